"""Prefix reuse: run a model from the input of a chosen layer onward (METHOD.md section 7).

Removing a unit changes nothing before its first consumer, so the activations up to there are
computed once per calibration batch and only the rest of the network is rerun per unit. The model
is traced with ``torch.fx``; a model that cannot be traced (data-dependent control flow, ...) or a
layer that is called more than once falls back to a full forward pass, automatically.

The traced graph shares its submodules with the model, so cswap's masking hooks apply to it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import fx, nn

log = logging.getLogger(__name__)


class SuffixRunner:
    """Full forward passes that keep the values each cut needs, and reruns from a cut."""

    def __init__(self, model: nn.Module, cut_layers: Iterable[str]) -> None:
        self.graph_module = fx.symbolic_trace(model)
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

    def full(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, dict[fx.Node, object]]]:
        """The model's output on ``images`` and, for every cut, the values its suffix needs."""
        wanted = {node for nodes in self.needed.values() for node in nodes}
        kept: dict[fx.Node, object] = {}

        class Keeper(fx.Interpreter):
            def run_node(self, node: fx.Node):
                value = super().run_node(node)
                if node in wanted:
                    kept[node] = value
                return value

        output = Keeper(self.graph_module).run(images)
        caches = {
            layer: {node: kept[node] for node in nodes} for layer, nodes in self.needed.items()
        }
        return output, caches

    def run_from(self, layer: str, cache: dict[fx.Node, object]) -> torch.Tensor:
        """The output recomputed from ``layer`` onward, earlier values taken from ``cache``."""
        environment = dict.fromkeys(self._prefix_nodes[layer])
        environment.update(cache)
        placeholder_count = sum(1 for node in self.nodes if node.op == "placeholder")
        return fx.Interpreter(self.graph_module).run(
            *([None] * placeholder_count), initial_env=environment
        )


def try_suffix_runner(model: nn.Module, cut_layers: Iterable[str]) -> SuffixRunner | None:
    """A SuffixRunner, or None (full forward passes) when the model cannot be traced."""
    try:
        return SuffixRunner(model, cut_layers)
    except Exception as error:  # fx raises many kinds of errors on untraceable code
        log.info("prefix reuse off (model not traceable with torch.fx: %s)", error)
        return None
