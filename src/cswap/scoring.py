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
from cswap.intervene import removed
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

    @property
    def xi(self) -> np.ndarray:
        return self.relative_effects.mean(axis=1)


def _cut_layer(space: UnitSpace, unit_id: int, runner: SuffixRunner | None) -> str | None:
    """The unit's earliest consumer in the traced graph: everything before it is unchanged."""
    if runner is None:
        return None
    layers = [target.layer for target in space.units[unit_id].targets]
    if not layers or not all(runner.supports(layer) for layer in layers):
        return None
    return min(layers, key=lambda layer: runner.cut_index[layer])


def _true_class(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    probabilities = torch.softmax(logits, dim=1)
    return probabilities.gather(1, labels.view(-1, 1)).squeeze(1).cpu()


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
    compensation: Compensation | None = None,
    progress: Progress | None = None,
) -> CausalEffects:
    """Exact per-sample relative effects of removing each unit in ``units`` (default: all units
    not already removed), one intervention per forward pass over each calibration batch.

    ``compensation``: the interventions are the compensated ones (each unit replaced by its folded
    mean), so the effects describe what compensated pruning will do.
    ``prefix_reuse`` reruns only the layers from the unit's first consumer onward (exact: the same
    operations on the same values); models that cannot be traced fall back to full passes.
    """
    already = sorted(set(already_removed))
    if units is None:
        gone = set(already)
        units = [unit.id for unit in space.units if unit.id not in gone]
    units = list(units)
    was_training = model.training
    model.eval()
    runner = None
    if prefix_reuse and units:
        consumers = {t.layer for unit in units for t in space.units[unit].targets}
        runner = try_suffix_runner(model, consumers)
    cuts = [_cut_layer(space, unit, runner) for unit in units]
    baseline = np.empty(len(images), dtype=np.float64)
    intervened = np.empty((len(units), len(images)), dtype=np.float64)
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size].to(device)
                target = labels[start : start + batch_size].to(device)
                stop = start + len(batch)
                with removed(model, space, already, compensation):
                    if runner is not None:
                        logits, caches = runner.full(batch)
                    else:
                        logits, caches = model(batch), {}
                baseline[start:stop] = _true_class(logits, target).to(torch.float64).numpy()
                for row, (unit_id, cut) in enumerate(zip(units, cuts, strict=True)):
                    with removed(model, space, [*already, unit_id], compensation):
                        logits = model(batch) if cut is None else runner.run_from(cut, caches[cut])
                    intervened[row, start:stop] = (
                        _true_class(logits, target).to(torch.float64).numpy()
                    )
                    if progress is not None:
                        progress(len(batch) / len(images))
    finally:
        model.train(was_training)
    # A true-class probability that underflows to 0 would make r infinite.
    safe_baseline = np.maximum(baseline, np.finfo(np.float64).tiny)
    effects = (intervened - baseline) / safe_baseline
    return CausalEffects(
        unit_ids=np.asarray(units, dtype=np.int64),
        relative_effects=effects,
        labels=labels.numpy().astype(np.int64),
        baseline=baseline,
    )
