"""Exact, reversible interventions: do(units removed).

Removing a unit is computed by masking its indices at the input of every consumer in its group
(forward pre-hooks multiplying by a 0/1 mask). Zeroing the producer's output instead would not be
removal when a per-channel affine (BatchNorm, a bias) follows. With a ``Compensation`` the removal
is the compensated one: the same masks, plus each consumer's folded constant added to its output
(forward hooks), which is exactly what the pruned-and-folded model computes
(``cswap.compensation``). The context manager removes every hook on exit, also when the forward
pass raises; hooks hold their model only through the handles.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from cswap.compensation import Compensation, consumer_indices
from cswap.norms import norm_channels, renormalized
from cswap.units import UnitSpace


def consumer_masks(space: UnitSpace, removed: Iterable[int]) -> dict[tuple[str, int], list[int]]:
    """(consumer layer, dim) -> input indices to zero, for a set of removed units."""
    return _indices(space, removed, "targets")


def norm_masks(space: UnitSpace, removed: Iterable[int]) -> dict[tuple[str, int], list[int]]:
    """(normalization layer, channel dim) -> channels it normalizes without, for removed units."""
    return _indices(space, removed, "norms")


def _indices(space: UnitSpace, removed: Iterable[int], part: str) -> dict[tuple[str, int], list]:
    by_layer: dict[tuple[str, int], list[int]] = defaultdict(list)
    for unit_id in set(removed):
        for target in getattr(space.units[unit_id], part):
            by_layer[(target.layer, target.dim)].extend(target.indices)
    return by_layer


def _renorm_hook(dim: int, keep: torch.Tensor):
    """The normalization recomputed over kept channels; ``keep``: (copies, channels)."""

    def hook(module: nn.Module, inputs: tuple, _output: torch.Tensor) -> torch.Tensor:
        return renormalized(module, inputs[0], keep, dim)

    return hook


def _keep_rows(channels: int, rows: list[list[int]]) -> torch.Tensor:
    keep = torch.ones(len(rows), channels)
    for row, indices in enumerate(rows):
        if indices:
            keep[row, indices] = 0.0
    return keep


def _mask_hook(dim: int, indices: torch.Tensor):
    def hook(_module: nn.Module, inputs: tuple) -> tuple:
        x = inputs[0]
        keep = torch.ones(x.shape[dim], dtype=x.dtype, device=x.device)
        keep[indices.to(x.device)] = 0
        shape = [1] * x.dim()
        shape[dim] = -1
        return (x * keep.view(shape), *inputs[1:])

    return hook


def _shift_hook(dim: int, delta: torch.Tensor):
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        shape = [1] * output.dim()
        shape[dim] = -1
        return output + delta.to(output).view(shape)

    return hook


class _WeightSwap:
    """A consumer computing with refitted (lstsq) weights: its parameters' data are swapped for
    the refit (the layer then runs once, not once more in a hook) and put back by ``remove``.
    A bias-free consumer gets the refitted bias from a forward hook."""

    def __init__(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor, dim: int):
        self.module = module
        self.weight = module.weight.data
        module.weight.data = weight.to(self.weight)
        self.bias = None
        self.hook = None
        if module.bias is not None:
            self.bias = module.bias.data
            module.bias.data = bias.to(self.bias)
        else:
            self.hook = module.register_forward_hook(_shift_hook(dim, bias))

    def remove(self) -> None:
        self.module.weight.data = self.weight
        if self.bias is not None:
            self.module.bias.data = self.bias
        if self.hook is not None:
            self.hook.remove()


def _mean_hook(dim: int, indices: torch.Tensor, values: torch.Tensor):
    def hook(_module: nn.Module, inputs: tuple) -> tuple:
        x = inputs[0].clone()
        index = [slice(None)] * x.dim()
        index[dim] = indices.to(x.device)
        shape = [1] * x.dim()
        shape[dim] = -1
        x[tuple(index)] = values.to(x).view(shape).expand_as(x[tuple(index)])
        return (x, *inputs[1:])

    return hook


@contextmanager
def removed(
    model: nn.Module,
    space: UnitSpace,
    units: Iterable[int],
    compensation: Compensation | None = None,
    *,
    ideal: bool = False,
) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes what it would with ``units`` physically removed (and,
    with ``compensation``, their mean contribution folded into the consumers).

    With an ``lstsq`` compensation each consumer computes with its refitted weights instead
    (except the layers it mean-compensates, ``compensation.fallback``).
    ``ideal=True`` (with a compensation) replaces the removed inputs by their means instead of
    folding: it differs from the fold only at zero-padded convolution borders, and exists to
    measure that difference.
    """
    modules = dict(model.named_modules())
    units = list(units)
    handles = []
    try:
        if compensation is not None and ideal:
            for layer, (dim, indices) in consumer_indices(space, units).items():
                index = torch.tensor(sorted(set(indices)), dtype=torch.long)
                values = compensation.means[layer].index_select(0, index)
                hook = _mean_hook(dim, index, values)
                handles.append(modules[layer].register_forward_pre_hook(hook))
            renorms = _layer_plans(modules, {}, {}, None, norm_masks(space, units))
            for layer, plan in renorms.items():
                handles += _install(modules[layer], plan)
            yield model
            return
        plans = _layer_plans(
            modules, consumer_masks(space, units), consumer_indices(space, units), compensation,
            norm_masks(space, units),
        )  # fmt: skip
        for layer, plan in plans.items():
            handles += _install(modules[layer], plan)
        yield model
    finally:
        for handle in reversed(handles):
            handle.remove()


