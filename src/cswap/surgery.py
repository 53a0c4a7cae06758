"""Physical removal through Torch-Pruning, replayable from a plan in original numbering."""

from __future__ import annotations

import copy

import torch
from torch import nn

from cswap.adapters import after_surgery, find_head_sites
from cswap.compensation import Compensation, fold
from cswap.errors import CswapError, first_line
from cswap.intervene import removed
from cswap.units import UnitSpace, dependency_graph


class EquivalenceError(CswapError):
    """The physically pruned model differs from the masked one: a mis-coupled removal."""


def apply_plan(
    model: nn.Module, plan: dict[str, list[int]], example_input: torch.Tensor
) -> nn.Module:
    """Remove, in place, the channels listed per root layer (original numbering) from ``model``.

    Groups are disjoint in the dimensions they prune, so removing one group never renumbers the
    dimension of another: the plan replays in any order on the unpruned architecture.
    """
    if not plan:
        return model
    modules = dict(model.named_modules())
    missing = [root for root in plan if root not in modules]
    if missing:
        raise CswapError(
            f"The removal plan names layers {missing} that the model does not have.",
            "replay a plan onto the same architecture it was made for.",
        )
    was_training = model.training
    model.eval()
    sites = {site.attention: (adapter, site) for adapter, site in find_head_sites(model)}
    try:
        for root, indices in plan.items():
            if root in sites:  # heads: the adapter keeps the attention module's attributes in sync
                adapter, site = sites[root]
                adapter.remove_heads(model, site, list(indices))
        channel_plan = {root: ix for root, ix in plan.items() if root not in sites}
        if not channel_plan:
            return model
        graph = dependency_graph(model, example_input)
        for root, indices in channel_plan.items():
            module = modules[root]
            pruner = graph.get_pruner_of_module(module)
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(indices))
            group.prune()
        after_surgery(model)
    finally:
        model.train(was_training)
    return model


def prune_and_fold(
    model: nn.Module,
    space: UnitSpace,
    units: list[int],
    example_input: torch.Tensor,
    compensation: Compensation | None = None,
) -> tuple[nn.Module, dict[str, str]]:
    """A physically pruned copy of ``model`` (with ``compensation``: the removed units' mean
    contribution folded into their consumers first) and where each fold went; ``model`` itself
    is untouched."""
    pruned = copy.deepcopy(model)
    sinks = fold(pruned, space, units, compensation, example_input) if compensation else {}
    return apply_plan(pruned, space.removal_plan(units), example_input), sinks


def prune_copy(
    model: nn.Module,
    space: UnitSpace,
    units: list[int],
    example_input: torch.Tensor,
    compensation: Compensation | None = None,
) -> nn.Module:
    """``prune_and_fold`` without the fold record."""
    return prune_and_fold(model, space, units, example_input, compensation)[0]


