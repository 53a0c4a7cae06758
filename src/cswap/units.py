"""Units: the smallest structures that can be removed on their own.

A CNN unit is index ``i`` of a coupled channel group found by Torch-Pruning's dependency graph: an
output channel of a convolution (or hidden neuron of a Linear) with everything coupled to it (its
BatchNorm entry, the input channel of each consumer, the same channel of every block of a residual
stage). The model input and the classifier's output classes are never units, nor is anything in a
layer the user ignores.

A unit is removed *exactly* by masking its indices at the input of every consumer in its group
(convolutions and Linears that read it): the physically pruned model computes the same thing
(``cswap.intervene``). A normalization over the channels inside a group (a LayerNorm over channels,
a one-group GroupNorm) is recomputed over the kept channels (``cswap.norms``): the unit lists it in
``norms``. Groups where removal cannot be computed exactly (a GroupNorm of several groups, a
consumer cswap cannot mask) are excluded and listed with the reason.

The unit space also does the accounting: parameters and MACs of the model after removing any set
of units, computed from per-layer kept fractions (exact for convolutions, Linears and per-channel
norms; checked against the physically pruned model by the tests).
"""

from __future__ import annotations

import math
import signal
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.utils import flop_counter
from torch_pruning.dependency import constants as tp_constants
from torch_pruning.dependency import index_mapping as tp_index_mapping
from torch_pruning.dependency import shape_infer as tp_shape_infer

from cswap.adapters import HeadSite, find_head_sites
from cswap.errors import CswapError, first_line, running_model
from cswap.inputs import resident_bytes
from cswap.norms import channel_dim, mixes_channels, recomputable

_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)  # group roots and channel consumers
OVER_BUDGET = "Torch-Pruning's grouping of its channels ran over its budget"
_PER_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class MaskTarget:
    """Indices of a consumer layer's input that carry a unit: ``dim`` 1 (conv) or -1 (Linear)."""

    layer: str
    dim: int
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Unit:
    id: int
    group: int
    index: int  # original numbering, in the group's root layer
    kind: str  # "channel" | "neuron" | "head"
    layers: tuple[str, ...]  # every layer the unit spans
    params: int  # parameters removed with this unit alone
    macs: int  # MACs (per image) removed with this unit alone
    targets: tuple[MaskTarget, ...]
    # every (layer, "out" | "in", indices) slice the unit owns: producers, norms and consumers
    slices: tuple[tuple[str, str, tuple[int, ...]], ...] = ()
    # normalizations over channels recomputed without the unit (dim: their channel dimension)
    norms: tuple[MaskTarget, ...] = ()

    @property
    def touched(self) -> tuple[str, ...]:
        """Every layer an intervention on the unit changes: consumers and recomputed norms."""
        return tuple(t.layer for t in (*self.targets, *self.norms))

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "group": self.group,
            "layers": list(self.layers),
            "index": self.index,
            "params": self.params,
            "macs": self.macs,
        }


@dataclass(frozen=True)
class UnitGroup:
    id: int
    root: str  # root layer name
    kind: str
    size: int
    layers: tuple[str, ...]
    unit_ids: tuple[int, ...]


@dataclass(frozen=True)
class ExcludedGroup:
    root: str
    size: int
    reason: str


@dataclass(frozen=True)
class _DimTerm:
    """A tensor (or a layer's MACs) that shrinks with the kept fraction of some dimensions."""

    amount: int
    dims: tuple[tuple[str, str], ...]  # (layer, "out" | "in")


