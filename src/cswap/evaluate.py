"""Before / after numbers: accuracy, params, MACs, CPU latency; validation of masked models."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from cswap.compensation import Compensation
from cswap.intervene import removed
from cswap.measure import count_macs, count_params, measure_latency, predict
from cswap.schedule import Validation
from cswap.suffix import try_suffix_runner
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
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    reference_predictions: torch.Tensor,
    *,
    device: str = "cpu",
    compensation: Compensation | None = None,
    threshold: float | None = None,
    prefix: ValidationPrefix | None = None,
) -> Validation:
    """Validation accuracy of ``model`` with ``units`` removed (masked), and its paired noise.

    ``threshold``: stop after the first batch from which the accuracy can no longer reach it
    even if every remaining image comes out right (the verdict is the full validation's; the
    accuracy is then that bound, ``complete`` False). ``prefix``: reuse the accepted model's
    activations before the layers the step changes (``ValidationPrefix``; exact)."""
    total = sum(len(labels) for _, labels in batches)
    correct, seen, predictions = 0, 0, []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), removed(model, space, units, compensation):
            step = prefix.step(units) if prefix is not None else None
            for index, (images, labels) in enumerate(batches):
                logits = model(images.to(device)) if step is None else step(index, images)
                predictions.append(logits.argmax(dim=1).cpu())
                correct += int((predictions[-1] == torch.as_tensor(labels).cpu()).sum())
                seen += len(labels)
                if threshold is not None and (correct + total - seen) / total < threshold:
                    break
    finally:
        model.train(was_training)
    predicted = torch.cat(predictions)
    labels = torch.cat([torch.as_tensor(labels).cpu() for _, labels in batches])[:seen]
    return Validation(
        accuracy=(correct + total - seen) / total,
        paired_se=paired_standard_error(reference_predictions[:seen], predicted, labels),
        images=seen,
        complete=seen == total,
    )


@torch.no_grad()
def output_divergence(
    model: nn.Module,
    space: UnitSpace,
    units: Sequence[int],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    compensations: Sequence[Compensation | None],
    *,
    device: str = "cpu",
) -> list[float]:
    """Mean KL divergence, over the images of ``batches``, from the unpruned model's softmax
    to the model with ``units`` removed under each of ``compensations`` (one value each): a
    continuous measure of how far each removal moves the outputs, far less noisy on a small
    validation set than the share of predictions kept."""
    totals = [0.0] * len(compensations)
    count = 0
    was_training = model.training
    model.eval()
    try:
        for images, _labels in batches:
            images = images.to(device)
            reference = torch.log_softmax(model(images).double(), dim=1)
            for position, compensation in enumerate(compensations):
                with removed(model, space, units, compensation):
                    logp = torch.log_softmax(model(images).double(), dim=1)
                kl = (reference.exp() * (reference - logp)).sum(1)
                totals[position] += float(kl.sum())
            count += len(images)
    finally:
        model.train(was_training)
    return [total / max(count, 1) for total in totals]


class ValidationPrefix:
    """The validation images' activations before one cut layer, kept from a step's own full
    passes and reused by later steps that change nothing before that layer.

    A step's masked model computes the same values as any other removal up to a layer L when
    both remove the same units among those consumed before L (their refits and masks sit before
    L; everything else acts from L on). So an entry is (L, those units, per-batch caches), and
    a step may run from L when its own units consumed before L are exactly those. A new entry is
    placed at the shallowest layer the step changes relative to the last step that passed (the
    accepted model, as the schedule accepts it), so the next trials from that model hit it; an
    entry built from an earlier accepted model gives way to a deeper one.
    Entries larger than ``budget_mb`` are not kept."""

    def __init__(self, model, space, batches, *, budget_mb: float = 1024.0) -> None:
        layers = {layer for unit in space.units for layer in unit.touched}
        self.runner = try_suffix_runner(model, layers, batches[0][0][:1]) if batches else None
        self.budget = budget_mb * 2**20
        self.first = {unit.id: self._first(unit) for unit in space.units}
        self.accepted: tuple[int, ...] = ()
        self.entry: _Entry | None = None
        self.hits = 0  # batches run from a cached cut

    def _first(self, unit) -> int:
        """Position of the unit's first consumer in the runner's order (-1: not a cut)."""
        if self.runner is None or not unit.touched:
            return -1
        if not all(self.runner.supports(layer) for layer in unit.touched):
            return -1
        return min(self.runner.cut_index[layer] for layer in unit.touched)

    def _before(self, units, layer: str) -> frozenset[int]:
        cut = self.runner.cut_index[layer]
        return frozenset(u for u in units if self.first[u] < cut)

    def step(self, units: Sequence[int]):
        """``run(index, images) -> logits`` for this step's masked model (masks applied by the
        caller), or None when the prefix cannot be reused."""
        if self.runner is None:
            return None
        changed = set(units) ^ set(self.accepted)
        positions = [self.first[u] for u in changed]
        if positions and min(positions) < 0:
            return None  # the step changes a layer that is not a cut: nothing to reuse
        entry = self.entry
        if entry is not None and self._before(units, entry.layer) == entry.units:
            deeper = positions and min(positions) > self.runner.cut_index[entry.layer]
            if entry.base == self.accepted or not deeper:
                return functools.partial(self._run, entry)
        if not positions:
            return None
        layer = next(n for n, c in self.runner.cut_index.items() if c == min(positions))
        self.entry = _Entry(layer, self._before(units, layer), self.accepted, {})
        return functools.partial(self._run, self.entry)

    def _run(self, entry: _Entry, index: int, images: torch.Tensor) -> torch.Tensor:
        if index in entry.caches:
            self.hits += 1
            return self.runner.run_from(entry.layer, entry.caches[index])
        logits, caches = self.runner.full(images, [entry.layer])
        kept = caches[entry.layer]
        if _nbytes(kept) * (index + 1) <= self.budget:
            entry.caches[index] = kept
        return logits

    def record(self, units: Sequence[int], validation: Validation, threshold: float) -> None:
        """The schedule accepts a step whose accuracy reaches ``threshold``: that model is the
        one the next steps extend."""
        if validation.complete and validation.accuracy >= threshold:
            self.accepted = tuple(units)


@dataclass(frozen=True)
class _Entry:
    """Per validation batch, the values from which ``layer`` onward can be rerun, valid for the
    removals whose units consumed before ``layer`` are ``units``; built from ``base``."""

    layer: str
    units: frozenset[int]
    base: tuple[int, ...]
    caches: dict[int, dict]


def _nbytes(cache: dict) -> int:
    return sum(v.numel() * v.element_size() for v in cache.values() if isinstance(v, torch.Tensor))


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