def verify_groups(
    model: nn.Module,
    space: UnitSpace,
    example_input: torch.Tensor,
    *,
    slice_params: int | None = None,
) -> dict[str, str]:
    """Root layer -> why its group fails, for every group whose units cannot be removed
    physically as they are masked: every other unit of every group (half of it: an error that
    grows with what is removed, such as a normalization over channels that is not recomputed,
    shows) is removed at once from a copy that shares the untouched tensors with ``model``
    (one surgery when all pass; on a large model, one per slice of groups whose layers hold at
    most ``slice_params``, by default an eighth of its parameters or 16M); a failure is
    bisected down to the groups that cause it."""
    failed: dict[str, str] = {}
    total = sum(p.numel() for p in model.parameters())
    budget = slice_params if slice_params is not None else max(16_000_000, total // 8)
    pending = _memory_slices(model, list(space.groups), budget)
    while pending:
        groups = pending.pop()
        removal = [unit for g in groups for unit in g.unit_ids[::2]]
        reason = _removal_failure(model, space, removal, example_input)
        if reason is None:
            continue
        if len(groups) == 1:
            failed[groups[0].root] = reason
            continue
        middle = len(groups) // 2
        pending += [groups[:middle], groups[middle:]]
    return failed


def _memory_slices(model: nn.Module, groups: list, budget: int) -> list[list]:
    """``groups`` in consecutive slices whose layers hold at most ``budget`` parameters (a
    group larger than that alone): removing units copies only the tensors it changes."""
    modules = dict(model.named_modules())

    def size(layer: str) -> int:
        return sum(t.numel() for t in modules[layer].parameters(recurse=False))

    slices: list[list] = [[]]
    held = 0
    for group in groups:
        cost = sum(size(layer) for layer in group.layers if layer in modules)
        if slices[-1] and held + cost > budget:
            slices.append([])
            held = 0
        slices[-1].append(group)
        held += cost
    return [chunk for chunk in slices if chunk]


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers: surgery replaces
    the tensors it prunes (Torch-Pruning never writes into them), so the copy costs only what
    it changes. Verification checks ``model``'s tensors' version counters afterwards."""
    tensors = [*model.parameters(), *model.buffers()]
    return copy.deepcopy(model, memo={id(t): t for t in tensors})


def _versions(model: nn.Module) -> list[int]:
    return [t._version for t in (*model.parameters(), *model.buffers())]


def _removal_failure(model, space, units, example_input) -> str | None:
    """Why removing ``units`` from a copy fails or differs from masking them; None if not."""
    before = _versions(model)
    try:
        pruned = apply_plan(shared_copy(model), space.removal_plan(units), example_input)
        check_equivalence(model, pruned, space, units, example_input)
    except EquivalenceError as error:
        return f"removing a unit is not what masking it computes ({first_line(error)})"
    except Exception as error:  # Torch-Pruning or the pruned model's forward pass
        if _out_of_memory(error):  # says nothing about the group: no copy fits
            raise CswapError(
                "Out of memory while removing units from a copy of the model to verify them "
                f"({first_line(error)[:120]}): pruning needs room for a second copy.",
                "free memory or use a machine with about twice the model's size to spare.",
            ) from error
        return f"removing a unit fails ({type(error).__name__}: {first_line(error)})"
    finally:
        if _versions(model) != before:  # the shared tensors were written: never go on
            raise RuntimeError("Verification changed the model's tensors in place: a bug.")
    return None


def _out_of_memory(error: Exception) -> bool:
    text = str(error)
    return isinstance(error, MemoryError) or any(
        marker in text for marker in ("DefaultCPUAllocator", "out of memory", "OutOfMemory")
    )


@torch.no_grad()
def check_equivalence(
    model: nn.Module,
    pruned: nn.Module,
    space: UnitSpace,
    units: list[int],
    batch: torch.Tensor,
    *,
    compensation: Compensation | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> float:
    """Masked output of ``model`` == output of ``pruned`` on ``batch``; the max abs difference.

    Raises EquivalenceError when they differ: silent mis-coupling is the worst failure a pruner
    can have.
    """
    model_mode, pruned_mode = model.training, pruned.training
    model.eval()
    pruned.eval()
    try:
        with removed(model, space, units, compensation):
            expected = model(batch)
        actual = pruned(batch)
    finally:
        model.train(model_mode)
        pruned.train(pruned_mode)
    difference = float((expected - actual).abs().max())
    # relative to the output's scale, not element by element: float error grows with the
    # magnitudes inside the network (a random-init Inception-v3 outputs ~1e8), and a
    # mis-coupled removal changes outputs on the scale of the output itself
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if not difference <= atol + rtol * scale:
        raise EquivalenceError(
            f"The physically pruned model differs from the masked model (max |diff| "
            f"{difference:.3g}): the dependency graph mis-coupled a removal.",
            "please report this model; meanwhile exclude the offending layers with "
            "ignored_layers (--ignore LAYER).",
        )
    return difference
