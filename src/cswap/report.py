"""The explainable half of the method: report.json, units.npz, report.html and its PNGs.

Schema of ``report.json`` (documented in docs/report.md): run summary (``model``, ``method``,
``target``, ``stop_reason``, params / MACs / latency / accuracies before and after), ``settings``
(every option used), ``calibration``, ``steps`` (every accepted or rolled-back step) and ``units``
(one entry per unit: where it is, its causal effect and category on the unpruned model and at
removal, the step that removed it or why it was kept). Per-class effects and p-values live in
``units.npz`` so that a 1000-class model does not make a huge JSON.
"""

from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cswap.categorize import CRITICAL, DETRIMENTAL, NEUTRAL, Categorization

REPORT_VERSION = 1
CATEGORY_COLOURS = {CRITICAL: "#d62728", NEUTRAL: "#7f7f7f", DETRIMENTAL: "#2ca02c"}


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
    (directory / "report.html").write_text(render_html(report, directory))


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
    left.set_xlabel("accepted step")
    left.set_ylabel("validation accuracy")
    right = left.twinx()
    right.plot(x, [p / report["params_before"] for p in params], "s--", color="#ff7f0e")
    right.set_ylabel("params kept (fraction)", color="#ff7f0e")
    left.legend(loc="lower left", fontsize=8)
    left.set_title("Accuracy and size per accepted step")
    return figure


def layer_table(report: dict) -> list[dict]:
    """Kept / removed units per group (named by its root layer)."""
    roots = {group["id"]: group["root"] for group in report.get("groups", [])}
    rows: dict[int, dict] = {}
    for unit in report.get("units", []):
        root = roots.get(unit["group"], unit["layers"][0])
        row = rows.setdefault(
            unit["group"], {"group": unit["group"], "root": root, "kept": 0, "removed": 0}
        )
        row["removed" if unit["removed_at_step"] is not None else "kept"] += 1
    return [rows[key] for key in sorted(rows)]


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
    axis.set_xlabel("units")
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
    for position, name in enumerate((CRITICAL, NEUTRAL, DETRIMENTAL)):
        values = np.asarray(by_category.get(name, []))
        if len(values):
            jitter = np.random.default_rng(position).uniform(-0.3, 0.3, len(values))
            axis.scatter(position + jitter, values, s=6, alpha=0.6, color=CATEGORY_COLOURS[name])
    axis.set_xticks(
        [0, 1, 2], [f"{name}\n({len(by_category.get(name, []))})" for name in CATEGORY_COLOURS]
    )
    axis.set_yscale("symlog", linthresh=1e-3)
    axis.axhline(0, color="black", linewidth=0.5)
    axis.set_ylabel("xi (global causal effect)")
    axis.set_title("Causal effect by category (unpruned model)")
    return figure


def _image(directory: Path, name: str) -> str:
    path = directory / name
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{name}" src="data:image/png;base64,{data}">'


