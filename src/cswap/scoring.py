"""Causal effects of units on the model's predictions (METHOD.md section 3).

sigma(x) = softmax(f(x))[y], the probability of the true class y (or, label-free, of the unpruned
model's own top-1). For a unit u, sigma*_u(x) is the same with u removed (an exact intervention),
and r_u(x) = (sigma*_u(x) - sigma(x)) / sigma(x) its per-sample relative effect. The global causal
effect xi_u is the mean of r_u over the calibration set: xi > 0 means removing u helps the true
class (u is harmful), xi < 0 that u helps.

Scoring can start from a model that already has units removed (``already_removed``): effects are
then relative to that model, which is how the progressive schedule re-scores as units go.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cswap.compensation import Compensation
from cswap.intervene import BaseRemoval, removed_each
from cswap.suffix import SuffixRunner, try_suffix_runner
from cswap.units import UnitSpace

Progress = Callable[[float], None]


@dataclass(frozen=True)
class CausalEffects:
    """r for every scored unit (rows) and calibration sample (columns)."""

    unit_ids: np.ndarray
    relative_effects: np.ndarray
    labels: np.ndarray
    baseline: np.ndarray  # sigma(x) of the model the effects are relative to
    # the same interventions measured without saturation (ranking): change of the true-class
    # log-probability, and KL(intact || intervened) of the predictive distributions
    log_ratio: np.ndarray | None = None
    kl: np.ndarray | None = None

    @property
    def xi(self) -> np.ndarray:
        return self.relative_effects.mean(axis=1)

    def subset(self, rows: np.ndarray) -> CausalEffects:
        """The effects of the units at ``rows`` only."""
        return CausalEffects(
            unit_ids=self.unit_ids[rows],
            relative_effects=self.relative_effects[rows],
            labels=self.labels,
            baseline=self.baseline,
            log_ratio=None if self.log_ratio is None else self.log_ratio[rows],
            kl=None if self.kl is None else self.kl[rows],
        )


def join_effects(parts: list[CausalEffects]) -> CausalEffects:
    """The effects of several disjoint sets of units (same samples, same baseline), in order."""
    first = parts[0]

    def stacked(name):
        values = [getattr(part, name) for part in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    return CausalEffects(
        unit_ids=np.concatenate([part.unit_ids for part in parts]),
        relative_effects=np.concatenate([part.relative_effects for part in parts]),
        labels=first.labels,
        baseline=first.baseline,
        log_ratio=stacked("log_ratio"),
        kl=stacked("kl"),
    )


def join_samples(parts: list[tuple[CausalEffects, np.ndarray]]) -> CausalEffects:
    """The effects of the same units measured on disjoint sets of calibration rows (each part
    with its rows, together every row once), as one measurement in row order. Parts may list
    more units than the first: rows follow the first part's units."""
    units = parts[0][0].unit_ids
    total = sum(len(columns) for _, columns in parts)
    names = ("relative_effects", "log_ratio", "kl")
    merged = {name: np.empty((len(units), total)) for name in names}
    labels, baseline = np.empty(total, dtype=np.int64), np.empty(total)
    for effects, columns in parts:
        position = {unit: row for row, unit in enumerate(effects.unit_ids.tolist())}
        rows = np.array([position[unit] for unit in units.tolist()], dtype=np.int64)
        for name in names:
            merged[name][:, columns] = getattr(effects, name)[rows]
        labels[columns], baseline[columns] = effects.labels, effects.baseline
    return CausalEffects(unit_ids=units, labels=labels, baseline=baseline, **merged)


def _cut_layer(space: UnitSpace, unit_id: int, runner: SuffixRunner | None) -> str | None:
    """The unit's earliest consumer in the traced graph: everything before it is unchanged."""
    if runner is None:
        return None
    layers = list(space.units[unit_id].touched)
    if not layers or not all(runner.supports(layer) for layer in layers):
        return None
    return min(layers, key=lambda layer: runner.cut_index[layer])


def _log_probabilities(logits: torch.Tensor) -> np.ndarray:
    return torch.log_softmax(logits.to(torch.float64), dim=1).cpu().numpy()


class _Outcomes:
    """Per unit and sample: the true-class probability, its log-ratio to the intact model and
    the KL divergence of the predictive distributions, filled batch by batch."""

    def __init__(self, units: int, samples: int, labels: np.ndarray) -> None:
        self.labels = labels
        self.baseline_log = np.empty(samples, dtype=np.float64)
        self.intervened_log = np.empty((units, samples), dtype=np.float64)
        self.kl = np.empty((units, samples), dtype=np.float64)
        self.reference: np.ndarray | None = None  # log-probabilities of the current batch

    def set_baseline(self, start: int, logits: torch.Tensor) -> None:
        self.reference = _log_probabilities(logits)
        rows = np.arange(len(self.reference))
        self.baseline_log[start : start + len(rows)] = self.reference[
            rows, self.labels[start : start + len(rows)]
        ]

    def add(self, row: int, start: int, logits: torch.Tensor) -> None:
        log_p = _log_probabilities(logits)
        size = len(log_p)
        labels = self.labels[start : start + size]
        self.intervened_log[row, start : start + size] = log_p[np.arange(size), labels]
        reference = self.reference
        self.kl[row, start : start + size] = (np.exp(reference) * (reference - log_p)).sum(1)

    def effects(self, units: list[int]) -> CausalEffects:
        baseline = np.exp(self.baseline_log)
        # A true-class probability that underflows to 0 would make r infinite.
        safe_baseline = np.maximum(baseline, np.finfo(np.float64).tiny)
        effects = (np.exp(self.intervened_log) - baseline) / safe_baseline
        return CausalEffects(
            unit_ids=np.asarray(units, dtype=np.int64),
            relative_effects=effects,
            labels=self.labels,
            baseline=baseline,
            log_ratio=self.intervened_log - self.baseline_log,
            kl=np.maximum(self.kl, 0.0),
        )


