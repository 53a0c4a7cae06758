"""Fast categorisation: sequential testing and first-order screening on top of exact scoring.

Both sit between scoring and categorisation: they decide *which* exact interventions to run.

Sequential testing (``looks``). The calibration samples are ordered so that every prefix is
stratified by class. Exact effects are computed look by look (e.g. on 25%, 50%, 75%, 100% of the
samples); at an early look a unit whose *critical* test already rejects is settled and gets no
more passes. Validity comes from spending alpha across looks (a Bonferroni split, the simplest
valid group-sequential design): the early looks share ``early_alpha_share`` of alpha equally, the
final look tests critical at the rest, so for every unit P(falsely called critical at any look) <=
sum of the per-look levels = alpha (union bound; each look's test is the fixed-n test at its own
level). A unit is also settled early as *neutral* when it is confidently inside the margin: every
class's lower confidence bound of mean r above -delta (Bonferroni across classes) and the overall
upper bound below +delta, at the look's level, so P(a truly critical or detrimental unit is
settled as neutral) <= alpha as well; or, with ``futility`` > 0 (default 0.05), by stochastic
curtailment: the conditional power of every final test under the current trend is below
``futility`` (no error guarantee for this one; its agreement with the fixed-n verdicts is
measured). Detrimental is only decided at the final look, at the full
alpha. ``early_alpha_share=0`` takes no critical verdict early: early looks only settle
neutral units, and every critical test runs at the final look at the full alpha (the fixed-n
test's own level; stopping for neutral can only make a unit less often critical). An early
look is taken only when every class tested on the full set has at least
``min_class_size`` samples in the prefix. A settled unit's xi is the mean over the samples it saw.
``looks=()`` is the exact fixed-n procedure.

First-order screening (``screen``). One backward pass per sample batch estimates every unit's r
at once: removing unit u zeroes (or, compensated, sets to the mean) its consumer inputs, so
``sigma* - sigma ~= -sum (x - m) * dsigma/dx`` over those inputs. Units whose *estimated* verdict
is critical with a wide safety factor (the estimated per-class mean below ``-screen_factor *
margin`` and its p-value below ``alpha / screen_factor``) are taken as critical without exact
passes; every other unit is scored exactly. This is a heuristic with no error guarantee: its
agreement with the exact categories is measured by ``cswap bench-speed``, not assumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from cswap.categorize import CRITICAL, Categorization, CategoryConfig, categorize
from cswap.compensation import Compensation
from cswap.criteria import consumer_inputs, reduce_captures, unit_values
from cswap.scoring import CausalEffects, causal_effects
from cswap.units import UnitSpace


@dataclass(frozen=True)
class FastConfig:
    looks: tuple[float, ...] = ()  # early looks, fractions of the samples; () = fixed n
    early_alpha_share: float = 0.25
    futility: float = 0.05  # curtailment of neutral units at early looks; 0 turns it off
    screen: bool = False
    screen_factor: float = 4.0

    def __post_init__(self) -> None:
        if any(not 0.0 < look < 1.0 for look in self.looks):
            raise ValueError(f"looks {self.looks} must be fractions in (0, 1).")
        if not 0.0 <= self.futility < 0.5:
            raise ValueError("futility must be in [0, 0.5).")
        if not 0.0 <= self.early_alpha_share < 1.0:
            raise ValueError("early_alpha_share must be in [0, 1).")
        if self.screen_factor < 1.0:
            raise ValueError("screen_factor must be >= 1.")


@dataclass(frozen=True)
class FastResult:
    categorization: Categorization
    exact_passes: int  # unit x sample interventions actually run
    full_passes: int  # what the fixed-n exact procedure runs
    screened: int  # units settled by screening
    settled_early: int  # units settled at an early look


def stratified_order(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A sample order whose every prefix holds each class in proportion."""
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        keys[members] = (np.arange(len(members)) + 0.5) / len(members)
    return np.lexsort((np.arange(len(labels)), keys))


