"""The committed zoo weights load and reproduce the manifest (training never runs here)."""

import pytest
import torch

from cswap.data.splits import fashion_mnist_split
from cswap.zoo.registry import ZOO
from cswap.zoo.store import (
    TEST_SLICE,
    WEIGHTS_DIR,
    build,
    evaluate_zoo_model,
    load_zoo_model,
    read_manifest,
    sha256_file,
)

MANIFEST = read_manifest()
REQUIRED = (
    "name",
    "architecture",
    "config",
    "test_accuracy",
    "params",
    "macs",
    "seed",
    "training_command",
    "sha256",
    "test_slice",
    "preprocessing",
    "recipe",
)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_is_committed_with_a_complete_manifest_entry(name):
    entry = MANIFEST["models"][name]
    assert all(key in entry for key in REQUIRED)
    assert entry["sha256"] == sha256_file(WEIGHTS_DIR / f"{name}.safetensors")
    assert entry["config"] == ZOO[name].config
    assert entry["recipe"] == ZOO[name].recipe.to_dict()
    assert 0.0 <= entry["test_accuracy"] <= 1.0
    assert entry["test_accuracy"] >= ZOO[name].accuracy_floor


def test_manifest_records_the_training_split():
    assert MANIFEST["split"] == fashion_mnist_split().fingerprint()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_committed_weights_reproduce_the_manifest_accuracy_on_the_test_slice(name):
    recorded = MANIFEST["models"][name]
    assert (recorded["test_slice"]["start"], recorded["test_slice"]["stop"]) == TEST_SLICE
    evaluation = evaluate_zoo_model(name, test_slice=TEST_SLICE)
    # One image of slack: float summation order differs between CPUs and can flip a tie.
    images = TEST_SLICE[1] - TEST_SLICE[0]
    assert abs(evaluation.test_accuracy - recorded["test_slice"]["accuracy"]) <= 1 / images
    assert evaluation.params == recorded["params"]
    assert evaluation.macs == recorded["macs"]


def test_tampered_weights_are_refused(tmp_path):
    from cswap.errors import CswapError

    for file in WEIGHTS_DIR.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    weights = tmp_path / "vgg.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CswapError, match="does not match the sha256"):
        load_zoo_model("vgg", weights_dir=tmp_path)


def test_vit_is_a_real_timm_vision_transformer():
    from timm.models.vision_transformer import Attention, VisionTransformer

    model = build(ZOO["vit"])
    assert isinstance(model, VisionTransformer)
    assert isinstance(model.blocks[0].attn, Attention)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_resnet20_uses_projection_shortcuts_where_width_changes():
    model = build(ZOO["resnet20"])
    assert isinstance(model.layer2[0].shortcut[0], torch.nn.Conv2d)
    assert model.layer2[0].shortcut[0].kernel_size == (1, 1)
    assert isinstance(model.layer1[0].shortcut, torch.nn.Identity)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 18 + 2  # stem, 9 blocks x 2, two projections
