"""The benchmark harness: every method x mode x compensation x target on the same units and data.

For each model the data are drawn once (the same calibration, validation and test images for
every method) and the units discovered once. For each (compensation, method) the units are
scored once: ``oneshot`` rows for all targets cut that one ranking; the ``progressive`` run goes
once to the largest target with every smaller target as a milestone (a chunk never jumps over
one), and the model at each crossing is one row. A progressive run that stops before a target
(``tolerance_unmet``) gives that target a row with ``reached = False`` and its final model.

Test accuracy and latency are measured on the physically pruned (and folded) model, which
computes what the masked one does (``cswap.surgery`` checks it in the tests and in every
``cswap prune``); params and MACs come from the exact accounting (equal to the pruned model's).

Rows are appended to ``OUT/results.csv`` as they finish; a rerun skips finished rows. First
scorings are cached in ``OUT/cache`` so the progressive phase does not score again.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cswap import api
from cswap.categorize import ESTIMATED, RankConfig, Ranking, causal_ranking
from cswap.criteria import CRITERIA
from cswap.errors import CswapError
from cswap.inputs import check_out_dir, resident_bytes
from cswap.intervene import removed as intervention
from cswap.measure import measure_latency, predict
from cswap.schedule import ScheduleConfig, oneshot
from cswap.session import (
    Options,
    make_options,
    make_ranker,
    measure_compensation,
    prepare,
    run_progressive,
    tensors,
)
from cswap.surgery import prune_and_fold

log = logging.getLogger("cswap.bench")

ALL_METHODS = ("cswap", *CRITERIA)
COLUMNS = (
    "model",
    "method",
    "mode",
    "compensate",
    "target",
    "reached",
    "params_reduction",
    "macs_reduction",
    "params",
    "macs",
    "test_accuracy",
    "test_accuracy_before",
    "test_accuracy_drop",
    "val_accuracy",
    "latency_ms",
    "latency_ms_before",
    "units_removed",
    "stop_reason",
    "scoring_seconds",
    "total_seconds",
    "note",
)
KEY = ("model", "method", "mode", "compensate", "target")


@dataclass(frozen=True)
class BenchConfig:
    models: tuple[str, ...]
    methods: tuple[str, ...]
    modes: tuple[str, ...]
    compensations: tuple[str, ...]
    targets: tuple[float, ...]
    tolerance: float = 0.005
    calib_per_class: int = 50
    validation_size: int | None = None
    batch_size: int = 256
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name, values, known in (
            ("methods", self.methods, ALL_METHODS),
            ("modes", self.modes, api.MODES),
            ("compensations", self.compensations, api.COMPENSATIONS),
        ):
            unknown = [value for value in values if value not in known]
            if unknown or not values:
                raise CswapError(
                    f"Unknown or no {name}: {unknown or values}.",
                    f"use some of {', '.join(known)}.",
                )
        if not self.targets or any(not 0.0 < t < 1.0 for t in self.targets):
            raise CswapError(f"targets {self.targets} must be fractions in (0, 1).", "e.g. 0.3.")
        if not self.models:
            raise CswapError("No model given.", "pass --models zoo:vgg,...")


def parse_list(text: str, everything: Sequence[str] = ()) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    return tuple(everything) if items == ("all",) and everything else items


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _key(row: dict) -> tuple:
    return tuple(str(row[name]) if name != "target" else f"{float(row[name]):.4f}" for name in KEY)


class _Writer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = read_rows(path)
        self.done = {_key(row) for row in self.rows}

    def add(self, row: dict) -> None:
        row = {name: row.get(name, "") for name in COLUMNS}
        if not self.path.is_file():  # the header comes with the first row: never a bare one
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", newline="") as handle:
                csv.DictWriter(handle, COLUMNS).writeheader()
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, COLUMNS).writerow(row)
        self.rows.append({k: str(v) for k, v in row.items()})
        self.done.add(_key(row))


class _ModelBench:
    """One model, prepared once: data, units, test tensors, baseline numbers."""

    def __init__(self, spec: str, config: BenchConfig, progress: bool) -> None:
        self.spec = spec
        self.config = config
        self.progress = progress
        loaded = api.load_spec(spec)
        selection = api.select_data(
            loaded,
            "fashion-mnist",
            per_class=config.calib_per_class,
            validation_size=config.validation_size,
            seed=config.seed,
            batch_size=config.batch_size,
            device=config.device,
        )
        self.options = make_options({"batch_size": config.batch_size, "seed": config.seed})
        self.prepared = prepare(
            loaded.model,
            selection.calibration,
            selection.validation,
            example_input=None,
            label_free=False,
            device=config.device,
            options=self.options,
        )
        if selection.test is None:
            raise CswapError("The data has no test split.", "use fashion-mnist.")
        images, labels = tensors(selection.test, config.batch_size)
        self.test_batches = [
            (images[i : i + config.batch_size], labels[i : i + config.batch_size])
            for i in range(0, len(images), config.batch_size)
        ]
        self.accuracy_before = self.test_accuracy((), None)
        example = self.prepared.example_input
        self.latency_before = measure_latency(self.prepared.model.cpu(), example, threads=1)
        self.prepared.model.to(self.prepared.device)

    def test_accuracy(self, units, compensation) -> float:
        model = self.prepared.model
        with intervention(model, self.prepared.space, units, compensation):
            predictions, labels = predict(model, self.test_batches, self.prepared.device)
        return float((predictions == labels).float().mean())

    def row(self, method, mode, compensate, target, units, compensation, **extra) -> dict:
        """Test accuracy and latency of the physically pruned (and folded) model: it computes
        what the masked model does (tested equal), at the pruned model's cost."""
        space = self.prepared.space
        units = list(units)
        params, macs = space.params_after(units), space.macs_after(units)
        pruned, _ = prune_and_fold(
            self.prepared.model.cpu(), space, units, self.prepared.example_input, compensation
        )
        self.prepared.model.to(self.prepared.device)
        latency = measure_latency(pruned, self.prepared.example_input, threads=1)
        predictions, labels = predict(
            pruned.to(self.prepared.device), self.test_batches, self.prepared.device
        )
        accuracy = float((predictions == labels).float().mean())
        return {
            "model": self.spec,
            "method": method,
            "mode": mode,
            "compensate": compensate,
            "target": f"{target:.4f}",
            "params_reduction": round(1 - params / space.params_total, 6),
            "macs_reduction": round(1 - macs / space.macs_total, 6),
            "params": params,
            "macs": macs,
            "test_accuracy": round(accuracy, 6),
            "test_accuracy_before": round(self.accuracy_before, 6),
            "test_accuracy_drop": round(self.accuracy_before - accuracy, 6),
            "latency_ms": round(latency, 4),
            "latency_ms_before": round(self.latency_before, 4),
            "units_removed": len(units),
        } | extra