class _ActivationMeter:
    """Counts the output elements of every leaf module in a forward pass: an upper bound of the
    activation memory a pass needs (not all of them are alive at once)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.elements = 0
        self.handles = []

    def _count(self, _module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            self.elements += output.numel()

    def __enter__(self):
        self.handles = [
            module.register_forward_hook(self._count)
            for module in self.model.modules()
            if not list(module.children())
        ]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False


def _repeat(value, copies: int, batch: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    return value


def _intervene(model, space, runner, units, base, rows, cut, batch, caches, compensation):
    """(row, logits) for every unit row in ``rows``: one pass for all of them when batching
    applies, else one pass each; ``base``: the open removal of the units already removed."""
    k, size = len(rows), len(batch)
    # batching through a cached suffix needs every batch-carrying value to be recognisable
    if k > 1 and (cut is None or size > 1):
        chunk = [units[row] for row in rows]
        with base.suspended(), removed_each(model, space, base.units, chunk, compensation):
            if cut is None:
                logits = model(batch.repeat(k, *([1] * (batch.dim() - 1))))
            else:
                cache = {node: _repeat(value, k, size) for node, value in caches[cut].items()}
                logits = runner.run_from(cut, cache)
        if logits.shape[0] == k * size:
            return [(row, logits[i * size : (i + 1) * size]) for i, row in enumerate(rows)]
    results = []
    for row in rows:
        with base.plus(units[row]):
            logits = model(batch) if cut is None else runner.run_from(cut, caches[cut])
        results.append((row, logits))
    return results


def _batch_interventions(
    model, space, runner, units, base, by_cut, per_pass, batch, caches, compensation
):
    """(row, logits) of every unit on one calibration batch, ``per_pass`` units per pass, the
    units of one cut layer together (they share its cached prefix)."""
    for cut, rows in by_cut.items():
        for first in range(0, len(rows), per_pass):
            chunk = rows[first : first + per_pass]
            yield from _intervene(
                model, space, runner, units, base, chunk, cut, batch, caches, compensation
            )


def remaining_units(space: UnitSpace, already_removed: Sequence[int]) -> list[int]:
    """Every unit of ``space`` not in ``already_removed``, in id order."""
    gone = set(already_removed)
    return [unit.id for unit in space.units if unit.id not in gone]


def causal_effects(
    model: nn.Module,
    space: UnitSpace,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    units: Sequence[int] | None = None,
    already_removed: Sequence[int] = (),
    batch_size: int = 256,
    device: str = "cpu",
    prefix_reuse: bool = True,
    units_per_pass: int | None = None,
    memory_budget_mb: float = 1024.0,
    compensation: Compensation | None = None,
    progress: Progress | None = None,
) -> CausalEffects:
    """Exact per-sample relative effects of removing each unit in ``units`` (default: all units
    not already removed), one intervention per forward pass over each calibration batch.

    ``compensation``: the interventions are the compensated ones (mean fold or lstsq refit, under
    ``already_removed`` too), so the effects describe what compensated pruning will do.
    ``prefix_reuse`` reruns only the layers from the unit's first consumer onward (exact: the same
    operations on the same values); models that cannot be traced fall back to full passes.
    ``units_per_pass`` interventions share one forward pass (the batch stacked once per unit,
    each copy with its own masks; exact); 0 picks as many as fit ``memory_budget_mb`` by an
    upper bound of the activations one image needs (capped at 64); 1 is one unit per pass;
    ``None`` (auto) is 1 on the CPU, where stacking copies measured slower than one pass per
    unit (``cswap bench-speed``: the pass is already compute-bound), and 0 on accelerators.
    """
    if units_per_pass is not None and units_per_pass < 0:
        raise ValueError(f"units_per_pass must be >= 0 or None, got {units_per_pass}.")
    already = sorted(set(already_removed))
    units = remaining_units(space, already) if units is None else list(units)
    was_training = model.training
    model.eval()
    runner = None
    if prefix_reuse and units:
        touched = {layer for unit in units for layer in space.units[unit].touched}
        runner = try_suffix_runner(model, touched, images[:1].to(device))
    cuts = [_cut_layer(space, unit, runner) for unit in units]
    by_cut: dict[str | None, list[int]] = {}
    for row, cut in enumerate(cuts):
        by_cut.setdefault(cut, []).append(row)
    outcomes = _Outcomes(len(units), len(images), labels.numpy().astype(np.int64))
    if compensation is not None:
        compensation = compensation.with_base(model, space, already)
    per_pass = units_per_pass
    if per_pass is None:
        per_pass = 1 if torch.device(device).type == "cpu" else 0
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size].to(device)
                with BaseRemoval(model, space, already, compensation) as base:
                    with _ActivationMeter(model) as meter:
                        if runner is not None:
                            logits, caches = runner.full(batch)
                        else:
                            logits, caches = model(batch), {}
                    if per_pass == 0:
                        per_image = max(1, meter.elements // len(batch)) * batch.element_size()
                        per_pass = int(memory_budget_mb * 2**20 // (per_image * len(batch)))
                        per_pass = max(1, min(64, per_pass))
                    outcomes.set_baseline(start, logits)
                    for row, intervened in _batch_interventions(
                        model, space, runner, units, base, by_cut, per_pass, batch, caches,
                        compensation,
                    ):  # fmt: skip
                        outcomes.add(row, start, intervened)
                        if progress is not None:
                            progress(len(batch) / len(images))
    finally:
        model.train(was_training)
    return outcomes.effects(units)
