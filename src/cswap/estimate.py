"""A cheap estimate of every unit's damage, and the band of units that need exact scoring.

Exact causal scoring runs the network once per unit and calibration batch. Most of those passes
cannot change a decision: a scoring round only serves the cut the schedule makes next (at most
``rescore_every`` of the parameters before it ranks again), and a unit whose damage per
parameter is far above that cut is not removed whatever its exact value.

The estimate: under the lstsq refit, removing a unit moves each of its consumers' refits in
closed form, and the growth of the refit's objective is the consumer's added squared output
error on the calibration inputs, per output channel (``RefitBasis.removal_cost``), with no pass
over the data. Each output channel's error is weighted by how much the predictions depend on
that channel (the diagonal Fisher information of the predictions about the layer's output,
``output_sensitivity``: one backward pass per class and batch per round), which makes it a
second-order estimate of the KL divergence. What the diagonal approximation misses is absorbed
by a scale per group, fitted to a few exactly scored units of the group (spread over its
estimates); the spread of those exact values around the scaled estimate (log scale) bounds its
error. Measured against exact KL on the intact zoo models (Spearman of damage per parameter):
vgg 0.70 unweighted, 0.91 weighted; resnet20 0.94 / 0.95; vit 0.97 / 0.97.
A consumer that lstsq mean-compensates for too few calibration rows (LSTSQ_MIN_ROWS: e.g. a
classifier after global pooling) is estimated by its mean fold's added squared output error
instead (``MeanBasis``, from the same Gram matrix), so its units need no exact pass either.

The band: order the units by estimated damage per unit of cost, find the estimate at which the
cheapest ``horizon`` of the parameters ends, and score exactly every unit whose estimate lies
below that point times exp(z * sd); the others keep the estimate (category ``estimated`` in the
report). Measured (docs/benchmarks.md): on zoo:resnet20 with the cut at 50%, z = 2 scores 63% of
the units and the one-shot cuts at 30% and 50% equal the exact ones; the default runs remove
the exact path's units at Jaccard 0.97-1.00.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cswap.compensation import Compensation
from cswap.units import UnitSpace


@dataclass(frozen=True)
class BandConfig:
    """``z``: the band's half-width in residual sd of the estimate (log scale); ``per_group``:
    units per group scored exactly to fit the estimate's scale; ``min_sd``: a floor on that sd
    (a few units per group can agree by chance); ``max_exact``: at most this many units scored
    exactly inside the band per round, the closest to the edge first (0: no cap), for models
    whose band holds more units than the time allows.

    Two stages inside the band (``sample_fraction`` > 0): the band's units are first scored
    exactly on a stratified ``sample_fraction`` of the calibration images (at least
    ``min_samples`` of them); a unit whose subsample mean KL per cost lies more than ``z``
    standard errors of that mean (log scale, relative error floored at ``min_relative_se``)
    from the edge is decided on that mean; only the rest are scored on the other images too.
    An earlier stage (``early_fraction`` > 0) scores the band's units on ``early_fraction`` of
    the first stage's images (at least ``early_min_samples``) before that, with the same rule;
    the units fitting the estimate's scale start at the first stage. ``control_variate``: the
    subsample means are corrected by a cheap per-image proxy known on every image
    (cswap.control), which narrows their standard errors."""

    z: float = 2.0
    per_group: int = 4
    min_sd: float = 0.25
    max_exact: int = 0
    sample_fraction: float = 0.25
    min_samples: int = 32
    min_relative_se: float = 0.1
    early_fraction: float = 0.25
    early_min_samples: int = 8
    control_variate: bool = False

    def __post_init__(self) -> None:
        if self.z <= 0 or self.per_group < 2 or self.min_sd < 0 or self.max_exact < 0:
            raise ValueError("band needs z > 0, per_group >= 2, min_sd >= 0 and max_exact >= 0.")
        if not 0 <= self.sample_fraction < 1 or self.min_samples < 2:
            raise ValueError("band needs 0 <= sample_fraction < 1 and min_samples >= 2.")
        if not 0 <= self.early_fraction < 1 or self.early_min_samples < 2:
            raise ValueError("band needs 0 <= early_fraction < 1 and early_min_samples >= 2.")


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
    space: UnitSpace,
    compensation: Compensation | None,
    units: Sequence[int],
    sensitivity: dict[str, torch.Tensor] | None = None,
) -> dict[int, float]:
    """Per unit of ``units``: the summed added output error of its consumers under the refit
    (``compensation`` already holds the bases of the current removal, ``with_base``), each
    output channel weighted by ``sensitivity`` when given. A consumer mean-compensated for too
    few rows is estimated by its mean fold's error (``MeanBasis``); units with a consumer that
    has no Gram matrix (no lstsq, over the memory budget, unsupported), and units whose removal
    renormalizes other channels (a LayerNorm over channels, ``Unit.norms``: the refit error of
    the consumers is not all it changes), get no estimate (scored exactly)."""
    if compensation is None or not (compensation.bases or compensation.mean_bases):
        return {}
    sensitivity = sensitivity or {}
    found = {}
    for unit in units:
        if space.units[unit].norms:  # its removal renormalizes channels: not in the estimate
            continue
        targets = space.units[unit].targets
        bases = [compensation.estimator(t.layer) for t in targets]
        if not targets or any(basis is None for basis in bases):
            continue
        found[unit] = sum(
            basis.removal_cost(t.indices, sensitivity.get(t.layer))
            for basis, t in zip(bases, targets, strict=True)
        )
    return found


def output_sensitivity(
    model: nn.Module,
    layers: Sequence[str],
    images: torch.Tensor,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    draws: int = 16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per layer of ``layers`` and output channel o: E_x sum_c p_c(x) |d log p_c(x) / d y_o(x)|^2
    (summed over positions or tokens), the diagonal of the Fisher information that the
    predictions hold about the layer's output channels: how much an output error of that channel
    moves the predictions (KL ~ 1/2 error^T F error). ``model`` as it computes now (run it inside
    ``cswap.intervene.removed`` for the current removal). With more than ``draws`` classes the
    sum over classes is estimated by ``draws`` labels drawn from p(x) (unbiased; seeded by
    ``seed``, so a run is repeatable)."""
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        modules[layer].register_forward_hook(
            lambda _m, _i, output, layer=layer: outputs.__setitem__(layer, output)
        )
        for layer in layers
    ]
    totals = {layer: torch.zeros(0) for layer in layers}
    generator = torch.Generator(device=device).manual_seed(seed)
    try:
        with torch.enable_grad():
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size].to(device).requires_grad_(True)
                log_p = torch.log_softmax(model(x), dim=1)
                for weight, chosen in label_draws(log_p.detach().exp(), draws, generator):
                    picked = log_p.gather(1, chosen.view(-1, 1)).squeeze(1)
                    grads = torch.autograd.grad(
                        picked.sum(), [outputs[layer] for layer in layers], retain_graph=True
                    )
                    for layer, grad in zip(layers, grads, strict=True):
                        added = _per_channel(grad.detach().double() ** 2, weight.double())
                        totals[layer] = added if not len(totals[layer]) else totals[layer] + added
    finally:
        for handle in handles:
            handle.remove()
    return {layer: (total / len(images)).cpu() for layer, total in totals.items()}


