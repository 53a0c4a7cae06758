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

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from cswap.errors import CswapError
from cswap.units import UnitSpace

log = logging.getLogger(__name__)
MODES = ("none", "mean", "lstsq")
MAX_LSTSQ_FEATURES = 8192  # a consumer's Gram matrix is (features + 1)^2 float64 values


@dataclass(frozen=True, eq=False)
class Compensation:
    """Mean input of every consumer layer, per input index (float64, on the CPU); for
    ``lstsq`` also the Gram matrix of each consumer's (unfolded) inputs with a ones column."""

    means: dict[str, torch.Tensor]
    images: int
    mode: str = "mean"
    grams: dict[str, torch.Tensor] | None = None
    ridge: float = 1e-3
    fallback: dict[str, str] | None = None  # lstsq: layer -> why it is mean-compensated instead

    def refits(self, layer: str) -> bool:
        """Whether ``layer`` is refitted (lstsq with a Gram matrix) rather than mean-shifted."""
        return self.mode == "lstsq" and self.grams is not None and layer in self.grams

    def scoring_view(self) -> Compensation:
        """What scoring intervenes with: the mean replacement (refitting the consumers for every
        single unit would cost a linear solve per unit and consumer)."""
        if self.mode == "mean":
            return self
        return Compensation(means=self.means, images=self.images)

    def refit(
        self, module: nn.Module, layer: str, indices: Iterable[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of ``module`` refitted by ridge least squares to reproduce its original
        outputs on the calibration inputs, with input channels ``indices`` removed.

        With x~ = (unfolded input, 1) and theta = (W, b), the original output is x~ theta, so the
        fit needs only the Gram matrix G = E[x~ x~^T]: theta_K = (G_KK + l I)^-1 (G_K: theta +
        l theta_K), K the kept features and the bias, l = ridge * mean(diag G_KK). Removed columns
        of the returned weight are zero.
        """
        gram = self.grams[layer]
        weight = module.weight.detach().to("cpu", torch.float64)
        out = weight.shape[0]
        flat = weight.reshape(out, -1)
        per_channel = flat.shape[1] // weight.shape[1]
        bias = (
            module.bias.detach().to("cpu", torch.float64)
            if module.bias is not None
            else torch.zeros(out, dtype=torch.float64)
        )
        theta = torch.cat([flat.T, bias.view(1, -1)])  # (features + 1, out)
        gone = torch.zeros(weight.shape[1], dtype=torch.bool)
        gone[sorted(set(indices))] = True
        keep = torch.cat([(~gone).repeat_interleave(per_channel), torch.tensor([True])])
        kept = keep.nonzero().squeeze(1)
        system = gram.index_select(0, kept).index_select(1, kept)
        scale = self.ridge * system.diagonal().mean().clamp_min(1e-12)
        rhs = gram.index_select(0, kept) @ theta + scale * theta.index_select(0, kept)
        system = system + scale * torch.eye(len(kept), dtype=torch.float64)
        solution = torch.linalg.solve(system, rhs)
        new_flat = torch.zeros_like(flat)
        new_flat[:, kept[:-1]] = solution[:-1].T
        return new_flat.view_as(weight), solution[-1]

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


def _lstsq_unsupported(module: nn.Module) -> str | None:
    """Why ``module`` cannot be refitted by least squares (it is mean-compensated then)."""
    features = module.weight[0].numel()
    if features > MAX_LSTSQ_FEATURES:
        size = 8 * (features + 1) ** 2 / 2**30
        return f"{features:,} inputs per output: a {size:.1f} GiB Gram matrix"
    if isinstance(module, nn.Conv1d | nn.Conv2d) and (
        isinstance(module.padding, str) or module.padding_mode != "zeros"
    ):
        return f"padding={module.padding!r}, padding_mode={module.padding_mode!r}"
    return None


def _features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(rows, features + 1): the inputs each output is computed from, with a ones column."""
    x = x.detach().to(torch.float64)
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
    else:
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(2)
        kernel = module.kernel_size if isinstance(module, nn.Conv2d) else (1, *module.kernel_size)
        stride = module.stride if isinstance(module, nn.Conv2d) else (1, *module.stride)
        padding = module.padding if isinstance(module, nn.Conv2d) else (0, *module.padding)
        dilation = module.dilation if isinstance(module, nn.Conv2d) else (1, *module.dilation)
        patches = nn.functional.unfold(
            x, kernel, dilation=dilation, padding=padding, stride=stride
        )  # (N, C*k*k, L)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype, device=rows.device)], 1)


@torch.no_grad()
def measure_means(
    model: nn.Module,
    space: UnitSpace,
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    mode: str = "mean",
    ridge: float = 1e-3,
) -> Compensation:
    """Mean input of every consumer layer over ``images`` (the unpruned model, eval mode); with
    ``mode="lstsq"`` also each consumer's input Gram matrix."""
    if len(images) == 0:
        raise CswapError(f"{mode} compensation needs calibration images; got none.", "pass some.")
    if mode not in MODES[1:]:
        raise CswapError(f"Unknown compensation {mode!r}.", f"use one of {', '.join(MODES)}.")
    check_consumers(model, space)
    modules = dict(model.named_modules())
    dims = {target.layer: target.dim for unit in space.units for target in unit.targets}
    fallback: dict[str, str] = {}
    if mode == "lstsq":
        for layer in dims:
            reason = _lstsq_unsupported(modules[layer])
            if reason:
                fallback[layer] = reason
        for layer, reason in sorted(fallback.items()):
            log.warning("lstsq compensation: %s is mean-compensated instead (%s)", layer, reason)
    sums: dict[str, torch.Tensor] = {}
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = defaultdict(int)
    gram_rows: dict[str, int] = defaultdict(int)

    def recorder(layer: str, dim: int):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().to(torch.float64)
            if mode == "lstsq" and layer not in fallback:
                rows = _features(module, inputs[0])
                product = (rows.T @ rows).cpu()
                grams[layer] = grams[layer] + product if layer in grams else product
                gram_rows[layer] += rows.shape[0]
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
    if mode == "lstsq":
        normalized = {layer: grams[layer] / gram_rows[layer] for layer in grams}
        return Compensation(
            means, len(images), mode="lstsq", grams=normalized, ridge=ridge, fallback=fallback
        )
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
            if compensation.refits(layer):
                weight, delta = compensation.refit(module, layer, indices)
                with torch.no_grad():
                    module.weight.copy_(weight.to(module.weight))
                    if module.bias is not None:
                        module.bias.zero_()  # the refitted bias replaces it entirely
            else:
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
