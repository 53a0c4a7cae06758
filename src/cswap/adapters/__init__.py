"""Architecture adapters: everything family-specific lives here, never in the core.

An adapter finds the attention modules it knows in a model and describes their heads as a
``HeadSite``: how many heads, which layer reads the concatenated head outputs (where a head is
masked), which layer dimensions a head spans (for the accounting and for excluding the dependency
graph's own, wrong, coupling of those dimensions), and how to remove heads physically while
keeping every attribute of the module in sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class HeadSite:
    attention: str  # the attention module's name
    family: str
    num_heads: int
    head_dim: int
    consumer: str  # the layer whose input holds the concatenated head outputs
    # (layer, "out" | "in", indices per head): the dimensions one head spans, head h owning
    # indices [offset + h * head_dim, offset + (h + 1) * head_dim) for each offset
    spans: tuple[tuple[str, str, tuple[int, ...]], ...]

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(layer for layer, _, _ in self.spans))

    def head_indices(self, head: int, offsets: Sequence[int]) -> tuple[int, ...]:
        return tuple(
            offset + head * self.head_dim + i for offset in offsets for i in range(self.head_dim)
        )


class Adapter(Protocol):
    family: str

    def sites(self, model: nn.Module) -> list[HeadSite]: ...

    def remove_heads(self, model: nn.Module, site: HeadSite, heads: Sequence[int]) -> None: ...


def adapters() -> list[Adapter]:
    from cswap.adapters.hf_vit import HuggingFaceViTAttention
    from cswap.adapters.timm_vit import TimmAttention
    from cswap.adapters.torchvision_vit import TorchvisionViTAttention

    return [TimmAttention(), HuggingFaceViTAttention(), TorchvisionViTAttention()]


def canonicalize(model: nn.Module) -> nn.Module:
    """Rewrite, in place, modules that cannot be masked or pruned as they are into equivalent
    ones (torchvision's nn.MultiheadAttention). Only ever applied to cswap's working copy."""
    for adapter in adapters():
        rewrite = getattr(adapter, "canonicalize", None)
        if rewrite is not None:
            rewrite(model)
    return model


def after_surgery(model: nn.Module) -> None:
    """Let each adapter bring model-level attributes in line with pruned layers (in place)."""
    for adapter in adapters():
        sync = getattr(adapter, "after_surgery", None)
        if sync is not None:
            sync(model)


def find_head_sites(model: nn.Module) -> list[tuple[Adapter, HeadSite]]:
    found = []
    for adapter in adapters():
        found += [(adapter, site) for site in adapter.sites(model)]
    return found


def keep_rows(linear: nn.Linear, rows: list[int]) -> None:
    """Keep only ``rows`` of a Linear's output (weight rows and bias entries), in place."""
    index = torch.tensor(rows, dtype=torch.long, device=linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(0, index).clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data.index_select(0, index).clone())
    linear.out_features = len(rows)


def keep_columns(linear: nn.Linear, columns: list[int]) -> None:
    """Keep only ``columns`` of a Linear's input, in place."""
    index = torch.tensor(columns, dtype=torch.long, device=linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(1, index).clone())
    linear.in_features = len(columns)


def projection_site(
    family: str,
    name: str,
    *,
    num_heads: int,
    head_dim: int,
    projections: Sequence[str],
    output: str,
) -> HeadSite:
    """A site whose heads are contiguous slices of separate q / k / v projections and of the
    output projection's input (Hugging Face, cswap's replacement of nn.MultiheadAttention)."""
    spans = [(f"{name}.{projection}", "out", (0,)) for projection in projections]
    spans.append((f"{name}.{output}", "in", (0,)))
    return HeadSite(
        attention=name,
        family=family,
        num_heads=num_heads,
        head_dim=head_dim,
        consumer=f"{name}.{output}",
        spans=tuple(spans),
    )


def remove_projection_heads(
    module: nn.Module,
    site: HeadSite,
    heads: Sequence[int],
    *,
    projections: Sequence[str],
    output: str,
) -> int:
    """Remove ``heads`` from separate projections; returns the number of heads kept."""
    keep = [h for h in range(site.num_heads) if h not in set(heads)]
    indices = [i for h in keep for i in site.head_indices(h, (0,))]
    for projection in projections:
        keep_rows(getattr(module, projection), indices)
    keep_columns(getattr(module, output), indices)
    return len(keep)
