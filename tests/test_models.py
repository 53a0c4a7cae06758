import pytest
import torch
from safetensors.torch import save_file

from cswap.errors import CswapError
from cswap.models import load_model


def test_torchvision_spec_with_options_builds_a_random_init_classifier():
    loaded = load_model("torchvision:resnet18?num_classes=10")
    assert loaded.family == "torchvision"
    assert loaded.preprocessing.size == (224, 224) and loaded.preprocessing.channels == 3
    assert loaded.model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    assert not loaded.model.training


def test_timm_spec_takes_preprocessing_from_the_model_config():
    loaded = load_model("timm:vit_tiny_patch16_224?num_classes=7&img_size=32&patch_size=8")
    assert loaded.preprocessing.size == (32, 32)
    assert loaded.model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_hf_spec_loads_a_local_model_directory(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=4,
    )
    original = ViTForImageClassification(config).eval()
    original.save_pretrained(tmp_path)
    loaded = load_model(f"hf:{tmp_path}")
    assert loaded.preprocessing.size == (16, 16) and loaded.preprocessing.channels == 1
    x = torch.randn(3, 1, 16, 16)
    assert torch.allclose(loaded.model(x), original(pixel_values=x).logits)
    assert len(loaded.class_names) == 4


def test_local_weights_file_is_loaded(tmp_path):
    source = load_model("torchvision:resnet18?num_classes=3").model
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = load_model("torchvision:resnet18?num_classes=3", weights=path).model
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), source(x))
    pth = tmp_path / "weights.pth"
    torch.save(source.state_dict(), pth)
    loaded = load_model("torchvision:resnet18?num_classes=3", weights=pth).model
    assert torch.equal(loaded(x), source(x))


def test_weights_that_do_not_fit_are_refused_with_the_mismatch(tmp_path):
    source = load_model("torchvision:resnet18?num_classes=3").model
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    with pytest.raises(CswapError, match=r"do not fit the architecture: .*fc.weight"):
        load_model("torchvision:resnet18?num_classes=10", weights=path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nothing", "Unknown model spec"),
        ("zoo:alexnet", "Unknown zoo model"),
        ("torchvision:resnet19", "torchvision has no model"),
        ("timm:not_a_model", "timm has no model"),
        ("hf:/nonexistent", "not a Hugging Face model directory"),
        ("torchvision:resnet18?colour=red", "could not be built with the options"),
    ],
)
def test_bad_model_specs_get_one_clear_error(spec, message):
    with pytest.raises(CswapError, match=message):
        load_model(spec)


def test_missing_weights_file_is_refused(tmp_path):
    with pytest.raises(CswapError, match="does not exist"):
        load_model("torchvision:resnet18", weights=tmp_path / "none.safetensors")
