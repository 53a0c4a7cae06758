import numpy as np
import pytest
from scipy import stats

from cswap.categorize import (
    CRITICAL,
    DETRIMENTAL,
    NEUTRAL,
    POOLED,
    CategoryConfig,
    categorize,
    causal_ranking,
    correct,
    groups_to_test,
)
from cswap.scoring import CausalEffects


def effects(rows, labels):
    rows = np.asarray(rows, dtype=np.float64)
    return CausalEffects(np.arange(len(rows)), rows, np.asarray(labels), np.ones(rows.shape[1]))


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
    critical_in_class_1 = np.where(labels == 1, -0.05, 0.0) + noise
    detrimental = 0.02 + noise
    tiny = 0.0002 + noise  # within the margin: neutral however many samples
    dead = np.zeros(40)
    result = categorize(effects([critical_in_class_1, detrimental, tiny, dead], labels))
    assert list(result.categories) == [CRITICAL, DETRIMENTAL, NEUTRAL, NEUTRAL]
    assert result.counts() == {CRITICAL: 1, NEUTRAL: 2, DETRIMENTAL: 1}
    assert result.class_means.shape == (4, 2)
    assert result.class_p_values[0, 1] < 0.05 and result.class_p_values[0, 0] > 0.05


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
    assert causal_ranking(categorization).order == (3, 1, 4, 0)
    assert causal_ranking(categorization, allow_critical=True).order == (3, 1, 4, 0, 2)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        CategoryConfig(test="z")
    with pytest.raises(ValueError):
        CategoryConfig(alpha=1.5)
    with pytest.raises(ValueError):
        CategoryConfig(correction="fdr")
