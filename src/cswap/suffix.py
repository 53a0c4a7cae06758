"""Prefix reuse: run a model from the input of a chosen layer onward (METHOD.md section 7).

Removing a unit changes nothing before its first consumer, so the activations up to there are
computed once per calibration batch and only the rest of the network is rerun per unit. Two ways,
tried in this order, each exact (the same operations on the same values):

- ``fx graph``: the model traced with ``torch.fx``; the suffix is the graph from the cut node on.
  The traced graph shares its submodules with the model, so cswap's masking hooks apply to it.
- ``module calls``: for models fx cannot trace (Python control flow on shapes or attributes,
  custom block ``forward`` code). The model's own ``forward`` runs, but every submodule call that
  ends before the cut layer starts returns the output it had in the full pass instead of computing
  it. Only modules called once per forward are replayed and each batch's call order is checked
  against the cut, so a call order that depends on the data falls back to a full pass for that
  batch instead of being wrong.

A layer that is called more than once has no single cut point and is scored with full passes.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from cswap.errors import first_line

log = logging.getLogger(__name__)


class _LeafTracer(fx.Tracer):
    """Symbolic tracing that keeps every cut layer a module call, also a custom subclass
    (e.g. a padded convolution) whose forward fx would otherwise trace through."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.leaves or super().is_leaf_module(module, qualified_name)


class SuffixRunner:
    """Full forward passes that keep the values each cut needs, and reruns from a cut."""

    kind = "fx graph"

    def __init__(self, model: nn.Module, cut_layers: Iterable[str]) -> None:
        cut_layers = set(cut_layers)
        graph = _LeafTracer(cut_layers).trace(model)
        self.graph_module = fx.GraphModule(model, graph)
        self.nodes = list(self.graph_module.graph.nodes)
        position = {node: index for index, node in enumerate(self.nodes)}
        calls: dict[str, list[fx.Node]] = {}
        for node in self.nodes:
            if node.op == "call_module":
                calls.setdefault(str(node.target), []).append(node)
        self.cut_index: dict[str, int] = {}
        self.needed: dict[str, list[fx.Node]] = {}
        for layer in set(cut_layers):
            nodes = calls.get(layer, [])
            if len(nodes) != 1:
                continue  # not called, or shared and called twice: no single cut point
            cut = position[nodes[0]]
            self.cut_index[layer] = cut
            self.needed[layer] = [
                node
                for node in self.nodes[:cut]
                if any(position[user] >= cut for user in node.users)
            ]
        self._prefix_nodes = {layer: self.nodes[:cut] for layer, cut in self.cut_index.items()}

    def supports(self, layer: str) -> bool:
        return layer in self.cut_index

    def full(
        self, images: torch.Tensor, layers: Iterable[str] | None = None
    ) -> tuple[torch.Tensor, dict[str, dict[fx.Node, object]]]:
        """The model's output on ``images`` and, for every cut (or those in ``layers``), the
        values its suffix needs."""
        needed = self.needed if layers is None else {layer: self.needed[layer] for layer in layers}
        wanted = {node for nodes in needed.values() for node in nodes}
        kept: dict[fx.Node, object] = {}

        class Keeper(fx.Interpreter):
            def run_node(self, node: fx.Node):
                value = super().run_node(node)
                if node in wanted:
                    kept[node] = value
                return value

        output = Keeper(self.graph_module).run(images)
        caches = {layer: {node: kept[node] for node in nodes} for layer, nodes in needed.items()}
        return output, caches

    def run_from(self, layer: str, cache: dict[fx.Node, object]) -> torch.Tensor:
        """The output recomputed from ``layer`` onward, earlier values taken from ``cache``."""
        environment = dict.fromkeys(self._prefix_nodes[layer])
        environment.update(cache)
        placeholder_count = sum(1 for node in self.nodes if node.op == "placeholder")
        return fx.Interpreter(self.graph_module).run(
            *([None] * placeholder_count), initial_env=environment
        )


def try_suffix_runner(
    model: nn.Module, cut_layers: Iterable[str], example: torch.Tensor | None = None
) -> SuffixRunner | ModuleCallRunner | None:
    """An fx SuffixRunner; for a model fx cannot trace, a ModuleCallRunner probed on
    ``example``; None (full forward passes) when neither finds a cut."""
    cut_layers = set(cut_layers)
    traced = None
    try:
        traced = SuffixRunner(model, cut_layers)
    except Exception as error:  # fx raises many kinds of errors on untraceable code
        log.info("fx cannot trace the model (%s); trying module-call replay", first_line(error))
    if example is None or (traced is not None and len(traced.cut_index) == len(cut_layers)):
        return traced
    replay = ModuleCallRunner(model, cut_layers, example)
    best = max((r for r in (traced, replay) if r is not None), key=lambda r: len(r.cut_index))
    if not best.cut_index:
        log.info("prefix reuse off: no cut layer is called exactly once")
        return None
    return best


