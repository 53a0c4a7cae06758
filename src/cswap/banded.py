"""A scoring round that spends exact passes only where the next cut can change (cswap.estimate).

1. Estimate every remaining unit's damage from its consumers' refits (no pass over the data;
   the output sensitivity that weights it is taken on the first stage's subsample, see 3).
2. Score exactly a few units per group, spread over the group's estimates, and the units that
   have no estimate; fit the estimate's per-group scale and its error to them (their means on
   the first stage's subsample, see 3).
3. Score exactly every unit whose estimated damage per cost is within exp(z * sd) of where the
   next ``horizon`` of the cost (parameters, or MACs for a MAC target) ends; the rest keep the
   scaled estimate. Exactly, in stages: first on a small stratified subsample of the images
   (``early_fraction`` of the next one, at least 8), then on a larger one (``sample_fraction``
   of all, at least 32), then on all; after each but the last, a unit whose mean so far is
   more than z of its standard errors from the (re-placed) edge keeps that mean; the others
   are scored on the next stage's images too, which makes the last ones' effects those of one
   full pass.
4. Categorize the fully scored units (the paper's test, unchanged) and add the others with
   category ``estimated``.

Falls back to scoring every unit exactly when no unit has an estimate (no lstsq refit).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from cswap.categorize import Categorization, CategoryConfig, categorize, with_estimates
from cswap.compensation import Compensation
from cswap.control import ControlVariate, fit_coefficients, second_order_proxy
from cswap.estimate import (
    BandConfig,
    calibration_sample,
    early_samples,
    exact_band,
    fit_scale,
    joint_damage,
    output_sensitivity,
    reconstruction_costs,
    sample_spread,
    split_samples,
)
from cswap.intervene import removed as intervention
from cswap.scoring import CausalEffects, join_effects, join_samples, remaining_units
from cswap.timings import stage
from cswap.units import UnitSpace

log = logging.getLogger("cswap")

Score = Callable[..., CausalEffects]  # causal_effects or a Ray backend's, with units=


@dataclass(frozen=True)
class BandedRound:
    categorization: Categorization
    exact: int  # units scored exactly
    estimated: int
    sd: float  # residual sd of the estimate (log scale); nan when not banded
    sampled: tuple[int, ...] = ()  # estimated units decided on a subsample of the images
    passes: float = math.nan  # exact passes spent, in units scored on every image


def banded_categorization(
    score: Score,
    model: nn.Module,
    space: UnitSpace,
    compensation: Compensation | None,
    already_removed: Sequence[int],
    *,
    images: torch.Tensor,
    labels: torch.Tensor,
    horizon: float | Sequence[float],
    cost_kind: str,
    band: BandConfig,
    category_config: CategoryConfig,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[float], None] | None = None,
    joint: bool = True,
) -> BandedRound:
    """The round's categorization with exact scoring inside the band only; ``horizon``: the
    cost (absolute, in ``cost_kind``) the schedule cuts before it ranks again, or several (each
    cut the ranking is to serve: the band is the union of their bands);
    ``score(units=..., images=..., labels=...)`` scores exactly (its model and scoring options
    bound by the caller); ``images``, ``labels``: the calibration data; ``joint``: add each
    unit's joint damage (``with_joint``)."""
    removed = sorted(set(already_removed))
    units = remaining_units(space, removed)
    if compensation is not None:
        compensation = compensation.with_base(model, space, removed)
    stages = _Stages(score, images, labels, band, seed, progress)
    sensitivity = _sensitivity(
        model, space, compensation, removed, units, stages.images_first, device, seed
    )
    costs = reconstruction_costs(space, compensation, units, sensitivity)
    if not costs:
        effects = score(units=units, images=images, labels=labels, progress=progress)
        categorization = categorize(effects, category_config)
        return BandedRound(categorization, len(units), 0, math.nan, passes=len(units))
    first_units = sorted(set(calibration_sample(space, costs, band.per_group)))
    first_units = sorted(first_units + [u for u in units if u not in costs])
    first = stages.first(first_units)  # on the subsample when there are two stages
    if band.control_variate:
        stages.control = _control_variate(
            model, space, compensation, removed, units, first, stages, device
        )
    sampled_first = dict(zip(first.unit_ids.tolist(), first.kl.mean(axis=1).tolist(), strict=True))
    fit = fit_scale(space, costs, sampled_first, band.min_sd)
    estimated = fit.damage(space, costs)
    horizons = (horizon,) if isinstance(horizon, int | float) else tuple(horizon)
    edge = _Edge(space, removed, cost_kind, horizons)
    inside = edge.band(estimated | sampled_first, math.exp(band.z * fit.sd), band.max_exact)
    rest = sorted(
        u for u in units if u not in sampled_first and (u in inside or u not in estimated)
    )
    log.info(
        "band: %d sampled units, then %d within x%.3g of the edge (estimate sd %.3f), "
        "first on %s of %d images",
        len(first_units),
        len(rest),
        math.exp(band.z * fit.sd),
        fit.sd,
        stages.describe(),
        len(labels),
    )
    parts, settled = [first], {}
    if rest:
        band_effects, settled = stages.band_units(rest, estimated | sampled_first, edge)
        parts += [band_effects] if len(band_effects.unit_ids) else []
    effects, sampled = stages.second(join_effects(parts), estimated | settled, edge)
    sampled |= settled
    effects = effects.subset(np.argsort(effects.unit_ids, kind="stable"))  # in unit order
    scored = set(effects.unit_ids.tolist())
    guesses = {u: sampled.get(u, estimated.get(u)) for u in units if u not in scored}
    if progress is not None:
        progress(len(guesses) - len(sampled))  # the sampled units were counted by stages
    categorization = with_estimates(categorize(effects, category_config), guesses)
    if joint:
        categorization = with_joint(
            categorization, model, space, compensation, removed, cost_kind, sensitivity
        )
    return BandedRound(
        categorization, len(scored), len(guesses), fit.sd, tuple(sorted(sampled)), stages.passes
    )


