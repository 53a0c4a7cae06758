"""`cswap bench`: one row per model x method x mode x compensation x target, resumable."""

import csv

import pytest
import torch

from cswap.bench import COLUMNS, BenchConfig, progressive_table, run_bench, table, update_doc
from cswap.errors import CswapError
from cswap.units import discover_units
from cswap.zoo.registry import ZOO
from cswap.zoo.store import build

TARGETS = (0.05, 0.1)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    config = BenchConfig(
        models=("zoo:vit",),
        methods=("l1", "random"),
        modes=("oneshot", "progressive"),
        compensations=("none", "mean"),
        targets=TARGETS,
        tolerance=0.05,
        calib_per_class=3,
        validation_size=300,
    )
    lines = []
    rows = run_bench(config, out, progress=False, echo=lines.append)
    return config, out, rows, lines


def test_every_row_is_written_with_every_column(bench_run):
    _, out, rows, _ = bench_run
    with (out / "results.csv").open() as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == len(rows) == 2 * 2 * 2 * len(TARGETS)
    assert tuple(written[0]) == COLUMNS
    for row in written:
        assert row["model"] == "zoo:vit"
        before, after = float(row["test_accuracy_before"]), float(row["test_accuracy"])
        assert float(row["test_accuracy_drop"]) == pytest.approx(before - after, abs=1e-5)
        assert float(row["latency_ms"]) > 0 and float(row["scoring_seconds"]) >= 0
        if row["mode"] == "oneshot" or row["reached"] == "True":
            assert float(row["params_reduction"]) >= float(row["target"])
    assert (out / "results.json").is_file() and (out / "zoo_vit.png").is_file()
    # a oneshot row overshoots its target by less than one unit's worth
    model = build(ZOO["vit"])
    space = discover_units(model, torch.zeros(1, 1, 28, 28))
    largest = max(unit.params for unit in space.units) / space.params_total
    oneshot = [r for r in written if r["mode"] == "oneshot"]
    assert all(float(r["params_reduction"]) - float(r["target"]) < largest for r in oneshot)


def test_rerun_skips_finished_rows(bench_run):
    config, out, rows, _ = bench_run
    lines = []
    again = run_bench(config, out, progress=False, echo=lines.append)
    assert len(again) == len(rows)
    assert lines == []  # nothing prepared, nothing run


def test_the_table_and_bad_configs():
    rows = [
        {
            "model": "m",
            "method": "l1",
            "mode": "oneshot",
            "compensate": "none",
            "target": "0.3000",
            "reached": "True",
            "test_accuracy": "0.81234",
            "note": "",
        }
    ]
    text = table(rows, targets=(0.3, 0.5))
    assert "| m | l1 | oneshot | none | 0.8123 |  |" in text
    with pytest.raises(CswapError, match="methods"):
        BenchConfig(("m",), ("magic",), ("oneshot",), ("none",), (0.3,))
    with pytest.raises(CswapError, match="targets"):
        BenchConfig(("m",), ("l1",), ("oneshot",), ("none",), (1.5,))


def _progressive(target, removed, seconds, stop):
    return {
        "model": "m",
        "method": "l1",
        "mode": "progressive",
        "compensate": "mean",
        "target": target,
        "reached": "False",
        "params_reduction": removed,
        "macs_reduction": "0.05",
        "test_accuracy": "0.9",
        "test_accuracy_drop": "0.01",
        "val_accuracy": "0.91",
        "stop_reason": stop,
        "total_seconds": seconds,
        "note": "",
    }


def test_the_progressive_table_shows_where_each_run_ended(tmp_path):
    rows = [
        _progressive("0.1000", "0.1", "60", "target_reached"),
        _progressive("0.2000", "0.15", "180", "tolerance_unmet"),
        _progressive("0.3000", "0.15", "180", "tolerance_unmet"),
    ]
    text = progressive_table(rows)
    assert text.splitlines()[2:] == [
        "| m | l1 | mean | 15.0% | 5.0% | 0.9000 (+0.0100) | 0.9100 | tolerance_unmet | 3 |"
    ]
    doc = tmp_path / "bench.md"
    doc.write_text("intro\n<!-- progressive -->\nold\n<!-- /progressive -->\nend\n")
    update_doc(doc, rows)
    assert doc.read_text() == f"intro\n<!-- progressive -->\n{text}\n<!-- /progressive -->\nend\n"
    update_doc(doc, rows)  # idempotent
    assert doc.read_text() == f"intro\n<!-- progressive -->\n{text}\n<!-- /progressive -->\nend\n"
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    with pytest.raises(CswapError, match="markers"):
        update_doc(bare, rows)
    broken = tmp_path / "broken.md"
    broken.write_text("<!-- grid -->\n")
    with pytest.raises(CswapError, match="/grid"):
        update_doc(broken, rows)
    assert broken.read_text() == "<!-- grid -->\n"


