"""timm ``Attention`` (ViT, DeiT, ...): heads as units.

A head is the q, k and v rows of ``qkv`` and the matching input columns of ``proj``. Removing heads
updates ``num_heads`` and ``attn_dim`` (timm >= 1.0); ``head_dim`` is unchanged, so ``scale`` stays
1/sqrt(head_dim) and the fused (SDPA) path, whose default scale is 1/sqrt(q.size(-1)), agrees.
Attention with a normalisation over the concatenated heads (``scale_norm``) is not supported:
masking a head is not removing it there.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cswap.adapters import HeadSite, keep_columns, keep_rows


class TimmAttention:
    family = "timm"

    def sites(self, model: nn.Module) -> list[HeadSite]:
        try:
            from timm.layers import Attention
        except ImportError:
            return []
        found = []
        for name, module in model.named_modules():
            if type(module) is not Attention or not isinstance(module.norm, nn.Identity):
                continue
            attn_dim = module.num_heads * module.head_dim
            spans = [
                (f"{name}.qkv", "out", (0, attn_dim, 2 * attn_dim)),
                (f"{name}.proj", "in", (0,)),
            ]
            if module.gate is not None:
                spans.append((f"{name}.gate", "out", (0,)))
            found.append(
                HeadSite(
                    attention=name,
                    family=self.family,
                    num_heads=module.num_heads,
                    head_dim=module.head_dim,
                    consumer=f"{name}.proj",
                    spans=tuple(spans),
                )
            )
        return found

    def remove_heads(self, model: nn.Module, site: HeadSite, heads: Sequence[int]) -> None:
        module = model.get_submodule(site.attention)
        keep = [h for h in range(module.num_heads) if h not in set(heads)]
        columns = [i for h in keep for i in site.head_indices(h, (0,))]
        attn_dim = module.num_heads * module.head_dim
        # q rows of the kept heads, then their k rows, then their v rows: qkv's layout
        rows = [
            i
            for offset in (0, attn_dim, 2 * attn_dim)
            for h in keep
            for i in site.head_indices(h, (offset,))
        ]
        keep_rows(module.qkv, rows)
        keep_columns(module.proj, columns)
        if module.gate is not None:
            keep_rows(module.gate, columns)
        module.num_heads = len(keep)
        module.attn_dim = len(keep) * module.head_dim
