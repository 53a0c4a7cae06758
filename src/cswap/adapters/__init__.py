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


def find_head_sites(model: nn.Module) -> list[tuple[Adapter, HeadSite]]:
    found = []
    for adapter in adapters():
        found += [(adapter, site) for site in adapter.sites(model)]
    return found