@dataclass(frozen=True)
class UnitSpace:
    """All units of a model, their groups, and exact params / MACs accounting."""

    units: tuple[Unit, ...]
    groups: tuple[UnitGroup, ...]
    excluded: tuple[ExcludedGroup, ...]
    protected_layers: tuple[str, ...]
    params_total: int
    macs_total: int  # per image
    dim_sizes: dict[tuple[str, str], int] = field(repr=False)
    # unit id -> ((layer, "out"|"in"), how many indices of that dimension the unit removes), ...
    unit_dims: dict[int, tuple[tuple[tuple[str, str], int], ...]] = field(repr=False)
    param_terms: tuple[_DimTerm, ...] = field(repr=False)
    mac_terms: tuple[_DimTerm, ...] = field(repr=False)

    def __len__(self) -> int:
        return len(self.units)

    @property
    def prunable_params(self) -> int:
        """Parameters that all units together carry (a weight shared by a group counts once)."""
        return self.params_total - self.params_after(unit.id for unit in self.units)

    def params_of(self, units: Iterable[int], removed: Iterable[int] = ()) -> int:
        """Parameters that removing ``units`` on top of ``removed`` really saves."""
        removed = set(removed)
        return self.params_after(removed) - self.params_after(removed | set(units))

    def savings(self, removed: Iterable[int], kind: str = "params") -> dict[int, float]:
        """For every unit not in ``removed``: the parameters (or MACs) its removal alone saves
        from the model with ``removed`` gone (exact for the accounting terms)."""
        removed = set(removed)
        fractions = self._kept_fractions(removed)
        terms = self.param_terms if kind == "params" else self.mac_terms
        by_dim: dict[tuple[str, str], list[int]] = defaultdict(list)
        for position, term in enumerate(terms):
            for dim in term.dims:
                by_dim[dim].append(position)
        result = {}
        for unit in self.units:
            if unit.id in removed:
                continue
            change = {key: count / self.dim_sizes[key] for key, count in self.unit_dims[unit.id]}
            touched = {position for key in change for position in by_dim[key]}
            total = 0.0
            for position in touched:
                term = terms[position]
                before = after = float(term.amount)
                for dim in term.dims:
                    kept = fractions.get(dim, 1.0)
                    before *= kept
                    after *= max(0.0, kept - change.get(dim, 0.0))
                total += before - after
            result[unit.id] = total
        return result

    def _kept_fractions(self, removed: Iterable[int]) -> dict[tuple[str, str], float]:
        gone: dict[tuple[str, str], int] = defaultdict(int)
        for unit_id in set(removed):
            for key, count in self.unit_dims[unit_id]:
                gone[key] += count
        return {key: 1.0 - count / self.dim_sizes[key] for key, count in gone.items()}

    def _total(self, terms: Sequence[_DimTerm], fixed: int, removed: Iterable[int]) -> int:
        fractions = self._kept_fractions(removed)
        total = float(fixed)
        for term in terms:
            scale = 1.0
            for dim in term.dims:
                scale *= fractions.get(dim, 1.0)
            total += term.amount * scale
        return round(total)

    def params_after(self, removed: Iterable[int]) -> int:
        fixed = self.params_total - sum(term.amount for term in self.param_terms)
        return self._total(self.param_terms, fixed, removed)

    def macs_after(self, removed: Iterable[int]) -> int:
        fixed = self.macs_total - sum(term.amount for term in self.mac_terms)
        return self._total(self.mac_terms, fixed, removed)

    def cost_after(self, removed: Iterable[int], kind: str = "params") -> int:
        """``params_after`` or ``macs_after``, by ``kind``."""
        return self.params_after(removed) if kind == "params" else self.macs_after(removed)

    def cost_total(self, kind: str = "params") -> int:
        return self.params_total if kind == "params" else self.macs_total

    def removal_plan(self, removed: Iterable[int]) -> dict[str, list[int]]:
        """Root layer name -> original indices to remove, for surgery and for the saved spec."""
        plan: dict[str, list[int]] = defaultdict(list)
        for unit_id in sorted(set(removed)):
            unit = self.units[unit_id]
            plan[self.groups[unit.group].root].append(unit.index)
        return {root: sorted(indices) for root, indices in plan.items()}


def module_names(model: nn.Module) -> dict[nn.Module, str]:
    return {module: name for name, module in model.named_modules()}


