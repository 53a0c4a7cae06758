"""Reproducible training of zoo models on the seeded 55,000-image Fashion-MNIST subset.

Runs in the background (``nohup cswap zoo train NAME &``), never in the test suite. Augmentation is
done on whole uint8 batches in memory, which is what makes CPU training affordable.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cswap.data.fashion_mnist import FashionMNIST
from cswap.data.splits import fashion_mnist_split
from cswap.zoo.registry import TrainRecipe, ZooEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    model: nn.Module
    seconds: float
    final_train_loss: float


def augment(images: torch.Tensor, recipe: TrainRecipe, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random crop (after zero padding) of a uint8 batch (N, C, H, W)."""
    if recipe.horizontal_flip:
        flip = torch.rand(len(images), generator=generator) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    pad = recipe.crop_padding
    if pad > 0:
        height, width = images.shape[-2:]
        padded = F.pad(images, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (len(images), 2), generator=generator)
        images = torch.stack(
            [
                padded[i, :, dy : dy + height, dx : dx + width]
                for i, (dy, dx) in enumerate(offsets.tolist())
            ]
        )
    return images


def one_cycle(step: int, total: int, max_lr: float, warmup_fraction: float) -> float:
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    # No weight decay on biases and normalisation parameters (1-d tensors).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.max_lr, momentum=0.9, nesterov=True)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.max_lr)
    raise ValueError(f"Unknown optimizer {recipe.optimizer!r}.")


def train(entry: ZooEntry, model: nn.Module, *, device: str = "cpu") -> TrainResult:
    recipe = entry.recipe
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    generator = torch.Generator().manual_seed(recipe.seed)
    dataset = FashionMNIST("train", preprocessing=entry.preprocessing)
    train_indices = torch.from_numpy(fashion_mnist_split().train)
    steps_per_epoch = math.ceil(len(train_indices) / recipe.batch_size)
    total_steps = steps_per_epoch * recipe.epochs
    model.to(device).train()
    optimizer = make_optimizer(model, recipe)
    start = time.perf_counter()
    step, loss_value = 0, float("nan")
    for epoch in range(recipe.epochs):
        order = train_indices[torch.randperm(len(train_indices), generator=generator)]
        running = []
        for batch_start in range(0, len(order), recipe.batch_size):
            indices = order[batch_start : batch_start + recipe.batch_size]
            raw = augment(dataset.images[indices], recipe, generator)
            inputs = entry.preprocessing(raw).to(device)
            labels = dataset.labels[indices].to(device)
            for group in optimizer.param_groups:
                group["lr"] = one_cycle(step, total_steps, recipe.max_lr, recipe.warmup_fraction)
            loss = F.cross_entropy(model(inputs), labels, label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running.append(loss.item())
            step += 1
        loss_value = float(np.mean(running))
        log.info(
            "%s epoch %d/%d: loss %.4f (%.0f s)",
            entry.name,
            epoch + 1,
            recipe.epochs,
            loss_value,
            time.perf_counter() - start,
        )
    model.eval()
    return TrainResult(
        model=model, seconds=time.perf_counter() - start, final_train_loss=loss_value
    )