def prefix_path(model: nn.Module, cut_layers: Iterable[str], example: torch.Tensor) -> str:
    """Which prefix reuse a scoring of ``model`` takes: "fx graph", "module calls" or "off"."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            runner = try_suffix_runner(model, cut_layers, example)
    finally:
        model.train(was_training)
    return "off" if runner is None else runner.kind


@dataclass
class _Call:
    name: str
    start: int
    end: int = -1
    parent: _Call | None = None
    tensor_output: bool = False
    children: list[_Call] = field(default_factory=list)


class _CallRecorder:
    """Hooks that record one forward pass's calls of ``names`` (default: every module) as a tree
    in start/end order, and their tensor outputs (a copy for the names in ``copy``)."""

    def __init__(self, model: nn.Module, names=None, copy: set[str] = frozenset()) -> None:
        self.modules = dict(model.named_modules())
        self.names = set(self.modules) if names is None else set(names)
        self.copy = copy
        self.calls: list[_Call] = []
        self.outputs: dict[str, list[tuple[torch.Tensor, int]]] = {}
        self._stack: list[_Call] = []
        self._clock = 0
        self._handles = []

    def _enter(self, name):
        def hook(_module, _inputs):
            parent = self._stack[-1] if self._stack else None
            call = _Call(name, self._tick(), parent=parent)
            if parent is not None:
                parent.children.append(call)
            self.calls.append(call)
            self._stack.append(call)

        return hook

    def _leave(self, _module, _inputs, output):
        call = self._stack.pop()
        call.end = self._tick()
        call.tensor_output = isinstance(output, torch.Tensor)
        if call.tensor_output:
            kept = output.clone() if call.name in self.copy else output
            self.outputs.setdefault(call.name, []).append((kept, kept._version))

    def changed_in_place(self) -> set[str]:
        """Modules whose output the forward code changed in place after they returned."""
        return {
            name
            for name, values in self.outputs.items()
            if any(value._version != version for value, version in values)
        }

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def __enter__(self):
        for name in self.names:
            module = self.modules[name]
            self._handles.append(module.register_forward_pre_hook(self._enter(name)))
            self._handles.append(module.register_forward_hook(self._leave))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return False


def _replay_plan(cut: _Call, once: set[str]) -> list[str]:
    """The largest module calls that end before ``cut`` starts: its ancestors' earlier children,
    each replaced by its own children when it is called more than once or returns no tensor."""
    plan: list[str] = []

    def take(call: _Call) -> None:
        if call.name in once and call.tensor_output:
            plan.append(call.name)
        else:
            for child in call.children:
                take(child)

    ancestor = cut.parent
    while ancestor is not None:
        for child in ancestor.children:
            if child.end != -1 and child.end < cut.start:
                take(child)
        ancestor = ancestor.parent
    return plan


class ModuleCallRunner:
    """Prefix reuse by replaying module outputs, for models ``torch.fx`` cannot trace."""

    kind = "module calls"

    def __init__(self, model: nn.Module, cut_layers: Iterable[str], example: torch.Tensor) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        with torch.no_grad(), _CallRecorder(model) as recorder:
            model(example)
        counts: dict[str, int] = {}
        for call in recorder.calls:
            counts[call.name] = counts.get(call.name, 0) + 1
        once = {name for name, count in counts.items() if count == 1 and name}
        first = {call.name: call for call in reversed(recorder.calls)}
        self.cut_index: dict[str, int] = {}
        self.plans: dict[str, list[str]] = {}
        for layer in set(cut_layers):
            if layer in once:
                self.cut_index[layer] = first[layer].start
                self.plans[layer] = _replay_plan(first[layer], once)
        self._kept = sorted({name for plan in self.plans.values() for name in plan})
        self._in_place = recorder.changed_in_place()

    def supports(self, layer: str) -> bool:
        return layer in self.cut_index

    def full(
        self, images: torch.Tensor, layers: Iterable[str] | None = None
    ) -> tuple[torch.Tensor, dict[str, dict]]:
        """The model's output on ``images`` and, per cut (or those in ``layers``), the outputs
        its replay needs (only the input when this batch's call order does not allow a replay)."""
        layers = list(self.cut_index) if layers is None else list(layers)
        names = {*layers, *(name for layer in layers for name in self.plans[layer])}
        with _CallRecorder(self.model, names, copy=self._in_place) as recorder:
            logits = self.model(images)
        # an output the forward code later changed in place is not what the module returned:
        # from now on it is kept (and replayed) as a copy; this batch does without it
        changed = recorder.changed_in_place()
        self._in_place |= changed
        calls: dict[str, list[_Call]] = {}
        for call in recorder.calls:
            calls.setdefault(call.name, []).append(call)
        kept = {
            name: values[-1][0] for name, values in recorder.outputs.items() if name not in changed
        }
        caches = {layer: self._cache(layer, images, kept, calls) for layer in layers}
        return logits, caches

    def _cache(self, layer, images, outputs, calls) -> dict:
        cache = {"": images}
        if len(calls.get(layer, [])) != 1:
            return cache
        start = calls[layer][0].start
        plan = self.plans[layer]
        if all(
            name in outputs and len(calls[name]) == 1 and calls[name][0].end < start
            for name in plan
        ):
            cache.update({name: outputs[name] for name in plan})
        return cache

    def run_from(self, layer: str, cache: dict) -> torch.Tensor:
        """The model rerun on the cached input with every planned call answered from ``cache``
        (hooks of a replayed module do not run again: its cached output already has them)."""
        replayed = [name for name in self.plans[layer] if name in cache]
        saved = []
        try:
            for name in replayed:
                module = self.modules[name]
                saved.append((module, module._forward_pre_hooks, module._forward_hooks))
                module._forward_pre_hooks, module._forward_hooks = OrderedDict(), OrderedDict()
                module.forward = functools.partial(_replay, cache[name], name in self._in_place)
            return self.model(cache[""])
        finally:
            for module, pre_hooks, hooks in saved:
                del module.forward
                module._forward_pre_hooks, module._forward_hooks = pre_hooks, hooks


def _replay(output: torch.Tensor, copy: bool, *_args, **_kwargs) -> torch.Tensor:
    return output.clone() if copy else output
