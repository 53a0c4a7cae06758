"""Critical / neutral / detrimental, by hypothesis tests against a practical margin (METHOD.md 5).

A deterministic network scored on paired samples makes a plain test of "effect = 0" call almost
everything significant, more so the more samples it gets. So the tests are against a margin delta
(a relative change of the true-class probability):

- critical: for at least one class k, mean r over S_k is significantly below -delta
  (one-sided test of H0: mean >= -delta, corrected across the classes of the unit);
- detrimental: over all of S, mean r is significantly above +delta and no class is critical;
- neutral: otherwise (within the margin, or not established).

Classes with fewer than ``min_class_size`` calibration samples cannot be tested on their own: they
are pooled into one extra group ("pooled"), which is tested like a class when it reaches
``min_class_size``; otherwise its samples only enter the all-samples test. This is what makes a
1000-class model with a few hundred label-free images work.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy import stats

from cswap.scoring import CausalEffects

CRITICAL, NEUTRAL, DETRIMENTAL = "critical", "neutral", "detrimental"
ESTIMATED = "estimated"  # not scored exactly (cswap.estimate): no test, an estimated KL only
POOLED = -1
TESTS = ("t", "wilcoxon")
CORRECTIONS = ("holm", "bonferroni", "bh", "none")
SCOPES = ("classes", "units")


@dataclass(frozen=True)
class Ranking:
    """Remaining units in the order they should be removed, with what produced the order."""

    order: tuple[int, ...]
    scores: dict[int, float] = field(default_factory=dict)
    categories: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CategoryConfig:
    margin: float = 0.001  # delta
    test: str = "t"  # one-sided one-sample t-test, or "wilcoxon" (signed-rank)
    alpha: float = 0.05
    correction: str = "holm"
    correction_scope: str = "classes"  # across the classes of one unit, or across all units too
    min_class_size: int = 5

    def __post_init__(self) -> None:
        if self.test not in TESTS:
            raise ValueError(f"test must be one of {TESTS}, got {self.test!r}.")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {self.correction!r}.")
        if self.correction_scope not in SCOPES:
            raise ValueError(f"correction_scope must be one of {SCOPES}.")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}.")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}.")
        if self.min_class_size < 2:
            raise ValueError("min_class_size must be >= 2.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Categorization:
    unit_ids: np.ndarray
    xi: np.ndarray
    tested_classes: np.ndarray  # class labels tested on their own; POOLED (-1) for the pool
    class_means: np.ndarray  # (units, tested classes): mean r per class
    class_p_values: np.ndarray  # (units, tested classes): corrected p of "mean < -margin"
    detrimental_p_values: np.ndarray  # (units,): p of "mean over S > +margin"
    categories: np.ndarray  # (units,) of str
    config: CategoryConfig
    # the same interventions without saturation, for ranking (NaN where not measured): mean
    # change of the true-class log-probability, and mean KL(intact || intervened)
    log_ratio: np.ndarray | None = None
    kl: np.ndarray | None = None
    # KL of removing the unit together with the units of its group ranked before it (its own
    # KL plus the refit's estimated interaction, cswap.estimate.joint_damage); NaN where not
    # estimated (a consumer without an lstsq estimate, see Compensation.estimator)
    joint: np.ndarray | None = None

    def category_of(self) -> dict[int, str]:
        return {int(u): str(c) for u, c in zip(self.unit_ids, self.categories, strict=True)}

    def counts(self) -> dict[str, int]:
        names = (CRITICAL, NEUTRAL, DETRIMENTAL)
        counts = {name: int((self.categories == name).sum()) for name in names}
        estimated = int((self.categories == ESTIMATED).sum())
        return counts | ({ESTIMATED: estimated} if estimated else {})


def _one_sided_p(samples: np.ndarray, bound: float, alternative: str, test: str) -> np.ndarray:
    """p-values per row of ``samples`` for H1: mean < bound ("less") or > bound ("greater")."""
    shifted = samples - bound
    mean = shifted.mean(axis=1)
    spread = shifted.std(axis=1)
    constant = spread <= 1e-15 * np.maximum(1.0, np.abs(shifted).max(axis=1))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        # Near-constant rows trigger scipy's precision warning; they are handled just below.
        warnings.simplefilter("ignore", RuntimeWarning)
        if test == "t":
            p = stats.ttest_1samp(shifted, 0.0, axis=1, alternative=alternative).pvalue
        else:
            p = np.ones(len(shifted))
            varied = np.flatnonzero(~constant)
            if len(varied):
                p[varied] = stats.wilcoxon(
                    shifted[varied], alternative=alternative, axis=1, zero_method="zsplit"
                ).pvalue
    p = np.asarray(p, dtype=np.float64)
    # A constant sample (a dead unit, for instance) has no variance: its verdict is certain.
    beyond = mean < 0 if alternative == "less" else mean > 0
    p[constant] = np.where(beyond[constant], 0.0, 1.0)
    return np.nan_to_num(p, nan=1.0)


def correct(p_values: np.ndarray, method: str) -> np.ndarray:
    """Family-wise / FDR correction along the last axis."""
    if method == "none" or p_values.shape[-1] == 0:
        return p_values
    m = p_values.shape[-1]
    if method == "bonferroni":
        return np.minimum(1.0, p_values * m)
    if method == "bh":
        return stats.false_discovery_control(p_values, axis=-1, method="bh")
    # Holm step-down: sorted p_(i) * (m - i), made monotone, capped at 1.
    order = np.argsort(p_values, axis=-1)
    ranked = np.take_along_axis(p_values, order, axis=-1) * (m - np.arange(m))
    ranked = np.minimum(1.0, np.maximum.accumulate(ranked, axis=-1))
    adjusted = np.empty_like(ranked)
    np.put_along_axis(adjusted, order, ranked, axis=-1)
    return adjusted


def groups_to_test(labels: np.ndarray, min_class_size: int) -> list[tuple[int, np.ndarray]]:
    """(class label or POOLED, sample positions) for every group that is tested on its own."""
    groups, pooled = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) >= min_class_size:
            groups.append((int(label), members))
        else:
            pooled.append(members)
    if pooled:
        members = np.sort(np.concatenate(pooled))
        if len(members) >= min_class_size:
            groups.append((POOLED, members))
    return groups


def categorize(
    effects: CausalEffects,
    config: CategoryConfig | None = None,
    *,
    critical_alpha: float | None = None,
) -> Categorization:
    """Categories of every unit in ``effects``; ``critical_alpha`` (default ``config.alpha``) is
    the level of the critical tests alone (sequential testing spends part of alpha earlier)."""
    config = config or CategoryConfig()
    critical_level = config.alpha if critical_alpha is None else critical_alpha
    r = effects.relative_effects
    groups = groups_to_test(effects.labels, config.min_class_size)
    n_units = len(effects.unit_ids)
    class_means = np.zeros((n_units, len(groups)))
    raw_p = np.ones((n_units, len(groups)))
    for column, (_, members) in enumerate(groups):
        class_means[:, column] = r[:, members].mean(axis=1)
        raw_p[:, column] = _one_sided_p(r[:, members], -config.margin, "less", config.test)
    detrimental_p = _one_sided_p(r, config.margin, "greater", config.test)
    if config.correction_scope == "units":
        class_p = correct(raw_p.reshape(1, -1), config.correction).reshape(raw_p.shape)
        detrimental_p = correct(detrimental_p.reshape(1, -1), config.correction).reshape(-1)
    else:
        class_p = correct(raw_p, config.correction)
    critical = (class_p < critical_level).any(axis=1)
    detrimental = ~critical & (detrimental_p < config.alpha)
    categories = np.where(critical, CRITICAL, np.where(detrimental, DETRIMENTAL, NEUTRAL))
    return Categorization(
        unit_ids=effects.unit_ids,
        xi=effects.xi,
        tested_classes=np.asarray([label for label, _ in groups], dtype=np.int64),
        class_means=class_means,
        class_p_values=class_p,
        detrimental_p_values=detrimental_p,
        categories=categories.astype(object),
        config=config,
        log_ratio=_mean_or_nan(effects.log_ratio, n_units),
        kl=_mean_or_nan(effects.kl, n_units),
    )


def with_estimates(categorization: Categorization, kl: dict[int, float]) -> Categorization:
    """``categorization`` (exactly scored units) plus units known only by an estimated KL
    (category ``estimated``; xi, log-ratio and class statistics NaN, p-values 1), in unit order."""
    if not kl:
        return categorization
    c = categorization
    extra = np.asarray(sorted(kl), dtype=c.unit_ids.dtype)
    ids = np.concatenate([c.unit_ids, extra])
    order = np.argsort(ids, kind="stable")
    n, classes = len(extra), c.class_means.shape[1]

    def merged(values: np.ndarray | None, filler) -> np.ndarray:
        exact = np.full(len(c.unit_ids), np.nan) if values is None else values
        return np.concatenate([exact, filler])[order]

    return replace(
        c,
        unit_ids=ids[order],
        xi=merged(c.xi, np.full(n, np.nan)),
        class_means=np.concatenate([c.class_means, np.full((n, classes), np.nan)])[order],
        class_p_values=np.concatenate([c.class_p_values, np.ones((n, classes))])[order],
        detrimental_p_values=merged(c.detrimental_p_values, np.ones(n)),
        categories=np.concatenate([c.categories, np.full(n, ESTIMATED, dtype=object)])[order],
        log_ratio=merged(c.log_ratio, np.full(n, np.nan)),
        kl=merged(c.kl, np.asarray([kl[int(u)] for u in extra], dtype=np.float64)),
    )


def _mean_or_nan(values: np.ndarray | None, rows: int) -> np.ndarray:
    if values is None:
        return np.full(rows, np.nan)
    return values.mean(axis=1)


@dataclass(frozen=True)
class RankConfig:
    """How C-SWAP orders its candidates (METHOD.md 6.2; the statistic and its weighing are ours).

    ``statistic``: the damage of removing a unit, measured on the same intervention as xi but
    without saturating on confident samples: ``kl`` (mean KL divergence of the intact from the
    intervened predictive distribution), ``logp`` (mean drop of the true-class
    log-probability) or ``xi`` (the paper's relative change, sign flipped). ``per_cost``: divide
    by what removing the unit saves (``costs``, parameters or MACs after the target's kind).
    ``categories_first``: detrimental, then neutral, then critical, each in damage order, so
    critical units are candidates only last; the default is one order across categories
    (measured: on zoo:vit at 50% the categories-first order cuts 1 pt worse, as the margin test
    marks more units critical on a cut model and forces costlier neutral units first).
    ``allow_critical=False`` is the paper's strict rule. ``joint`` (with ``kl``): rank by the
    damage of removing a unit together with its group's units ranked before it
    (``Categorization.joint``) where it was estimated: a layer of many units that each alone
    cost nothing, because the refit rebuilds any one from the others, is not cut to the last
    unit (measured: on EfficientNet-Lite2 at 20% of the MACs the one-shot cut keeps 88% of the
    held-out predictions with it and 78% without).
    """

    statistic: str = "kl"
    per_cost: bool = True
    categories_first: bool = False
    allow_critical: bool = True
    joint: bool = True

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {self.statistic!r}.")


STATISTICS = ("kl", "logp", "xi")


def damage(categorization: Categorization, statistic: str, joint: bool = False) -> np.ndarray:
    """Per unit, how much its removal hurts (lower is removed first); ``joint`` (kl only): the
    joint damage where it was estimated."""
    if statistic == "xi":
        return -categorization.xi
    values = categorization.kl if statistic == "kl" else categorization.log_ratio
    if values is None or np.isnan(values).any():
        raise ValueError(f"The {statistic!r} statistic was not measured for every unit.")
    if statistic == "kl" and joint and categorization.joint is not None:
        return np.where(np.isfinite(categorization.joint), categorization.joint, values)
    return values if statistic == "kl" else -values


def causal_ranking(
    categorization: Categorization,
    config: RankConfig | None = None,
    costs: dict[int, float] | None = None,
) -> Ranking:
    """C-SWAP's candidate order by ``config`` (see RankConfig); ``costs``: per unit, what its
    removal saves (needed with ``per_cost``; a unit saving nothing goes last)."""
    config = config or RankConfig()
    units = categorization.unit_ids.tolist()
    values = damage(categorization, config.statistic, config.joint)
    key = dict(zip(units, values.tolist(), strict=True))
    if config.per_cost:
        if costs is None:
            raise ValueError("per_cost ranking needs the units' costs.")
        key = {u: (v / costs[u] if costs[u] > 0 else np.inf) for u, v in key.items()}
    category = categorization.category_of()
    rank_of = {DETRIMENTAL: 0, NEUTRAL: 1, ESTIMATED: 1, CRITICAL: 2}
    allowed = [u for u in units if config.allow_critical or category[u] != CRITICAL]

    def sort_key(unit: int) -> tuple:
        first = rank_of[category[unit]] if config.categories_first else 0
        return (first, key[unit], unit)

    order = sorted(allowed, key=sort_key)
    return Ranking(order=tuple(order), scores=key, categories=category)