def test_speed_bench_reports_every_lever_against_naive():
    from cswap.bench import speed_bench

    result = speed_bench(
        "zoo:vit",
        levers=("prefix", "batching", "band"),
        calib_per_class=1,
        test_size=100,
        echo=lambda _: None,
    )
    for key in ("naive_seconds", "fast_seconds", "speedup", "cpu_speedup", "category_agreement"):
        assert key in result
    assert result["fast_lever"] == "band"  # no "default" or "all" given: the last lever
    assert set(result["levers"]) == {"naive", "prefix", "batching", "band"}
    # the exact levers reproduce the naive verdicts, xi and cuts
    for lever in ("prefix", "batching"):
        entry = result["levers"][lever]
        assert entry["category_agreement"] == 1.0 and entry["categories_tested"] == 1.0
        assert entry["xi_spearman"] > 0.999999
        assert entry["removal_agreement"] == {"0.3": 1.0, "0.5": 1.0}
        assert entry["exact_pass_fraction"] == 1.0
        assert entry["cut_accuracy"] == result["naive_cut_accuracy"]  # the same cuts
    # the cuts' accuracy on the first 100 test images
    assert set(result["naive_cut_accuracy"]) == {"0.3", "0.5"}
    assert result["cut_accuracy"] == result["levers"]["band"]["cut_accuracy"]
    assert result["cut_accuracy_gap"] == pytest.approx(
        max(result["naive_cut_accuracy"][c] - result["cut_accuracy"][c] for c in ("0.3", "0.5"))
    )
    band = result["levers"]["band"]
    estimated = band["categories"].get("estimated", 0)
    assert band["estimated"] == estimated
    assert band["exact_pass_fraction"] == pytest.approx(1 - estimated / result["units"], abs=1e-4)
    assert band["categories_tested"] == pytest.approx(band["exact_pass_fraction"], abs=1e-4)
    assert result["peak_memory_mb"] > 0
    # every other lever is timed before and after naive, with the same decisions each time
    assert len(result["levers"]["naive"]["seconds_runs"]) == 1
    for lever in ("prefix", "batching", "band"):
        entry = result["levers"][lever]
        assert len(entry["seconds_runs"]) == 2 and entry["repeatable"] is True
        assert entry["seconds"] == pytest.approx(sum(entry["seconds_runs"]) / 2, abs=1e-3)
    low, high = result["speedup_range"]
    assert low <= result["speedup"] + 1e-3 and result["speedup"] <= high + 1e-3
    with pytest.raises(CswapError, match="Unknown levers"):
        speed_bench("zoo:vit", levers=("warp",))


def test_end_to_end_bench_refuses_a_model_without_a_target_before_running(tmp_path):
    from cswap.bench import end_to_end_bench

    with pytest.raises(CswapError, match="No end-to-end target for \\['zoo:nope'\\]"):
        end_to_end_bench(["zoo:vgg", "zoo:nope"], tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_the_ranking_table_keeps_compensations_apart_and_bolds_each_columns_best():
    from cswap.bench_ranking import ranking_table

    def row(ranking, compensate, accuracy):
        return dict(model="m", ranking=ranking, compensate=compensate, target="0.5000",
                    test_accuracy=str(accuracy))  # fmt: skip

    rows = [row("taylor", "lstsq", 0.91), row("taylor", "lstsq+correction", 0.93)]
    rows.append(row("kl", "lstsq", 0.92))
    assert ranking_table(rows).splitlines() == [
        "| ranking | m @ 50% |",
        "|---|---|",
        "| taylor (lstsq) | 0.9100 |",
        "| taylor (lstsq+correction) | **0.9300** |",
        "| kl (lstsq) | 0.9200 |",
    ]
    assert ranking_table(rows[:1] + rows[2:]).splitlines()[2:] == [
        "| taylor | 0.9100 |",
        "| kl | **0.9200** |",
    ]
