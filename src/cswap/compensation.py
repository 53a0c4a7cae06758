"""Mean compensation: what a removed unit carried, folded into the layers that remain.

Removing a unit by zeroing it at its consumers' inputs throws away its mean contribution, which
every downstream layer was tuned to. Mean compensation replaces the unit by its mean activation
over the calibration data instead. For a consumer with weight W reading the removed inputs S,
the constant part of its output is

    Linear:        delta = W[:, S] @ mu[S]
    Convolution:   delta = (sum over kernel positions of W[:, S]) @ mu[S]   (one value per output
                   channel)

``mu`` is the consumer's mean input per index (conv: over samples and positions; Linear: over
samples and every leading axis, e.g. ViT tokens). ``delta`` is folded into the consumer's bias, or
into the running mean of the BatchNorm that alone reads the consumer's output (``BN(y + delta)``
with running mean ``m`` equals ``BN(y)`` with running mean ``m - delta``), or into a new bias when
the consumer has neither.

Exactness. The *intervention* cswap scores and validates is exactly the fold: inputs S zeroed and
``delta`` added to the consumer's output (``cswap.intervene``), so compensated masking equals the
pruned and folded model up to float rounding. What the fold approximates, "replace the channel by
its mean", differs from it only where a convolution zero-pads: a border output sees padding, not
the mean, at the kernel taps that fall outside the image, while the folded bias adds the full
kernel sum everywhere. ``ideal=True`` in ``cswap.intervene.removed`` computes the ideal
replacement so the difference can be measured (tests and the report do).

The means are measured once, on the unpruned model: units removed later see means that ignore
earlier removals (a fixed, documented approximation; masking and folding use the same values, so
the equivalence stays exact).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from cswap.errors import CswapError
from cswap.units import UnitSpace

MODES = ("none", "mean")


@dataclass(frozen=True, eq=False)
class Compensation:
    """Mean input of every consumer layer, per input index (float64, on the CPU)."""

    means: dict[str, torch.Tensor]
    images: int

    def delta(self, module: nn.Module, layer: str, indices: Iterable[int]) -> torch.Tensor:
        """The constant ``module`` adds to its output (per output channel / feature) from its
        inputs ``indices`` held at their means."""
        index = torch.tensor(sorted(set(indices)), dtype=torch.long)
        mean = self.means[layer].index_select(0, index)
        weight = module.weight.detach().to("cpu", torch.float64)
        if isinstance(module, nn.Linear):
            columns = weight.index_select(1, index)
        else:
            columns = weight.index_select(1, index).flatten(2).sum(2)
        return columns @ mean


def consumer_indices(space: UnitSpace, units: Iterable[int]) -> dict[str, tuple[int, list[int]]]:
    """Consumer layer -> (input dim, input indices of ``units``)."""
    found: dict[str, tuple[int, list[int]]] = {}
    for unit_id in set(units):
        for target in space.units[unit_id].targets:
            _dim, indices = found.setdefault(target.layer, (target.dim, []))
            indices.extend(target.indices)
    return found


def check_consumers(model: nn.Module, space: UnitSpace) -> None:
    """Mean compensation folds through Linears and ungrouped convolutions only."""
    modules = dict(model.named_modules())
    for layer in {target.layer for unit in space.units for target in unit.targets}:
        module = modules[layer]
        supported = isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv1d | nn.Conv2d) and module.groups == 1
        )
        if not supported:
            raise CswapError(
                f"Layer {layer} ({type(module).__name__}) consumes prunable units, but mean "
                "compensation can only fold into Linear layers and ungrouped convolutions.",
                f"run with compensate='none', or ignore the units feeding it (--ignore {layer}).",
            )


@torch.no_grad()
def measure_means(
    model: nn.Module,
    space: UnitSpace,
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    device: str = "cpu",
) -> Compensation:
    """Mean input of every consumer layer over ``images`` (the unpruned model, eval mode)."""
    if len(images) == 0:
        raise CswapError("Mean compensation needs calibration images; got none.", "pass some.")
    check_consumers(model, space)
    modules = dict(model.named_modules())
    dims = {target.layer: target.dim for unit in space.units for target in unit.targets}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = defaultdict(int)

    def recorder(layer: str, dim: int):
        def hook(_module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().to(torch.float64)
            x = x.movedim(dim, -1).reshape(-1, x.shape[dim])
            total = x.sum(0).cpu()
            sums[layer] = sums[layer] + total if layer in sums else total
            counts[layer] += x.shape[0]

        return hook

    handles = [
        modules[layer].register_forward_pre_hook(recorder(layer, dim))
        for layer, dim in dims.items()
    ]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size].to(device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    missing = sorted(set(dims) - set(sums))
    if missing:
        raise CswapError(
            f"Layers {missing} consume prunable units but never ran on the calibration images.",
            "ignore them (--ignore LAYER) or use compensate='none'.",
        )
    means = {layer: sums[layer] / counts[layer] for layer in dims}
    return Compensation(means=means, images=len(images))


def _sole_batchnorm(graph, module: nn.Module) -> nn.Module | None:
    """The BatchNorm that is the only reader of ``module``'s output, if there is one."""
    node = graph.module2node.get(module)
    if node is None or len(node.outputs) != 1:
        return None
    reader = node.outputs[0].module
    if isinstance(reader, nn.modules.batchnorm._BatchNorm) and reader.track_running_stats:
        return reader
    return None


def fold(
    model: nn.Module,
    space: UnitSpace,
    units: Iterable[int],
    compensation: Compensation,
    example_input: torch.Tensor,
) -> dict[str, str]:
    """Fold the mean contribution of ``units`` into ``model`` in place (before it is pruned).

    Returns, per consumer layer, where its constant went: ``bias``, ``batchnorm NAME`` or ``new
    bias`` (a bias-free layer without a following BatchNorm gets one; loading a saved model
    recreates it from the weights file).
    """
    modules = dict(model.named_modules())
    names = {module: name for name, module in modules.items()}
    sinks: dict[str, str] = {}
    graph = None
    was_training = model.training
    model.eval()  # tracing the graph runs a forward pass: BatchNorm statistics must not move
    try:
        for layer, (_dim, indices) in sorted(consumer_indices(space, units).items()):
            module = modules[layer]
            delta = compensation.delta(module, layer, indices)
            if module.bias is not None:
                with torch.no_grad():
                    module.bias.add_(delta.to(module.bias))
                sinks[layer] = "bias"
                continue
            if graph is None:
                with torch.enable_grad():  # Torch-Pruning traces through autograd
                    graph = tp.DependencyGraph().build_dependency(
                        model, example_input, verbose=False
                    )
            norm = _sole_batchnorm(graph, module)
            if norm is not None:
                with torch.no_grad():
                    norm.running_mean.sub_(delta.to(norm.running_mean))
                sinks[layer] = f"batchnorm {names[norm]}"
                continue
            module.bias = nn.Parameter(delta.to(module.weight).detach())
            sinks[layer] = "new bias"
    finally:
        model.train(was_training)
    return sinks


def add_zero_biases(model: nn.Module, layers: Iterable[str]) -> None:
    """Recreate the biases a fold added (loading a saved model: values come from its weights)."""
    for layer in layers:
        module = model.get_submodule(layer)
        if module.bias is None:
            out = module.weight.shape[0]
            module.bias = nn.Parameter(torch.zeros(out, dtype=module.weight.dtype))
