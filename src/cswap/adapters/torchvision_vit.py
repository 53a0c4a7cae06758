"""torchvision ``VisionTransformer``: heads as units.

``nn.MultiheadAttention`` cannot hold fewer heads of the same size (embed_dim must divide by
num_heads) and applies its output projection without calling the ``out_proj`` module, so it can be
neither masked nor pruned as it is. ``canonicalize`` replaces every self-attention
``nn.MultiheadAttention`` of a torchvision ViT ``EncoderBlock`` with ``SelfAttention``, an
equivalent module of cswap's with separate q / k / v / out projections (same weights, same output);
heads are then removed like timm's. The block's static ``num_heads`` attribute is kept in sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cswap.adapters import HeadSite, projection_site, remove_projection_heads

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class SelfAttention(nn.Module):
    """Batch-first multi-head self-attention with separate projections; any head count."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    @classmethod
    def from_multihead(cls, attention: nn.MultiheadAttention) -> SelfAttention:
        head_dim = attention.embed_dim // attention.num_heads
        bias = attention.in_proj_bias is not None
        module = cls(attention.embed_dim, attention.num_heads, head_dim, bias=bias)
        q, k, v = attention.in_proj_weight.data.chunk(3, dim=0)
        with torch.no_grad():
            for projection, weight in zip(
                (module.q_proj, module.k_proj, module.v_proj), (q, k, v), strict=True
            ):
                projection.weight.copy_(weight)
            if bias:
                for projection, part in zip(
                    (module.q_proj, module.k_proj, module.v_proj),
                    attention.in_proj_bias.data.chunk(3),
                    strict=True,
                ):
                    projection.bias.copy_(part)
                module.out_proj.bias.copy_(attention.out_proj.bias.data)
            module.out_proj.weight.copy_(attention.out_proj.weight.data)
        return module.to(attention.in_proj_weight.device, attention.in_proj_weight.dtype)

    def forward(self, query, key=None, value=None, need_weights=False, **_kwargs):
        batch, tokens, _ = query.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, tokens, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(query)), heads(self.v_proj(query))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return self.out_proj(out), None


class TorchvisionViTAttention:
    family = "torchvision"

    def canonicalize(self, model: nn.Module) -> None:
        try:
            from torchvision.models.vision_transformer import EncoderBlock
        except ImportError:
            return
        for block in model.modules():
            if isinstance(block, EncoderBlock) and isinstance(
                block.self_attention, nn.MultiheadAttention
            ):
                attention = block.self_attention
                if not attention.batch_first or not attention._qkv_same_embed_dim:
                    continue
                block.self_attention = SelfAttention.from_multihead(attention)

    def after_surgery(self, model: nn.Module) -> None:
        """A narrower residual stream: torchvision's VisionTransformer reshapes the patches with
        its own ``hidden_dim`` attribute, kept equal to the patch projection's output."""
        try:
            from torchvision.models.vision_transformer import VisionTransformer
        except ImportError:
            return
        for module in model.modules():
            if isinstance(module, VisionTransformer):
                module.hidden_dim = module.conv_proj.out_channels

    def sites(self, model: nn.Module) -> list[HeadSite]:
        return [
            projection_site(
                self.family,
                name,
                num_heads=module.num_heads,
                head_dim=module.head_dim,
                projections=PROJECTIONS,
                output="out_proj",
            )
            for name, module in model.named_modules()
            if isinstance(module, SelfAttention)
        ]

    def remove_heads(self, model: nn.Module, site: HeadSite, heads: Sequence[int]) -> None:
        module = model.get_submodule(site.attention)
        kept = remove_projection_heads(
            module, site, heads, projections=PROJECTIONS, output="out_proj"
        )
        module.num_heads = kept
        parent_name = site.attention.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if hasattr(parent, "num_heads"):  # torchvision's EncoderBlock keeps a static copy
            parent.num_heads = kept
