"""Architectures of the reference zoo, built from a plain config dict.

Every builder takes keyword arguments only, so a manifest's ``config`` entry rebuilds the exact
model: ``build(name, **config)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    """CIFAR-style residual block; a 1x1 conv + BatchNorm projection where shape changes.

    The projection ("option B") shortcut is deliberate: Torch-Pruning mis-couples the
    zero-padding ("option A") shortcut, so a pruned model would silently differ from the masked one.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-20/32/... for small images: 3 stages, ``blocks_per_stage`` blocks each."""

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages = []
        previous = widths[0]
        for stage_index, width in enumerate(widths):
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(previous, width, stride))
                previous = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class VGG(nn.Module):
    """VGG-style CNN with BatchNorm; ``layout`` lists conv widths, ``"M"`` a 2x2 max-pool."""

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        layout: Sequence[int | str] = (32, 64, "M", 128, 128, "M", 256, 256, "M"),
        hidden: int = 256,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            width = int(item)
            layers += [
                nn.Conv2d(previous, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(previous, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(x)


def build_resnet20(**config) -> nn.Module:
    return CifarResNet(**config)


def build_vgg(**config) -> nn.Module:
    return VGG(**config)


def build_vit(**config) -> nn.Module:
    """A timm ``VisionTransformer``: the real timm Attention module is what gets pruned."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**config)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": build_resnet20,
    "vgg": build_vgg,
    "vit": build_vit,
}