def classifier_layers(model: nn.Module, example_input: torch.Tensor) -> tuple[list[str], int]:
    """The layers that produce the class logits (protected), and the number of classes.

    Refuses a model whose output is not (batch, classes) of class scores (see
    ``check_class_scores``), and images the model cannot run on.
    """
    names = module_names(model)
    executed: list[tuple[str, nn.Module, tuple[int, ...]]] = []

    def record(module, _inputs, output):
        if isinstance(output, torch.Tensor):
            executed.append((names[module], module, tuple(output.shape)))

    handles = [
        module.register_forward_hook(record)
        for module in model.modules()
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.Conv1d, *_NORMS))
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), running_model(tuple(example_input.shape), "the calibration images"):
            output = model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    check_class_scores(model, output, executed)
    num_classes = output.shape[1]
    layers = [(name, shape) for name, module, shape in executed if not isinstance(module, _NORMS)]
    candidates = [name for name, shape in layers if len(shape) >= 2 and shape[1] == num_classes]
    if not candidates:
        candidates = [name for name, shape in layers if shape[-1] == num_classes]
    if not candidates:
        raise CswapError(
            "Cannot find the layer that produces the class logits.",
            "pass it in ignored_layers (--ignore LAYER).",
        )
    return [candidates[-1]], num_classes


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def check_class_scores(model: nn.Module, output, executed) -> None:
    """Refuse an output that is not class scores: not (batch, classes), a headless backbone's
    features (a normalization after the last weight layer, or timm's ``num_classes=0``), or
    probabilities (a softmax already applied: every row non-negative and summing to 1)."""
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise CswapError(
            f"The model's output is {shape}, not (batch, classes): it is not an image classifier.",
            "wrap it so that forward(images) returns logits of shape (batch, classes).",
        )
    headless = getattr(model, "num_classes", None) == 0
    last_norm = None
    for name, module, _shape in executed:
        last_norm = (name, type(module).__name__) if isinstance(module, _NORMS) else None
    if headless or last_norm is not None:
        found = (
            "num_classes=0 (no classifier head)"
            if headless
            else f"its output comes from a {last_norm[1]} ({last_norm[0]}) after the last "
            "Linear/conv layer"
        )
        raise CswapError(
            f"The model's {output.shape[1]} outputs look like features, not class scores: {found}.",
            "build it with its classifier head (e.g. timm:NAME?num_classes=10, or keep the "
            "model's fc / head), or wrap it so that forward(images) returns logits.",
        )
    rows = output.double()
    if (
        output.shape[1] > 1
        and bool((rows >= 0).all())
        and bool(
            torch.allclose(rows.sum(dim=1), torch.ones(len(rows), dtype=rows.dtype), atol=1e-4)
        )
    ):
        raise CswapError(
            "The model outputs probabilities (every row is non-negative and sums to 1): a "
            "softmax is applied already, and effects on probabilities saturate.",
            "pass the model without its final softmax, so that it returns logits "
            "(log-probabilities from log_softmax are fine too).",
        )


