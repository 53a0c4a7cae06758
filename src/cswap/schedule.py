"""The progressive schedule (METHOD.md section 6), criterion-agnostic and model-free.

The loop only sees three callables: ``rank(removed) -> Ranking`` (any criterion: causal,
magnitude, Taylor, ...), ``validate(removed, threshold) -> Validation`` (accuracy of the model with
those units removed; it may stop once the accuracy cannot reach ``threshold``) and the unit
space's accounting. So it is testable without a model, and every baseline
runs through the very same loop.

1. Candidates come in the ranking's order (for C-SWAP: detrimental, neutral, then critical
   units unless protected, each by damage per parameter saved; ``cswap.categorize``).
2. Start (``oneshot_start``): a cut to the target re-ranked every ``rescore_every`` of the
   parameters on the cut model, validated once; else the one-shot cut of the first ranking; else
   bisection along the re-ranked path. So a run never ends below its own one-shot cut.
3. Then chunks of candidates are tried. Accepted if validation accuracy stays within
   ``tolerance`` of the unpruned model; otherwise rolled back and retried with its first half
   (the rest stays in the candidate list), until a single unit (or round_to block) that fails
   is isolated, kept and marked ``failed``. Halving is not failure. The chunk is sized in real
   parameters (a shared weight once): it starts at ``initial_chunk`` of the prunable
   parameters, doubles after an acceptance and halves after a rejection; a chunk that would
   overshoot the target is trimmed to it. Whenever a further ``rescore_every`` of the
   parameters has gone since the last ranking, the remaining units are ranked again.
4. Stop reasons: ``target_reached``; ``candidates_exhausted`` (nothing left to try);
   ``tolerance_unmet`` (``patience`` isolated failures in a row: near the threshold every
   further decision is a coin toss on validation noise).
5. Per-group safety: a group never loses all its units (``min_keep``, at least ``round_to``);
   with ``round_to`` > 1 units leave a group in blocks, so that its kept count stays a multiple
   of ``round_to``.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

from cswap.categorize import Ranking
from cswap.errors import CswapError
from cswap.units import UnitSpace

TARGET_REACHED = "target_reached"
CANDIDATES_EXHAUSTED = "candidates_exhausted"
TOLERANCE_UNMET = "tolerance_unmet"
MAX_STEPS = "max_steps"  # a safety net (max_steps option), not expected in practice


@dataclass(frozen=True)
class Validation:
    accuracy: float
    paired_se: float  # sqrt(b + c) / n against the unpruned model's predictions
    images: int  # validated; fewer than all when the step was rejected early
    # False: validation stopped once the step could no longer pass; ``accuracy`` is then the
    # most the full validation could have given (every remaining image right)
    complete: bool = True


@dataclass(frozen=True)
class ScheduleConfig:
    target_params: float | None = None
    target_macs: float | None = None
    tolerance: float = 0.005
    initial_chunk: float = 0.01
    rescore_every: float = 0.10
    round_to: int = 1
    min_keep: int = 1
    patience: int = 8
    max_steps: int = 10_000
    # start with one validated cut to the target: the one-shot cut of the first ranking
    # (oneshot_first), else / then the cut re-scored every rescore_every; then bisection along
    # the re-scored cut: a run never ends below its own one-shot cut
    oneshot_start: bool = True
    oneshot_first: bool = True
    # intermediate params-removed fractions a chunk must not jump over (benchmarks record the
    # model at each one); the run still stops only at the target
    milestones: tuple[float, ...] = ()

    @property
    def cost_kind(self) -> str:
        """The currency of the target, in which units are ranked per cost and ``rescore_every``
        is counted: MACs when the only target is MACs, else parameters."""
        return "macs" if self.target_params is None and self.target_macs is not None else "params"

    @property
    def first_cut(self) -> float | None:
        """The fraction of the cost (``cost_kind``) that the start's one-shot cut removes, when
        the start validates it first: the target, or the first milestone (None otherwise)."""
        if not (self.oneshot_start and self.oneshot_first):
            return None
        if self.milestones:
            return min(self.milestones) if self.cost_kind == "params" else None
        return self.target_macs if self.cost_kind == "macs" else self.target_params

    def __post_init__(self) -> None:
        if self.target_params is None and self.target_macs is None:
            raise CswapError(
                "No target given: nothing says how much to remove.",
                "give a fraction to remove: --target-params 0.3 or --target-macs 0.3 "
                "(Python: target_params=0.3 or target_macs=0.3).",
            )
        for name in ("target_params", "target_macs", "tolerance"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Real)
            ):
                raise CswapError(
                    f"{name}={value!r} is a {type(value).__name__}, not a number.",
                    f"pass a number, e.g. {name}=0.3.",
                )
        for name in ("target_params", "target_macs"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise CswapError(
                    f"{name}={value} is outside (0, 1): it is the fraction to remove.",
                    "pass e.g. 0.5 to remove half.",
                )
        if not 0.0 <= self.tolerance < 1.0:
            raise CswapError(
                f"tolerance={self.tolerance} is outside [0, 1): it is an accuracy fraction.",
                "pass e.g. 0.005 for half a point.",
            )
        if any(not 0.0 < value < 1.0 for value in self.milestones):
            raise CswapError(
                f"milestones {self.milestones} must be fractions in (0, 1).", "use e.g. 0.3."
            )
        if self.round_to < 1 or self.min_keep < 1 or self.patience < 1 or self.max_steps < 1:
            raise CswapError(
                "round_to, min_keep, patience and max_steps must be >= 1.", "use e.g. round_to=8."
            )
        if not 0.0 < self.initial_chunk <= 1.0 or not 0.0 < self.rescore_every <= 1.0:
            raise CswapError(
                "initial_chunk and rescore_every are fractions in (0, 1].", "use e.g. 0.01."
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Step:
    index: int
    units: tuple[int, ...]
    accepted: bool
    params: int  # of the model if the step is accepted
    macs: int
    val_accuracy: float
    paired_se: float
    rescored_after: bool = False
    probe: bool = False  # a trial of the re-scored start: ``units`` is its whole prefix
    stopped_early: bool = False  # rejected before every validation image: val_accuracy is a bound

    def to_dict(self) -> dict:
        data = asdict(self)
        data["units"] = list(self.units)
        data["units_tried"] = len(self.units)
        return data


@dataclass(frozen=True)
class ScheduleState:
    """Everything needed to resume: written to the checkpoint after every accepted step."""

    removed: tuple[int, ...] = ()
    failed: tuple[int, ...] = ()
    steps: tuple[Step, ...] = ()
    chunk_params: float = 0.0
    cost_at_last_ranking: int = 0  # params or MACs left (config.cost_kind)
    consecutive_failures: int = 0
    block_limit: int = 0  # after a rejection: the retry takes at most this many blocks (0: any)


@dataclass(frozen=True)
class ScheduleResult:
    removed: tuple[int, ...]  # in removal order
    removed_at_step: dict[int, int]
    failed: tuple[int, ...]
    steps: tuple[Step, ...]
    stop_reason: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    baseline_accuracy: float
    final_validation: Validation


Rank = Callable[[tuple[int, ...]], Ranking]
# validate(removed, threshold=None): with a threshold, validation may stop as soon as the
# accuracy can no longer reach it (the step is rejected either way); without, it is complete
Validate = Callable[..., Validation]
OnStep = Callable[[ScheduleState, Step, Ranking | None], None]


def target_reached(space: UnitSpace, config: ScheduleConfig, removed: Sequence[int]) -> bool:
    reached = []
    if config.target_params is not None:
        limit = (1.0 - config.target_params) * space.params_total
        reached.append(space.params_after(removed) <= limit)
    if config.target_macs is not None:
        limit = (1.0 - config.target_macs) * space.macs_total
        reached.append(space.macs_after(removed) <= limit)
    return any(reached)


def _limit(space: UnitSpace, fraction: float) -> float:
    return (1.0 - fraction) * space.params_total


def next_milestone(space: UnitSpace, config: ScheduleConfig, removed: Sequence[int]):
    """The first milestone not yet reached by ``removed`` (None when all are)."""
    params = space.params_after(removed)
    for milestone in sorted(config.milestones):
        if params > _limit(space, milestone):
            return milestone
    return None


def oneshot(
    space: UnitSpace, config: ScheduleConfig, ranking: Ranking
) -> tuple[tuple[int, ...], bool]:
    """Remove blocks in ranking order, without validation, until the target: (removed, reached).

    Per-group safety and round_to apply as in the progressive loop. The cut lands on the target
    within one block (one unit with round_to=1) of parameters.
    """
    blocks = make_blocks(space, ranking.order, (), config)
    units, ends, count = _shortest_prefix(blocks, lambda r: target_reached(space, config, r))
    removed = units[: ends[count]]
    return removed, target_reached(space, config, removed)


def make_blocks(
    space: UnitSpace, order: Sequence[int], removed: Sequence[int], config: ScheduleConfig
) -> list[tuple[int, ...]]:
    """Candidates as removable blocks in ranking order, honouring per-group safety and round_to.

    With round_to = 1 a block is one unit. With round_to = k, a group of n units with m already
    removed first gives a block of (n - m) mod k units (so the kept count becomes a multiple of
    k), then blocks of k; a block takes its place in the order at its last unit.
    """
    removed_per_group: dict[int, int] = defaultdict(int)
    for unit_id in removed:
        removed_per_group[space.units[unit_id].group] += 1
    step = config.round_to
    floor = math.ceil(max(config.min_keep, 1) / step) * step
    pending: dict[int, list[int]] = defaultdict(list)
    closed: set[int] = set()
    blocks = []
    for unit_id in order:
        group = space.groups[space.units[unit_id].group]
        if group.id in closed:
            continue
        kept = group.size - removed_per_group[group.id]
        needed = kept % step or step
        if kept - needed < floor:
            closed.add(group.id)  # per-group safety: this group gives up no more units
            continue
        pending[group.id].append(unit_id)
        if len(pending[group.id]) == needed:
            blocks.append(tuple(pending.pop(group.id)))
            removed_per_group[group.id] += needed
    return blocks


def run_schedule(
    space: UnitSpace,
    config: ScheduleConfig,
    rank: Rank,
    validate: Validate,
    *,
    baseline: Validation,
    state: ScheduleState | None = None,
    on_step: OnStep | None = None,
) -> ScheduleResult:
    """Remove units progressively until the target, the candidates or the tolerance runs out."""
    prunable = max(1, space.prunable_params)
    state = state or ScheduleState(
        chunk_params=config.initial_chunk * prunable,
        cost_at_last_ranking=space.cost_total(config.cost_kind),
    )
    threshold = baseline.accuracy - config.tolerance
    ranking = rank(state.removed)
    blocks = _fresh_blocks(space, ranking, state, config)
    if config.oneshot_start and not state.steps and not state.removed:
        state, ranking = _oneshot_start(
            space, config, rank, ranking, validate, threshold, state, on_step
        )
        blocks = _fresh_blocks(space, ranking, state, config)
    stop_reason = CANDIDATES_EXHAUSTED
    while True:
        if target_reached(space, config, state.removed):
            stop_reason = TARGET_REACHED
            break
        if not blocks:
            stop_reason = CANDIDATES_EXHAUSTED
            break
        if len(state.steps) >= config.max_steps:
            stop_reason = MAX_STEPS
            break
        chunk_blocks = _take_chunk(space, config, blocks, state)
        chunk = tuple(unit for block in chunk_blocks for unit in block)
        trial = (*state.removed, *chunk)
        validation = validate(trial, threshold)
        accepted = validation.accuracy >= threshold
        step = Step(
            index=len(state.steps),
            units=chunk,
            accepted=accepted,
            params=space.params_after(trial),
            macs=space.macs_after(trial),
            val_accuracy=validation.accuracy,
            paired_se=validation.paired_se,
            stopped_early=not validation.complete,
        )
        new_ranking = None
        if accepted:
            state = replace(
                state,
                removed=trial,
                chunk_params=2 * max(state.chunk_params, space.params_of(chunk, trial)),
                consecutive_failures=0,
                block_limit=0,
            )
            kind = config.cost_kind
            cost = space.cost_after(state.removed, kind)
            remaining = _fresh_blocks(space, ranking, state, config)
            since = state.cost_at_last_ranking - cost
            if since >= config.rescore_every * space.cost_total(kind) and remaining:
                new_ranking = ranking = rank(state.removed)
                state = replace(state, cost_at_last_ranking=cost)
                step = replace(step, rescored_after=True)
        elif len(chunk_blocks) == 1:
            state = replace(
                state,
                failed=(*state.failed, *chunk),
                consecutive_failures=state.consecutive_failures + 1,
                block_limit=0,
            )
        else:
            # retry with the first half of the chunk: strictly fewer blocks, so it terminates.
            # Halving is not a failure: only an isolated unit that fails counts toward patience.
            state = replace(
                state,
                chunk_params=space.params_of(chunk, state.removed) / 2,
                block_limit=len(chunk_blocks) // 2,
            )
        state = replace(state, steps=(*state.steps, step))
        # The candidates follow from the ranking and what is removed or failed: recomputing them
        # (rather than slicing) is what makes a resumed run identical to an uninterrupted one.
        blocks = _fresh_blocks(space, ranking, state, config)
        if on_step is not None:
            on_step(state, step, new_ranking)
        if state.consecutive_failures >= config.patience:
            stop_reason = TOLERANCE_UNMET
            break
    removed_at_step = {}
    for step in state.steps:
        if step.accepted:
            removed_at_step.update(dict.fromkeys(step.units, step.index))
    final = validate(state.removed) if state.removed else baseline
    return ScheduleResult(
        removed=state.removed,
        removed_at_step=removed_at_step,
        failed=state.failed,
        steps=state.steps,
        stop_reason=stop_reason,
        params_before=space.params_total,
        params_after=space.params_after(state.removed),
        macs_before=space.macs_total,
        macs_after=space.macs_after(state.removed),
        baseline_accuracy=baseline.accuracy,
        final_validation=final,
    )


def _oneshot_start(space, config, rank, ranking, validate, threshold, state, on_step):
    """The start of a progressive run: one validated cut to the target (or the first
    milestone). ``oneshot_first``: the one-shot cut of the first ranking is validated first (it
    needs no further scoring round); if it fails, or without ``oneshot_first``, the cut
    re-scored every ``rescore_every`` of the cost on the cut model (effects interact), then the
    other of the two; if both fail, bisection along the re-scored path finds the longest prefix
    that passes, down to the initial chunk's size. Probe steps list the whole prefix they
    tried."""
    first = ranking
    plain = _prefixes(space, config, _fresh_blocks(space, first, state, config))
    cut = plain[len(plain) - 1]
    if config.oneshot_first:
        state, passed = _probe(space, validate, threshold, state, cut, on_step)
        if passed:
            return _accept_start(space, config, rank, state, cut, None, first, on_step)
    path, last_ranking = _rescored_path(space, config, rank, ranking, state)
    full = path[len(path) - 1]
    if full != cut or not config.oneshot_first:
        state, passed = _probe(space, validate, threshold, state, full, on_step)
        if passed:
            return _accept_start(space, config, rank, state, full, last_ranking, first, on_step)
    if cut != full and not config.oneshot_first:
        state, passed = _probe(space, validate, threshold, state, cut, on_step)
        if passed:
            return _accept_start(space, config, rank, state, cut, None, first, on_step)
    return _bisect_start(space, config, rank, validate, threshold, state, path, first, on_step)


def _bisect_start(space, config, rank, validate, threshold, state, path, first, on_step):
    """The longest prefix of the re-scored ``path`` that passes, to the initial chunk's size."""
    resolution = config.initial_chunk * max(1, space.prunable_params)
    low, high = 0, len(path) - 1
    while high - low > 1:
        if space.params_after(path[low]) - space.params_after(path[high]) <= resolution:
            break
        middle = (low + high) // 2
        state, passed = _probe(space, validate, threshold, state, path[middle], on_step)
        low, high = (middle, high) if passed else (low, middle)
    return _accept_start(space, config, rank, state, path[low], None, first, on_step)