def _cache_path(out: Path, spec: str, method: str, compensate: str, options=None) -> Path:
    safe = spec.replace(":", "_").replace("/", "_")
    name = f"{safe}__{method}__{compensate}"
    if method == "cswap" and options is not None:  # the order depends on the ranking options
        rank = options.rank_config()
        name += f"__{rank.statistic}{'_cost' if rank.per_cost else ''}"
        name += "_cat" if rank.categories_first else ""
    return out / "cache" / f"{name}.json"


def _first_ranking(bench: _ModelBench, method, compensate, compensation, out: Path):
    """(oneshot ranking, progressive ranking, scoring seconds), cached on disk."""
    path = _cache_path(out, bench.spec, method, compensate, bench.options)
    if path.is_file():
        data = json.loads(path.read_text())
        rankings = [
            Ranking(
                order=tuple(item["order"]),
                scores={int(k): v for k, v in item["scores"].items()},
                categories={int(k): v for k, v in item["categories"].items()},
            )
            for item in data["rankings"]
        ]
        return rankings[0], rankings[1], data["scoring_seconds"]
    started = time.perf_counter()
    ranker = make_ranker(
        method, "progressive", bench.prepared, bench.options, bench.progress, compensation
    )
    if method == "cswap":
        categorization = ranker.categorization(())
        costs = bench.prepared.space.savings((), "params")
        full = causal_ranking(categorization, bench.options.rank_config(True), costs)
        progressive = causal_ranking(categorization, bench.options.rank_config(), costs)
    else:
        full = progressive = ranker(())
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "scoring_seconds": seconds,
        "rankings": [
            {
                "order": list(r.order),
                "scores": {str(k): v for k, v in r.scores.items()},
                "categories": {str(k): v for k, v in r.categories.items()},
            }
            for r in (full, progressive)
        ],
    }
    path.write_text(json.dumps(data))
    return full, progressive, seconds


def _schedule(config: BenchConfig, target: float, milestones=()) -> ScheduleConfig:
    return ScheduleConfig(
        target_params=target, tolerance=config.tolerance, milestones=tuple(milestones)
    )


