"""`cswap bench-ranking`: which order of C-SWAP's candidates cuts best (issue: rank with
resolution).

One causal scoring per model (under the compensation the cut applies), then the one-shot cut of
every ranking variant (statistic x weighing by cost x categories first) at every target, and the
same cut of baseline criteria, all evaluated on the test split with the same units, data and
compensation. The rows go to OUT/rankings.csv (resumable); the scoring is cached in OUT/cache.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cswap.bench import BenchConfig, _ModelBench, read_rows
from cswap.categorize import Categorization, RankConfig, causal_ranking
from cswap.checkpoint import load_categorization
from cswap.errors import CswapError
from cswap.reconstruct import propagated
from cswap.report import units_arrays
from cswap.schedule import ScheduleConfig, oneshot
from cswap.session import CausalRanker, CriterionRanker, measure_compensation

VARIANTS: dict[str, RankConfig] = {
    "xi_categories": RankConfig("xi", per_cost=False, categories_first=True),  # the paper's order
    "logp_categories": RankConfig("logp", per_cost=False, categories_first=True),
    "kl_categories": RankConfig("kl", per_cost=False, categories_first=True, joint=False),
    "xi": RankConfig("xi", per_cost=False),
    "logp": RankConfig("logp", per_cost=False),
    "kl": RankConfig("kl", per_cost=False, joint=False),
    "xi_per_param": RankConfig("xi", per_cost=True),
    "logp_per_param": RankConfig("logp", per_cost=True),
    "kl_per_param": RankConfig("kl", per_cost=True, joint=False),
    "logp_per_param_categories": RankConfig("logp", per_cost=True, categories_first=True),
    "kl_per_param_categories": RankConfig("kl", per_cost=True, categories_first=True, joint=False),
    # the default: KL with the group's earlier units removed (the refit's interaction), per param
    "kl_joint_per_param": RankConfig("kl", per_cost=True),
}
BASELINES = ("taylor", "l1", "fpgm")
# the default order, re-scored on the partly cut model every RESCORE_STEP of the parameters
RESCORED = "kl_joint_per_param_rescored"
RESCORE_STEP = 0.1
COLUMNS = (
    "model",
    "ranking",
    "compensate",
    "target",
    "params_reduction",
    "test_accuracy",
    "test_accuracy_before",
    "scoring_seconds",
)


def _scored(bench: _ModelBench, compensate: str, compensation, out: Path):
    """The first causal categorization of ``bench``'s model (cached) and its scoring time."""
    safe = bench.spec.replace(":", "_").replace("/", "_")
    path = out / "cache" / f"{safe}__cswap_effects__{compensate}.npz"
    refitted = ",".join(sorted(compensation.grams or {})) if compensation is not None else ""
    if path.is_file():
        arrays = np.load(path, allow_pickle=False)
        if "refitted" in arrays and str(arrays["refitted"]) == refitted and "joint" in arrays:
            config = bench.options.category_config()
            return load_categorization(arrays, "", config), float(arrays["scoring_seconds"])
    # scored under another compensation (layers refitted) or before the joint damage: again
    started = time.perf_counter()
    ranker = CausalRanker(bench.prepared, bench.options, bench.progress, compensation)
    categorization = ranker.categorization(())
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = units_arrays(categorization) | {
        "scoring_seconds": np.asarray(seconds),
        "refitted": np.asarray(refitted),
    }
    np.savez(path, **arrays)
    return categorization, seconds


def _orders(bench, categorization: Categorization, seconds: float, baselines) -> dict:
    """Ranking name -> (ranking, seconds its scores took)."""
    costs = bench.prepared.space.savings((), "params")
    orders = {
        name: (causal_ranking(categorization, config, costs), seconds)
        for name, config in VARIANTS.items()
    }
    for method in baselines:
        started = time.perf_counter()
        ranking = CriterionRanker(method, bench.prepared, bench.options)(())
        orders[method] = (ranking, time.perf_counter() - started)
    return orders


def _rescored_cuts(bench, compensation, first: Categorization, targets) -> dict:
    """target -> (removed, seconds): the default order cut in steps of RESCORE_STEP of the
    parameters, the remaining units re-scored on the cut model (with its compensation) between
    steps; no validation (a one-shot cut that re-scores)."""
    space = bench.prepared.space
    ranker = CausalRanker(bench.prepared, bench.options, bench.progress, compensation)
    config = bench.options.rank_config(True)
    started = time.perf_counter()
    removed: tuple[int, ...] = ()
    categorization = first
    cuts = {}
    goal = 0.0
    for target in sorted(targets):
        while goal < target - 1e-9:
            goal = min(target, goal + RESCORE_STEP)
            if removed:
                categorization = ranker.categorization(removed)
            ranking = causal_ranking(categorization, config, space.savings(removed, "params"))
            order = [unit for unit in ranking.order if unit not in set(removed)]
            removed, _ = oneshot(
                space,
                ScheduleConfig(target_params=goal),
                type(ranking)(order=(*removed, *order)),
            )
        cuts[target] = (removed, time.perf_counter() - started)
    return cuts