def first_order_effects(
    model: nn.Module,
    space: UnitSpace,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    already_removed=(),
    compensation: Compensation | None = None,
    batch_size: int = 256,
    device: str = "cpu",
) -> np.ndarray:
    """(units, samples): r estimated to first order from one backward pass per batch."""
    from cswap.intervene import removed

    was_training = model.training
    model.eval()
    columns = []
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device).requires_grad_(True)
            target = labels[start : start + batch_size].to(device)
            store: dict[str, list] = {}
            with (
                torch.enable_grad(),
                removed(model, space, already_removed, compensation),
                consumer_inputs(model, space, store),
            ):
                probabilities = torch.softmax(model(batch), dim=1)
                sigma = probabilities.gather(1, target.view(-1, 1)).squeeze(1)
                sigma.sum().backward()

            def centred(layer: str, entry: dict) -> torch.Tensor:
                x = entry["x"]
                if compensation is not None:  # compensated removal moves x to the mean
                    shape = [1] * x.dim()
                    shape[entry["dim"]] = -1
                    x = x - compensation.means[layer].to(x).view(shape)
                return x * entry["grad"]

            per_layer = reduce_captures(store, len(batch), centred)
            change = -unit_values(space, per_layer)  # (samples, units)
            columns.append(change / sigma.detach().double().cpu().numpy()[:, None])
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return np.concatenate(columns).T


def fast_categorize(
    model: nn.Module,
    space: UnitSpace,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: CategoryConfig,
    fast: FastConfig,
    *,
    units=None,
    already_removed=(),
    compensation: Compensation | None = None,
    seed: int = 0,
    progress: Callable[[float], None] | None = None,
    **scoring,
) -> FastResult:
    """Categories of ``units`` (default: all not removed) with the levers of ``fast``."""
    gone = set(already_removed)
    if units is None:
        units = [unit.id for unit in space.units if unit.id not in gone]
    units = np.asarray(list(units), dtype=np.int64)
    n = len(images)
    order = stratified_order(labels.numpy(), seed)
    images, labels = images[order], labels[order]
    label_array = labels.numpy().astype(np.int64)
    full_passes = len(units) * n
    decided: dict[int, tuple] = {}  # unit -> (xi, class means row, class p row, det p, category)
    screened = 0
    if fast.screen:
        estimate = first_order_effects(
            model,
            space,
            images,
            labels,
            already_removed=already_removed,
            compensation=compensation,
            **{k: v for k, v in scoring.items() if k in ("batch_size", "device")},
        )
        guessed = categorize(
            CausalEffects(units, estimate[units], label_array, np.ones(n)),
            replace(config, alpha=config.alpha / fast.screen_factor),
        )
        sure = (guessed.categories == CRITICAL) & (
            guessed.class_means.min(axis=1) < -fast.screen_factor * config.margin
        )
        # a screened unit's damage is not measured, only known to be large: it ranks last
        guessed = replace(guessed, log_ratio=guessed.xi, kl=np.full(len(units), np.inf))
        for row in np.flatnonzero(sure):
            decided[int(units[row])] = _entry(guessed, row)
        screened = int(sure.sum())
    active = [int(u) for u in units if int(u) not in decided]
    looks = sorted(fast.looks)
    early_alpha = config.alpha * fast.early_alpha_share / len(looks) if looks else 0.0
    final_alpha = config.alpha * (1 - fast.early_alpha_share) if looks else config.alpha
    # share 0: early looks only settle neutral units; the "inside the margin" bound is then
    # taken at alpha per look (it guards against missing a critical unit, not a false one)
    neutral_alpha = early_alpha if early_alpha > 0 else config.alpha / max(1, len(looks))
    effects = np.zeros((len(space), 0))
    log_ratio = np.zeros((len(space), 0))
    kl = np.zeros((len(space), 0))
    baseline = np.zeros(0)
    seen = 0
    exact = 0
    settled_early = 0
    last: Categorization | None = None
    for look in [*looks, 1.0]:
        upto = n if look == 1.0 else max(seen + 1, round(look * n))
        if upto <= seen or not active:
            continue
        part = causal_effects(
            model,
            space,
            images[seen:upto],
            labels[seen:upto],
            units=active,
            already_removed=already_removed,
            compensation=compensation,
            progress=(lambda f, s=upto - seen: progress(f * s / n)) if progress else None,
            **scoring,
        )
        exact += len(active) * (upto - seen)
        effects = _extend(effects, active, part.relative_effects)
        log_ratio = _extend(log_ratio, active, part.log_ratio)
        kl = _extend(kl, active, part.kl)
        baseline = np.concatenate([baseline, part.baseline])
        seen = upto
        so_far = CausalEffects(
            np.asarray(active),
            effects[active],
            label_array[:seen],
            baseline,
            log_ratio=log_ratio[active],
            kl=kl[active],
        )
        if seen < n and _classes_testable(label_array, seen, config.min_class_size):
            verdict = categorize(so_far, replace(config, alpha=early_alpha or config.alpha))
            critical = (verdict.categories == CRITICAL) & (early_alpha > 0)
            neutral = _surely_neutral(so_far, config, neutral_alpha)
            if fast.futility > 0:
                neutral |= _hopeless(so_far, config, n / seen, final_alpha, fast.futility)
            # a neutral stop needs a non-critical verdict too (with share 0 the verdict is at
            # the full alpha, and a unit it calls critical runs on to the final test)
            stop = critical | (neutral & (verdict.categories != CRITICAL))
            for row in np.flatnonzero(stop):
                decided[active[row]] = _entry(verdict, row)
            settled_early += int(stop.sum())
            active = [unit for row, unit in enumerate(active) if not stop[row]]
        else:
            last = categorize(so_far, config, critical_alpha=final_alpha)
    if last is not None:
        for row, unit in enumerate(last.unit_ids):
            decided[int(unit)] = _entry(last, row)
    return FastResult(
        categorization=_assemble(units, decided, config, label_array),
        exact_passes=exact,
        full_passes=full_passes,
        screened=screened,
        settled_early=settled_early,
    )