def _probe(space, validate, threshold, state, units, on_step):
    validation = validate(units, threshold)
    step = Step(
        index=len(state.steps),
        units=units,
        accepted=validation.accuracy >= threshold,
        params=space.params_after(units),
        macs=space.macs_after(units),
        val_accuracy=validation.accuracy,
        paired_se=validation.paired_se,
        probe=True,
        stopped_early=not validation.complete,
    )
    state = replace(state, steps=(*state.steps, step))
    if on_step is not None and not step.accepted:
        on_step(state, step, None)
    return state, step.accepted


def _accept_start(space, config, rank, state, units, ranking, first, on_step):
    """Continue from ``units`` (accepted by the last probe, or nothing): the ranking valid there
    is ``ranking`` if given, else a re-scoring of ``units`` (``first`` when nothing passed)."""
    state = replace(state, removed=tuple(units))
    if not units:
        return state, first
    step = state.steps[-1]
    if ranking is None and not target_reached(space, config, units):
        ranking = rank(tuple(units))
        step = replace(step, rescored_after=True)
    elif ranking is None:
        ranking = first  # target reached: the loop ends at once
    state = replace(
        state,
        steps=(*state.steps[:-1], step),
        cost_at_last_ranking=space.cost_after(units, config.cost_kind),
    )
    if on_step is not None:
        on_step(state, step, ranking)
    return state, ranking


