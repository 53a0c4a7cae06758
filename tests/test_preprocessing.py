"""Preprocessing that fits the model: the evaluation transform of its weights, and --input-size.

Oracle for the transform: torchvision's own functional resize (shorter side, antialiased) and
centre crop, then normalisation, on the same float image.
"""

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from cswap.api import load_spec
from cswap.data.preprocessing import Preprocessing
from cswap.errors import CswapError
from cswap.models import load_model


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shape", [(3, 20, 24), (3, 31, 17)])
def test_resize_and_centre_crop_equal_torchvisions_transform(mode, shape):
    torch.manual_seed(0)
    image = torch.rand(*shape)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    ours = Preprocessing((16, 16), 3, mean, std, resize=18, interpolation=mode)(image)
    resized = TF.resize(image, [18], interpolation=InterpolationMode(mode), antialias=True)
    expected = TF.normalize(TF.center_crop(resized, [16, 16]), list(mean), list(std))
    assert ours.shape == (3, 16, 16)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_preprocessing_round_trips_and_describes_the_crop():
    preprocessing = Preprocessing((224, 224), 3, (0.5,) * 3, (0.5,) * 3, 256, "bicubic")
    assert Preprocessing.from_dict(preprocessing.to_dict()) == preprocessing
    assert Preprocessing.from_dict({**Preprocessing().to_dict(), "resize": None}).resize is None
    assert "shorter side to 256 (bicubic" in preprocessing.describe()
    assert "centre crop 224x224" in preprocessing.describe()
    assert preprocessing.with_input_size(112).resize == 128
    with pytest.raises(ValueError, match="smaller than the crop"):
        Preprocessing((224, 224), 3, (0.5,) * 3, (0.5,) * 3, resize=200)


@pytest.mark.parametrize(
    ("name", "size", "resize", "mode"),
    [
        ("resnet50", 224, 232, "bilinear"),
        ("inception_v3", 299, 342, "bilinear"),
        ("efficientnet_b3", 300, 320, "bicubic"),
    ],
)
def test_torchvision_models_take_their_weights_evaluation_transform(name, size, resize, mode):
    from cswap.models import _torchvision_preprocessing

    preprocessing = _torchvision_preprocessing(name)
    assert preprocessing.size == (size, size) and preprocessing.resize == resize
    assert preprocessing.interpolation == mode
    assert preprocessing.mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_timm_models_take_timms_evaluation_transform(name):
    import timm

    loaded = load_model(f"timm:{name}?num_classes=5")
    config = timm.data.resolve_data_config({}, model=loaded.model)
    resize, crop = timm.data.create_transform(**config, is_training=False).transforms[:2]
    assert loaded.preprocessing.size == tuple(crop.size)
    assert loaded.preprocessing.resize == resize.size
    assert loaded.preprocessing.interpolation == config["interpolation"]


def test_input_size_overrides_the_models_own():
    small = load_spec("torchvision:resnet18?num_classes=10", input_size=64)
    # resnet18's weights: shorter side 256, crop 224; at 64 px the resize scales to 64 * 256 // 224
    assert small.preprocessing.size == (64, 64) and small.preprocessing.resize == 73
    for bad in (0, 5, True):
        with pytest.raises(CswapError, match="input_size"):
            load_spec("torchvision:resnet18?num_classes=10", input_size=bad)
