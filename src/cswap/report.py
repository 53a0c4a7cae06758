"""The explainable half of the method: report.json, units.npz, report.html and its PNGs.

Schema of ``report.json`` (documented in docs/report.md): run summary (``model``, ``method``,
``target``, ``stop_reason``, params / MACs / latency / accuracies before and after), ``settings``
(every option used), ``calibration``, ``steps`` (every accepted or rolled-back step) and ``units``
(one entry per unit: where it is, its causal effect and category on the unpruned model and at
removal, the step that removed it or why it was kept). Per-class effects and p-values live in
``units.npz`` so that a 1000-class model does not make a huge JSON.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from cswap.categorize import CRITICAL, DETRIMENTAL, NEUTRAL, Categorization
from cswap.report_page import CATEGORY_COLOURS, layer_table, render_html

REPORT_VERSION = 1


def units_arrays(categorization: Categorization) -> dict[str, np.ndarray]:
    """What goes into units.npz: per-class effects and p-values of the first scoring."""
    return {
        "unit_ids": categorization.unit_ids,
        "xi": categorization.xi,
        "tested_classes": categorization.tested_classes,
        "class_means": categorization.class_means,
        "class_p_values": categorization.class_p_values,
        "detrimental_p_values": categorization.detrimental_p_values,
        "categories": categorization.categories.astype(str),
        "log_ratio": _or_nan(categorization.log_ratio, len(categorization.unit_ids)),
        "kl": _or_nan(categorization.kl, len(categorization.unit_ids)),
        "joint": _or_nan(categorization.joint, len(categorization.unit_ids)),
    }


def _or_nan(values: np.ndarray | None, rows: int) -> np.ndarray:
    return np.full(rows, np.nan) if values is None else values


def write_report(directory: Path, report: dict, arrays: dict[str, np.ndarray]) -> None:
    """report.json, units.npz, PNGs and report.html into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    np.savez_compressed(directory / "units.npz", **arrays)
    figures = {
        "steps.png": plot_steps(report),
        "layers.png": plot_layers(report),
        "xi.png": plot_xi(report),
    }
    for name, figure in figures.items():
        if figure is not None:
            figure.savefig(directory / name, dpi=110, bbox_inches="tight")
            plt.close(figure)
    (directory / "report.html").write_text(render_html(report, directory, arrays))


def plot_steps(report: dict):
    steps = [step for step in report.get("steps", []) if step["accepted"]]
    if not steps:
        return None
    figure, left = plt.subplots(figsize=(7, 3.6))
    x = [0] + [i + 1 for i in range(len(steps))]
    accuracy = [report["val_accuracy_before"]] + [s["val_accuracy"] for s in steps]
    params = [report["params_before"]] + [s["params"] for s in steps]
    left.plot(x, accuracy, "o-", color="#1f77b4", label="validation accuracy")
    left.axhline(
        report["val_accuracy_before"] - report["tolerance"],
        color="#1f77b4",
        linestyle=":",
        label="tolerance",
    )
    left.set_xlabel("accepted step (count)")
    left.set_ylabel("validation accuracy (fraction)")
    right = left.twinx()
    right.plot(x, [p / report["params_before"] for p in params], "s--", color="#ff7f0e")
    right.set_ylabel("parameters kept (fraction of original)", color="#ff7f0e")
    left.legend(loc="lower left", fontsize=8)
    left.set_title("Accuracy and size per accepted step")
    return figure


def plot_layers(report: dict):
    rows = layer_table(report)
    if not rows:
        return None
    figure, axis = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2))
    names = [row["root"] for row in rows]
    kept = np.array([row["kept"] for row in rows])
    gone = np.array([row["removed"] for row in rows])
    axis.barh(names, kept, color="#1f77b4", label="kept")
    axis.barh(names, gone, left=kept, color="#d3d3d3", label="removed")
    axis.invert_yaxis()
    axis.set_xlabel("units (count)")
    axis.legend(fontsize=8)
    axis.set_title("Kept and removed units per group (root layer)")
    return figure


def plot_xi(report: dict):
    units = report.get("units", [])
    if not units or all(unit.get("xi") is None for unit in units):
        return None
    figure, axis = plt.subplots(figsize=(7, 3.2))
    by_category = defaultdict(list)
    for unit in units:
        if unit.get("xi") is not None:
            by_category[unit["category"]].append(unit["xi"])
    tested = (CRITICAL, NEUTRAL, DETRIMENTAL)  # estimated units have no xi
    for position, name in enumerate(tested):
        values = np.asarray(by_category.get(name, []))
        if len(values):
            jitter = np.random.default_rng(position).uniform(-0.3, 0.3, len(values))
            axis.scatter(position + jitter, values, s=6, alpha=0.6, color=CATEGORY_COLOURS[name])
    axis.set_xticks([0, 1, 2], [f"{name}\n({len(by_category.get(name, []))})" for name in tested])
    axis.set_yscale("symlog", linthresh=1e-3)
    axis.axhline(0, color="black", linewidth=0.5)
    axis.set_ylabel("xi: accuracy change on removal (fraction)")
    axis.set_title("Causal effect by category (unpruned model)")
    return figure


def thumbnails(images: np.ndarray, size: int = 64) -> np.ndarray:
    """(N, C, H, W) preprocessed images as (N, h, w, C) uint8 for display: each image stretched
    to its own min..max (the preprocessing is undone up to an affine map), at most ``size`` px."""
    batch = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if batch.shape[-1] > size or batch.shape[-2] > size:
        scale = size / max(batch.shape[-2:])
        batch = torch.nn.functional.interpolate(batch, scale_factor=scale, mode="area")
    low = batch.amin(dim=(1, 2, 3), keepdim=True)
    high = batch.amax(dim=(1, 2, 3), keepdim=True)
    scaled = (batch - low) / (high - low).clamp_min(1e-12) * 255.0
    return scaled.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