def _mac_per_module(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs of each module itself (children excluded), for one image."""
    counter = flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example_input[:1])
    inclusive = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        _, _, path = key.partition(".")
        inclusive[path] = sum(ops.values()) // 2
    own = dict(inclusive)
    for path, value in inclusive.items():
        # subtract from the nearest ancestor that ran (containers like ModuleList never run)
        parent = path
        while parent:
            parent = parent.rpartition(".")[0]
            if parent in inclusive:
                own[parent] -= value
                break
    return own


def _is_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d | nn.Conv1d)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def _is_grouped(module: nn.Module) -> bool:
    """A grouped, not depthwise, convolution: one channel cannot leave it on its own."""
    return (
        isinstance(module, nn.Conv2d | nn.Conv1d)
        and module.groups > 1
        and not _is_depthwise(module)
    )


def discover_units(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    ignored_layers: Sequence[str] = (),
    excluded_roots: dict[str, str] | None = None,
    budget: GroupingBudget | None = None,
) -> UnitSpace:
    """Find every unit of ``model`` (channels of conv groups, neurons of Linear groups);
    ``excluded_roots``: root layer -> why its group is excluded (e.g. it failed verification,
    ``cswap.surgery.verify_groups``); ``budget``: what Torch-Pruning may spend grouping one
    root layer's channels (a root over it is excluded with the reason)."""
    names = module_names(model)
    by_name = dict(model.named_modules())
    unknown = [name for name in ignored_layers if name not in by_name]
    if unknown:
        raise CswapError(
            f"Ignored layer(s) {unknown} are not in the model.",
            "use names from model.named_modules().",
        )
    was_training = model.training
    model.eval()
    try:
        protected, _ = classifier_layers(model, example_input)
        # an ignored container ignores every layer inside it
        ignored_modules = [
            module for name in (*protected, *ignored_layers) for module in by_name[name].modules()
        ]
        graph, raw_groups, ungrouped = _dependency_groups(
            model, example_input, ignored_modules, budget or GroupingBudget(), excluded_roots or {}
        )
        macs_per_module = _mac_per_module(model, example_input)
    finally:
        model.train(was_training)
    sites = [site for _, site in find_head_sites(model)]
    space = _build_space(
        model, graph, raw_groups, names, protected, macs_per_module, sites, excluded_roots or {}
    )
    ungrouped = tuple(
        ExcludedGroup(names[module], graph.get_out_channels(module), reason)
        for module, reason in ungrouped.items()
    )
    return replace(space, excluded=space.excluded + ungrouped) if ungrouped else space


def dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, tolerant of operations whose channel index
    mapping it cannot work out (it fails on the reshapes of a channel shuffle) or maps off the
    channel dimension (channels-last windows, attention logits; ``_mapped_off_the_channels``):
    such an operation is cut out of the graph, so no group reaches across it. A group that
    needed to (its removal no longer fits the layers behind the cut) then fails verification
    on a copy (``cswap.surgery.verify_groups``) and is excluded with the reason; nothing is
    mis-coupled silently. Every stage that builds the graph (discovery, surgery, compensation)
    builds it here, so they all see the same groups."""
    graph = tp.DependencyGraph()
    with torch.enable_grad():  # Torch-Pruning traces through autograd
        try:
            graph.build_dependency(model, example_input, verbose=False)
        except Exception:
            if not getattr(graph, "module2node", None):
                raise  # failed before the index mapping: nothing to recover
            _tolerant_index_mapping(graph)
    for node in list(graph.module2node.values()):
        kinds = (tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.SLICE)
        if node.type in kinds and _mapped_off_the_channels(graph, node):
            _cut(node, unlink=False)
    return graph


def _mapped_off_the_channels(graph: tp.DependencyGraph, node) -> bool:
    """A reshape or slice that Torch-Pruning maps although it does not act on the channels of a
    (batch, channels, ...) tensor: the attention logits' (windows, heads, tokens, tokens) view,
    the window partitions and patch merging of channels-last tensors (Swin, MaxViT). There its
    mapping couples the wrong indices and its index lists multiply until memory runs out. A
    flatten of (batch, channels, ...) into channels x positions features is kept."""
    placeholder = tp_constants.INDEX_MAPPING_PLACEHOLDER
    deps = [dep for neighbour in (node, *node.inputs) for dep in neighbour.dependencies]
    mapped = any(
        m is not placeholder
        for dep in deps
        if dep.source is node or dep.target is node
        for m in dep.index_mapping
    )
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if not mapped or sizes is None or len(sizes) < 2:
        return False
    sizes = [int(size) for size in sizes]
    channels = _traced_channels(graph, node.inputs, tp_shape_infer.infer_out_channels_recursively)
    if channels is not None and sizes[1] != channels:
        return True
    if node.type != tp.ops.OPTYPE.RESHAPE:
        return False
    features = _traced_channels(graph, node.outputs, tp_shape_infer.infer_in_channels_recursively)
    return features is not None and features not in (sizes[1], math.prod(sizes[1:]))


def _next_mixing_norm(graph: tp.DependencyGraph, module: nn.Module) -> nn.Module | None:
    """A normalization over channels that cswap cannot recompute over kept channels (a GroupNorm
    of several groups, a LocalResponseNorm) that ``module``'s output reaches before any other
    conv or linear layer reads it (a residual stream, through adds, concats, reshapes): every
    group through it is excluded, so its grouping is not tried."""
    stack, seen = list(graph.module2node[module].outputs), set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if mixes_channels(node.module) and channel_dim(node.module) is None:
            return node.module
        if not isinstance(node.module, _WEIGHT_LAYERS):
            stack.extend(node.outputs)
    return None


def _traced_channels(graph, nodes, infer) -> int | None:
    for neighbour in nodes:
        channels = infer(graph, neighbour, [0])
        if channels is not None:
            return channels
    return None


def _tolerant_index_mapping(graph: tp.DependencyGraph) -> None:
    """Torch-Pruning's index-mapping update, node by node; a node it fails on is cut out."""
    updates = {
        tp.ops.OPTYPE.CONCAT: tp_index_mapping.update_concat_index_mapping,
        tp.ops.OPTYPE.SPLIT: tp_index_mapping.update_split_index_mapping,
        tp.ops.OPTYPE.RESHAPE: tp_index_mapping.update_reshape_index_mapping,
        tp.ops.OPTYPE.UNBIND: tp_index_mapping.update_unbind_index_mapping,
        tp.ops.OPTYPE.EXPAND: tp_index_mapping.update_expand_index_mapping,
        tp.ops.OPTYPE.SLICE: tp_index_mapping.update_slice_index_mapping,
    }
    for node in list(graph.module2node.values()):
        update = updates.get(node.type)
        if update is None:
            continue
        try:
            update(graph, node)
        except Exception:
            _cut(node)


def _cut(node, *, unlink: bool = True) -> None:
    """Remove every dependency through ``node``, so no group reaches across it; ``unlink``: its
    edges too (Torch-Pruning then has nothing to map there when it updates the mappings again,
    as it does for every group). Without, the traced data flow stays visible."""
    for neighbour in (*node.inputs, *node.outputs):
        neighbour.dependencies = [d for d in neighbour.dependencies if d.target is not node]
        if unlink:
            neighbour.inputs = [n for n in neighbour.inputs if n is not node]
            neighbour.outputs = [n for n in neighbour.outputs if n is not node]
    node.dependencies = []
    if unlink:
        node.inputs, node.outputs = [], []


def _dependency_groups(model, example_input, ignored_modules, budget, excluded_roots):
    """Torch-Pruning's dependency graph, its coupled groups, and root layer -> why no group
    could be formed from it. An operation the graph cannot follow (e.g. the reshape of a
    channel shuffle) costs the groups that reach it, not the run."""
    try:
        graph = dependency_graph(model, example_input)
    except Exception as error:
        frames = [
            f for f in traceback.extract_tb(error.__traceback__) if "torch_pruning" in f.filename
        ]
        where = f" in its {frames[-1].name}" if frames else ""
        raise CswapError(
            f"Torch-Pruning cannot follow this model's channel dependencies ({type(error).__name__}"
            f"{where}: {first_line(error)}); reshapes that mix channels (a channel shuffle, "
            "window partitions) are a known cause.",
            "exclude the blocks around that operation with --ignore LAYER (ignored_layers=...), "
            "or prune another architecture; please report this one.",
        ) from error
    skip = {root: why for root, why in excluded_roots.items() if why.startswith(OVER_BUDGET)}
    raw_groups, failed = _all_groups(graph, ignored_modules, module_names(model), budget, skip)
    return graph, raw_groups, failed


def _all_groups(graph, ignored_modules, names, budget, skip):
    """Every group rooted at a conv / linear layer's output channels (as Torch-Pruning's
    ``get_all_groups``), with a root the graph fails on, or whose grouping runs over ``budget``,
    recorded (root module -> why) instead of ending the search; ``skip``: root name -> why, not
    grouped again (over the budget in an earlier discovery)."""
    ignored = set(map(id, [*ignored_modules, *graph.IGNORED_LAYERS_IN_TRACING]))
    covered: set[int] = set()
    groups, failed = [], {}
    for module in list(graph.module2node):
        if id(module) in ignored or id(module) in covered:
            continue
        if not isinstance(module, _WEIGHT_LAYERS):
            continue
        pruner = graph.get_pruner_of_module(module)
        channels = pruner.get_out_channels(module) if pruner is not None else None
        if channels is None:
            continue
        norm = _next_mixing_norm(graph, module)
        if norm is not None:  # its group would be excluded for the norm: skip the grouping
            failed[module] = _mixing_norm_reason(names[norm], norm)
            continue
        if names[module] in skip:
            failed[module] = skip[names[module]]
            continue
        try:
            with budget.limit():
                group = graph.get_pruning_group(
                    module, pruner.prune_out_channels, list(range(channels))
                )
        except _OverBudget as error:
            failed[module] = f"{OVER_BUDGET} ({error})"
            continue
        except Exception as error:  # Torch-Pruning's failure names the cause
            failed[module] = (
                f"Torch-Pruning cannot group its channels ({type(error).__name__}: "
                f"{first_line(error)[:80]})"
            )
            continue
        outputs = [
            dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)
        ]
        covered.update(map(id, outputs))
        if not any(id(m) in ignored for m in outputs):
            groups.append(group)
    return groups, failed