@dataclass(frozen=True)
class _Edge:
    """Where the next cut ends (or each of the cuts a ranking is to serve), for the band of a
    set of damage values: the union of the bands around every edge."""

    space: UnitSpace
    removed: list[int]
    cost_kind: str
    horizons: tuple[float, ...]

    def band(self, values: dict[int, float], spread, limit: int = 0) -> set[int]:
        costs = self.space.savings(self.removed, self.cost_kind)
        share = -(-limit // len(self.horizons)) if limit > 0 else 0  # the cap split evenly
        inside: set[int] = set()
        for horizon in self.horizons:  # counted in the same currency as the costs
            inside |= exact_band(values, costs, costs, horizon, spread, share)
        return inside


class _Stages:
    """Exact scoring in stages when the calibration set allows (BandConfig.sample_fraction):
    every unit on a subsample of the images first (the band's units on an early, smaller
    subsample of it before that, ``early_fraction``); each later stage scores on more images
    only the units whose place relative to the edge the images so far did not settle. With one
    stage the first is every image. ``passes``: spent so far, in units scored on every image."""

    def __init__(self, score, images, labels, band, seed, progress) -> None:
        self.score, self.images, self.labels, self.band = score, images, labels, band
        self.progress, self.seed = progress, seed
        self.control: ControlVariate | None = None  # set after the first stage
        self.rows = split_samples(labels.numpy(), band, seed)
        self.share = 1.0 if self.rows is None else len(self.rows) / len(labels)
        self.early = None  # positions within ``rows`` of the early stage's images
        if self.rows is not None:
            self.early = early_samples(labels.numpy()[self.rows], band, seed)
        self.passes = 0.0

    @property
    def images_first(self) -> torch.Tensor:
        """The first stage's images (also those the estimate's output sensitivity is taken on)."""
        return self.images if self.rows is None else self.images[torch.as_tensor(self.rows)]

    def describe(self) -> str:
        """The stages' image counts before the last, e.g. "8, then 32"."""
        if self.rows is None:
            return str(len(self.labels))
        early = f"{len(self.early)}, then " if self.early is not None else ""
        return f"{early}{len(self.rows)}"

    def first(self, units: Sequence[int]) -> CausalEffects:
        self.passes += len(units) * self.share
        return self._on(units, self.rows, self.share)

    def band_units(self, units, values, edge) -> tuple[CausalEffects, dict]:
        """(effects on the first stage's images of the ``units`` the early stage did not
        settle, {unit: early mean KL} of those it did); ``values`` place the edge."""
        if self.early is None:
            return self.first(units), {}
        total = len(self.labels)
        early_share = len(self.early) / total
        self.passes += len(units) * early_share
        early = self._on(units, self.rows[self.early], early_share)
        kept, settled = self._settle(early, values, edge, self.rows[self.early])
        if self.progress is not None:
            self.progress(len(settled) * (1 - early_share))
        later = np.setdiff1d(np.arange(len(self.rows)), self.early)
        later_share = len(later) / total
        self.passes += len(kept) * later_share
        if not kept:
            return early.subset(np.array([], dtype=np.int64)), settled
        more = self._on(kept, self.rows[later], later_share)
        return join_samples([(more, later), (early, self.early)]), settled

    def second(self, partial: CausalEffects, values, edge) -> tuple[CausalEffects, dict]:
        """(effects of the units scored on every image, {unit: subsample mean KL} of the units
        decided on the subsample); ``values``: the other units' damage, which places the edge
        with the subsample means."""
        if self.rows is None:
            return partial, {}
        kept, sampled = self._settle(partial, values, edge, self.rows)
        if self.progress is not None:
            self.progress(len(sampled) * (1 - self.share))
        self.passes += len(kept) * (1 - self.share)
        if not kept:
            return partial.subset(np.array([], dtype=np.int64)), sampled
        other = np.setdiff1d(np.arange(len(self.labels)), self.rows)
        second = self._on(kept, other, 1 - self.share)
        return join_samples([(second, other), (partial, self.rows)]), sampled

    @property
    def first_columns(self) -> np.ndarray:
        """The calibration images of the first stage."""
        return np.arange(len(self.labels)) if self.rows is None else self.rows

    def _settle(self, partial: CausalEffects, values, edge, columns) -> tuple[list[int], dict]:
        """(units still within z standard errors of the edge, {unit: mean KL so far} of the
        others): the edge placed by ``values`` with these units' means; ``columns``: the
        images ``partial`` was measured on (the control variate's correction needs them)."""
        ids = partial.unit_ids.tolist()
        kl = partial.kl
        if self.control is not None:
            kl = self.control.adjusted(ids, kl, columns)
        means = kl.mean(axis=1).tolist()
        spreads = sample_spread(kl, len(self.labels), self.band).tolist()
        spread = dict(zip(ids, spreads, strict=True))
        inside = edge.band(values | dict(zip(ids, means, strict=True)), spread)
        kept = [unit for unit in ids if unit in inside]
        return kept, {u: m for u, m in zip(ids, means, strict=True) if u not in inside}

    def _on(self, units, rows, share) -> CausalEffects:
        """Exact effects of ``units`` on the calibration ``rows`` (None: all of them)."""
        progress = self.progress
        if progress is not None and share < 1:
            progress = functools.partial(_scaled, progress, share)
        if rows is None:
            images, labels = self.images, self.labels
            return self.score(units=units, images=images, labels=labels, progress=progress)
        picked = torch.as_tensor(rows)
        return self.score(
            units=units, images=self.images[picked], labels=self.labels[picked], progress=progress
        )


def _scaled(progress: Callable[[float], None], share: float, amount: float) -> None:
    progress(amount * share)


def _sensitivity(model, space, compensation, removed, units, images, device, seed):
    """Output sensitivity of the consumers of ``units`` on the model as it stands (``removed``
    gone, compensated); {} without a refit (it would weigh no estimate)."""
    if compensation is None or not (compensation.bases or compensation.mean_bases):
        return {}  # the sensitivity pass would be wasted
    layers = sorted({t.layer for unit in units for t in space.units[unit].targets})
    was_training = model.training
    model.eval()
    try:
        with stage("output sensitivity"), intervention(model, space, removed, compensation):
            return output_sensitivity(model, layers, images, device=device, seed=seed)
    finally:
        model.train(was_training)


def _control_variate(model, space, compensation, removed, units, first, stages, device):
    """The staged scoring's control variate (cswap.control) for the units whose every consumer
    is mean-folded (or uncompensated): the proxy on every calibration image, its coefficients
    checked on the pilot units' first stage; None with one stage (nothing is decided on a
    subsample) or no such unit."""
    folded = [u for u in units if not _refitted(space, compensation, u)]
    if stages.rows is None or not folded:
        return None
    was_training = model.training
    model.eval()
    try:
        with stage("control variate"), intervention(model, space, removed, compensation):
            proxy = second_order_proxy(
                model,
                space,
                folded,
                stages.images,
                means=None if compensation is None else compensation.means,
                device=device,
                seed=stages.seed,
            )
    finally:
        model.train(was_training)
    index = {unit: row for row, unit in enumerate(folded)}
    coefficients = fit_coefficients(
        space, index, proxy, first.unit_ids.tolist(), first.kl, stages.first_columns
    )
    return ControlVariate(index, proxy, coefficients)


def _refitted(space: UnitSpace, compensation: Compensation | None, unit: int) -> bool:
    """Whether some consumer of ``unit`` is refitted by lstsq (its removal is then not the mean
    fold the control variate's proxy expands)."""
    if compensation is None:
        return False
    return any(compensation.refits(target.layer) for target in space.units[unit].targets)


def with_joint(
    categorization: Categorization,
    model: nn.Module,
    space: UnitSpace,
    compensation: Compensation | None,
    removed: Sequence[int],
    cost_kind: str,
    sensitivity: dict[str, torch.Tensor] | None = None,
    *,
    images: torch.Tensor | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> Categorization:
    """``categorization`` with each unit's joint damage (cswap.estimate.joint_damage) where its
    consumers have an estimate; unchanged without lstsq. ``sensitivity``: the round's output
    sensitivity, else taken on ``images`` (a round scored exactly)."""
    if compensation is None or not compensation.estimates:
        return categorization
    removed = sorted(set(removed))
    compensation = compensation.with_base(model, space, removed)
    ids = categorization.unit_ids.tolist()
    if sensitivity is None:
        sensitivity = _sensitivity(model, space, compensation, removed, ids, images, device, seed)
    kl = dict(zip(ids, categorization.kl.tolist(), strict=True))
    with stage("joint damage"):
        joint = joint_damage(
            space, compensation, kl, space.savings(removed, cost_kind), sensitivity
        )
    values = np.asarray([joint.get(u, math.nan) for u in ids], dtype=np.float64)
    return replace(categorization, joint=values)