def _layer_plans(modules, masks, inputs, compensation, norms=None) -> dict[str, list[tuple]]:
    """Per consumer layer, the hooks that compute a removal there, as values ready to install
    (``_install``): the masks of the removed inputs (``masks``: (layer, dim) -> indices, as
    ``consumer_masks``) and, with ``compensation``, the refitted weights or the folded shift
    (``inputs``: layer -> (dim, indices), as ``consumer_indices``); per normalization over
    channels (``norms``, as ``norm_masks``), its recomputation over the kept channels."""
    plans: dict[str, list[tuple]] = defaultdict(list)
    for (layer, dim), indices in masks.items():
        plans[layer].append(("mask", dim, torch.tensor(sorted(set(indices)), dtype=torch.long)))
    for (layer, dim), indices in (norms or {}).items():
        keep = _keep_rows(norm_channels(modules[layer]), [sorted(set(indices))])
        plans[layer].append(("renorm", dim, keep))
    if compensation is None:
        return plans
    for layer, (dim, indices) in inputs.items():
        module, out_dim = modules[layer], 1 if dim == 1 else -1
        if compensation.refits(layer):
            weight, bias = compensation.refit(module, layer, indices)
            plans[layer].append(("refit", weight, bias, out_dim))
        else:
            plans[layer].append(("shift", compensation.delta(module, layer, indices), out_dim))
    return plans


def _install(module: nn.Module, plan: list[tuple]) -> list:
    """Attach one layer's planned hooks; returns their handles (``remove()`` undoes each)."""
    handles = []
    for kind, *values in plan:
        if kind == "mask":
            handles.append(module.register_forward_pre_hook(_mask_hook(*values)))
        elif kind == "renorm":
            handles.append(module.register_forward_hook(_renorm_hook(*values)))
        elif kind == "refit":
            weight, bias, out_dim = values
            handles.append(_WeightSwap(module, weight, bias, out_dim))
        else:
            delta, out_dim = values
            handles.append(module.register_forward_hook(_shift_hook(out_dim, delta)))
    return handles


class BaseRemoval:
    """``removed(model, space, base, compensation)`` held open for many interventions on top of
    it: ``plus(unit)`` computes what ``removed`` of ``base`` and ``unit`` computes (the same
    hooks, bit for bit) by replacing the hooks of the unit's consumer layers only, so an
    intervention costs its own layers whatever the size of ``base``. Use as a context."""

    def __init__(self, model, space: UnitSpace, base: Iterable[int], compensation) -> None:
        self.modules = dict(model.named_modules())
        self.space, self.compensation = space, compensation
        self.units = base = sorted(set(base))
        self.masks, self.inputs = consumer_masks(space, base), consumer_indices(space, base)
        self.norms = norm_masks(space, base)
        self.plans = _layer_plans(self.modules, self.masks, self.inputs, compensation, self.norms)
        self.handles: dict[str, list] = {}

    def __enter__(self) -> BaseRemoval:
        try:
            for layer, plan in self.plans.items():
                self.handles[layer] = _install(self.modules[layer], plan)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        for layer in list(self.handles):
            for handle in reversed(self.handles.pop(layer)):
                handle.remove()
        return False

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """The model as it is without the base removal (for code that installs it itself)."""
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()

    def _plans_with(self, unit: int) -> dict[str, list[tuple]]:
        """The plans of the unit's consumer layers for the base and the unit removed."""
        masks = _merged(self.masks, consumer_masks(self.space, [unit]))
        norms = _merged(self.norms, norm_masks(self.space, [unit]))
        inputs = {}
        for layer, (dim, indices) in consumer_indices(self.space, [unit]).items():
            base_dim, base_indices = self.inputs.get(layer, (dim, []))
            inputs[layer] = (base_dim, [*base_indices, *indices])
        return _layer_plans(self.modules, masks, inputs, self.compensation, norms)

    @contextmanager
    def plus(self, unit: int) -> Iterator[None]:
        layers = sorted(set(self.space.units[unit].touched))
        swapped: dict[str, list] = {}
        try:
            for layer in layers:  # first: a refit reads the consumer's own weights
                for handle in reversed(self.handles.pop(layer, [])):
                    handle.remove()
                swapped[layer] = []  # a failure from here on still restores the base
            plans = self._plans_with(unit)
            for layer in layers:
                swapped[layer] = _install(self.modules[layer], plans[layer])
            yield
        finally:
            for layer, handles in swapped.items():
                for handle in reversed(handles):
                    handle.remove()
                self.handles[layer] = _install(self.modules[layer], self.plans.get(layer, []))


