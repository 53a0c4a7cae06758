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

from cswap.intervene import removed
from cswap.units import UnitSpace

Progress = Callable[[int], None]


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


@torch.no_grad()
def true_class_probability(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: str
) -> torch.Tensor:
    """softmax(model(x))[y] for every sample, computed in ``images``' dtype."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        probabilities = torch.softmax(model(batch), dim=1)
        target = labels[start : start + batch_size].to(device)
        out.append(probabilities.gather(1, target.view(-1, 1)).squeeze(1).cpu())
    return torch.cat(out)


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
    progress: Progress | None = None,
) -> CausalEffects:
    """Exact per-sample relative effects of removing each unit in ``units`` (default: all units
    not already removed), one intervention per forward pass over the calibration batches."""
    already = sorted(set(already_removed))
    if units is None:
        gone = set(already)
        units = [unit.id for unit in space.units if unit.id not in gone]
    was_training = model.training
    model.eval()
    try:
        with removed(model, space, already):
            baseline = true_class_probability(model, images, labels, batch_size, device)
        baseline = baseline.to(torch.float64).numpy()
        effects = np.empty((len(units), len(images)), dtype=np.float64)
        for row, unit_id in enumerate(units):
            with removed(model, space, [*already, unit_id]):
                intervened = true_class_probability(model, images, labels, batch_size, device)
            effects[row] = (intervened.to(torch.float64).numpy() - baseline) / baseline
            if progress is not None:
                progress(1)
    finally:
        model.train(was_training)
    return CausalEffects(
        unit_ids=np.asarray(units, dtype=np.int64),
        relative_effects=effects,
        labels=labels.numpy().astype(np.int64),
        baseline=baseline,
    )