def run_bench(
    config: BenchConfig,
    out: str | Path,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Run every missing row; returns all rows of OUT/results.csv. Writes results.json and one
    PNG per model at the end."""
    out = Path(out)
    check_out_dir(out, overwrite=True)  # a file, under a file, unwritable: before any work
    for spec in config.models:  # an unknown or broken spec fails now, not after other models
        api.load_spec(spec)
    writer = _Writer(out / "results.csv")
    targets = tuple(sorted(config.targets))
    for phase in ("oneshot", "progressive"):
        if phase not in config.modes:
            continue
        for spec in config.models:
            wanted = [
                (method, compensate)
                for compensate in config.compensations
                for method in config.methods
                if any(
                    (spec, method, phase, compensate, f"{t:.4f}") not in writer.done
                    for t in targets
                )
            ]
            if not wanted:
                continue
            echo(f"[{phase}] {spec}: preparing data and units")
            bench = _ModelBench(spec, config, progress)
            compensations = {}
            for method, compensate in wanted:
                if compensate not in compensations:
                    compensations[compensate] = measure_compensation(
                        bench.prepared, compensate, bench.options
                    )
                compensation = compensations[compensate]
                try:
                    rows = _run_one(bench, method, phase, compensate, compensation, targets, out)
                except CswapError as error:  # e.g. bn_scale on a ViT: a row that says why
                    rows = [
                        {
                            "model": spec,
                            "method": method,
                            "mode": phase,
                            "compensate": compensate,
                            "target": f"{t:.4f}",
                            "note": f"not applicable: {error.problem}",
                        }
                        for t in targets
                    ]
                for row in rows:
                    if _key(row) not in writer.done:
                        writer.add(row)
                        echo(_describe(row))
    rows = writer.rows
    write_summary(out, rows, config)
    return rows


def _run_one(bench, method, mode, compensate, compensation, targets, out) -> list[dict]:
    full, progressive_ranking, scoring_seconds = _first_ranking(
        bench, method, compensate, compensation, out
    )
    space = bench.prepared.space
    rows = []
    if mode == "oneshot":  # no validation: a one-shot cut never looks at it
        for target in targets:
            started = time.perf_counter()
            removed, reached = oneshot(space, _schedule(bench.config, target), full)
            seconds = scoring_seconds + time.perf_counter() - started
            rows.append(
                bench.row(
                    method,
                    mode,
                    compensate,
                    target,
                    removed,
                    compensation,
                    reached=reached,
                    stop_reason="target_reached" if reached else "candidates_exhausted",
                    scoring_seconds=round(scoring_seconds, 2),
                    total_seconds=round(seconds, 2),
                )
            )
        return rows
    # progressive: one run to the largest target, every smaller one a milestone
    crossings: dict[float, tuple[tuple[int, ...], float, float]] = {}
    started = time.perf_counter()

    def on_accept(state) -> None:
        params = space.params_after(state.removed)
        validation = state.steps[-1].val_accuracy
        for target in targets:
            if target not in crossings and params <= (1 - target) * space.params_total:
                elapsed = scoring_seconds + time.perf_counter() - started
                crossings[target] = (state.removed, validation, elapsed)

    ranker = make_ranker(
        method, "progressive", bench.prepared, bench.options, bench.progress, compensation
    )
    ranker.preset = progressive_ranking
    result = run_progressive(
        bench.prepared,
        bench.options,
        _schedule(bench.config, targets[-1], targets[:-1]),
        ranker,
        bench.prepared.validator(compensation),
        progress=bench.progress,
        on_accept=on_accept,
    )
    total = scoring_seconds + time.perf_counter() - started
    for target in targets:
        if target in crossings:
            removed, validation, seconds = crossings[target]
            reached, stop = True, "target_reached"
        else:
            removed, validation = result.removed, result.final_validation.accuracy
            seconds, reached, stop = total, False, result.stop_reason
        rows.append(
            bench.row(
                method,
                mode,
                compensate,
                target,
                removed,
                compensation,
                reached=reached,
                val_accuracy=round(validation, 6),
                stop_reason=stop,
                scoring_seconds=round(scoring_seconds, 2),
                total_seconds=round(seconds, 2),
            )
        )
    return rows


def _describe(row: dict) -> str:
    if row.get("note"):
        return f"{row['model']} {row['method']} {row['mode']} {row['compensate']}: {row['note']}"
    return (
        f"{row['model']:14s} {row['method']:8s} {row['mode']:11s} {row['compensate']:4s} "
        f"target {float(row['target']):.2f}: params -{float(row['params_reduction']):.1%}, "
        f"test {float(row['test_accuracy']):.4f} (drop {float(row['test_accuracy_drop']):+.4f})"
        f"{'' if str(row['reached']) == 'True' else ' [not reached]'}"
    )


def write_summary(out: Path, rows: list[dict], config: BenchConfig | None = None) -> None:
    """results.json (rows + machine) and one PNG per model."""
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if config is not None:
        info["config"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in config.__dict__.items()
        }
    (out / "results.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    for model in sorted({row["model"] for row in rows}):
        figure = plot_model(model, [row for row in rows if row["model"] == model])
        if figure is not None:
            safe = model.replace(":", "_").replace("/", "_")
            figure.savefig(out / f"{safe}.png", dpi=110, bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(figure)


def plot_model(model: str, rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if not row.get("note")]
    if not rows:
        return None
    compensations = sorted({row["compensate"] for row in rows})
    figure, axes = plt.subplots(
        1, len(compensations), figsize=(6 * len(compensations), 4.2), sharey=True, squeeze=False
    )
    colours = dict(zip(ALL_METHODS, plt.get_cmap("tab10").colors, strict=False))
    before = float(rows[0]["test_accuracy_before"])
    for axis, compensate in zip(axes[0], compensations, strict=True):
        for method in ALL_METHODS:
            for mode, style in (("oneshot", "--"), ("progressive", "-")):
                points = sorted(
                    (float(r["params_reduction"]), float(r["test_accuracy"]))
                    for r in rows
                    if r["method"] == method and r["mode"] == mode and r["compensate"] == compensate
                )
                points = sorted(set(points))
                if not points:
                    continue
                x, y = zip(*points, strict=True)
                axis.plot(
                    x,
                    y,
                    style,
                    marker="o" if mode == "progressive" else "x",
                    markersize=3,
                    color=colours[method],
                    label=f"{method} {mode}",
                )
        axis.axhline(before, color="black", linewidth=0.6)
        axis.set_title(f"{model}, compensation: {compensate}")
        axis.set_xlabel("params removed (fraction)")
        axis.set_ylim(max(0.0, before - 0.3), min(1.0, before + 0.02))
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=6, ncol=2, loc="lower left")
    return figure


def table(rows: list[dict], targets: Sequence[float] = (0.3, 0.5, 0.7)) -> str:
    """A markdown table: test accuracy per (model, method, mode, compensation) at ``targets``."""
    lines = [
        "| model | method | mode | comp. | " + " | ".join(f"{t:.0%}" for t in targets) + " |",
        "|---|---|---|---|" + "---|" * len(targets),
    ]
    grouped: dict[tuple, dict[float, dict]] = {}
    for row in rows:
        key = (row["model"], row["method"], row["mode"], row["compensate"])
        grouped.setdefault(key, {})[round(float(row["target"]), 4)] = row
    for key in sorted(grouped):
        cells = []
        for target in targets:
            row = grouped[key].get(round(target, 4))
            if row is None:
                cells.append("")
            elif row.get("note"):
                cells.append("n/a")
            else:
                mark = "" if str(row["reached"]) == "True" else "*"
                cells.append(f"{float(row['test_accuracy']):.4f}{mark}")
        lines.append("| " + " | ".join(key) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def progressive_table(rows: list[dict]) -> str:
    """A markdown table: where each progressive run ended (its row with the most params removed)."""
    lines = [
        "| model | method | comp. | params removed | MACs removed | test acc (drop) | val acc "
        "| stop | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    final: dict[tuple, dict] = {}
    for row in rows:
        if row["mode"] != "progressive" or row.get("note"):
            continue
        key = (row["model"], row["method"], row["compensate"])
        best = final.get(key)
        if best is None or (float(row["params_reduction"]), float(row["total_seconds"])) > (
            float(best["params_reduction"]),
            float(best["total_seconds"]),
        ):
            final[key] = row
    for key in sorted(final):
        row = final[key]
        lines.append(
            "| "
            + " | ".join(key)
            + f" | {float(row['params_reduction']):.1%} | {float(row['macs_reduction']):.1%}"
            f" | {float(row['test_accuracy']):.4f} ({float(row['test_accuracy_drop']):+.4f})"
            f" | {float(row['val_accuracy']):.4f} | {row['stop_reason']}"
            f" | {float(row['total_seconds']) / 60:.0f} |"
        )
    return "\n".join(lines)


DOC_BLOCKS = {"progressive": progressive_table, "grid": table}


def update_doc(path: str | Path, rows: list[dict]) -> None:
    """Regenerate the tables between ``<!-- NAME -->`` and ``<!-- /NAME -->`` in a markdown file
    (NAME: progressive, grid) from the rows; the prose around them is left as it is."""
    path = Path(path)
    if not path.is_file():
        raise CswapError(f"{path} does not exist.", "Give the markdown file to update.")
    text = path.read_text()
    found = False
    for name, make in DOC_BLOCKS.items():
        start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
        if start not in text:
            continue
        if end not in text or text.index(end) < text.index(start):
            raise CswapError(f"{path}: {start} has no {end} after it.", f"Add {end}.")
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = f"{before}{start}\n{make(rows)}\n{end}{after}"
        found = True
    if not found:
        raise CswapError(
            f"{path} has no table markers.",
            "Put <!-- progressive --><!-- /progressive --> or <!-- grid --><!-- /grid --> "
            "where the tables go.",
        )
    path.write_text(text)


# ----------------------------------------------------------------------------- scoring speed

LOOKS = (0.25, 0.5, 0.75)
SPEED_CUTS = (0.3, 0.5)  # one-shot cuts (params fractions) whose removed units are compared


@dataclass(frozen=True)
class Lever:
    prefix: bool = False  # prefix reuse
    per_pass: int | None = 1  # units per pass; 0: fill the budget; None: the tool's auto choice
    looks: tuple[float, ...] = ()  # sequential looks
    early_share: float = 0.0  # alpha spent at the looks on critical verdicts
    screen: bool = False  # first-order screening
    band: bool = False  # exact scoring only near the cut (cswap.banded)
    sample_fraction: float = 0.25  # with band: its units on this share of the images first
    early_fraction: float = 0.25  # with band: and on this share of those before that
    edges: int = len(SPEED_CUTS)  # with band: banded at the last this many of SPEED_CUTS
    control_variate: bool = False  # with band: subsample means corrected (cswap.control)


SPEED_LEVERS = {
    "naive": Lever(),
    "prefix": Lever(prefix=True),
    "batching": Lever(per_pass=0),
    "sequential": Lever(looks=LOOKS, early_share=0.25),  # early critical and neutral verdicts
    "futility": Lever(looks=LOOKS),  # early neutral verdicts only, critical at alpha
    "screening": Lever(screen=True),
    "band": Lever(band=True),
    "all": Lever(prefix=True, per_pass=None, looks=LOOKS, screen=True),
    "onestage": Lever(prefix=True, per_pass=None, band=True, sample_fraction=0.0),
    # banded at the 50% cut only, as a progressive round is banded at its next cut only
    "oneedge": Lever(prefix=True, per_pass=None, band=True, edges=1),
    # two stages (the first on sample_fraction of the images, then the rest): no early stage
    "twostage": Lever(prefix=True, per_pass=None, band=True, early_fraction=0.0),
    # cswap prune's scoring levers, banded at every cut this round is judged at (a progressive
    # run's round has one: its next cut)
    "default": Lever(prefix=True, per_pass=None, band=True),
    # the default with the control variate (cswap.control)
    "cv": Lever(prefix=True, per_pass=None, band=True, control_variate=True),
}


class _PeakMemory:
    """Peak resident memory (MB) of this process while the block runs, sampled every 5 ms."""

    def __enter__(self):
        import threading

        self.peak = self.start = _rss_mb()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, _rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())
        return False


def _rss_mb() -> float:
    return (resident_bytes() or 0) / 2**20


def speed_bench(
    spec: str,
    *,
    levers: Sequence[str] = ("naive", "prefix", "band", "default"),
    calib_per_class: int = 50,
    compensate: str = "lstsq",
    batch_size: int = 256,
    memory_budget_mb: float = 1024.0,
    seed: int = 0,
    device: str = "cpu",
    test_size: int | None = None,
    bracket: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Time the first scoring of ``spec`` under each lever; compare categories, xi and the
    units that one-shot cuts at 30% and 50% of the parameters remove with the naive exact run
    (one unit per full forward pass, fixed n, no screening, every unit exact), and those cuts'
    test accuracy (the first ``test_size`` test images; None: all). ``compensate``: the
    interventions scored, as ``cswap prune`` scores them (the compensated removal).
    ``bracket``: every other lever is timed once before naive and once after it (naive, the
    longest, runs once), so a drift of the machine's speed during the run shows as the spread
    of each lever's two timings and of its speedup (``speedup_range``)."""
    unknown = [lever for lever in levers if lever not in SPEED_LEVERS]
    if unknown:
        raise CswapError(f"Unknown levers {unknown}.", f"use some of {', '.join(SPEED_LEVERS)}.")
    others = [lever for lever in levers if lever != "naive"]
    levers = ["naive", *others]
    prepared, compensation, test = _speed_session(
        spec, calib_per_class, compensate, batch_size, seed, device, test_size
    )
    timed = functools.partial(
        _timed_round, prepared, compensation, seed, batch_size, memory_budget_mb
    )
    before = {lever: timed(lever) for lever in others} if bracket else {}
    runs = {"naive": [timed("naive")]}
    for lever in others:
        runs[lever] = [before[lever], timed(lever)] if bracket else [timed(lever)]
    space = prepared.space
    reference = runs["naive"][0]["round"]["categorization"]
    reference_cuts = _speed_cuts(space, reference)
    results: dict[str, dict] = {}
    for lever in levers:
        timings = runs[lever]
        categorization = timings[0]["round"]["categorization"]
        cuts = _speed_cuts(space, categorization)
        entry = {
            **_timing_entry(timings, len(space)),
            **{k: v for k, v in timings[0]["round"].items() if k != "categorization"},
            **_agreement(categorization, reference),
            "removal_agreement": {str(c): _jaccard(cuts[c], reference_cuts[c]) for c in cuts},
            "cut_accuracy": {
                str(cut): _cut_accuracy(prepared, units, compensation, test)
                for cut, units in cuts.items()
            },
            "categories": categorization.counts(),
            # every run of the lever decided the same (the scoring is seeded)
            "repeatable": all(
                np.array_equal(t["round"]["categorization"].kl, categorization.kl, equal_nan=True)
                for t in timings
            ),
        }
        results[lever] = entry
        echo(_speed_line(spec, lever, entry))
    return _speed_summary(spec, prepared, compensate, results, levers)


def _timed_round(prepared, compensation, seed, batch_size, memory_budget_mb, lever) -> dict:
    """One first scoring round under ``lever``: its wall and CPU seconds, memory, what it
    spent and its categorization."""
    started, cpu_started = time.perf_counter(), time.process_time()
    with _PeakMemory() as memory:
        round_ = _lever_round(
            prepared, compensation, SPEED_LEVERS[lever], seed, batch_size, memory_budget_mb
        )
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "peak": memory.peak,
        "growth": memory.peak - memory.start,
        "round": round_,
    }