class _OverBudget(Exception):
    pass


@dataclass(frozen=True)
class GroupingBudget:
    """What grouping one root layer may spend: ``seconds``, and the process's resident memory
    (``max_bytes``, None: no limit). Checked four times a second by a timer signal, so it
    works in the main thread on Unix only (elsewhere there is no limit)."""

    seconds: float = 60.0
    max_bytes: int | None = None

    @contextmanager
    def limit(self) -> Iterator[None]:
        """Raise ``_OverBudget`` inside the block once it runs over the budget."""
        usable = (
            hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        )
        if not usable:
            yield
            return
        started = time.monotonic()

        def check(_signum, _frame) -> None:
            if time.monotonic() - started > self.seconds:
                raise _OverBudget(f"more than {self.seconds:g} s")
            held = resident_bytes()
            if self.max_bytes is not None and held is not None and held > self.max_bytes:
                raise _OverBudget(
                    f"the process grew to {held / 2**30:.1f} GiB, over {self.max_bytes / 2**30:.1f}"
                )

        previous = signal.signal(signal.SIGALRM, check)
        signal.setitimer(signal.ITIMER_REAL, 0.25, 0.25)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _build_space(
    model, graph, raw_groups, names, protected, macs_per_module, sites, excluded_roots
) -> UnitSpace:
    units: list[Unit] = []
    groups: list[UnitGroup] = []
    excluded: list[ExcludedGroup] = []
    dim_sizes: dict[tuple[str, str], int] = {}
    unit_dims: dict[int, list[tuple[tuple[str, str], int]]] = defaultdict(list)
    # Dimensions that attention adapters own: the dependency graph's coupling of them is wrong
    # (a qkv output is not one channel per consumer input), so its groups there are dropped.
    owned = {(layer, side) for site in sites for layer, side, _ in site.spans}

    bare = _bare_parameters(graph)
    order = {module: position for position, module in enumerate(names)}
    raw_groups = sorted(raw_groups, key=lambda raw: order.get(raw[0].dep.target.module, 0))
    for raw in raw_groups:
        root = names.get(raw[0].dep.target.module, "?")
        size = len(raw[0].idxs)
        reason = excluded_roots.get(root) or _exclusion_reason(graph, raw, names, bare)
        if reason is None and _touches(graph, raw, names, owned):
            reason = "attention dimensions: heads are the units there (see the adapter)"
        if reason is None and size < 2:
            reason = "a single channel: removing it would remove the whole layer"
        if reason is not None:
            excluded.append(ExcludedGroup(root, size, reason))
            continue
        _add_group(graph, raw, (names, bare), root, units, groups, dim_sizes, unit_dims)

    for site in sites:
        if site.attention in excluded_roots:
            excluded.append(
                ExcludedGroup(site.attention, site.num_heads, excluded_roots[site.attention])
            )
            continue
        _add_head_group(model, site, units, groups, dim_sizes, unit_dims)
    param_terms, mac_terms = _accounting_terms(model, names, dim_sizes, macs_per_module)
    space = UnitSpace(
        units=tuple(units),
        groups=tuple(groups),
        excluded=tuple(excluded),
        protected_layers=tuple(protected),
        params_total=sum(p.numel() for p in model.parameters()),
        macs_total=sum(macs_per_module.values()),
        dim_sizes=dict(dim_sizes),
        unit_dims={unit: tuple(dims) for unit, dims in unit_dims.items()},
        param_terms=tuple(param_terms),
        mac_terms=tuple(mac_terms),
    )
    return _with_unit_costs(space)