def _rescored_path(space, config, rank, ranking, state):
    """Prefixes of a removal order built without validation: cut ``rescore_every`` of the
    parameters (MACs for a MAC target) along the current ranking, re-rank on the cut model, cut
    again, up to the target. Returns the prefixes (block boundaries) and the ranking valid at
    the end."""
    units: list[int] = []
    ends = [0]
    while True:
        current = replace(state, removed=tuple(units))
        blocks = _fresh_blocks(space, ranking, current, config)
        kind = config.cost_kind
        goal = space.cost_after(units, kind) - config.rescore_every * space.cost_total(kind)
        for block in blocks:
            if space.cost_after(units, kind) <= goal or _done(space, config, units):
                break
            units.extend(block)
            ends.append(len(units))
        if _done(space, config, units) or not blocks or len(ends) == 1:
            return _Prefixes(tuple(units), tuple(ends)), ranking
        ranking = rank(tuple(units))


def _done(space, config, removed) -> bool:
    return target_reached(space, config, removed) or _past_milestone(space, config, removed)


@dataclass(frozen=True)
class _Prefixes:
    """Prefix ``k`` of a ranking's blocks: ``self[k]`` (k = 0 is nothing)."""

    units: tuple[int, ...]
    lengths: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, count: int) -> tuple[int, ...]:
        return self.units[: self.lengths[count]]


