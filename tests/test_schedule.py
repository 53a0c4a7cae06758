"""The progressive schedule with fake rankings and validations: no model runs here."""

import itertools
from collections import Counter
from dataclasses import replace

import pytest
import torch

from conftest import TinyNet
from cswap.categorize import Ranking
from cswap.errors import CswapError
from cswap.schedule import (
    CANDIDATES_EXHAUSTED,
    TARGET_REACHED,
    TOLERANCE_UNMET,
    ScheduleConfig,
    Validation,
    make_blocks,
    oneshot,
    run_schedule,
)
from cswap.units import discover_units

SPACE = discover_units(TinyNet(width=16), torch.zeros(1, 1, 14, 14))
BASELINE = Validation(accuracy=0.9, paired_se=0.0, images=1000)


def ranker(order=None, calls=None):
    def rank(removed):
        if calls is not None:
            calls.append(len(removed))
        gone = set(removed)
        units = order if order is not None else [u.id for u in SPACE.units]
        return Ranking(order=tuple(u for u in units if u not in gone))

    return rank


def validator(bad=frozenset(), cost=0.01):
    def validate(removed, threshold=None):
        return Validation(0.9 - cost * len(set(removed) & bad), 0.001, 1000)

    return validate


def test_reaches_the_target_without_touching_harmful_units():
    bad = frozenset(range(0, len(SPACE), 7))
    config = ScheduleConfig(target_params=0.4, tolerance=0.005)
    result = run_schedule(SPACE, config, ranker(), validator(bad), baseline=BASELINE)
    assert result.stop_reason == TARGET_REACHED
    assert result.params_after <= 0.6 * SPACE.params_total
    assert not set(result.removed) & bad
    assert set(result.failed) <= bad and result.failed
    # trimmed at the target: one unit fewer would not have reached it
    last_unit = result.removed[-1]
    assert result.params_after + SPACE.units[last_unit].params > 0.6 * SPACE.params_total - 1


def test_macs_target_and_first_of_two_targets():
    config = ScheduleConfig(target_macs=0.3)
    result = run_schedule(SPACE, config, ranker(), validator(), baseline=BASELINE)
    assert result.stop_reason == TARGET_REACHED
    assert result.macs_after <= 0.7 * SPACE.macs_total
    both = ScheduleConfig(target_params=0.9, target_macs=0.1)
    result = run_schedule(SPACE, both, ranker(), validator(), baseline=BASELINE)
    assert result.macs_after <= 0.9 * SPACE.macs_total
    assert result.params_after > 0.1 * SPACE.params_total