def _bare_parameters(graph: tp.DependencyGraph) -> dict[int, tuple[str, int]]:
    """id of each parameter outside a known layer (a layer scale, a class token) -> its name
    and the dimension Torch-Pruning prunes."""
    named = {id(p): name for name, p in graph.model.named_parameters()}
    return {
        id(u.parameters): (named[id(u.parameters)], u.pruning_dim)
        for u in graph.unwrapped_parameters
        if id(u.parameters) in named
    }


def _add_group(graph, raw, known, root, units, groups, dim_sizes, unit_dims) -> None:
    """One group of Torch-Pruning's, its units appended to ``units`` (ids continue from there)
    and their dimensions recorded for the accounting; ``known``: (module names, bare
    parameters as ``_bare_parameters``)."""
    root_module = raw[0].dep.target.module
    size = len(raw[0].idxs)
    group_id, first_id = len(groups), len(units)
    parts = _GroupParts(graph, *known)
    for item in raw:
        parts.add(item)
    for key, total in parts.dim_sizes.items():
        dim_sizes[key] = total
    kind = "neuron" if isinstance(root_module, nn.Linear) else "channel"
    for index in range(size):
        units.append(parts.unit(first_id + index, group_id, index, kind))
    for key, roots in parts.per_unit_dims:
        counts = np.bincount(np.asarray(roots, dtype=np.int64), minlength=size)
        for index in range(size):
            if counts[index]:
                unit_dims[first_id + index].append((key, int(counts[index])))
    unit_ids = tuple(range(first_id, first_id + size))
    groups.append(UnitGroup(group_id, root, kind, size, tuple(parts.layers), unit_ids))