def _extend(columns: np.ndarray, rows: list[int], values: np.ndarray) -> np.ndarray:
    """``columns`` (all units, samples so far) with the next samples' ``values`` of ``rows``."""
    block = np.zeros((len(columns), values.shape[1]))
    block[rows] = values
    return np.concatenate([columns, block], axis=1)


def _classes_testable(labels: np.ndarray, seen: int, min_class_size: int) -> bool:
    """An early look is taken only when every class tested on the full set can be tested on the
    prefix too (otherwise a class-specific effect could hide in the pool)."""
    full = np.bincount(labels, minlength=labels.max() + 1)
    prefix = np.bincount(labels[:seen], minlength=labels.max() + 1)
    tested = full >= min_class_size
    return bool(np.all(prefix[tested] >= min_class_size))


def _surely_neutral(effects: CausalEffects, config: CategoryConfig, alpha: float) -> np.ndarray:
    """Units confidently inside the margin: for every tested class the lower confidence bound of
    mean r is above -delta (Bonferroni across the classes), and the upper bound of the overall
    mean is below +delta; each at level ``alpha``. Under "critical" (or "detrimental") the
    chance of this is at most alpha."""
    from scipy import stats

    from cswap.categorize import groups_to_test

    r = effects.relative_effects
    groups = groups_to_test(effects.labels, config.min_class_size)
    inside = np.ones(len(r), dtype=bool)
    level = alpha / max(1, len(groups))
    for _, members in groups:
        values = r[:, members]
        m = values.shape[1]
        spread = values.std(axis=1, ddof=1) / np.sqrt(m)
        lower = values.mean(axis=1) - stats.t.ppf(1 - level, m - 1) * spread
        inside &= lower > -config.margin
    m = r.shape[1]
    upper = r.mean(axis=1) + stats.t.ppf(1 - alpha, m - 1) * r.std(axis=1, ddof=1) / np.sqrt(m)
    return inside & (upper < config.margin)


