"""Hugging Face transformers 5.x ``ViTAttention``: heads as units.

A head is its rows of ``q_proj``, ``k_proj``, ``v_proj`` and its input columns of ``o_proj``.
Removing heads sets ``num_attention_heads`` on that layer only (the shared config is left alone:
blocks may keep different numbers of heads); ``head_dim`` and ``scaling`` are unchanged, and the
forward pass infers the head count from the tensor shapes, so eager and SDPA attention both work.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cswap.adapters import HeadSite, projection_site, remove_projection_heads

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class HuggingFaceViTAttention:
    family = "hf"

    def sites(self, model: nn.Module) -> list[HeadSite]:
        try:
            from transformers.models.vit.modeling_vit import ViTAttention
        except ImportError:
            return []
        return [
            projection_site(
                self.family,
                name,
                num_heads=module.q_proj.out_features // module.head_dim,
                head_dim=module.head_dim,
                projections=PROJECTIONS,
                output="o_proj",
            )
            for name, module in model.named_modules()
            if isinstance(module, ViTAttention)
        ]

    def remove_heads(self, model: nn.Module, site: HeadSite, heads: Sequence[int]) -> None:
        module = model.get_submodule(site.attention)
        kept = remove_projection_heads(
            module, site, heads, projections=PROJECTIONS, output="o_proj"
        )
        module.num_attention_heads = kept
