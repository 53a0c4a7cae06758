"""A scoring round that spends exact passes only where the next cut can change (cswap.estimate).

1. Estimate every remaining unit's damage from its consumers' refits (no pass over the data).
2. Score exactly a few units per group, spread over the group's estimates, and the units that
   have no estimate; fit the estimate's per-group scale and its error to them.
3. Score exactly every unit whose estimated damage per cost is within exp(z * sd) of where the
   next ``horizon`` of the parameters ends; the rest keep the scaled estimate.
4. Categorize the exactly scored units (the paper's test, unchanged) and add the others with
   category ``estimated``.

Falls back to scoring every unit exactly when no unit has an estimate (no lstsq refit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cswap.categorize import Categorization, CategoryConfig, categorize, with_estimates
from cswap.compensation import Compensation
from cswap.estimate import (
    BandConfig,
    calibration_sample,
    exact_band,
    fit_scale,
    output_sensitivity,
    reconstruction_costs,
)
from cswap.intervene import removed as intervention
from cswap.scoring import CausalEffects, join_effects, remaining_units
from cswap.units import UnitSpace

Score = Callable[..., CausalEffects]  # causal_effects or a Ray backend's, with units=


@dataclass(frozen=True)
class BandedRound:
    categorization: Categorization
    exact: int  # units scored exactly
    estimated: int
    sd: float  # residual sd of the estimate (log scale); nan when not banded


def banded_categorization(
    score: Score,
    model: nn.Module,
    space: UnitSpace,
    compensation: Compensation | None,
    already_removed: Sequence[int],
    *,
    images: torch.Tensor,
    horizon: float,
    cost_kind: str,
    band: BandConfig,
    category_config: CategoryConfig,
    device: str = "cpu",
    progress: Callable[[float], None] | None = None,
) -> BandedRound:
    """The round's categorization with exact scoring inside the band only; ``horizon``: the
    parameters (absolute) the schedule cuts before it ranks again; ``score(units=...)`` scores
    exactly (its model, data and scoring options bound by the caller); ``images``: the
    calibration images (for the output sensitivity)."""
    removed = sorted(set(already_removed))
    units = remaining_units(space, removed)
    if compensation is not None:
        compensation = compensation.with_base(model, space, removed)
    costs = _estimates(model, space, compensation, removed, units, images, device)
    if not costs:
        effects = score(units=units, progress=progress)
        return BandedRound(categorize(effects, category_config), len(units), 0, math.nan)
    first_units = sorted(set(calibration_sample(space, costs, band.per_group)))
    first_units += [u for u in units if u not in costs]
    first = score(units=sorted(first_units), progress=progress)
    exact = dict(zip(first.unit_ids.tolist(), first.kl.mean(axis=1).tolist(), strict=True))
    fit = fit_scale(space, costs, exact, band.min_sd)
    estimated = fit.damage(space, costs)
    values = estimated | exact
    inside = exact_band(
        values,
        space.savings(removed, cost_kind),
        space.savings(removed, "params"),
        horizon,
        math.exp(band.z * fit.sd),
        band.max_exact,
    )
    rest = sorted(u for u in units if u not in exact and (u in inside or u not in values))
    parts = [first] + ([score(units=rest, progress=progress)] if rest else [])
    effects = join_effects(parts)
    effects = effects.subset(np.argsort(effects.unit_ids, kind="stable"))  # in unit order
    scored = set(effects.unit_ids.tolist())
    guesses = {u: estimated[u] for u in units if u not in scored}
    if progress is not None and guesses:
        progress(len(guesses))
    categorization = with_estimates(categorize(effects, category_config), guesses)
    return BandedRound(categorization, len(scored), len(guesses), fit.sd)


def _estimates(model, space, compensation, removed, units, images, device) -> dict[int, float]:
    """Sensitivity-weighted reconstruction costs on the model as it stands (``removed`` gone,
    compensated); {} without a refit (no unit then has an estimate, see reconstruction_costs)."""
    if compensation is None or not compensation.bases:
        return {}  # the sensitivity pass would be wasted
    layers = sorted({t.layer for unit in units for t in space.units[unit].targets})
    was_training = model.training
    model.eval()
    try:
        with intervention(model, space, removed, compensation):
            sensitivity = output_sensitivity(model, layers, images, device=device)
    finally:
        model.train(was_training)
    return reconstruction_costs(space, compensation, units, sensitivity)
