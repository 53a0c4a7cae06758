"""Before / after numbers: accuracy, params, MACs, CPU latency; validation of masked models."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

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
    latency_ms: float  # batch of one, CPU, fixed threads

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None,
    example_input: torch.Tensor,
    *,
    device: str = "cpu",
    latency_threads: int = 1,
) -> Evaluation:
    """Accuracy on ``batches`` (on ``device``), params, MACs and CPU latency of one image."""
    accuracy, images = None, 0
    model.to(device)
    if batches is not None:
        predictions, labels = predict(model, batches, device)
        images = len(labels)
        accuracy = float((predictions == labels).float().mean()) if images else None
    cpu_model = model.to("cpu")
    example = example_input[:1].to("cpu")
    result = Evaluation(
        accuracy=accuracy,
        images=images,
        params=count_params(cpu_model),
        macs=count_macs(cpu_model, example),
        latency_ms=measure_latency(cpu_model, example, threads=latency_threads),
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