def _hopeless(
    effects: CausalEffects, config: CategoryConfig, growth: float, alpha: float, gamma: float
) -> np.ndarray:
    """Stochastic curtailment: units whose final tests would almost surely not reject.

    Conditional power under the current trend: with theta = (mean - bound) / s estimated on the m
    samples seen, the final statistic over n = m * ``growth`` samples is approximately
    N(theta sqrt(n), (n - m) / n). A class whose probability of ending significantly below
    -delta (uncorrected, at ``alpha``: easier to reach than the corrected test) is below
    ``gamma`` cannot plausibly make the unit critical; likewise for detrimental over all samples.
    A unit for which no test can plausibly reject is settled as neutral. No error-rate
    guarantee: agreement with the fixed-n verdicts is what ``cswap bench-speed`` measures.
    """
    from scipy import stats

    from cswap.categorize import groups_to_test

    r = effects.relative_effects

    def power(values: np.ndarray, bound: float, lower: bool) -> np.ndarray:
        m = values.shape[1]
        final = m * growth
        spread = np.maximum(values.std(axis=1, ddof=1), 1e-300)
        theta = (values.mean(axis=1) - bound) / spread
        critical = stats.t.ppf(1 - alpha, max(1.0, final - 1))
        scale = np.sqrt(max(final - m, 1e-12) / final)
        centre = theta * np.sqrt(final)
        if lower:
            return stats.norm.cdf((-critical - centre) / scale)
        return stats.norm.sf((critical - centre) / scale)

    hopeless = np.ones(len(r), dtype=bool)
    for _, members in groups_to_test(effects.labels, config.min_class_size):
        hopeless &= power(r[:, members], -config.margin, lower=True) < gamma
    hopeless &= power(r, config.margin, lower=False) < gamma
    return hopeless


def _entry(categorization: Categorization, row: int) -> tuple:
    return (
        float(categorization.xi[row]),
        categorization.tested_classes,
        categorization.class_means[row],
        categorization.class_p_values[row],
        float(categorization.detrimental_p_values[row]),
        str(categorization.categories[row]),
        float(categorization.log_ratio[row]),
        float(categorization.kl[row]),
    )


def _assemble(units, decided, config, labels) -> Categorization:
    """One Categorization over ``units``; class columns aligned on the full set of tested classes
    (a unit settled on fewer samples may have tested fewer classes: NaN there)."""
    from cswap.categorize import groups_to_test

    classes = np.asarray([label for label, _ in groups_to_test(labels, config.min_class_size)])
    means = np.full((len(units), len(classes)), np.nan)
    p_values = np.full((len(units), len(classes)), np.nan)
    xi, det, categories, log_ratio, kl = [], [], [], [], []
    for row, unit in enumerate(units):
        unit_xi, tested, unit_means, unit_p, unit_det, category, unit_log, unit_kl = decided[
            int(unit)
        ]
        log_ratio.append(unit_log)
        kl.append(unit_kl)
        for column, label in enumerate(tested):
            where = np.flatnonzero(classes == label)
            if len(where):
                means[row, where[0]] = unit_means[column]
                p_values[row, where[0]] = unit_p[column]
        xi.append(unit_xi)
        det.append(unit_det)
        categories.append(category)
    return Categorization(
        unit_ids=np.asarray(units, dtype=np.int64),
        xi=np.asarray(xi),
        tested_classes=classes.astype(np.int64),
        class_means=means,
        class_p_values=p_values,
        detrimental_p_values=np.asarray(det),
        categories=np.asarray(categories, dtype=object),
        config=config,
        log_ratio=np.asarray(log_ratio),
        kl=np.asarray(kl),
    )