def compare_rankings(
    models: Sequence[str],
    targets: Sequence[float],
    out: str | Path,
    *,
    compensate: str = "lstsq",
    baselines: Sequence[str] = BASELINES,
    variants: Sequence[str] = tuple(VARIANTS),
    calib_per_class: int = 50,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    echo: Callable[[str], None] = print,
    error_correction: bool = False,
) -> list[dict]:
    """Rows of OUT/rankings.csv: test accuracy of every ranking's one-shot cut per target;
    ``error_correction`` (lstsq): each cut refitted on its own pruned inputs as ``cswap prune``
    does at the end (``cswap.reconstruct``), in rows whose compensate is ``lstsq+correction``."""
    if error_correction and compensate != "lstsq":
        raise CswapError("error_correction refits lstsq layers.", "use compensate='lstsq'.")
    label = f"{compensate}+correction" if error_correction else compensate
    out = Path(out)
    path = out / "rankings.csv"
    rows = read_rows(path)
    done = {(r["model"], r["ranking"], r["compensate"], f"{float(r['target']):.4f}") for r in rows}
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            csv.DictWriter(handle, COLUMNS).writeheader()
    unknown = sorted(set(variants) - {*VARIANTS, RESCORED})
    if unknown:
        raise CswapError(f"Unknown ranking variant(s) {unknown}.", f"use some of {list(VARIANTS)}.")
    names = [*variants, *baselines]
    for spec in models:
        wanted = [
            (name, target)
            for name in names
            for target in targets
            if (spec, name, label, f"{target:.4f}") not in done
        ]
        if not wanted:
            continue
        config = BenchConfig(
            models=(spec,),
            methods=("cswap",),
            modes=("oneshot",),
            compensations=(compensate,),
            targets=tuple(targets),
            calib_per_class=calib_per_class,
            seed=seed,
            device=device,
        )
        echo(f"{spec}: preparing data and units")
        bench = _ModelBench(spec, config, progress)
        compensation = measure_compensation(bench.prepared, compensate, bench.options)
        categorization, causal_seconds = _scored(bench, compensate, compensation, out)
        echo(f"{spec}: scored in {causal_seconds:.0f} s: {categorization.counts()}")
        orders = _orders(bench, categorization, causal_seconds, baselines)
        space = bench.prepared.space
        if any(name == RESCORED for name, _ in wanted):
            orders[RESCORED] = _rescored_cuts(bench, compensation, categorization, targets)
        for name, target in wanted:
            if name == RESCORED:
                removed, seconds = orders[name][target]
            else:
                ranking, seconds = orders[name]
                removed, _reached = oneshot(space, ScheduleConfig(target_params=target), ranking)
            applied = compensation
            if error_correction:
                images = bench.prepared.calibration_images
                applied = propagated(bench.prepared.model, space, removed, compensation, images)
            row = {
                "model": spec,
                "ranking": name,
                "compensate": label,
                "target": f"{target:.4f}",
                "params_reduction": round(1 - space.params_after(removed) / space.params_total, 6),
                "test_accuracy": round(bench.test_accuracy(removed, applied), 6),
                "test_accuracy_before": round(bench.accuracy_before, 6),
                "scoring_seconds": round(seconds, 2),
            }
            with path.open("a", newline="") as handle:
                csv.DictWriter(handle, COLUMNS).writerow(row)
            rows.append({k: str(v) for k, v in row.items()})
            echo(f"{spec} {name:28s} {target:.2f}: test {row['test_accuracy']:.4f}")
    return rows


def ranking_table(rows: list[dict]) -> str:
    """Markdown: one line per ranking (and compensation, when the rows hold several), one
    column per (model, target); the best of each column in bold."""
    columns = sorted({(r["model"], float(r["target"])) for r in rows})
    several = len({r["compensate"] for r in rows}) > 1
    lines_of = list(dict.fromkeys((r["ranking"], r["compensate"]) for r in rows))
    value = {
        (r["model"], float(r["target"]), r["ranking"], r["compensate"]): float(r["test_accuracy"])
        for r in rows
    }
    header = "| ranking | " + " | ".join(f"{m} @ {t:.0%}" for m, t in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for name, compensate in lines_of:
        cells = []
        for model, target in columns:
            accuracy = value.get((model, target, name, compensate))
            best = max(v for (m, t, *_), v in value.items() if m == model and t == target)
            text = "" if accuracy is None else f"{accuracy:.4f}"
            cells.append(f"**{text}**" if accuracy is not None and accuracy == best else text)
        label = f"{name} ({compensate})" if several else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
