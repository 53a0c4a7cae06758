"""Vision Transformers: heads and MLP neurons as units; masked == pruned; attributes in sync."""

import copy
import random

import pytest
import torch

from cswap.intervene import removed
from cswap.measure import count_macs, count_params
from cswap.models import load_model
from cswap.surgery import prune_copy
from cswap.units import discover_units
from cswap.zoo.registry import ZOO
from cswap.zoo.store import build


def spread_weights(model, seed=0):
    """Random init gives near-constant ViT outputs; larger weights make the comparison sharp."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            std = 1.0 / module.in_features**0.5  # unit-scale activations, even 12 blocks deep
            module.weight.data.normal_(0, std, generator=generator)
            if module.bias is not None:
                module.bias.data.normal_(0, 0.1, generator=generator)
    return model.eval()


TIMM = {
    "zoo:vit": (lambda: build(ZOO["vit"]), (1, 28, 28)),
    "timm:vit_tiny_patch16_224": (
        lambda: (
            load_model("timm:vit_tiny_patch16_224?num_classes=10&img_size=32&patch_size=8").model
        ),
        (3, 32, 32),
    ),
    "timm:deit_tiny_patch16_224": (
        lambda: (
            load_model("timm:deit_tiny_patch16_224?num_classes=10&img_size=32&patch_size=8").model
        ),
        (3, 32, 32),
    ),
}


@pytest.mark.parametrize("name", sorted(TIMM))
@pytest.mark.parametrize("kind", ["head", "neuron", "both"])
def test_timm_masked_equals_pruned(name, kind):
    factory, shape = TIMM[name]
    model = spread_weights(factory())
    x = torch.randn(7, *shape)
    space = discover_units(model, x[:1])
    kinds = {"head", "neuron"} if kind == "both" else {kind}
    rng = random.Random(len(name))
    units = []
    for group in space.groups:
        if group.kind in kinds:
            units += rng.sample(group.unit_ids, rng.randint(1, group.size - 1))
    pruned = prune_copy(model, space, units, x[:1])
    with removed(model, space, units):
        masked = model(x)
    assert torch.allclose(masked, pruned(x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(masked, model(x), rtol=1e-4, atol=1e-5)
    assert space.params_after(units) == count_params(pruned)
    assert space.macs_after(units) == count_macs(pruned, x[:1])
    for block in pruned.blocks:
        attention = block.attn
        assert attention.fused_attn
        assert attention.num_heads * attention.head_dim == attention.qkv.out_features // 3
        assert attention.attn_dim == attention.proj.in_features
        assert attention.scale == attention.head_dim**-0.5
        assert block.mlp.fc1.out_features == block.mlp.fc2.in_features
    for batch in (1, 7):
        assert pruned(torch.randn(batch, *shape)).shape == (batch, 10)


def test_vit_units_are_heads_neurons_and_the_embedding_width():
    model = build(ZOO["vit"])
    space = discover_units(model, torch.zeros(1, 1, 28, 28))
    kinds = {group.kind for group in space.groups}
    assert kinds == {"head", "neuron"}
    heads = [group for group in space.groups if group.kind == "head"]
    assert len(heads) == 6 and all(group.size == 4 for group in heads)
    neurons = [group for group in space.groups if group.kind == "neuron"]
    assert sorted(group.size for group in neurons) == [64] + [128] * 6
    # the residual stream: one group through every block, its LayerNorms recomputed
    (stream,) = [group for group in neurons if group.size == 64]
    width = space.units[stream.unit_ids[0]]
    assert len(width.norms) == 2 * 6 + 1 and len(width.targets) == 2 * 6 + 1
    # cls token, position embedding (50 tokens), patch kernel + bias; per block: two norms'
    # weight and bias, a qkv column, a proj row + bias, an fc1 column, an fc2 row + bias; the
    # final norm and a head column
    assert width.params == 1 + 50 + (16 + 1) + 6 * (2 * 2 + 192 + 65 + 128 + 129) + 2 + 10
    head = space.units[heads[0].unit_ids[0]]
    assert head.layers == ("blocks.0.attn.qkv", "blocks.0.attn.proj")
    # a head saves its qkv rows (with bias), proj columns and its share of attention MACs
    assert head.params == 3 * 16 * (64 + 1) + 16 * 64
    assert head.macs == 50 * (3 * 16 * 64 + 16 * 64) + 2 * 50 * 50 * 16


def test_removing_all_but_one_head_per_block_still_runs():
    model = spread_weights(build(ZOO["vit"]))
    space = discover_units(model, torch.zeros(1, 1, 28, 28))
    units = [u for g in space.groups if g.kind == "head" for u in g.unit_ids[1:]]
    pruned = prune_copy(model, space, units, torch.zeros(1, 1, 28, 28))
    assert all(block.attn.num_heads == 1 for block in pruned.blocks)
    x = torch.randn(3, 1, 28, 28)
    with removed(model, space, units):
        assert torch.allclose(model(x), pruned(x), rtol=1e-4, atol=1e-5)


def small_hf_vit(attn_implementation="sdpa"):
    from transformers import ViTConfig, ViTForImageClassification

    from cswap.models import HuggingFaceLogits

    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        num_labels=10,
        attn_implementation=attn_implementation,
    )
    return HuggingFaceLogits(ViTForImageClassification(config))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_hugging_face_masked_equals_pruned(implementation):
    model = spread_weights(small_hf_vit(implementation))
    x = torch.randn(7, 1, 16, 16)
    space = discover_units(model, x[:1])
    assert {group.kind for group in space.groups} == {"head", "neuron"}
    rng = random.Random(3)
    units = []
    for group in space.groups:
        units += rng.sample(group.unit_ids, rng.randint(1, group.size - 1))
    pruned = prune_copy(model, space, units, x[:1])
    with removed(model, space, units):
        masked = model(x)
    assert torch.allclose(masked, pruned(x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(masked, model(x), rtol=1e-4, atol=1e-5)
    assert space.params_after(units) == count_params(pruned)
    assert space.macs_after(units) == count_macs(pruned, x[:1])
    heads = [layer.attention.num_attention_heads for layer in pruned.model.vit.layers]
    assert pruned.model.config.num_attention_heads == 4  # the shared config is untouched
    for layer, count in zip(pruned.model.vit.layers, heads, strict=True):
        attention = layer.attention
        assert attention.q_proj.out_features == count * attention.head_dim
        assert attention.o_proj.in_features == count * attention.head_dim
    for batch in (1, 7):
        assert pruned(torch.randn(batch, 1, 16, 16)).shape == (batch, 10)


def test_torchvision_vit_b_16_masked_equals_pruned():
    from cswap.adapters import canonicalize
    from cswap.session import Options, _verified_units

    original = load_model("torchvision:vit_b_16?num_classes=10&image_size=32").model.eval()
    x = torch.randn(7, 3, 32, 32)
    model = spread_weights(copy.deepcopy(original))
    reference = model(x)
    canonicalize(model)
    # the replacement of nn.MultiheadAttention computes the same thing
    assert torch.allclose(model(x), reference, rtol=1e-4, atol=1e-5)
    space = _verified_units(model, x[:1], Options())
    heads = [group for group in space.groups if group.kind == "head"]
    assert len(heads) == 12 and all(group.size == 12 for group in heads)
    # the residual stream is a group too: torchvision reshapes the patches with the model's
    # own hidden_dim attribute, which the adapter keeps equal to the narrower width
    (stream,) = [group for group in space.groups if group.root.endswith("11.mlp.3")]
    assert stream.size == 768
    assert not [group for group in space.excluded if group.reason.startswith("removing")]
    rng = random.Random(5)
    units = []
    for group in space.groups:
        units += rng.sample(group.unit_ids, rng.randint(1, group.size - 1))
    pruned = prune_copy(model, space, units, x[:1])
    with removed(model, space, units):
        masked = model(x)
    assert torch.allclose(masked, pruned(x), rtol=1e-4, atol=1e-5)
    assert space.params_after(units) == count_params(pruned)
    assert space.macs_after(units) == count_macs(pruned, x[:1])
    width = 768 - sum(1 for unit in units if space.units[unit].group == stream.id)
    assert pruned.hidden_dim == pruned.conv_proj.out_channels == width < 768
    for block in pruned.encoder.layers:
        attention = block.self_attention
        assert block.num_heads == attention.num_heads
        assert attention.q_proj.out_features == attention.num_heads * attention.head_dim
    for batch in (1, 7):
        assert pruned(torch.randn(batch, 3, 32, 32)).shape == (batch, 10)


def test_prune_save_load_and_onnx_for_a_timm_vit(tmp_path):
    import numpy as np
    import onnxruntime
    from timm.models.vision_transformer import VisionTransformer
    from torch.utils.data import TensorDataset

    import cswap

    config = dict(img_size=16, patch_size=4, in_chans=1, num_classes=4, embed_dim=32, depth=2)

    def fresh():
        return VisionTransformer(num_heads=4, mlp_ratio=2.0, **config)

    torch.manual_seed(0)
    model = spread_weights(fresh())
    images = torch.randn(160, 1, 16, 16)
    labels = model(images).argmax(1)  # a task the model solves perfectly
    data = TensorDataset(images, labels)
    result = cswap.prune(
        model, data, target_params=0.2, tolerance=0.2, min_class_size=3, progress=False
    )
    kinds = {unit["kind"] for unit in result.report["units"] if unit["removed_at_step"] is not None}
    assert kinds <= {"head", "neuron"} and kinds
    assert result.report["macs_after"] < result.report["macs_before"]
    out = result.save(tmp_path / "vit", export=["onnx"])
    loaded = cswap.load(out, base_model=fresh())
    x = torch.randn(5, 1, 16, 16)
    assert torch.equal(loaded(x), result.model(x))
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    (logits,) = session.run(None, {"images": x.numpy()})
    assert np.allclose(logits, result.model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
