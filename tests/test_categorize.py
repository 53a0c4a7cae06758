import numpy as np
import pytest
from scipy import stats

from cswap.categorize import (
    CRITICAL,
    DETRIMENTAL,
    NEUTRAL,
    POOLED,
    CategoryConfig,
    RankConfig,
    categorize,
    causal_ranking,
    correct,
    groups_to_test,
)
from cswap.scoring import CausalEffects


def effects(rows, labels):
    rows = np.asarray(rows, dtype=np.float64)
    return CausalEffects(
        unit_ids=np.arange(len(rows)),
        relative_effects=rows,
        labels=np.asarray(labels),
        baseline=np.ones(rows.shape[1]),
    )


def test_holm_matches_a_hand_computation():
    p = np.array([[0.01, 0.04, 0.03, 0.005]])
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    assert np.allclose(correct(p, "holm"), [[0.03, 0.06, 0.06, 0.02]])
    assert np.allclose(correct(p, "bonferroni"), [[0.04, 0.16, 0.12, 0.02]])
    assert np.allclose(correct(p, "bh"), stats.false_discovery_control(p[0], method="bh"))
    assert np.array_equal(correct(p, "none"), p)


def test_categories_against_the_margin():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    noise = rng.normal(0, 0.001, size=40)

    def near(value):  # consistent effect, small noise: the t-test has a variance to work with
        return value + rng.normal(0, 1e-4, size=40)

    rows = [
        np.where(labels == 1, -0.05, 0.0) + noise,  # 0: hurts class 1 only
        0.02 + noise,  # 1: removing it helps a lot
        near(-0.0005),  # 2: a consistent loss of 0.05%, inside the margin 0.001
        near(-0.01),  # 3: a consistent loss of 1%, beyond the margin
        near(+0.0005),  # 4: a consistent gain of 0.05%, inside the margin 0.001
        np.zeros(40),  # 5: dead
    ]
    wide = categorize(effects(rows, labels), CategoryConfig(margin=0.001))
    assert list(wide.categories) == [CRITICAL, DETRIMENTAL, NEUTRAL, CRITICAL, NEUTRAL, NEUTRAL]
    assert wide.counts() == {CRITICAL: 2, NEUTRAL: 3, DETRIMENTAL: 1}
    assert wide.class_means.shape == (6, 2)
    assert wide.class_p_values[0, 1] < 0.05 and wide.class_p_values[0, 0] > 0.05
    # the units inside the margin are clearly not significant against it
    assert wide.class_p_values[2].min() > 0.5 and wide.detrimental_p_values[4] > 0.5
    # the same effects against a ten times narrower margin: both slight units are now beyond it
    narrow = categorize(effects(rows, labels), CategoryConfig(margin=0.0001))
    assert list(narrow.categories) == [
        CRITICAL,
        DETRIMENTAL,
        CRITICAL,
        CRITICAL,
        DETRIMENTAL,
        NEUTRAL,
    ]
    assert narrow.class_p_values[2].max() < 1e-6 and narrow.detrimental_p_values[4] < 1e-6
    # the margin changes the verdicts, not the effects
    assert np.array_equal(wide.xi, narrow.xi)


def test_significant_against_zero_but_not_the_margin_is_neutral():
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], 20)
    row = -0.0005 + rng.normal(0, 1e-4, size=40)  # every sample loses about 0.05%
    # a plain one-sided test of "effect = 0" calls it a significant loss, in every class
    assert stats.ttest_1samp(row, 0.0, alternative="less").pvalue < 1e-10
    for label in (0, 1):
        members = row[labels == label]
        assert stats.ttest_1samp(members, 0.0, alternative="less").pvalue < 1e-6
    # against the margin 0.001 it is not a loss worth keeping the unit for: neutral
    result = categorize(effects([row], labels), CategoryConfig(margin=0.001))
    assert result.categories[0] == NEUTRAL
    assert np.all(result.class_means[0] > -0.001) and np.all(result.class_means[0] < 0)
    assert result.class_p_values[0].min() > 0.5
    # without the margin (the plain test) the very same effects make it critical
    assert categorize(effects([row], labels), CategoryConfig(margin=0.0)).categories[0] == CRITICAL


def test_constant_effects_have_certain_verdicts():
    labels = np.repeat([0, 1], 5)
    result = categorize(effects([np.full(10, -0.5), np.full(10, 0.5), np.zeros(10)], labels))
    assert list(result.categories) == [CRITICAL, DETRIMENTAL, NEUTRAL]