def label_draws(probabilities: torch.Tensor, draws: int, generator: torch.Generator):
    """(per-sample weight, label per sample) pairs whose weighted sum over the pairs is the sum
    over classes with weight p_c(x): every class when few, else ``draws`` labels from p(x)."""
    samples, classes = probabilities.shape
    if classes <= draws:
        for c in range(classes):
            yield probabilities[:, c], torch.full((samples,), c, device=probabilities.device)
        return
    chosen = torch.multinomial(probabilities, draws, replacement=True, generator=generator)
    for j in range(draws):
        yield torch.full((samples,), 1.0 / draws, device=probabilities.device), chosen[:, j]


def _per_channel(squares: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sum over samples (weighted) and positions / tokens: conv outputs (N, C, H, W) keep C,
    Linear outputs (N, ..., F) keep F."""
    if squares.dim() == 4:
        per_sample = squares.sum(dim=(2, 3))
    else:
        per_sample = squares.reshape(squares.shape[0], -1, squares.shape[-1]).sum(1)
    return (per_sample * weight.view(-1, 1)).sum(0)


def joint_damage(
    space: UnitSpace,
    compensation: Compensation,
    kl: dict[int, float],
    costs: dict[int, float],
    sensitivity: dict[str, torch.Tensor] | None = None,
) -> dict[int, float]:
    """Per unit of ``kl`` whose consumers all have an estimate (``Compensation.estimator``;
    ``compensation`` holds the bases of the current removal): the damage of removing it after
    the units of its group that rank before it (by ``kl`` per ``costs``, what each saves).

    Each unit's KL was measured (or estimated) alone; under the refit, units of one group
    stand in for each other, so removing many together costs more than the sum of their costs
    alone. The bases say by how much in closed form: along the group's order, the growth of
    each consumer's objective for each unit after those before it (``sequential`` of its
    RefitBasis, or of its MeanBasis: the mean fold's squared error; weighted by
    ``sensitivity`` like the estimate) minus its growth alone, converted to KL by the group's
    median ratio of KL to the growth alone, is added to the unit's KL. The damage per cost is
    then made non-decreasing along the order (a group is cut from its front: joint = running
    maximum of damage per cost, times the cost)."""
    sensitivity = sensitivity or {}
    by_group: dict[int, list[int]] = {}
    for unit in kl:
        by_group.setdefault(space.units[unit].group, []).append(unit)
    joint: dict[int, float] = {}
    for units in by_group.values():
        order = sorted(units, key=lambda u: (_per(kl[u], costs[u]), u))
        growth = _group_growth(space, compensation, order, sensitivity)
        if growth is None:
            continue
        along, alone = growth
        ratios = [
            kl[u] / a for u, a in zip(order, alone, strict=True) if a > 1e-30 and kl[u] > KL_FLOOR
        ]
        if not ratios:
            continue
        scale = float(np.median(ratios))
        highest = 0.0
        for unit, step, own in zip(order, along, alone, strict=True):
            value = max(kl[unit] + scale * (step - own), 0.0)
            highest = max(highest, _per(value, costs[unit]))
            joint[unit] = highest * costs[unit] if costs[unit] > 0 else value
    return joint


def _per(value: float, cost: float) -> float:
    return value / cost if cost > 0 else math.inf


def _group_growth(space, compensation, order, sensitivity):
    """(growth of each unit after those before it, growth alone), summed over the group's
    consumers; None when a consumer has no estimate or the units do not share them."""
    targets = space.units[order[0]].targets
    if not targets:
        return None
    along, alone = np.zeros(len(order)), np.zeros(len(order))
    for position, target in enumerate(targets):
        basis = compensation.estimator(target.layer)
        if basis is None:
            return None
        sets = []
        for unit in order:
            own = space.units[unit].targets
            if len(own) != len(targets) or own[position].layer != target.layer:
                return None
            sets.append(own[position].indices)
        weights = sensitivity.get(target.layer)
        along += basis.sequential(sets, weights)
        alone += np.array([basis.removal_cost(indices, weights) for indices in sets])
    return along, alone


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


# The KL of a removal that changes nothing measurable: float32 logits put identical predictive
# distributions about 4e-14 nats apart (measured on EfficientNet-Lite2's near-dead channels, whose
# estimates are 1e-7; their log-ratio would swamp the fit's error).
KL_FLOOR = 1e-9


def fit_scale(
    space: UnitSpace, costs: dict[int, float], exact: dict[int, float], min_sd: float
) -> EstimateFit:
    """The per-group scale of the estimate and its residual sd from exactly scored units. Units
    whose estimate is about 0 or whose exact damage is at float32's noise floor (KL_FLOOR: dead
    and near-dead units) carry no scale information. A group whose every sampled unit with an
    estimate is at the floor takes the median of the other groups' scales: its units are then
    estimated (near 0, they are cut on their estimate) instead of all being scored exactly."""
    residuals: dict[int, list[float]] = {}
    at_floor: set[int] = set()
    for unit, value in exact.items():
        cost = costs.get(unit)
        if cost is None or cost <= 1e-30:
            continue
        group = space.units[unit].group
        if value <= KL_FLOOR:
            at_floor.add(group)
            continue
        residuals.setdefault(group, []).append(math.log(value / cost))
    log_scale = {group: float(np.mean(values)) for group, values in residuals.items()}
    deviations = [v - log_scale[g] for g, values in residuals.items() for v in values]
    free = len(deviations) - len(log_scale)
    sd = math.sqrt(sum(d * d for d in deviations) / free) if free > 0 else math.inf
    if log_scale:
        median = float(np.median(list(log_scale.values())))
        log_scale |= {group: median for group in at_floor - set(log_scale)}
    return EstimateFit(log_scale=log_scale, sd=max(sd, min_sd))


def exact_band(
    estimated: dict[int, float],
    per_cost: dict[int, float],
    params: dict[int, float],
    horizon: float,
    spread: float | dict[int, float],
    limit: int = 0,
) -> set[int]:
    """Units whose estimated damage per cost lies within a factor ``spread`` (exp(z * sd)) of
    the point where the cheapest ``horizon`` of the cost (by ``params``, what each unit's removal
    saves in the horizon's currency: parameters or MACs) ends, in the order of the estimate
    divided by ``per_cost``: on either side, so a unit far below the edge is cut on its
    estimate. Every unit when the horizon is not reached.
    ``spread`` per unit (a dict): only the units it names can be inside, each with its own
    factor; the others still place the edge. ``limit`` > 0: only that many, the closest to the
    edge (by the ratio of keys)."""
    keys = {u: (v / per_cost[u] if per_cost[u] > 0 else math.inf) for u, v in estimated.items()}
    order = sorted(keys, key=lambda u: (keys[u], u))
    factor = spread.get if isinstance(spread, dict) else (lambda _u: spread)
    total = 0.0
    for unit in order:
        total += params[unit]
        if total >= horizon:
            edge = keys[unit]
            inside = [
                u
                for u in order
                if factor(u) is not None and edge / factor(u) <= keys[u] <= edge * factor(u)
            ]
            break
    else:
        edge = math.inf
        inside = [u for u in order if factor(u) is not None]
    if 0 < limit < len(inside):
        tiny = 1e-300  # keys of dead units are 0

        def distance(u: int) -> float:
            if math.isinf(edge) or math.isinf(keys[u]):
                return 0.0 if keys[u] == edge else math.inf
            return abs(math.log((keys[u] + tiny) / (edge + tiny)))

        inside = sorted(inside, key=lambda u: (distance(u), u))[:limit]
    return set(inside)


def split_samples(labels: np.ndarray, config: BandConfig, seed: int = 0) -> np.ndarray | None:
    """The calibration rows of the first stage (sorted): a seeded systematic sample of the
    images ordered by label, so every label keeps its share (``config.sample_fraction``, at least
    ``config.min_samples`` images); None when that is half the images or more (two stages would
    not save)."""
    return _stratified(labels, config.sample_fraction, config.min_samples, seed)


def early_samples(labels: np.ndarray, config: BandConfig, seed: int = 0) -> np.ndarray | None:
    """Positions, within ``labels`` (the first stage's), of the early stage's images: the same
    stratified sample of ``config.early_fraction`` of them (at least ``early_min_samples``);
    None when that is half of them or more."""
    return _stratified(labels, config.early_fraction, config.early_min_samples, seed + 1)


def _stratified(labels: np.ndarray, fraction: float, minimum: int, seed: int) -> np.ndarray | None:
    count = len(labels)
    size = max(minimum, math.ceil(fraction * count))
    if fraction <= 0 or 2 * size > count:
        return None
    return stratified(labels, size, seed)


def stratified(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` of the samples, spread evenly over ``labels`` (each label's
    share kept to within one sample), random within a label."""
    count = len(labels)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(count), labels))  # by label, random within a label
    step = count / size
    picks = np.floor(rng.random() * step + step * np.arange(size)).astype(int)
    return np.sort(order[np.minimum(picks, count - 1)])


def sample_spread(kl: np.ndarray, total: int, config: BandConfig) -> np.ndarray:
    """Per row of ``kl`` (units x subsample of ``total`` images): exp(z * relative
    standard error of the subsample mean as an estimate of the mean over all ``total`` images),
    the finite-population correction included and the relative error floored."""
    size = kl.shape[1]
    mean = kl.mean(axis=1)
    error = kl.std(axis=1, ddof=1) / math.sqrt(size) * math.sqrt(1 - size / total)
    relative = np.where(mean > 0, error / np.maximum(mean, 1e-300), np.inf)
    relative = np.where((mean <= 0) & (error <= 0), 0.0, relative)  # no change on any image
    return np.exp(config.z * np.maximum(relative, config.min_relative_se))