def _prefixes(space, config, blocks) -> _Prefixes:
    """The cumulative removals along ``blocks``, from nothing up to the one-shot cut (found by
    bisection: the parameters left only fall along the prefixes)."""
    flat, ends, count = _shortest_prefix(blocks, lambda r: _done(space, config, r))
    return _Prefixes(flat, tuple(ends[: count + 1]))


def _shortest_prefix(blocks, reached) -> tuple[tuple[int, ...], list[int], int]:
    """(the blocks' units in order, where each prefix of blocks ends, the fewest blocks whose
    units satisfy ``reached``; all of them when none do). ``reached`` must be monotone along
    the prefixes (the cost left only falls as units are added): bisection, log n calls."""
    flat: list[int] = []
    ends = [0]
    for block in blocks:
        flat.extend(block)
        ends.append(len(flat))
    low, high = 0, len(ends) - 1
    while low < high:
        middle = (low + high) // 2
        if reached(flat[: ends[middle]]):
            high = middle
        else:
            low = middle + 1
    return tuple(flat), ends, low


def _past_milestone(space, config, removed) -> bool:
    """``removed`` has reached the first milestone (benchmarks record the model there)."""
    first = min(config.milestones, default=None)
    return first is not None and space.params_after(removed) <= _limit(space, first)


def _fresh_blocks(space, ranking, state, config) -> list[tuple[int, ...]]:
    skip = set(state.removed) | set(state.failed)
    order = [unit for unit in ranking.order if unit not in skip]
    return make_blocks(space, order, state.removed, config)


def _take_chunk(space, config, blocks, state) -> list[tuple[int, ...]]:
    """Leading blocks worth about ``chunk_params`` parameters, trimmed at the target."""
    chunk: list[tuple[int, ...]] = []
    removed = list(state.removed)
    start = space.params_after(removed)
    milestone = next_milestone(space, config, removed)
    for block in blocks:
        chunk.append(block)
        removed.extend(block)
        total = start - space.params_after(removed)  # shared weights count once
        if total >= state.chunk_params or target_reached(space, config, removed):
            break
        if milestone is not None and space.params_after(removed) <= _limit(space, milestone):
            break
        if state.block_limit and len(chunk) >= state.block_limit:
            break
    return chunk
