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


class TinyNet(torch.nn.Module):
    """A small CNN with every coupling the engine must handle: BN, a residual add, a flatten into
    a hidden Linear layer."""

    def __init__(self, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AvgPool2d(3)  # 7x7 -> 2x2 (ONNX-exportable, unlike adaptive 7 -> 2)
        self.hidden = nn.Linear(2 * width * 4, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        x = self.pool(self.down(x)).flatten(1)
        return self.head(torch.relu(self.hidden(x)))


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine terms, so that masking the wrong place would show."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) * 2 - 1)
    return model


@pytest.fixture(scope="session")
def fashion_small():
    """2,000 training and 1,000 held-out Fashion-MNIST images at 14x14 (fast to train on)."""
    from cswap.data.fashion_mnist import load_arrays

    images, labels = load_arrays("train")
    x = torch.nn.functional.avg_pool2d(images[:3000].float() / 255.0, 2)
    x = (x - 0.286) / 0.353
    return x[:2000], labels[:2000], x[2000:], labels[2000:3000]


@pytest.fixture(scope="session")
def trained_tiny(fashion_small):
    """TinyNet trained for a few seconds: ~75% accurate, so that effects are meaningful."""
    torch.manual_seed(0)
    train_x, train_y, _, _ = fashion_small
    model = TinyNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _epoch in range(3):
        for start in range(0, len(train_x), 64):
            loss = torch.nn.functional.cross_entropy(
                model(train_x[start : start + 64]), train_y[start : start + 64]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()
