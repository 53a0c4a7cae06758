"""How raw images become a model's input, recorded as data so that reports can state it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """Match ``channels``, scale to [0, 1], bring to ``size``, normalise.

    ``resize`` None: resize straight to ``size`` (bilinear). ``resize`` = S: the evaluation
    transform of ImageNet models (torchvision's weights, timm's ``crop_pct``): the shorter side
    to S with the aspect kept (``interpolation``, antialiased), then the centre ``size`` crop.
    A grey image fed to a 3-channel model is repeated over the channels; an RGB image fed to a
    1-channel model is converted with the ITU-R 601 luma weights.
    """

    size: tuple[int, int] = (28, 28)
    channels: int = 1
    mean: tuple[float, ...] = FASHION_MNIST_MEAN
    std: tuple[float, ...] = FASHION_MNIST_STD
    resize: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"Preprocessing supports 1 or 3 channels, got {self.channels}.")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean/std need {self.channels} values each, got {self.mean} and {self.std}."
            )
        if self.resize is not None and self.resize < max(self.size):
            raise ValueError(f"resize {self.resize} is smaller than the crop {self.size}.")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}.")

    def describe(self) -> str:
        height, width = self.size
        if self.resize is None:
            shape = f"resize to {height}x{width} (bilinear)"
        else:
            shape = (
                f"resize the shorter side to {self.resize} ({self.interpolation}, aspect kept), "
                f"centre crop {height}x{width}"
            )
        return (
            f"{shape}, {self.channels} channel(s), "
            f"scale to [0, 1], normalise with mean {self.mean} and std {self.std}"
        )

    def with_input_size(self, size: int) -> Preprocessing:
        """The same transform at ``size`` x ``size`` (a resize scaled in proportion)."""
        resize = None if self.resize is None else size * self.resize // max(self.size)
        return replace(self, size=(size, size), resize=resize)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            size=tuple(data["size"]),
            channels=int(data["channels"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            resize=data.get("resize"),
            interpolation=data.get("interpolation", "bilinear"),
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Map uint8 images of shape (N, C, H, W) or (C, H, W) to normalised float32 input."""
        single = images.dim() == 3
        batch = images.unsqueeze(0) if single else images
        batch = batch.to(torch.float32)
        if images.dtype == torch.uint8:
            batch = batch / 255.0
        batch = _match_channels(batch, self.channels)
        if self.resize is not None:
            batch = _centre_crop(_resize_shorter(batch, self.resize, self.interpolation), self.size)
        elif tuple(batch.shape[-2:]) != tuple(self.size):
            batch = F.interpolate(batch, size=self.size, mode="bilinear", align_corners=False)
        mean = torch.tensor(self.mean, dtype=batch.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=batch.dtype).view(1, -1, 1, 1)
        batch = (batch - mean) / std
        return batch[0] if single else batch


def supported_interpolation(mode: str) -> str:
    """``mode`` when this preprocessing implements it, else bilinear."""
    return mode if mode in INTERPOLATIONS else "bilinear"


def _resize_shorter(batch: torch.Tensor, side: int, mode: str) -> torch.Tensor:
    """The shorter side to ``side``, the longer in proportion (rounded down, as torchvision)."""
    height, width = batch.shape[-2:]
    if height <= width:
        size = (side, int(side * width / height))
    else:
        size = (int(side * height / width), side)
    if size == (height, width):
        return batch
    return F.interpolate(batch, size=size, mode=mode, align_corners=False, antialias=True)


def _centre_crop(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    height, width = batch.shape[-2:]
    top = round((height - size[0]) / 2.0)
    left = round((width - size[1]) / 2.0)
    return batch[..., top : top + size[0], left : left + size[1]]


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