def test_wilcoxon_option_agrees_on_clear_cases():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 15)
    rows = [-0.1 + rng.normal(0, 0.01, 30), 0.1 + rng.normal(0, 0.01, 30), np.zeros(30)]
    result = categorize(effects(rows, labels), CategoryConfig(test="wilcoxon"))
    assert list(result.categories) == [CRITICAL, DETRIMENTAL, NEUTRAL]


def test_small_classes_are_pooled():
    labels = np.array([0] * 6 + [1, 2, 3, 4, 5, 6, 7])  # class 0 testable, seven singletons
    groups = groups_to_test(labels, min_class_size=5)
    assert [label for label, _ in groups] == [0, POOLED]
    assert len(groups[1][1]) == 7
    # a unit that hurts only the singleton classes is found through the pool
    row = np.where(labels == 0, 0.0, -0.3) + np.linspace(-1e-3, 1e-3, 13)
    result = categorize(effects([row], labels))
    assert result.categories[0] == CRITICAL
    assert list(result.tested_classes) == [0, POOLED]


def test_too_few_samples_everywhere_leaves_only_the_overall_test():
    labels = np.arange(4)  # four classes, one sample each: nothing testable per class
    result = categorize(effects([np.full(4, 0.3)], labels))
    assert result.class_means.shape == (1, 0)
    assert result.categories[0] == DETRIMENTAL


def test_ranking_order():
    labels = np.repeat([0, 1], 10)
    rows = [np.full(20, v) for v in (0.0, 0.01, -0.2, 0.05, 0.0005)]
    categorization = categorize(effects(rows, labels))
    assert list(categorization.categories) == [NEUTRAL, DETRIMENTAL, CRITICAL, DETRIMENTAL, NEUTRAL]
    paper = RankConfig("xi", per_cost=False, categories_first=True, allow_critical=False)
    assert causal_ranking(categorization, paper).order == (3, 1, 4, 0)
    with_critical = RankConfig("xi", per_cost=False, categories_first=True)
    assert causal_ranking(categorization, with_critical).order == (3, 1, 4, 0, 2)
    with pytest.raises(ValueError, match="not measured"):
        causal_ranking(categorization, RankConfig("kl", per_cost=False))


def test_ranking_by_damage_per_cost_in_one_order():
    labels = np.repeat([0, 1], 10)
    rows = [np.full(20, v) for v in (0.0, 0.01, -0.2, 0.0)]
    kl = np.array([[0.4] * 20, [0.3] * 20, [0.5] * 20, [0.1] * 20])
    log_ratio = -kl
    result = CausalEffects(
        unit_ids=np.arange(4),
        relative_effects=np.stack(rows),
        labels=labels,
        baseline=np.ones(20),
        log_ratio=log_ratio,
        kl=kl,
    )
    categorization = categorize(result)
    costs = {0: 100.0, 1: 10.0, 2: 1000.0, 3: 1.0}
    # damage per unit saved: 0.004, 0.03, 0.0005, 0.1; in one order the critical unit 2 first
    single = RankConfig("kl", categories_first=False)
    assert causal_ranking(categorization, single, costs).order == (2, 0, 1, 3)
    by_logp = causal_ranking(categorization, RankConfig("logp", categories_first=False), costs)
    assert by_logp.order == (2, 0, 1, 3)
    assert by_logp.scores[0] == pytest.approx(0.004)
    protected = RankConfig("kl", allow_critical=False)
    assert causal_ranking(categorization, protected, costs).order == (0, 1, 3)
    assert RankConfig().categories_first is False  # the measured default: one order
    unweighted = RankConfig("kl", per_cost=False, categories_first=False)
    assert causal_ranking(categorization, unweighted).order == (3, 1, 0, 2)
    grouped = RankConfig("kl", categories_first=True)  # critical units last
    assert causal_ranking(categorization, grouped, costs).order == (1, 0, 3, 2)
    with pytest.raises(ValueError, match="costs"):
        causal_ranking(categorization, RankConfig("kl"))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        CategoryConfig(test="z")
    with pytest.raises(ValueError):
        CategoryConfig(alpha=1.5)
    with pytest.raises(ValueError):
        CategoryConfig(correction="fdr")
