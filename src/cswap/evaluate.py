"""Before / after numbers: accuracy, params, MACs, CPU latency; validation of masked models."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from cswap.compensation import Compensation
from cswap.intervene import removed
from cswap.measure import count_macs, count_params, measure_latency, predict
from cswap.schedule import Validation
from cswap.units import UnitSpace


@dataclass(frozen=True)
class Evaluation:
    accuracy: float | None  # None when there is no data to evaluate on
    images: int
    params: int
    macs: int  # per image
    latency_ms: float | None  # batch of one, CPU, fixed threads (None: not measured here)
    per_class: dict[int, tuple[int, int]] = field(default_factory=dict)  # label: (right, all)

    def to_dict(self) -> dict:
        return asdict(self)


def per_class_counts(predictions: torch.Tensor, labels: torch.Tensor) -> dict[int, tuple[int, int]]:
    """{label: (images predicted right, images)} over the labels present."""
    right = predictions == labels
    return {
        int(label): (int(right[labels == label].sum()), int((labels == label).sum()))
        for label in torch.unique(labels)
    }


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None,
    example_input: torch.Tensor,
    *,
    device: str = "cpu",
    latency_threads: int = 1,
    latency: bool = True,
) -> Evaluation:
    """Accuracy (overall and per class) on ``batches`` (on ``device``), params, MACs and, with
    ``latency``, the CPU latency of one image."""
    accuracy, images, classes = None, 0, {}
    model.to(device)
    if batches is not None:
        predictions, labels = predict(model, batches, device)
        images = len(labels)
        accuracy = float((predictions == labels).float().mean()) if images else None
        classes = per_class_counts(predictions, labels) if images else {}
    cpu_model = model.to("cpu")
    example = example_input[:1].to("cpu")
    result = Evaluation(
        accuracy=accuracy,
        images=images,
        params=count_params(cpu_model),
        macs=count_macs(cpu_model, example),
        latency_ms=(
            measure_latency(cpu_model, example, threads=latency_threads) if latency else None
        ),
        per_class=classes,
    )
    model.to(device)
    return result


def paired_standard_error(
    reference: torch.Tensor, other: torch.Tensor, labels: torch.Tensor
) -> float:
    """sqrt(b + c) / n: the noise of an accuracy difference measured on the same images, b and c
    being the images only one of the two models gets right."""
    reference_right = reference == labels
    other_right = other == labels
    discordant = int((reference_right != other_right).sum())
    return math.sqrt(discordant) / max(1, len(labels))


def masked_validation(
    model: nn.Module,
    space: UnitSpace,
    units: Sequence[int],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    reference_predictions: torch.Tensor,
    *,
    device: str = "cpu",
    compensation: Compensation | None = None,
) -> Validation:
    """Validation accuracy of ``model`` with ``units`` removed (masked), and its paired noise."""
    with removed(model, space, units, compensation):
        predictions, labels = predict(model, batches, device)
    accuracy = float((predictions == labels).float().mean())
    return Validation(
        accuracy=accuracy,
        paired_se=paired_standard_error(reference_predictions, predictions, labels),
        images=len(labels),
    )


def unit_evidence(
    model: nn.Module,
    space: UnitSpace,
    units: Sequence[int],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    compensation: Compensation | None = None,
    device: str = "cpu",
    top: int = 4,
) -> dict[int, list[dict]]:
    """For each unit, the ``top`` images whose probability of their label fell most when the unit
    alone was removed (the intervention scoring measures), with the predictions before / after."""
    model.eval()
    intact = _probabilities(model, images, device)
    rows = torch.arange(len(labels))
    evidence = {}
    for unit in units:
        with removed(model, space, [unit], compensation):
            probabilities = _probabilities(model, images, device)
        drop = intact[rows, labels] - probabilities[rows, labels]
        order = torch.argsort(drop, descending=True)[:top]
        evidence[int(unit)] = [
            {
                "image": int(i),
                "label": int(labels[i]),
                "p_label_before": round(float(intact[i, labels[i]]), 4),
                "p_label_after": round(float(probabilities[i, labels[i]]), 4),
                "predicted_before": int(intact[i].argmax()),
                "predicted_after": int(probabilities[i].argmax()),
            }
            for i in order.tolist()
        ]
    return evidence


def _probabilities(model: nn.Module, images: torch.Tensor, device: str, batch: int = 256):
    with torch.no_grad():
        return torch.cat(
            [
                torch.softmax(model(images[i : i + batch].to(device)), dim=1).cpu()
                for i in range(0, len(images), batch)
            ]
        )
