"""Normalizations over channels, recomputed over the channels a removal keeps.

A LayerNorm over the channels (or a GroupNorm with one group) divides every channel by statistics
of all channels: zeroing a channel is not removing it, because the zero still counts in the
mean and the variance. ConvNeXt-V2's global response normalization (GRN: each channel's spatial
L2 norm divided by the mean of those norms over the channels) mixes channels the same way. What
the physically pruned model computes is the same normalization over the kept channels only
(Torch-Pruning shrinks its ``normalized_shape`` / ``num_channels`` / parameters).
``renormalized`` computes that on the unpruned model: mean and variance over the kept channels,
the removed channels' outputs zero (every reader of them masks them anyway).

``channel_dim`` says, for a module, along which dimension of its input the channels lie when it
is such a normalization (``None`` if it is not one cswap can recompute). It is checked, not
assumed: with every channel kept, ``renormalized`` must equal the module's own forward on a
probe input, so a LayerNorm subclass with its own layout (timm's channels-first
``LayerNorm2d``) is recognised by what it computes.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

_PROBE_SPATIAL = 3
_MIXING = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
# module -> its checked channel dim: discovery asks for every norm it meets, once per group
_CHANNEL_DIMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_grn(module: nn.Module) -> bool:
    """A global response normalization (timm's ``GlobalResponseNorm`` and look-alikes)."""
    return "ResponseNorm" in type(module).__name__ and all(
        hasattr(module, name) for name in ("weight", "bias", "eps", "channel_dim", "spatial_dim")
    )


def mixes_channels(module: nn.Module) -> bool:
    """A normalization whose output for one channel depends on the other channels."""
    return isinstance(module, _MIXING) or is_grn(module)


def recomputable(module: nn.Module) -> bool:
    """A normalization over channels whose statistics can be recomputed over kept channels."""
    if isinstance(module, nn.GroupNorm):
        return module.num_groups == 1
    if is_grn(module):
        return module.weight is not None and module.weight.dim() == 1
    return isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1


def norm_channels(module: nn.Module) -> int:
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if is_grn(module):
        return module.weight.shape[0]
    return module.normalized_shape[0]


def channel_dim(module: nn.Module) -> int | None:
    """The input dimension holding the channels (-1 channels last, 1 channels first), checked
    against the module's own forward (once per module); None when it is not a recomputable
    normalization."""
    if not recomputable(module):
        return None
    if module not in _CHANNEL_DIMS:
        _CHANNEL_DIMS[module] = _probed_channel_dim(module)
    return _CHANNEL_DIMS[module]


def _probed_channel_dim(module: nn.Module) -> int | None:
    channels = norm_channels(module)
    weight = next(module.parameters(), None)
    dtype = weight.dtype if weight is not None else torch.float32
    device = weight.device if weight is not None else None
    generator = torch.Generator().manual_seed(0)
    layouts = ((-1, (2, _PROBE_SPATIAL, 2, channels)), (1, (2, channels, _PROBE_SPATIAL, 2)))
    if not is_grn(module):  # a LayerNorm may also see (batch, tokens, channels)
        layouts = ((-1, (2, _PROBE_SPATIAL, channels)), layouts[1])
    for dim, shape in layouts:
        probe = torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
        probe = probe.to(device) if device is not None else probe
        keep = torch.ones(1, channels, dtype=dtype, device=probe.device)
        try:
            with torch.no_grad():
                expected = module(probe)
                actual = renormalized(module, probe, keep, dim)
        except (RuntimeError, ValueError):
            continue
        same = expected.shape == actual.shape
        if same and torch.allclose(expected, actual, atol=1e-4, rtol=1e-3):
            return dim
    return None


def renormalized(module: nn.Module, x: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """``module``'s normalization of ``x`` over the kept channels only.

    ``keep``: (copies, channels), 1 for a kept channel; the batch is ``copies`` stacked blocks,
    block j computed with ``keep[j]`` (one row: the whole batch with it).
    """
    copies = keep.shape[0]
    blocks = x.reshape(copies, x.shape[0] // copies, *x.shape[1:])
    axis = 1 + (dim % x.dim())
    shape = [copies] + [1] * x.dim()
    shape[axis] = -1
    mask = keep.to(x).view(shape)
    if is_grn(module):
        return _response_normalized(module, blocks, mask, axis).reshape(x.shape)
    # a one-group GroupNorm: every position of every kept channel; a LayerNorm: the channels
    reduce = tuple(range(2, blocks.dim())) if isinstance(module, nn.GroupNorm) else (axis,)
    count = (mask.expand_as(blocks)).sum(reduce, keepdim=True)
    mean = (blocks * mask).sum(reduce, keepdim=True) / count
    centred = (blocks - mean) * mask
    variance = (centred * centred).sum(reduce, keepdim=True) / count
    out = centred * torch.rsqrt(variance + module.eps)
    affine = [1] * blocks.dim()
    affine[axis] = -1
    if module.weight is not None:
        out = out * module.weight.to(x).view(affine)
    if module.bias is not None:
        out = out + module.bias.to(x).view(affine)
    return (out * mask).reshape(x.shape)


def _response_normalized(module: nn.Module, blocks: torch.Tensor, mask, axis: int) -> torch.Tensor:
    """GRN over the kept channels: x + bias + weight * x * |x| / mean over kept channels of |x|
    (|x|: a channel's L2 norm over the positions)."""
    positions = tuple(d for d in range(2, blocks.dim()) if d != axis)
    norms = blocks.norm(p=2, dim=positions, keepdim=True)
    mean = (norms * mask).sum(axis, keepdim=True) / mask.sum(axis, keepdim=True)
    affine = [1] * blocks.dim()
    affine[axis] = -1
    weight, bias = module.weight.to(blocks).view(affine), module.bias.to(blocks).view(affine)
    out = blocks + bias + weight * blocks * (norms / (mean + module.eps))
    return out * mask