def _timing_entry(timings: list[dict], units: int) -> dict:
    """A lever's timings over its runs: the mean, and each run's (``seconds_runs``)."""
    seconds = float(np.mean([t["seconds"] for t in timings]))
    return {
        "seconds": round(seconds, 3),
        "seconds_runs": [round(t["seconds"], 3) for t in timings],
        "cpu_seconds": round(float(np.mean([t["cpu_seconds"] for t in timings])), 3),
        "cpu_seconds_runs": [round(t["cpu_seconds"], 3) for t in timings],
        "units_per_second": round(units / seconds, 3),
        "peak_memory_mb": round(max(t["peak"] for t in timings), 1),
        "memory_growth_mb": round(max(t["growth"] for t in timings), 1),
    }


def _speed_line(spec: str, lever: str, entry: dict) -> str:
    runs = " / ".join(f"{s:.1f}" for s in entry["seconds_runs"])
    return (
        f"{spec} {lever:10s} {entry['seconds']:8.1f} s ({runs}; cpu {entry['cpu_seconds']:7.1f}"
        f" s)  exact {entry['exact_pass_fraction']:.3f}  "
        f"agreement {entry['category_agreement']:.4f}  "
        f"removal {min(entry['removal_agreement'].values()):.4f}  "
        f"test accuracy {' / '.join(f'{a:.4f}' for a in entry['cut_accuracy'].values())}  "
        f"peak {entry['peak_memory_mb']:.0f} MB"
    )