class _GroupParts:
    """What a group's items say a unit owns: consumer inputs to mask, normalizations to
    recompute, the parameter slices (producers, norms, consumers, bare parameters)."""

    def __init__(self, graph, names, bare) -> None:
        self.graph, self.names, self.bare = graph, names, bare
        self.layers: list[str] = []
        self.consumers: list[tuple[str, int, dict]] = []  # (layer, dim, root -> indices)
        self.norms: list[tuple[str, int, dict]] = []
        self.slices: list[tuple[str, str, dict]] = []
        self.dim_sizes: dict[tuple[str, str], int] = {}
        self.per_unit_dims: list[tuple[tuple[str, str], list[int]]] = []

    def add(self, item) -> None:
        module = item.dep.target.module
        by_root = _by_root(item.idxs, item.root_idxs)
        if isinstance(module, nn.Parameter) and id(module) in self.bare:
            parameter, dim = self.bare[id(module)]
            self._dim((parameter, "param"), module.shape[dim], item)  # no module to name
            owner = parameter.rpartition(".")[0]
            norm = self.graph.model.get_submodule(owner)
            if mixes_channels(norm):  # a GRN: the graph sees its parameters, not the module
                self._norm(owner, norm, by_root)
            return
        if not isinstance(module, nn.Module) or module not in self.names:
            return  # Torch-Pruning's own op nodes (add, concat, flatten, ...)
        name = self.names[module]
        if name not in self.layers:
            self.layers.append(name)
        is_norm = mixes_channels(module)
        if is_norm:
            self._norm(name, module, by_root)
        is_out = self.graph.is_out_channel_pruning_fn(item.dep.handler)
        if is_out or _is_depthwise(module) or is_norm:
            key, total = (name, "out"), self.graph.get_out_channels(module)
        else:
            key, total = (name, "in"), self.graph.get_in_channels(module)
            dim = 1 if isinstance(module, nn.Conv2d | nn.Conv1d) else -1
            self.consumers.append((name, dim, by_root))
        if self._dim(key, total, item):
            self.slices.append((name, key[1], by_root))

    def _norm(self, name: str, module: nn.Module, by_root: dict) -> None:
        if all(n != name for n, _, _ in self.norms):
            self.norms.append((name, channel_dim(module), by_root))

    def _dim(self, key, total: int, item) -> bool:
        if key in self.dim_sizes:  # e.g. a depthwise conv reached twice
            return False
        self.dim_sizes[key] = total
        self.per_unit_dims.append((key, list(item.root_idxs)))
        return True

    def unit(self, unit_id: int, group_id: int, index: int, kind: str) -> Unit:
        def owned(parts):
            return tuple(MaskTarget(n, dim, held.get(index, ())) for n, dim, held in parts)

        slices = tuple((n, side, held.get(index, ())) for n, side, held in self.slices)
        return Unit(
            unit_id, group_id, index, kind, tuple(self.layers), 0, 0, owned(self.consumers),
            slices, owned(self.norms),
        )  # fmt: skip


def _touches(graph, raw, names, owned) -> bool:
    for item in raw:
        module = item.dep.target.module
        if isinstance(module, nn.Module) and module in names:
            side = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
            if (names[module], side) in owned:
                return True
    return False


def _add_head_group(model, site: HeadSite, units, groups, dim_sizes, unit_dims) -> None:
    """One group per attention module, one unit per head (masked at the consumer's input)."""
    group_id = len(groups)
    first_id = len(units)
    for layer, side, _ in site.spans:
        linear = model.get_submodule(layer)
        dim_sizes[(layer, side)] = linear.out_features if side == "out" else linear.in_features
    dim_sizes[(site.attention, "heads")] = site.num_heads
    for head in range(site.num_heads):
        unit_id = first_id + head
        target = MaskTarget(site.consumer, -1, site.head_indices(head, (0,)))
        slices = tuple(
            (layer, side, site.head_indices(head, offsets)) for layer, side, offsets in site.spans
        )
        units.append(Unit(unit_id, group_id, head, "head", site.layers, 0, 0, (target,), slices))
        for layer, side, offsets in site.spans:
            unit_dims[unit_id].append(((layer, side), site.head_dim * len(offsets)))
        unit_dims[unit_id].append(((site.attention, "heads"), 1))
    unit_ids = tuple(range(first_id, first_id + site.num_heads))
    groups.append(
        UnitGroup(group_id, site.attention, "head", site.num_heads, site.layers, unit_ids)
    )