def test_stops_when_no_chunk_passes():
    config = ScheduleConfig(target_params=0.5, patience=3, initial_chunk=0.2, oneshot_start=False)
    everything_bad = frozenset(range(len(SPACE)))
    result = run_schedule(SPACE, config, ranker(), validator(everything_bad), baseline=BASELINE)
    assert result.stop_reason == TOLERANCE_UNMET
    assert result.removed == ()
    assert len(result.failed) == 3  # patience counts isolated failures only
    sizes = [len(step.units) for step in result.steps]
    assert sizes[0] > 4  # a real chunk was tried and halved down to single units
    assert sum(size == 1 for size in sizes) == 3
    # chunk halving: every rejected chunk is at most half the size of the one before it
    assert all(b <= max(1, a // 2) + 1 for a, b in itertools.pairwise(sizes))


def test_a_harmful_unit_at_the_head_of_a_large_chunk_is_isolated_and_the_run_goes_on():
    harmful = SPACE.units[-1].id
    order = [harmful, *[u.id for u in SPACE.units if u.id != harmful]]
    for start in (False, True):
        config = ScheduleConfig(
            target_params=0.8, initial_chunk=0.3, patience=2, oneshot_start=start
        )
        result = run_schedule(
            SPACE, config, ranker(order=order), validator({harmful}), baseline=BASELINE
        )
        assert result.stop_reason == TARGET_REACHED
        assert result.failed == (harmful,)
        assert harmful not in result.removed
        assert result.params_after <= 0.2 * SPACE.params_total


def test_chunk_sizing_counts_a_shared_weight_once():
    all_units = [u.id for u in SPACE.units]
    real = SPACE.params_total - SPACE.params_after(all_units)
    assert SPACE.prunable_params == real
    assert sum(u.params for u in SPACE.units) > real  # a weight read by two groups, twice
    config = ScheduleConfig(target_params=0.9, initial_chunk=0.2, oneshot_start=False)
    result = run_schedule(SPACE, config, ranker(), validator(), baseline=BASELINE)
    first = result.steps[0]
    saved = SPACE.params_total - first.params
    largest = max(u.params for u in SPACE.units)
    assert 0.2 * real <= saved < 0.2 * real + largest


def test_the_progressive_run_ends_at_least_as_far_as_its_oneshot_cut():
    """Validation that rejects every partial removal between 10% and 60% (as noise near the
    tolerance can): chunk by chunk the loop stalls, but the one-shot cut to 70% passes."""

    def validate(removed, threshold=None):
        params = SPACE.params_after(removed)
        stalled = 0.4 * SPACE.params_total < params < 0.9 * SPACE.params_total
        return Validation(0.5 if stalled else 0.9, 0.001, 1000)

    config = ScheduleConfig(target_params=0.7, patience=2)
    result = run_schedule(SPACE, config, ranker(), validate, baseline=BASELINE)
    assert result.stop_reason == TARGET_REACHED and result.steps[0].probe
    slow = run_schedule(
        SPACE, replace(config, oneshot_start=False), ranker(), validate, baseline=BASELINE
    )
    assert slow.stop_reason == TOLERANCE_UNMET  # what the probe avoids


def test_a_failing_oneshot_cut_backs_off_along_the_ranking_by_bisection():
    order = [u.id for u in SPACE.units]
    limit = 0.5 * SPACE.params_total  # the ranking is fine until half of the params are gone

    def validate(removed, threshold=None):
        return Validation(0.5 if SPACE.params_after(removed) < limit else 0.9, 0.001, 1000)

    config = ScheduleConfig(target_params=0.8, patience=1, initial_chunk=0.01)
    result = run_schedule(SPACE, config, ranker(order), validate, baseline=BASELINE)
    probes = [step for step in result.steps if step.probe]
    assert not probes[0].accepted and len(probes) >= 3
    accepted = [step for step in probes if step.accepted]
    full_cut = probes[0].units
    assert accepted and accepted[-1].units == full_cut[: len(accepted[-1].units)]
    # the longest passing prefix was found to within the resolution of the initial chunk
    resolution = 0.01 * SPACE.prunable_params + max(u.params for u in SPACE.units)
    assert accepted[-1].params - limit <= resolution
    assert result.params_after >= limit


def test_stops_when_candidates_run_out():
    config = ScheduleConfig(target_params=0.9)
    few = [SPACE.groups[-1].unit_ids[0], SPACE.groups[-1].unit_ids[1]]
    result = run_schedule(SPACE, config, ranker(order=few), validator(), baseline=BASELINE)
    assert result.stop_reason == CANDIDATES_EXHAUSTED
    assert sorted(result.removed) == sorted(few)


def test_every_group_keeps_a_unit():
    config = ScheduleConfig(target_params=0.99)
    result = run_schedule(SPACE, config, ranker(), validator(), baseline=BASELINE)
    per_group = Counter(SPACE.units[u].group for u in result.removed)
    for group in SPACE.groups:
        assert per_group[group.id] <= group.size - 1


def test_round_to_keeps_counts_multiples():
    config = ScheduleConfig(target_params=0.99, round_to=4)
    result = run_schedule(SPACE, config, ranker(), validator(), baseline=BASELINE)
    per_group = Counter(SPACE.units[u].group for u in result.removed)
    for group in SPACE.groups:
        kept = group.size - per_group[group.id]
        assert kept % 4 == 0 and kept >= 4


def test_blocks_with_round_to_start_by_rounding_the_group_down():
    group = SPACE.groups[0]  # 16 units
    config = ScheduleConfig(target_params=0.5, round_to=3)
    blocks = make_blocks(SPACE, list(group.unit_ids), [], config)
    assert [len(block) for block in blocks] == [1, 3, 3, 3, 3]  # 16 -> 15 -> ... -> 3


def test_rescoring_after_each_fraction_of_params():
    calls = []
    config = ScheduleConfig(target_params=0.5, rescore_every=0.1, oneshot_start=False)
    run_schedule(SPACE, config, ranker(calls=calls), validator(), baseline=BASELINE)
    assert calls[0] == 0 and len(calls) >= 3
    assert calls == sorted(calls)


def test_rescorings_are_spaced_by_the_fraction_of_params():
    seen = []

    def rank(removed):
        seen.append(SPACE.params_after(removed))
        return ranker()(removed)

    config = ScheduleConfig(target_params=0.6, rescore_every=0.15, oneshot_start=False)
    result = run_schedule(SPACE, config, rank, validator(), baseline=BASELINE)
    assert seen[0] == SPACE.params_total and len(seen) >= 3
    for before, after in itertools.pairwise(seen):
        assert before - after >= 0.15 * SPACE.params_total
    rescored = [step for step in result.steps if step.rescored_after]
    assert len(rescored) == len(seen) - 1


def test_same_inputs_same_result():
    bad = frozenset(range(3, len(SPACE), 5))
    config = ScheduleConfig(target_params=0.4)
    a = run_schedule(SPACE, config, ranker(), validator(bad), baseline=BASELINE)
    b = run_schedule(SPACE, config, ranker(), validator(bad), baseline=BASELINE)
    assert a.removed == b.removed and a.steps == b.steps


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"target_params": 0.0},
        {"target_params": 1.0},
        {"target_macs": -0.2},
        {"target_params": 0.5, "tolerance": 2.0},
    ],
)
def test_bad_targets_are_refused(kwargs):
    with pytest.raises(CswapError):
        ScheduleConfig(**kwargs)