def _speed_session(spec, calib_per_class, compensate, batch_size, seed, device, test_size=None):
    """(prepared session, compensation, test batches)."""
    loaded = api.load_spec(spec)
    selection = api.select_data(
        loaded,
        "fashion-mnist",
        per_class=calib_per_class,
        validation_size=100,
        seed=seed,
        batch_size=batch_size,
        device=device,
    )
    options = make_options({"batch_size": batch_size, "seed": seed})
    prepared = prepare(
        loaded.model,
        selection.calibration,
        selection.validation,
        example_input=None,
        label_free=False,
        device=device,
        options=options,
    )
    images, labels = tensors(selection.test, batch_size)
    images, labels = images[:test_size], labels[:test_size]
    test = [
        (images[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, len(images), batch_size)
    ]
    return prepared, measure_compensation(prepared, compensate, options), test


def _cut_accuracy(prepared, units, compensation, test) -> float:
    """Test accuracy of the model with ``units`` removed (compensated as they were scored)."""
    model = prepared.model
    with intervention(model, prepared.space, units, compensation):
        predictions, labels = predict(model, test, prepared.device)
    return round(float((predictions == labels).float().mean()), 4)


def _lever_round(prepared, compensation, lever: Lever, seed, batch_size, memory_budget_mb):
    """The first scoring round under ``lever``: its categorization and what it spent."""
    from cswap.banded import banded_categorization, with_joint
    from cswap.estimate import BandConfig
    from cswap.fastscore import FastConfig, fast_categorize
    from cswap.scoring import causal_effects

    scoring = dict(
        batch_size=batch_size,
        device=prepared.device,
        prefix_reuse=lever.prefix,
        units_per_pass=lever.per_pass,
        memory_budget_mb=memory_budget_mb,
        compensation=compensation,
    )
    data = (prepared.model, prepared.space, prepared.calibration_images)
    config = Options().category_config()
    if lever.band:
        score = functools.partial(causal_effects, *data[:2], **scoring)
        banded = banded_categorization(
            score,
            prepared.model,
            prepared.space,
            compensation,
            (),
            images=prepared.calibration_images,
            labels=prepared.calibration_labels,
            device=prepared.device,
            # banded at every cut the round is judged at (with one edge, at the last only)
            horizon=[cut * prepared.space.params_total for cut in SPEED_CUTS[-lever.edges :]],
            cost_kind="params",
            band=BandConfig(
                sample_fraction=lever.sample_fraction,
                early_fraction=lever.early_fraction,
                control_variate=lever.control_variate,
            ),
            category_config=config,
            seed=seed,
        )
        return {
            "categorization": banded.categorization,
            "exact_pass_fraction": round(banded.passes / len(prepared.space), 4),
            "settled_early": 0,
            "screened": 0,
            "estimated": banded.estimated,
            "sampled": len(banded.sampled),
        }
    result = fast_categorize(
        *data,
        prepared.calibration_labels,
        config,
        FastConfig(looks=lever.looks, early_alpha_share=lever.early_share, screen=lever.screen),
        seed=seed,
        **scoring,
    )
    # ranked as cswap prune ranks an exactly scored round (the banded rounds add their own)
    categorization = with_joint(
        result.categorization,
        prepared.model,
        prepared.space,
        compensation,
        (),
        "params",
        images=prepared.calibration_images,
        device=prepared.device,
        seed=seed,
    )
    return {
        "categorization": categorization,
        "exact_pass_fraction": round(result.exact_passes / result.full_passes, 4),
        "settled_early": result.settled_early,
        "screened": result.screened,
        "estimated": 0,
    }


def _speed_cuts(space, categorization) -> dict[float, set[int]]:
    """The units one-shot cuts of the default C-SWAP order remove at each of SPEED_CUTS."""
    ranking = causal_ranking(categorization, RankConfig(), space.savings((), "params"))
    return {
        cut: set(oneshot(space, ScheduleConfig(target_params=cut), ranking)[0])
        for cut in SPEED_CUTS
    }


def _jaccard(a: set[int], b: set[int]) -> float:
    return round(len(a & b) / max(1, len(a | b)), 4)


def _agreement(categorization, reference) -> dict:
    """Category agreement over the units both have tested (estimated units have no category),
    and the Spearman correlation of xi over the same units."""
    from scipy.stats import spearmanr

    tested = (categorization.categories != ESTIMATED) & (reference.categories != ESTIMATED)
    same = categorization.categories[tested] == reference.categories[tested]
    rho = spearmanr(categorization.xi[tested], reference.xi[tested]).statistic
    return {
        "category_agreement": round(float(same.mean()), 4) if tested.any() else None,
        "categories_tested": round(float(tested.mean()), 4),
        "xi_spearman": round(float(rho), 4),
    }


def _speed_summary(spec, prepared, compensate, results, levers) -> dict:
    naive = results["naive"]
    fast_name = next((n for n in ("default", "all") if n in results), levers[-1])
    fast = results[fast_name]
    return {
        "model": spec,
        "units": len(prepared.space),
        "calibration_images": len(prepared.calibration_images),
        "compensate": compensate,
        "torch_threads": torch.get_num_threads(),
        "fast_lever": fast_name,
        "naive_seconds": naive["seconds"],
        "fast_seconds": fast["seconds"],
        "speedup": round(naive["seconds"] / fast["seconds"], 3),
        # naive over the fast lever's slowest and fastest run (bracketing naive)
        "speedup_range": [
            round(naive["seconds"] / max(fast["seconds_runs"]), 3),
            round(naive["seconds"] / min(fast["seconds_runs"]), 3),
        ],
        # CPU time of this process: robust to other jobs sharing the cores (wall time is not)
        "naive_cpu_seconds": naive["cpu_seconds"],
        "fast_cpu_seconds": fast["cpu_seconds"],
        "cpu_speedup": round(naive["cpu_seconds"] / max(fast["cpu_seconds"], 1e-9), 3),
        "category_agreement": fast["category_agreement"],
        "categories_tested": fast["categories_tested"],
        "removal_agreement": min(fast["removal_agreement"].values()),
        # test accuracy of the one-shot cuts: what a differing removal costs
        "cut_accuracy": fast["cut_accuracy"],
        "naive_cut_accuracy": naive["cut_accuracy"],
        "cut_accuracy_gap": round(
            max(naive["cut_accuracy"][c] - fast["cut_accuracy"][c] for c in naive["cut_accuracy"]),
            4,
        ),
        "xi_spearman": fast["xi_spearman"],
        "peak_memory_mb": max(entry["peak_memory_mb"] for entry in results.values()),
        "levers": results,
    }


END_TO_END = {"zoo:vgg": 0.5, "zoo:resnet20": 0.3, "zoo:vit": 0.35}  # the targets


def end_to_end_bench(
    models: Sequence[str],
    out: Path,
    *,
    exact: bool = False,
    echo: Callable[[str], None] = print,
) -> dict:
    """Time the default ``cswap prune`` of each zoo model to its END_TO_END target (a fresh
    process, as a user runs it), with the report's per-stage timings; ``exact`` also runs it
    with ``--exact-band 0`` (every unit scored exactly) and gives the accuracy difference."""
    import subprocess
    import sys

    unknown = [model for model in models if model not in END_TO_END]
    if unknown:
        raise CswapError(f"No end-to-end target for {unknown}.", f"use {', '.join(END_TO_END)}.")
    check_out_dir(out, resume=False, overwrite=True)
    rows = []
    for model in models:
        for band in (2.0, 0.0) if exact else (2.0,):
            run_dir = out / f"{model.replace(':', '_')}_band{band:g}"
            command = [sys.executable, "-m", "cswap", "prune", "--model", model]
            command += ["--data", "fashion-mnist", "--target-params", str(END_TO_END[model])]
            command += ["--exact-band", str(band), "--out", str(run_dir), "--overwrite", "--quiet"]
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - started
            rows.append(_end_to_end_row(model, band, seconds, run_dir))
            echo(_describe_end_to_end(rows[-1]))
    result = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "runs": rows}
    for row in rows:
        twin = [r for r in rows if r["model"] == row["model"] and r["exact_band"] == 0.0]
        if twin and row["exact_band"] > 0:
            row["test_accuracy_vs_exact"] = round(
                row["test_accuracy_after"] - twin[0]["test_accuracy_after"], 4
            )
    return result


