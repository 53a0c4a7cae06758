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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from cswap.errors import CswapError
from cswap.timings import stage
from cswap.units import UnitSpace, dependency_graph

log = logging.getLogger(__name__)
MODES = ("none", "mean", "lstsq")
LSTSQ_MEMORY_GB = 4.0  # default budget for the Gram matrices and their inverses (scoring)
# A refit needs this many rows of calibration inputs (images x output positions) per feature
# (inputs per output + bias). Below it the least-squares fit reproduces the calibration outputs
# whatever is removed (with as many features as rows it interpolates them: a layer after global
# pooling reads one row per image), so both the refit and every effect scored under it hold on
# the calibration images only. Ordinary least squares' in-sample residual is (1 - d / n) of the
# error it makes on new inputs: at 4 rows per feature the in-sample figure is at least 3/4 of it.
LSTSQ_MIN_ROWS = 4.0


@dataclass(frozen=True, eq=False)
class RefitBasis:
    """One consumer's ridge refit under a base removal, ready for further removals.

    ``theta`` (kept features + bias, outputs) minimises a quadratic whose Hessian over the kept
    features is H = G_KK + l I; ``inverse`` is H^-1. Constraining a further block S of features
    to zero moves the minimiser by delta = -H^-1[:, S] (H^-1[S, S])^-1 theta_S (the constrained
    minimum of the same quadratic), so scoring a unit under the refit that pruning will apply
    costs a small solve of |S| x |S| instead of a refit of the whole layer.
    """

    shape: tuple[int, ...]  # the consumer's weight shape
    per_channel: int  # features per input channel (kernel positions)
    kept: torch.Tensor  # feature rows kept under the base removal (the bias row last)
    inverse: torch.Tensor
    theta: torch.Tensor

    def rows(self, channels: Iterable[int]) -> torch.Tensor:
        """Rows of ``theta`` that carry input ``channels`` (those the base removal kept)."""
        channels = sorted(set(channels))
        if not channels:
            return torch.zeros(0, dtype=torch.long)
        position = torch.full((self.shape[1] * self.per_channel + 1,), -1, dtype=torch.long)
        position[self.kept] = torch.arange(len(self.kept))
        offsets = torch.arange(self.per_channel)
        features = (torch.tensor(channels).view(-1, 1) * self.per_channel + offsets).view(-1)
        rows = position[features]
        return rows[rows >= 0]  # channels the base removal already took have none

    def weights(self, channels: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) with input ``channels`` removed on top of the base removal."""
        theta = self.theta
        rows = self.rows(channels)
        if len(rows):
            columns = self.inverse.index_select(1, rows)
            block = columns.index_select(0, rows)
            theta = theta - columns @ torch.linalg.solve(block, theta.index_select(0, rows))
            theta = theta.index_copy(0, rows, torch.zeros_like(theta.index_select(0, rows)))
        flat = torch.zeros(self.shape[0], self.shape[1] * self.per_channel, dtype=theta.dtype)
        flat[:, self.kept[:-1]] = theta[:-1].T
        return flat.view(self.shape), theta[-1]

    def removal_cost(self, channels: Iterable[int], weights: torch.Tensor | None = None) -> float:
        """How much the refit's objective grows when input ``channels`` are removed too:
        trace(theta_S^T (H^-1[S, S])^-1 theta_S), the consumer's added squared output error on
        the calibration inputs (plus the ridge term), in closed form from this basis. With
        ``weights`` (one per output channel), the per-output-channel growths are weighted."""
        rows = self.rows(channels)
        if not len(rows):
            return 0.0
        block = self.inverse.index_select(0, rows).index_select(1, rows)
        theta = self.theta.index_select(0, rows)
        per_output = (theta * torch.linalg.solve(block, theta)).sum(0)
        if weights is not None:
            per_output = per_output * weights.to(per_output)
        return float(per_output.sum())

    def sequential(
        self, channel_sets: Sequence[Iterable[int]], weights: torch.Tensor | None = None
    ) -> np.ndarray:
        """Per channel set, in order: ``removal_cost`` of it after all the sets before it (on
        the refit that already lost them), so the running sum is the removal cost of the union.
        Each removal updates the inverse and the minimiser in closed form (a rank-|S|
        downdate), no refit."""
        inverse, theta = self.inverse.clone(), self.theta.clone()
        costs = np.zeros(len(channel_sets))
        for position, channels in enumerate(channel_sets):
            rows = self.rows(channels)
            if not len(rows):
                continue
            columns = inverse.index_select(1, rows)
            block = columns.index_select(0, rows)
            part = theta.index_select(0, rows)
            solved = torch.linalg.solve(block, part)
            costs[position] = _weighted((part * solved).sum(0), weights)
            theta = theta - columns @ solved
            inverse = inverse - columns @ torch.linalg.solve(block, columns.T)
        return costs


@dataclass(frozen=True)
class MeanBasis:
    """A mean-compensated consumer's output error under a base removal, for estimates (its
    refit would not hold beyond the calibration images, LSTSQ_MIN_ROWS, or was not asked for).
    Holding input block S at its means adds W_S (x_S - mu_S) to the output; its mean square per
    output channel is the quadratic form of the inputs' covariance C (from the Gram matrix),
    plus twice its cross term with the error the base removal already makes. The interior of a
    convolution: where it zero-pads, the fold differs (``border_gap``)."""

    per_channel: int
    weight: torch.Tensor  # (outputs, features), float64
    covariance: torch.Tensor  # (features, features) over the calibration rows
    gone: torch.Tensor  # bool per feature: removed by the base removal
    # C[:, gone] W[:, gone]^T: each feature's covariance with the base removal's error, once
    # per base (every estimate's cross term reads it)
    carried: torch.Tensor  # (features, outputs)

    def rows(self, channels: Iterable[int]) -> torch.Tensor:
        """Feature rows of input ``channels`` that the base removal kept."""
        channels = sorted(set(channels))
        if not channels:
            return torch.zeros(0, dtype=torch.long)
        offsets = torch.arange(self.per_channel)
        rows = (torch.tensor(channels).view(-1, 1) * self.per_channel + offsets).view(-1)
        return rows[~self.gone[rows]]

    def removal_cost(self, channels: Iterable[int], weights: torch.Tensor | None = None) -> float:
        """How much the mean square output error grows when input ``channels`` are also held
        at their means, summed over output channels (weighted by ``weights``)."""
        return float(self.sequential([channels], weights)[0])

    def sequential(
        self, channel_sets: Sequence[Iterable[int]], weights: torch.Tensor | None = None
    ) -> np.ndarray:
        """Per channel set, in order: the growth after all the sets before it (as for
        ``RefitBasis.sequential``; the running sum is the growth of the union)."""
        gone, carried = self.gone.clone(), self.carried
        costs = np.zeros(len(channel_sets))
        for position, channels in enumerate(channel_sets):
            rows = self.rows(channels)
            rows = rows[~gone[rows]]
            if not len(rows):
                continue
            part = self.weight[:, rows]  # (outputs, |S|)
            own = ((part @ self.covariance[rows][:, rows]) * part).sum(1)
            cross = (part * carried[rows].T).sum(1)
            costs[position] = _weighted(own + 2 * cross, weights)
            carried = carried + self.covariance[:, rows] @ part.T
            gone[rows] = True
        return costs


def _weighted(per_output: torch.Tensor, weights: torch.Tensor | None) -> float:
    if weights is not None:
        per_output = per_output * weights.to(per_output)
    return float(per_output.sum())


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
    # lstsq: layer -> (input channels of the base removal, its refit), see ``with_base``
    bases: dict[str, tuple[frozenset[int], RefitBasis]] | None = None
    base: frozenset[int] | None = None  # the units ``bases`` were computed for
    # lstsq: Gram matrices of layers mean-compensated for too few rows (estimates only), and
    # their MeanBasis under the base removal
    mean_grams: dict[str, torch.Tensor] | None = None
    mean_bases: dict[str, tuple[frozenset[int], MeanBasis]] | None = None
    # one removal's fits on the pruned model's own inputs (cswap.reconstruct): layer ->
    # (its removed input indices, weight, bias), and for mean-compensated layers (indices, shift)
    fitted: dict[str, tuple[frozenset[int], torch.Tensor, torch.Tensor]] | None = None
    shifts: dict[str, tuple[frozenset[int], torch.Tensor]] | None = None

    @property
    def estimates(self) -> bool:
        """Whether some consumer has a Gram matrix to estimate removals from (lstsq)."""
        return self.mode == "lstsq" and bool(self.grams or self.mean_grams)

    def estimator(self, layer: str) -> RefitBasis | MeanBasis | None:
        """The basis that estimates removals at ``layer`` under the base removal (``with_base``):
        its refit, or its mean fold's error; None without a Gram matrix."""
        found = (self.bases or {}).get(layer) or (self.mean_bases or {}).get(layer)
        return None if found is None else found[1]

    def refits(self, layer: str) -> bool:
        """Whether ``layer`` is refitted (lstsq with a Gram matrix) rather than mean-shifted."""
        return self.mode == "lstsq" and self.grams is not None and layer in self.grams

    def scale(self, layer: str) -> float:
        """The ridge strength of ``layer``: ``ridge`` times the mean diagonal of its whole Gram
        matrix (a constant of the layer, so refits of nested removals are one quadratic)."""
        return self.ridge * float(self.grams[layer].diagonal().mean().clamp_min(1e-12))

    def refit(
        self, module: nn.Module, layer: str, indices: Iterable[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of ``module`` refitted by ridge least squares to reproduce its original
        outputs on the calibration inputs, with input channels ``indices`` removed.

        With x~ = (unfolded input, 1) and theta = (W, b), the original output is x~ theta, so the
        fit needs only the Gram matrix G = E[x~ x~^T]: theta_K minimises
        (theta - theta0)^T G (theta - theta0) + l |theta_K - theta0_K|^2 with theta zero outside
        K (the kept features and the bias): theta_K = (G_KK + l I)^-1 (G_K: theta0 + l theta0_K),
        l = ``scale(layer)``. Removed columns of the returned weight are zero.
        """
        indices = set(indices)
        fitted = (self.fitted or {}).get(layer)
        if fitted is not None and fitted[0] == indices:
            return fitted[1], fitted[2]
        cached = (self.bases or {}).get(layer)
        if cached is not None and cached[0] <= indices:
            return cached[1].weights(indices - cached[0])
        return self.basis(module, layer, indices).weights(())

    def with_base(self, model: nn.Module, space: UnitSpace, base: Iterable[int]) -> Compensation:
        """This compensation with every refitted consumer's refit under the removal of ``base``
        precomputed (one inverse per consumer), so that ``refit`` of ``base`` plus a few more
        units costs no linear solve of the layer's size. Scoring rounds use it."""
        if not self.estimates:
            return self
        base = frozenset(base)
        if self.bases is not None and self.base == base:  # already computed for this base
            return self
        modules = dict(model.named_modules())
        removed_inputs = {
            layer: indices for layer, (_, indices) in consumer_indices(space, base).items()
        }
        layers = {target.layer for unit in space.units for target in unit.targets}
        bases, mean_bases = {}, {}
        with stage("lstsq refit"):
            for layer in sorted(layers):
                indices = frozenset(removed_inputs.get(layer, ()))
                if self.refits(layer):
                    bases[layer] = (indices, self.basis(modules[layer], layer, indices))
                elif layer in (self.mean_grams or {}):
                    mean_bases[layer] = (indices, self.mean_basis(modules[layer], layer, indices))
        return replace(self, bases=bases, mean_bases=mean_bases, base=base)

    def mean_basis(self, module: nn.Module, layer: str, indices: Iterable[int]) -> MeanBasis:
        """The mean fold's error at ``module`` with input channels ``indices`` removed."""
        gram = self.mean_grams[layer]
        mean = gram[-1, :-1]  # the ones column: each feature's mean
        weight = module.weight.detach().to("cpu", torch.float64)
        flat = weight.reshape(weight.shape[0], -1)
        per_channel = flat.shape[1] // weight.shape[1]
        gone = torch.zeros(weight.shape[1], dtype=torch.bool)
        gone[sorted(set(indices))] = True
        gone = gone.repeat_interleave(per_channel)
        covariance = gram[:-1, :-1] - torch.outer(mean, mean)
        return MeanBasis(
            per_channel=per_channel,
            weight=flat,
            covariance=covariance,
            gone=gone,
            carried=covariance[:, gone] @ flat[:, gone].T,
        )

    def basis(self, module: nn.Module, layer: str, indices: Iterable[int]) -> RefitBasis:
        """The refit of ``module`` with input channels ``indices`` removed, kept in a form from
        which removing further channels costs no linear solve (``RefitBasis.weights``)."""
        gram = self.grams[layer]
        weight = module.weight.detach().to("cpu", torch.float64)
        theta = layer_theta(module)
        per_channel = (theta.shape[0] - 1) // weight.shape[1]
        kept = kept_features(weight.shape[1], per_channel, indices)
        scale = self.scale(layer)
        system = gram.index_select(0, kept).index_select(1, kept)
        system = system + scale * torch.eye(len(kept), dtype=torch.float64)
        inverse = torch.linalg.inv(system)
        rhs = gram.index_select(0, kept) @ theta + scale * theta.index_select(0, kept)
        return RefitBasis(
            shape=tuple(weight.shape),
            per_channel=per_channel,
            kept=kept,
            inverse=inverse,
            theta=inverse @ rhs,
        )

    def delta(self, module: nn.Module, layer: str, indices: Iterable[int]) -> torch.Tensor:
        """The constant ``module`` adds to its output (per output channel / feature) from its
        inputs ``indices`` held at their means (or the corrected shift of ``shifts``)."""
        shifted = (self.shifts or {}).get(layer)
        if shifted is not None and shifted[0] == set(indices):
            return shifted[1]
        index = torch.tensor(sorted(set(indices)), dtype=torch.long)
        mean = self.means[layer].index_select(0, index)
        weight = module.weight.detach().to("cpu", torch.float64)
        if isinstance(module, nn.Linear):
            columns = weight.index_select(1, index)
        else:
            columns = weight.index_select(1, index).flatten(2).sum(2)
        return columns @ mean


def layer_theta(module: nn.Module) -> torch.Tensor:
    """(features + 1, out), float64 on the CPU: the layer's flattened weight, its bias (or
    zeros) as the last row; ``input_rows(module, x) @ layer_theta(module)`` is its output."""
    weight = module.weight.detach().to("cpu", torch.float64)
    out = weight.shape[0]
    bias = (
        module.bias.detach().to("cpu", torch.float64)
        if module.bias is not None
        else torch.zeros(out, dtype=torch.float64)
    )
    return torch.cat([weight.reshape(out, -1).T, bias.view(1, -1)])


def kept_features(channels: int, per_channel: int, indices: Iterable[int]) -> torch.Tensor:
    """Positions in ``layer_theta``'s rows of the features that remain when input channels
    ``indices`` are removed (each channel has ``per_channel`` features), and of the bias."""
    gone = torch.zeros(channels, dtype=torch.bool)
    gone[sorted(set(indices))] = True
    keep = torch.cat([(~gone).repeat_interleave(per_channel), torch.tensor([True])])
    return keep.nonzero().squeeze(1)


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
    """Why ``module`` cannot be refitted by least squares at all (it is mean-compensated then)."""
    if isinstance(module, nn.Conv1d | nn.Conv2d) and (
        isinstance(module.padding, str) or module.padding_mode != "zeros"
    ):
        return f"padding={module.padding!r}, padding_mode={module.padding_mode!r}"
    return None


def lstsq_fallback(modules: dict[str, nn.Module], layers, memory_gb: float) -> dict[str, str]:
    """Layers to mean-compensate instead of refitting, with why: unsupported ones, then the
    widest until the rest fit ``memory_gb`` (each refitted layer keeps a float64 Gram matrix of
    (inputs per output + 1)^2 values, and scoring an inverse of the same size)."""
    fallback = {}
    sizes = {}
    for layer in layers:
        reason = _lstsq_unsupported(modules[layer])
        if reason:
            fallback[layer] = reason
        else:
            sizes[layer] = 2 * 8 * (modules[layer].weight[0].numel() + 1) ** 2 / 2**30
    total = sum(sizes.values())
    for layer in sorted(sizes, key=lambda name: (-sizes[name], name)):
        if total <= memory_gb:
            break
        features = modules[layer].weight[0].numel()
        fallback[layer] = (
            f"{features:,} inputs per output: {sizes[layer]:.2f} GiB of Gram matrix and inverse "
            f"would exceed the lstsq memory budget of {memory_gb:g} GiB (lstsq_memory_gb)"
        )
        total -= sizes[layer]
    return fallback


def _too_few_rows(grams: dict, rows: dict[str, int], min_rows: float) -> dict[str, str]:
    """Layers whose Gram matrix was measured on fewer than ``min_rows`` rows per feature, with
    why they are mean-compensated instead (LSTSQ_MIN_ROWS)."""
    fallback = {}
    for layer in sorted(grams):
        features = grams[layer].shape[0]
        if rows[layer] < min_rows * features:
            fallback[layer] = (
                f"{rows[layer]:,} rows of calibration inputs for {features:,} features: a "
                f"refit needs {min_rows:g} per feature (lstsq_min_rows) to hold beyond the "
                "calibration images; more calibration images give it more rows"
            )
            log.warning(
                "lstsq compensation: %s is mean-compensated instead (%s)", layer, fallback[layer]
            )
    return fallback


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
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
    memory_gb: float = LSTSQ_MEMORY_GB,
    min_rows: float = LSTSQ_MIN_ROWS,
) -> Compensation:
    """Mean input of every consumer layer over ``images`` (the unpruned model, eval mode); with
    ``mode="lstsq"`` also each consumer's input Gram matrix, for the layers whose calibration
    inputs hold at least ``min_rows`` rows per feature (the others are mean-compensated, with
    the reason in ``fallback``)."""
    if len(images) == 0:
        raise CswapError(f"{mode} compensation needs calibration images; got none.", "pass some.")
    if mode not in MODES[1:]:
        raise CswapError(f"Unknown compensation {mode!r}.", f"use one of {', '.join(MODES)}.")
    check_consumers(model, space)
    modules = dict(model.named_modules())
    dims = {target.layer: target.dim for unit in space.units for target in unit.targets}
    fallback: dict[str, str] = {}
    if mode == "lstsq":
        fallback = lstsq_fallback(modules, dims, memory_gb)
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
                rows = input_rows(module, inputs[0])
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
        fallback |= _too_few_rows(grams, gram_rows, min_rows)
        normalized = {layer: grams[layer] / gram_rows[layer] for layer in grams}
        return Compensation(
            means,
            len(images),
            mode="lstsq",
            grams={k: v for k, v in normalized.items() if k not in fallback},
            ridge=ridge,
            fallback=fallback,
            mean_grams={k: v for k, v in normalized.items() if k in fallback},
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
                graph = dependency_graph(model, example_input)
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