def _merged(base: dict, own: dict) -> dict:
    """The base's (layer, dim) -> indices on the layers of ``own``, with ``own``'s added."""
    layers = {layer for layer, _ in own}
    merged = {key: list(v) for key, v in base.items() if key[0] in layers}
    for key, indices in own.items():
        merged[key] = merged.get(key, []) + indices
    return merged


def _blocked_mask_hook(dim: int, keep: torch.Tensor):
    """Input of k stacked copies of a batch: copy j masked by ``keep[j]``."""

    def hook(_module: nn.Module, inputs: tuple) -> tuple:
        x = inputs[0]
        k = keep.shape[0]
        blocks = x.reshape(k, x.shape[0] // k, *x.shape[1:])
        shape = [k] + [1] * (x.dim())
        shape[1 + (dim % x.dim())] = -1
        masked = blocks * keep.to(x).view(shape)
        return (masked.reshape(x.shape), *inputs[1:])

    return hook


def _blocked_shift_hook(dim: int, deltas: torch.Tensor):
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        k = deltas.shape[0]
        blocks = output.reshape(k, output.shape[0] // k, *output.shape[1:])
        shape = [k] + [1] * output.dim()
        shape[1 + (dim % output.dim())] = -1
        return (blocks + deltas.to(output).view(shape)).reshape(output.shape)

    return hook


def _blocked_refit_hook(weights: torch.Tensor, biases: torch.Tensor):
    """Copy j of the stacked batch computed with its own refitted (lstsq) weights."""

    def hook(module: nn.Module, inputs: tuple, _output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        k = weights.shape[0]
        blocks = x.reshape(k, x.shape[0] // k, *x.shape[1:])
        outputs = []
        for block, weight, bias in zip(blocks, weights.to(x), biases.to(x), strict=True):
            if isinstance(module, nn.Linear):
                outputs.append(nn.functional.linear(block, weight, bias))
            else:
                outputs.append(module._conv_forward(block, weight, bias))
        return torch.cat(outputs)

    return hook


def _copy_hooks(module, layer, dim, rows, compensation):
    """Hooks for one consumer of ``removed_each``: ``rows[j]`` the input indices copy j loses."""
    hooks = [("pre", _blocked_mask_hook(dim, _keep_rows(module.weight.shape[1], rows)))]
    if compensation is None:
        return hooks
    if compensation.refits(layer):
        fits = [compensation.refit(module, layer, indices) for indices in rows]
        weights = torch.stack([weight for weight, _ in fits])
        biases = torch.stack([bias for _, bias in fits])
        return [*hooks, ("post", _blocked_refit_hook(weights, biases))]
    deltas = torch.zeros(len(rows), module.weight.shape[0], dtype=torch.float64)
    for row, indices in enumerate(rows):
        if indices:
            deltas[row] = compensation.delta(module, layer, indices)
    out_dim = 1 if dim == 1 else -1
    return [*hooks, ("post", _blocked_shift_hook(out_dim, deltas))]


@contextmanager
def removed_each(
    model: nn.Module,
    space: UnitSpace,
    base: Iterable[int],
    units: list[int],
    compensation: Compensation | None = None,
) -> Iterator[nn.Module]:
    """Batched interventions: the model's input is ``len(units)`` stacked copies of a batch, and
    copy j computes with ``base`` and ``units[j]`` removed: the same masks and compensation
    (mean shift or lstsq refit) as ``removed``, applied per copy.
    """
    modules = dict(model.named_modules())
    base_indices = consumer_indices(space, base)
    unit_indices = [consumer_indices(space, [unit]) for unit in units]
    touched = set(base_indices).union(*unit_indices)
    handles = []
    try:
        for layer in sorted(touched):
            module = modules[layer]
            dim, common = base_indices.get(layer, (None, []))
            rows = []
            for own in unit_indices:
                own_dim, extra = own.get(layer, (dim, []))
                dim = own_dim if own_dim is not None else dim
                rows.append(sorted(set(common) | set(extra)))
            for kind, hook in _copy_hooks(module, layer, dim, rows, compensation):
                if kind == "pre":
                    handles.append(module.register_forward_pre_hook(hook))
                else:
                    handles.append(module.register_forward_hook(hook))
        handles += _copy_norm_hooks(modules, space, base, units)
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _copy_norm_hooks(modules, space: UnitSpace, base: Iterable[int], units: list[int]) -> list:
    """``removed_each``'s normalizations: copy j recomputed without base's and units[j]'s
    channels."""
    common = norm_masks(space, base)
    own = [norm_masks(space, [unit]) for unit in units]
    handles = []
    for layer, dim in sorted(set(common).union(*own)):
        rows = [sorted({*common.get((layer, dim), []), *o.get((layer, dim), [])}) for o in own]
        keep = _keep_rows(norm_channels(modules[layer]), rows)
        handles.append(modules[layer].register_forward_hook(_renorm_hook(dim, keep)))
    return handles


def hook_count(model: nn.Module) -> int:
    """Forward (pre-)hooks attached anywhere in ``model``: 0 after every cswap context."""
    return sum(
        len(module._forward_pre_hooks) + len(module._forward_hooks) for module in model.modules()
    )
