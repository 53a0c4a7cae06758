"""A cheap estimate of every unit's damage, and the band of units that need exact scoring.

Exact causal scoring runs the network once per unit and calibration batch. Most of those passes
cannot change a decision: a scoring round only serves the cut the schedule makes next (at most
``rescore_every`` of the parameters before it ranks again), and a unit whose damage per
parameter is far above that cut is not removed whatever its exact value.

The estimate: under the lstsq refit, removing a unit moves each of its consumers' refits in
closed form, and the growth of the refit's objective is the consumer's added squared output
error on the calibration inputs (``RefitBasis.removal_cost``), with no pass over the data. How
much of that error reaches the predictions differs between layers, so the estimate is scaled
per group from a few exactly scored units of the group (spread over its estimates), and the
spread of those exact values around the scaled estimate (log scale) bounds its error.

The band: order the units by estimated damage per unit of cost, find the estimate at which the
cheapest ``horizon`` of the parameters ends, and score exactly every unit whose estimate lies
below that point times exp(z * sd); the others keep the estimate (category ``estimated`` in the
report). Measured on zoo:resnet20 (docs/benchmarks.md): z = 2 scores 39-45% of the units and the
one-shot cuts agree with exact ones at Jaccard 0.94-0.97.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from cswap.compensation import Compensation
from cswap.units import UnitSpace


@dataclass(frozen=True)
class BandConfig:
    """``z``: the band's half-width in residual sd of the estimate (log scale); ``per_group``:
    units per group scored exactly to fit the estimate's scale; ``min_sd``: a floor on that sd
    (a few units per group can agree by chance)."""

    z: float = 2.0
    per_group: int = 4
    min_sd: float = 0.25

    def __post_init__(self) -> None:
        if self.z <= 0 or self.per_group < 2 or self.min_sd < 0:
            raise ValueError("band needs z > 0, per_group >= 2 and min_sd >= 0.")


@dataclass(frozen=True)
class EstimateFit:
    """Per group, log(exact KL / reconstruction cost) of its sampled units, and the pooled sd of
    the sampled units' log residuals around their group's scale."""

    log_scale: dict[int, float]
    sd: float

    def damage(self, space: UnitSpace, costs: dict[int, float]) -> dict[int, float]:
        """Estimated KL of each unit in ``costs`` whose group has a scale."""
        return {
            unit: cost * math.exp(self.log_scale[space.units[unit].group])
            for unit, cost in costs.items()
            if space.units[unit].group in self.log_scale
        }


def reconstruction_costs(
    model: nn.Module, space: UnitSpace, compensation: Compensation | None, units: Sequence[int]
) -> dict[int, float]:
    """Per unit of ``units``: the summed added output error of its consumers under the refit
    (``compensation`` already holds the bases of the current removal, ``with_base``). Units
    with a consumer that is not refitted (mean fallback, no lstsq) get no estimate."""
    if compensation is None or not compensation.bases:
        return {}
    found = {}
    for unit in units:
        targets = space.units[unit].targets
        if not targets or not all(compensation.refits(t.layer) for t in targets):
            continue
        bases = [compensation.bases.get(t.layer) for t in targets]
        if any(basis is None for basis in bases):
            continue
        found[unit] = sum(
            basis[1].removal_cost(t.indices) for basis, t in zip(bases, targets, strict=True)
        )
    return found


def calibration_sample(space: UnitSpace, costs: dict[int, float], per_group: int) -> list[int]:
    """Per group, ``per_group`` units spread evenly over the group's sorted estimates (its
    cheapest and costliest included), or all of them when the group is that small."""
    by_group: dict[int, list[int]] = {}
    for unit in costs:
        by_group.setdefault(space.units[unit].group, []).append(unit)
    chosen = []
    for units in by_group.values():
        units.sort(key=lambda u: (costs[u], u))
        if len(units) <= per_group:
            chosen.extend(units)
            continue
        picks = np.unique(np.round(np.linspace(0, len(units) - 1, per_group)).astype(int))
        chosen.extend(units[i] for i in picks)
    return sorted(chosen)


def fit_scale(
    space: UnitSpace, costs: dict[int, float], exact: dict[int, float], min_sd: float
) -> EstimateFit:
    """The per-group scale of the estimate and its residual sd from exactly scored units. Units
    whose estimate or exact damage is about 0 (dead units) carry no scale information."""
    residuals: dict[int, list[float]] = {}
    for unit, value in exact.items():
        cost = costs.get(unit)
        if cost is None or cost <= 1e-30 or value <= 1e-30:
            continue
        residuals.setdefault(space.units[unit].group, []).append(math.log(value / cost))
    log_scale = {group: float(np.mean(values)) for group, values in residuals.items()}
    deviations = [v - log_scale[g] for g, values in residuals.items() for v in values]
    free = len(deviations) - len(log_scale)
    sd = math.sqrt(sum(d * d for d in deviations) / free) if free > 0 else math.inf
    return EstimateFit(log_scale=log_scale, sd=max(sd, min_sd))


def exact_band(
    estimated: dict[int, float],
    per_cost: dict[int, float],
    params: dict[int, float],
    horizon: float,
    spread: float,
) -> set[int]:
    """Units whose estimated damage per cost lies within ``spread`` (a factor, exp(z * sd)) of
    the point where the cheapest ``horizon`` parameters (by ``params``, what each unit's removal
    saves) end, in the order of the estimate divided by ``per_cost``."""
    keys = {u: (v / per_cost[u] if per_cost[u] > 0 else math.inf) for u, v in estimated.items()}
    order = sorted(keys, key=lambda u: (keys[u], u))
    total, edge = 0.0, math.inf
    for unit in order:
        total += params[unit]
        if total >= horizon:
            edge = keys[unit]
            break
    return {u for u in order if keys[u] <= edge * spread}
