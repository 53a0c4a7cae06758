"""Hugging Face transformers 5.x ``ViTAttention``: heads as units.

A head is its rows of ``q_proj``, ``k_proj``, ``v_proj`` and its input columns of ``o_proj``.
Removing heads sets ``num_attention_heads`` on that layer only (the shared config is left alone:
blocks may keep different numbers of heads); ``head_dim`` and ``scaling`` are unchanged, and the
forward pass infers the head count from the tensor shapes, so eager and SDPA attention both work.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cswap.adapters import HeadSite
from cswap.adapters.timm_vit import keep_columns, keep_rows

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class HuggingFaceViTAttention:
    family = "hf"

    def sites(self, model: nn.Module) -> list[HeadSite]:
        try:
            from transformers.models.vit.modeling_vit import ViTAttention
        except ImportError:
            return []
        found = []
        for name, module in model.named_modules():
            if not isinstance(module, ViTAttention):
                continue
            spans = [(f"{name}.{projection}", "out", (0,)) for projection in PROJECTIONS]
            spans.append((f"{name}.o_proj", "in", (0,)))
            found.append(
                HeadSite(
                    attention=name,
                    family=self.family,
                    num_heads=module.q_proj.out_features // module.head_dim,
                    head_dim=module.head_dim,
                    consumer=f"{name}.o_proj",
                    spans=tuple(spans),
                )
            )
        return found

    def remove_heads(self, model: nn.Module, site: HeadSite, heads: Sequence[int]) -> None:
        module = model.get_submodule(site.attention)
        keep = [h for h in range(site.num_heads) if h not in set(heads)]
        indices = [i for h in keep for i in site.head_indices(h, (0,))]
        for projection in PROJECTIONS:
            keep_rows(getattr(module, projection), indices)
        keep_columns(module.o_proj, indices)
        module.num_attention_heads = len(keep)