def _end_to_end_row(model: str, band: float, seconds: float, run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    rounds = report.get("scoring_rounds") or []
    return {
        "model": model,
        "target_params": END_TO_END[model],
        "exact_band": band,
        "wall_seconds": round(seconds, 1),
        "stop_reason": report["stop_reason"],
        "params_reduction": round(report["params_reduction"], 4),
        "test_accuracy_before": report["test_accuracy_before"],
        "test_accuracy_after": report["test_accuracy_after"],
        "units_scored_exactly": sum(r.get("exact", 0) for r in rounds),
        "units_estimated": sum(r.get("estimated", 0) for r in rounds),
        "scoring_rounds": len(rounds),
        "timings": {name: entry["seconds"] for name, entry in report["timings"]["totals"].items()},
    }


def _describe_end_to_end(row: dict) -> str:
    return (
        f"{row['model']} to {row['target_params']:.0%} (exact band {row['exact_band']:g}): "
        f"{row['wall_seconds']:.0f} s, {row['stop_reason']}, removed "
        f"{row['params_reduction']:.1%}, test {row['test_accuracy_before']:.4f} -> "
        f"{row['test_accuracy_after']:.4f}; exact {row['units_scored_exactly']}, "
        f"estimated {row['units_estimated']} units"
    )


def project_scoring(
    spec: str,
    *,
    input_size: int = 224,
    images: int = 8,
    calibration_images: int = 500,
    echo: Callable[[str], None] = print,
) -> dict:
    """Measure the exact per-unit scoring cost of ``spec`` (random init, ``input_size`` px) on
    one unit of every group, with prefix reuse, and project one exact scoring round over every
    unit at ``calibration_images`` images (the cost grows linearly with the images)."""
    from cswap.adapters import canonicalize
    from cswap.scoring import causal_effects
    from cswap.units import discover_units

    loaded = api.load_spec(spec)
    model = canonicalize(loaded.model).eval()
    torch.manual_seed(0)
    batch = torch.randn(images, 3, input_size, input_size)
    started = time.perf_counter()
    space = discover_units(model, batch[:1])
    discovery = time.perf_counter() - started
    with torch.no_grad():
        labels = model(batch).argmax(1)
    sample = [group.unit_ids[0] for group in space.groups]
    ticks: list[float] = []
    # the first unit twice: its first pass also pays the tracing and the baseline pass
    causal_effects(
        model,
        space,
        batch,
        labels,
        units=[sample[0], *sample],
        batch_size=images,
        progress=lambda _n: ticks.append(time.perf_counter()),
    )
    per_unit = np.diff(ticks)
    scale = calibration_images / images
    round_seconds = sum(
        len(group.unit_ids) * cost * scale
        for group, cost in zip(space.groups, per_unit, strict=True)
    )
    result = {
        "model": spec,
        "input_size": input_size,
        "units": len(space),
        "groups": len(space.groups),
        "params": space.params_total,
        "macs": space.macs_total,
        "unit_discovery_seconds": round(discovery, 1),
        "measured_images": images,
        "median_unit_seconds_per_image": float(np.median(per_unit) / images),
        "exact_round_seconds": round(round_seconds, 1),
        "calibration_images": calibration_images,
        "torch_threads": torch.get_num_threads(),
    }
    echo(
        f"{spec} @ {input_size}px: {len(space)} units in {len(space.groups)} groups; one exact "
        f"round at {calibration_images} images: {round_seconds / 3600:.1f} h"
    )
    return result


def latency_stability(
    run_dir: str | Path,
    *,
    repeats: int = 5,
    batches: Sequence[int] = (1, 32),
    threads: int = 1,
    echo: Callable[[str], None] = print,
) -> dict:
    """The report's paired latency, measured ``repeats`` times on one saved run: how much the
    before / after ratio moves between measurements (the spread is (max - min) / median)."""
    from cswap.export import read_spec
    from cswap.measure import paired_latency

    _, spec = read_spec(run_dir)
    if not spec.get("base_model"):
        raise CswapError(
            f"{run_dir} was saved from a model built in Python: its base cannot be rebuilt.",
            "run this on the --out directory of a `cswap prune --model SPEC` run.",
        )
    base = api.load_spec(spec["base_model"]).model.eval()
    pruned = api.load(run_dir).eval()
    example = torch.randn(spec["example_input_shape"])
    result = {
        "run": str(run_dir),
        "threads": threads,
        "machine": platform.processor(),
        "batches": {},
    }
    for batch in batches:
        ratios = []
        for repeat in range(repeats):
            measured = paired_latency(base, pruned, example, batch=batch, threads=threads)
            ratios.append(measured.ratio)
            echo(
                f"batch {batch:3d} #{repeat + 1}: before {measured.before_ms:.3f} ms, after "
                f"{measured.after_ms:.3f} ms, ratio x{measured.ratio:.3f}"
            )
        median = float(np.median(ratios))
        spread = (max(ratios) - min(ratios)) / median
        result["batches"][str(batch)] = {"ratios": ratios, "median": median, "spread": spread}
        echo(f"batch {batch:3d}: ratio x{median:.3f}, spread {spread:.1%} over {repeats} runs")
    return result


def scale_bench(
    spec: str,
    *,
    workers: Sequence[int] = (1, 2),
    calib_per_class: int = 10,
    compensate: str = "lstsq",
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> dict:
    """One first scoring of ``spec`` in this process (1 torch thread) and on Ray with each worker
    count: wall time, speedup, per-unit cost, and whether the effects are identical."""
    from cswap.distributed import RayConfig, RayScoring, require_ray
    from cswap.scoring import causal_effects

    ray = require_ray()
    loaded = api.load_spec(spec)
    selection = api.select_data(
        loaded, "fashion-mnist", per_class=calib_per_class, validation_size=100, seed=seed
    )
    options = make_options({"seed": seed, "min_class_size": 2})
    prepared = prepare(
        loaded.model, selection.calibration, selection.validation, example_input=None,
        label_free=False, device="cpu", options=options,
    )  # fmt: skip
    compensation = measure_compensation(prepared, compensate, options)
    inputs = (prepared.model, prepared.space, prepared.calibration_images)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        alone = causal_effects(*inputs, prepared.calibration_labels, compensation=compensation)
        single = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    units, images = len(alone.unit_ids), len(prepared.calibration_images)
    result = {
        "model": spec, "units": units, "images": images, "compensate": compensate,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "single_process_seconds": round(single, 2),
        "seconds_per_unit_image": single / (units * images), "workers": {},
    }  # fmt: skip
    echo(f"{spec}: {units} units x {images} images, one process (1 thread): {single:.1f} s")
    for count in workers:
        ray.init(num_cpus=count, include_dashboard=False, log_to_driver=False)
        scorer = RayScoring(RayConfig(workers=count))
        try:
            started = time.perf_counter()
            spread = scorer.effects(*inputs, prepared.calibration_labels, compensation=compensation)
            seconds = time.perf_counter() - started
        finally:
            scorer.close()
            ray.shutdown()
        same = bool(np.array_equal(spread.relative_effects, alone.relative_effects))
        result["workers"][str(count)] = {
            "seconds": round(seconds, 2), "speedup": round(single / seconds, 2),
            "identical": same, "worker_seconds": scorer.worker_seconds,
        }  # fmt: skip
        echo(f"  {count} worker(s): {seconds:.1f} s, x{single / seconds:.2f}, identical: {same}")
    return result