def _fraction(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def describe_targets(report: dict) -> list[str]:
    """Each target in words: the goal, where the run stands, met or not, which one stopped it."""
    names = {"params": "parameters", "macs": "MACs"}
    lines = []
    for item in report.get("target_status") or []:
        verdict = "met" if item["met"] else "NOT met"
        if item["stopped_the_run"]:
            verdict += ", stopped the run"
        lines.append(
            f"remove {item['goal']:.1%} of the {names[item['kind']]}: removed "
            f"{item['removed']:.1%} ({verdict})"
        )
    return lines


def render_html(report: dict, directory: Path) -> str:
    """One self-contained page (images inlined) a person reads."""
    e = html.escape
    summary_rows = [
        ("model", e(str(report["model"]))),
        ("method", e(str(report["method"]))),
        ("mode", e(str(report.get("mode")))),
        ("compensation", e(str((report.get("compensation") or {}).get("mode")))),
        *(("target", e(line)) for line in describe_targets(report)),
        ("stop reason", e(str(report.get("stop_reason")))),
    ]
    metrics = [
        ("parameters", report.get("params_before"), report.get("params_after"), "{:,}"),
        ("MACs / image", report.get("macs_before"), report.get("macs_after"), "{:,}"),
        (
            "CPU latency (ms)",
            report.get("latency_ms_before"),
            report.get("latency_ms_after"),
            "{:.3f}",
        ),
        (
            "validation accuracy",
            report.get("val_accuracy_before"),
            report.get("val_accuracy_after"),
            "{:.4f}",
        ),
        (
            "test accuracy",
            report.get("test_accuracy_before"),
            report.get("test_accuracy_after"),
            "{:.4f}",
        ),
    ]
    metric_rows = "".join(
        f"<tr><td>{name}</td><td>{'-' if a is None else fmt.format(a)}</td>"
        f"<td>{'-' if b is None else fmt.format(b)}</td></tr>"
        for name, a, b, fmt in metrics
    )
    step_rows = "".join(
        f"<tr class={'ok' if s['accepted'] else 'no'}><td>{s['index']}</td>"
        f"<td>{s['units_tried']}</td><td>{'accepted' if s['accepted'] else 'rolled back'}</td>"
        f"<td>{s['params']:,}</td><td>{s['macs']:,}</td><td>{_fraction(s['val_accuracy'])}</td>"
        f"<td>{s['paired_se']:.4f}</td></tr>"
        for s in report.get("steps", [])
    )
    layer_rows = "".join(
        f"<tr><td>{e(row['root'])}</td><td>{row['kept']}</td><td>{row['removed']}</td></tr>"
        for row in layer_table(report)
    )
    counts = report.get("categories") or {}
    if report.get("categories") is None:
        ranking_section = (
            f"<h2>Ranking</h2><p>Units ranked by the <code>{e(str(report['method']))}</code> "
            "criterion (lowest score removed first; every unit's score is in "
            "<code>report.json</code>). No causal categories: that is C-SWAP's.</p>"
        )
    else:
        ranking_section = f"""<h2>Categories (first scoring, unpruned model)</h2>
<p>critical {counts.get(CRITICAL, 0)}, neutral {counts.get(NEUTRAL, 0)},
detrimental {counts.get(DETRIMENTAL, 0)}. Removal is tried for detrimental units first (largest
xi first), then neutral ones; critical units are kept unless allowed.</p>
{_image(directory, "xi.png")}"""
    compensation = report.get("compensation") or {}
    folds = compensation.get("folded_into") or {}
    instead = compensation.get("mean_instead_of_lstsq")
    how = (
        (lambda layer: f"<td>{e('mean: ' + instead[layer]) if layer in instead else 'refit'}</td>")
        if instead is not None
        else (lambda layer: "")
    )
    fold_rows = "".join(
        f"<tr><td>{e(layer)}</td><td>{e(sink)}</td>{how(layer)}</tr>"
        for layer, sink in folds.items()
    )
    how_header = "<th>how</th>" if instead is not None else ""
    compensation_section = (
        "<h2>Compensation</h2><p>Where each reading layer's folded constant went.</p>"
        f"<table><tr><th>layer</th><th>folded into</th>{how_header}</tr>{fold_rows}</table>"
        if fold_rows
        else ""
    )
    settings = e(json.dumps(report.get("settings", {}), indent=1))
    warnings = "".join(f"<li>{e(w)}</li>" for w in report.get("warnings", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cswap report: {e(str(report["model"]))}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
tr.no {{ color: #999; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>cswap report</h1>
<table>{"".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in summary_rows)}</table>
<h2>Before and after</h2>
<table><tr><th></th><th>before</th><th>after</th></tr>{metric_rows}</table>
{ranking_section}
<h2>Steps</h2>
{_image(directory, "steps.png")}
<table><tr><th>step</th><th>units</th><th>verdict</th><th>params</th><th>MACs</th>
<th>val. accuracy</th><th>paired s.e.</th></tr>{step_rows}</table>
<h2>Per layer</h2>
{_image(directory, "layers.png")}
<table><tr><th>group (root layer)</th><th>kept</th><th>removed</th></tr>{layer_rows}</table>
{compensation_section}
<h2>Warnings</h2><ul>{warnings or "<li>none</li>"}</ul>
<h2>Settings</h2><pre>{settings}</pre>
<p>Every unit, its causal effect, category and fate: <code>report.json</code>; per-class effects
and p-values: <code>units.npz</code>.</p>
</body></html>
"""