def _mixing_norm_reason(name: str, norm: nn.Module) -> str:
    if isinstance(norm, nn.GroupNorm) and norm.num_groups > 1:
        return (
            f"{name} normalises groups of channels ({norm.num_groups} groups): removing single "
            "channels would leave groups of unequal size, which GroupNorm cannot compute"
        )
    kind = type(norm).__name__
    if recomputable(norm):
        return f"{name} ({kind}) normalises across channels in a layout cswap cannot recompute"
    return f"{name} ({kind}) normalises across channels; masking is not removal there"


def _exclusion_reason(graph, raw, names, bare) -> str | None:
    has_consumer = False
    for item in raw:
        module = item.dep.target.module
        if isinstance(module, nn.Parameter) and id(module) in bare:
            owner = bare[id(module)][0].rpartition(".")[0]
            norm = graph.model.get_submodule(owner)
            if mixes_channels(norm) and channel_dim(norm) is None:
                return _mixing_norm_reason(owner, norm)
        if not isinstance(module, nn.Module) or module not in names:
            continue  # Torch-Pruning's own op nodes (add, concat, flatten, ...)
        if _is_grouped(module):
            return f"{names[module]} is a grouped convolution; single channels cannot leave it"
        if mixes_channels(module) and channel_dim(module) is None:
            return _mixing_norm_reason(names[module], module)
        is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
        if is_out or _is_depthwise(module):
            continue
        if isinstance(module, _WEIGHT_LAYERS):
            has_consumer = True
        elif not isinstance(module, _PER_CHANNEL_NORMS):
            return f"consumer {names[module]} ({type(module).__name__}) cannot be masked"
    if not has_consumer:
        return (
            "no layer reads these channels (they reach the output directly, or pass an "
            "operation the dependency graph cannot follow)"
        )
    return None


def _accounting_terms(model, names, dim_sizes, macs_per_module):
    param_terms, mac_terms = [], []
    for module in model.modules():
        name = names[module]
        out_key, in_key = (name, "out"), (name, "in")
        has_out, has_in = out_key in dim_sizes, in_key in dim_sizes
        if not (has_out or has_in):
            continue
        for parameter in module.parameters(recurse=False):
            dims = []
            if has_out and parameter.shape[0] == dim_sizes[out_key]:
                dims.append(out_key)
            if (
                has_in
                and parameter.dim() >= 2
                and isinstance(module, _WEIGHT_LAYERS)
                and parameter.shape[1] == dim_sizes[in_key]
            ):
                dims.append(in_key)
            if dims:
                param_terms.append(_DimTerm(parameter.numel(), tuple(dims)))
    parameters = dict(model.named_parameters())
    for (name, side), _ in dim_sizes.items():
        if side == "param":  # a bare parameter (layer scale): shrinks with its one dimension
            param_terms.append(_DimTerm(parameters[name].numel(), ((name, side),)))
    for module in model.modules():
        name = names[module]
        keys = [(name, "out"), (name, "in"), (name, "heads")]
        dims = [key for key in keys if key in dim_sizes]
        macs = macs_per_module.get(name, 0)
        if macs and dims:
            mac_terms.append(_DimTerm(macs, tuple(dims)))
    return param_terms, mac_terms


def _by_root(idxs, roots) -> dict[int, tuple[int, ...]]:
    """Root index -> the dimension's indices it owns, in their order."""
    owned: dict[int, list[int]] = defaultdict(list)
    for i, root in zip(idxs, roots, strict=True):
        owned[root].append(i)
    return {root: tuple(values) for root, values in owned.items()}


def _with_unit_costs(space: UnitSpace) -> UnitSpace:
    """Fill in each unit's own params / MACs (what removing it alone saves)."""
    params, macs = space.savings(()), space.savings((), kind="macs")
    units = tuple(
        replace(unit, params=round(params[unit.id]), macs=round(macs[unit.id]))
        for unit in space.units
    )
    return UnitSpace(
        units,
        space.groups,
        space.excluded,
        space.protected_layers,
        space.params_total,
        space.macs_total,
        space.dim_sizes,
        space.unit_dims,
        space.param_terms,
        space.mac_terms,
    )
