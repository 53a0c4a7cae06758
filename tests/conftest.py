from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture
def image_folder(tmp_path, rng):
    """A small ImageFolder: 3 classes x 12 RGB PNGs of 20x24 pixels."""
    from PIL import Image

    root = tmp_path / "images"
    for name in ("cat", "dog", "owl"):
        (root / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root
