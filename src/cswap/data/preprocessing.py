"""How raw images become a model's input, recorded as data so that reports can state it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


@dataclass(frozen=True)
class Preprocessing:
    """Resize to ``size`` (bilinear), match ``channels``, scale to [0, 1], normalise.

    A grey image fed to a 3-channel model is repeated over the channels; an RGB image fed to a
    1-channel model is converted with the ITU-R 601 luma weights.
    """

    size: tuple[int, int] = (28, 28)
    channels: int = 1
    mean: tuple[float, ...] = FASHION_MNIST_MEAN
    std: tuple[float, ...] = FASHION_MNIST_STD

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"Preprocessing supports 1 or 3 channels, got {self.channels}.")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean/std need {self.channels} values each, got {self.mean} and {self.std}."
            )

    def describe(self) -> str:
        height, width = self.size
        return (
            f"resize to {height}x{width} (bilinear), {self.channels} channel(s), "
            f"scale to [0, 1], normalise with mean {self.mean} and std {self.std}"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            size=tuple(data["size"]),
            channels=int(data["channels"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Map uint8 images of shape (N, C, H, W) or (C, H, W) to normalised float32 input."""
        single = images.dim() == 3
        batch = images.unsqueeze(0) if single else images
        batch = batch.to(torch.float32)
        if images.dtype == torch.uint8:
            batch = batch / 255.0
        batch = _match_channels(batch, self.channels)
        if tuple(batch.shape[-2:]) != tuple(self.size):
            batch = F.interpolate(batch, size=self.size, mode="bilinear", align_corners=False)
        mean = torch.tensor(self.mean, dtype=batch.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=batch.dtype).view(1, -1, 1, 1)
        batch = (batch - mean) / std
        return batch[0] if single else batch


def _match_channels(batch: torch.Tensor, channels: int) -> torch.Tensor:
    have = batch.shape[1]
    if have == channels:
        return batch
    if have == 1 and channels == 3:
        return batch.expand(-1, 3, -1, -1)
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=batch.dtype).view(1, 3, 1, 1)
        return (batch * weights).sum(dim=1, keepdim=True)
    if have == 4:  # RGBA: drop alpha
        return _match_channels(batch[:, :3], channels)
    raise ValueError(f"Cannot map {have}-channel images to {channels} channels.")
