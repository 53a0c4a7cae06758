"""The zoo's entries: architecture config, preprocessing and training recipe, as data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cswap.data.preprocessing import Preprocessing
from cswap.errors import CswapError


@dataclass(frozen=True)
class TrainRecipe:
    """Everything that decides a zoo model's weights, besides the data split."""

    epochs: int
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" (Nesterov, momentum 0.9) or "adamw"
    max_lr: float = 0.1
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.15  # one-cycle schedule: linear warm-up, then cosine decay
    label_smoothing: float = 0.0
    crop_padding: int = 2  # random crop after zero padding, in pixels
    horizontal_flip: bool = True
    seed: int = 0
    threads: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    architecture: str
    description: str
    config: dict = field(hash=False)
    recipe: TrainRecipe
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    accuracy_floor: float = 0.0


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry(
            name="resnet20",
            architecture="resnet20",
            description="CIFAR-style ResNet-20 (16/32/64), 1x1-conv projection shortcuts: compact",
            config={"in_channels": 1, "num_classes": 10, "widths": [16, 32, 64]},
            recipe=TrainRecipe(epochs=12, max_lr=0.1),
            accuracy_floor=0.92,
        ),
        ZooEntry(
            name="vgg",
            architecture="vgg",
            description="VGG-style CNN with BatchNorm (6 convs, 32-256): over-parameterised",
            config={
                "in_channels": 1,
                "num_classes": 10,
                "layout": [32, 64, "M", 128, 128, "M", 256, 256, "M"],
                "hidden": 256,
            },
            recipe=TrainRecipe(epochs=4, max_lr=0.05),
            accuracy_floor=0.92,
        ),
        ZooEntry(
            name="vit",
            architecture="vit",
            description="timm VisionTransformer, patch 4, dim 64, depth 6, 4 heads",
            config={
                "img_size": 28,
                "patch_size": 4,
                "in_chans": 1,
                "num_classes": 10,
                "embed_dim": 64,
                "depth": 6,
                "num_heads": 4,
                "mlp_ratio": 2.0,
            },
            recipe=TrainRecipe(
                epochs=20,
                optimizer="adamw",
                max_lr=2e-3,
                weight_decay=0.05,
                warmup_fraction=0.1,
                label_smoothing=0.1,
                threads=1,  # trained beside resnet20, one core each
            ),
            accuracy_floor=0.88,
        ),
    )
}


def get_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise CswapError(
            f"Unknown zoo model {name!r}.",
            f"use one of {', '.join(sorted(ZOO))} (`cswap zoo list`).",
        )
    return ZOO[name]