@pytest.mark.parametrize("seed", range(6))
def test_always_terminates_without_the_safety_net(seed):
    import random

    rng = random.Random(seed)
    order = [u.id for u in SPACE.units]
    rng.shuffle(order)  # big and small units interleaved: halving params alone could stall
    bad = frozenset(rng.sample(order, len(order) // 3))

    def validate(removed, threshold=None):
        return Validation(0.5 if set(removed) & bad else 0.9, 0.001, 1000)

    config = ScheduleConfig(target_params=0.9, patience=1000, max_steps=2000)
    result = run_schedule(SPACE, config, ranker(order=order), validate, baseline=BASELINE)
    assert result.stop_reason != "max_steps"
    assert not set(result.removed) & bad
    assert set(result.failed) <= bad


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_savings_are_the_marginal_cost_of_each_unit_on_the_current_model(kind):
    after = SPACE.params_after if kind == "params" else SPACE.macs_after
    removed = [u.id for u in SPACE.units[::3]]
    savings = SPACE.savings(removed, kind)
    assert set(savings) == {u.id for u in SPACE.units} - set(removed)
    for unit, saved in savings.items():
        assert saved == pytest.approx(after(removed) - after([*removed, unit]), abs=1.0)
    alone = {u.id: u.params if kind == "params" else u.macs for u in SPACE.units}
    assert any(saved != pytest.approx(alone[unit]) for unit, saved in savings.items())


def _flipping_ranker(calls, validations, kind="params"):
    """Natural order at the first ranking, reversed at the next, and so on."""

    def rank(removed):
        calls.append((SPACE.cost_after(removed, kind), len(validations)))
        gone = set(removed)
        order = [u.id for u in SPACE.units if u.id not in gone]
        return Ranking(order=tuple(order if len(calls) % 2 else order[::-1]))

    return rank


def _recording_validator(validations):
    """Accepts every step, recording what it was asked to validate."""

    def validate(removed, threshold=None):
        validations.append(removed)
        return Validation(0.9, 0.001, 1000)

    return validate


def test_the_start_rescores_along_its_cut_before_validating():
    calls, validations = [], []
    validate = _recording_validator(validations)

    config = ScheduleConfig(target_params=0.5, rescore_every=0.1, oneshot_first=False)
    result = run_schedule(
        SPACE, config, _flipping_ranker(calls, validations), validate, baseline=BASELINE
    )
    assert result.stop_reason == TARGET_REACHED
    assert len(result.steps) == 1 and result.steps[0].probe and result.steps[0].accepted
    before = [params for params, seen in calls if seen == 0]
    assert len(before) >= 4  # re-ranked on the cut model every 10% before validating once
    for earlier, later in itertools.pairwise(before):
        assert earlier - later >= 0.1 * SPACE.params_total
    natural = Ranking(order=tuple(u.id for u in SPACE.units))
    plain, _ = oneshot(SPACE, config, natural)
    assert set(result.removed) != set(plain)  # the cut followed the re-ranked orders


def test_a_mac_target_rescores_every_tenth_of_the_macs():
    calls, validations = [], []
    validate = _recording_validator(validations)

    config = ScheduleConfig(target_macs=0.35, rescore_every=0.1, oneshot_first=False)
    assert config.cost_kind == "macs"
    ranker = _flipping_ranker(calls, validations, kind="macs")
    result = run_schedule(SPACE, config, ranker, validate, baseline=BASELINE)
    assert result.stop_reason == TARGET_REACHED and len(result.steps) == 1
    before = [macs for macs, seen in calls if seen == 0]
    assert len(before) == 3  # at 0, then after >= 10% and >= 20% of the MACs (target: 35%)
    for earlier, later in itertools.pairwise(before):
        assert earlier - later >= 0.1 * SPACE.macs_total


def test_the_plain_oneshot_cut_is_the_fallback_when_the_rescored_cut_fails():
    calls, validations = [], []
    natural = Ranking(order=tuple(u.id for u in SPACE.units))
    config = ScheduleConfig(target_params=0.5, rescore_every=0.1, patience=1, oneshot_first=False)
    plain, _ = oneshot(SPACE, config, natural)
    bad = {u.id for u in SPACE.units} - set(plain)

    def validate(removed, threshold=None):
        validations.append(removed)
        return Validation(0.5 if set(removed) & bad else 0.9, 0.001, 1000)

    result = run_schedule(
        SPACE, config, _flipping_ranker(calls, validations), validate, baseline=BASELINE
    )
    first, second = result.steps[:2]
    assert first.probe and not first.accepted
    assert second.probe and second.accepted and set(second.units) == set(plain)
    assert result.stop_reason == TARGET_REACHED and set(result.removed) == set(plain)


def test_the_start_validates_the_first_rankings_oneshot_cut_first():
    calls, validations = [], []
    config = ScheduleConfig(target_params=0.5, rescore_every=0.1)
    assert config.first_cut == 0.5
    natural = Ranking(order=tuple(u.id for u in SPACE.units))
    plain, _ = oneshot(SPACE, config, natural)
    ranker = _flipping_ranker(calls, validations)
    result = run_schedule(
        SPACE, config, ranker, _recording_validator(validations), baseline=BASELINE
    )
    assert len(calls) == 1  # one scoring round: the cut passed, the target is reached
    assert validations[0] == plain and len(result.steps) == 1 and result.steps[0].accepted
    assert result.stop_reason == TARGET_REACHED and result.removed == plain


def test_a_failed_oneshot_cut_falls_back_to_the_rescored_cut():
    calls, validations = [], []
    config = ScheduleConfig(target_params=0.5, rescore_every=0.1, patience=1)
    natural = Ranking(order=tuple(u.id for u in SPACE.units))
    plain, _ = oneshot(SPACE, config, natural)
    bad = {plain[-1]}  # the plain cut fails on its last unit

    def validate(removed, threshold=None):
        validations.append(removed)
        return Validation(0.5 if set(removed) & bad else 0.9, 0.001, 1000)

    result = run_schedule(
        SPACE, config, _flipping_ranker(calls, validations), validate, baseline=BASELINE
    )
    first, second = result.steps[:2]
    assert first.probe and not first.accepted and first.units == plain
    assert [seen for _, seen in calls][:2] == [0, 1]  # re-scored only after the plain cut failed
    assert second.probe and second.accepted and set(second.units) != set(plain)
    assert not set(second.units) & bad and result.stop_reason == TARGET_REACHED


@pytest.mark.parametrize(
    ("settings", "first_cut"),
    [
        ({"target_macs": 0.2}, 0.2),
        ({"target_params": 0.4, "target_macs": 0.2}, 0.4),
        ({"target_params": 0.5, "milestones": (0.3, 0.1)}, 0.1),
        ({"target_params": 0.5, "oneshot_first": False}, None),
        ({"target_params": 0.5, "oneshot_start": False}, None),
    ],
)
def test_the_first_cut_is_the_target_or_first_milestone_in_the_cost_currency(settings, first_cut):
    assert ScheduleConfig(**settings).first_cut == first_cut


@pytest.mark.parametrize("round_to", [1, 4])
@pytest.mark.parametrize(
    "targets", [{"target_params": 0.3}, {"target_macs": 0.45}, {"target_params": 0.999}]
)
def test_the_oneshot_cut_is_the_shortest_prefix_of_blocks_that_reaches_the_target(
    targets, round_to
):
    # oracle: walk the blocks one by one and stop at the first prefix that meets the target
    config = ScheduleConfig(round_to=round_to, **targets)
    order = [u.id for u in SPACE.units][::-1]
    removed: list[int] = []
    for block in make_blocks(SPACE, order, (), config):
        params, macs = SPACE.params_after(removed), SPACE.macs_after(removed)
        if params <= (1 - targets.get("target_params", 2)) * SPACE.params_total or (
            macs <= (1 - targets.get("target_macs", 2)) * SPACE.macs_total
        ):
            break
        removed.extend(block)
    cut, reached = oneshot(SPACE, config, Ranking(order=tuple(order)))
    assert cut == tuple(removed)
    assert reached == (targets.get("target_params") != 0.999)


def test_the_first_scoring_round_serves_the_next_cut_and_the_oneshot_cut():
    from types import SimpleNamespace

    from cswap.session import CausalRanker, Options

    ranker = CausalRanker(
        SimpleNamespace(space=SPACE),
        Options(),
        False,
        None,
        cost_kind="macs",
        horizon=0.1,
        first_cut=0.3,
    )
    total = SPACE.macs_total
    assert ranker._horizons(()) == [0.1 * total, 0.3 * total]
    assert ranker._horizons((0, 1)) == [0.1 * total]  # a later round: the next cut only
