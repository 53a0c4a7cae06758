"""Scoring on a local Ray runtime with 2 CPU workers gives the single-process effects, also when
a worker dies mid-run and when the driver is interrupted and resumed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cswap.api import select_data
from cswap.categorize import categorize
from cswap.distributed import RayConfig, RayScoring, shards
from cswap.errors import CswapError
from cswap.models import load_model
from cswap.scoring import causal_effects
from cswap.session import make_options, measure_compensation, prepare

ray = pytest.importorskip("ray")  # a dev pin: CI has it; `pip install cswap[ray]` elsewhere
PER_WORKER = RayConfig(workers=2).shards_per_worker


@pytest.fixture(scope="module")
def runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    wait_for_no_ray_process()  # the tests' workers went with the runtime


def wait_for_no_ray_process(seconds: float = 20) -> None:
    import time

    deadline = time.monotonic() + seconds
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_processes() == []


def scoring_inputs(spec: str, per_class: int = 2, compensate: str = "lstsq"):
    loaded = load_model(spec)
    selection = select_data(loaded, "fashion-mnist", per_class=per_class, validation_size=40)
    options = make_options({"min_class_size": 2})
    prepared = prepare(
        loaded.model, selection.calibration, selection.validation, example_input=None,
        label_free=False, device="cpu", options=options,
    )  # fmt: skip
    compensation = measure_compensation(prepared, compensate, options)
    return prepared, compensation, options


def single_process(prepared, compensation, units=None, already=()):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: the same float32 operations
    try:
        return causal_effects(
            prepared.model, prepared.space, prepared.calibration_images,
            prepared.calibration_labels, units=units, already_removed=already,
            compensation=compensation,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def on_workers(scorer, prepared, compensation, units=None, already=()):
    return scorer.effects(
        prepared.model, prepared.space, prepared.calibration_images,
        prepared.calibration_labels, units=units, already_removed=already,
        compensation=compensation,
    )  # fmt: skip


def assert_same(a, b) -> None:
    assert np.array_equal(a.unit_ids, b.unit_ids)
    for name in ("relative_effects", "kl", "log_ratio", "baseline"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_sharding_is_deterministic_and_covers_every_unit():
    pieces = shards([9, 3, 1, 7, 5, 2, 8], workers=2, per_worker=2)
    assert pieces == [(1, 2), (3, 5), (7, 8), (9,)]
    assert shards([], 2, 4) == []


def ray_processes() -> list[str]:
    """Command lines of Ray's processes (raylet, GCS, workers) that are still alive."""
    import os
    from pathlib import Path

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if any(mark in command for mark in ("raylet", "gcs_server", "ray::", "default_worker.py")):
            found.append(command[:120])
    return found


def test_a_runtime_the_scorer_starts_leaves_no_process_behind():
    assert not ray.is_initialized() and ray_processes() == []
    prepared, compensation, _ = scoring_inputs("zoo:resnet20", compensate="mean")
    units = [unit.id for unit in prepared.space.units][:16]
    scorer = RayScoring(RayConfig(workers=2))  # no runtime yet: it starts a local one
    assert ray.is_initialized() and ray_processes()
    on_workers(scorer, prepared, compensation, units=units)
    scorer.close()
    assert not ray.is_initialized()
    wait_for_no_ray_process()


@pytest.mark.parametrize(("spec", "already"), [("zoo:resnet20", (3, 40)), ("zoo:vit", ())])
def test_two_workers_give_the_single_process_effects(runtime, spec, already):
    prepared, compensation, options = scoring_inputs(spec)
    # every fifth unit: every layer and kind, at a fifth of the cost
    units = [unit.id for unit in prepared.space.units if unit.id not in already][::5]
    reference = single_process(prepared, compensation, units=units, already=already)
    scorer = RayScoring(RayConfig(workers=2))
    distributed = on_workers(scorer, prepared, compensation, units=units, already=already)
    assert_same(distributed, reference)
    config = options.category_config()
    ours, theirs = categorize(distributed, config), categorize(reference, config)
    assert np.array_equal(ours.xi, theirs.xi)
    assert list(ours.categories) == list(theirs.categories)
    assert len(scorer.worker_seconds) == 2  # both workers scored shards
    assert len(scorer.computed) == len(shards(reference.unit_ids, 2, PER_WORKER))
    scorer.close()
    assert ray.is_initialized()  # a runtime the scorer did not start is left running


@pytest.fixture(scope="module")
def resnet(runtime):  # mean compensation: the fault tests need no refit in each new worker
    prepared, compensation, _ = scoring_inputs("zoo:resnet20", compensate="mean")
    units = [unit.id for unit in prepared.space.units][:48]
    return prepared, compensation, units, single_process(prepared, compensation, units=units)


def test_a_worker_killed_mid_run_changes_nothing(resnet):
    prepared, compensation, units, reference = resnet
    killed = []

    def kill_a_busy_worker(scorer, _key):
        if not killed:
            victim = scorer.actors[-1]
            killed.append(victim)
            ray.kill(victim)

    scorer = RayScoring(RayConfig(workers=2), on_shard=kill_a_busy_worker)
    try:
        assert_same(on_workers(scorer, prepared, compensation, units=units), reference)
        assert killed and scorer._count > 2  # a replacement worker was started
        assert len(set(scorer.computed)) == len(shards(units, 2, PER_WORKER))
        # the workers stay for the next scoring round, which gives the same effects again
        assert_same(on_workers(scorer, prepared, compensation, units=units), reference)
        assert scorer._count == 3
    finally:
        scorer.close()


def test_an_interrupted_driver_resumes_without_recomputing_finished_shards(resnet, tmp_path):
    prepared, compensation, units, reference = resnet
    finished = []

    def interrupt_after_two(scorer, key):
        finished.append(key)
        if len(finished) == 2:
            raise KeyboardInterrupt

    first = RayScoring(RayConfig(workers=2), store=tmp_path, on_shard=interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        on_workers(first, prepared, compensation, units=units)
    assert first.actors == []  # the interrupt left no worker holding a CPU
    resumed = RayScoring(RayConfig(workers=2), store=tmp_path)
    try:
        assert_same(on_workers(resumed, prepared, compensation, units=units), reference)
    finally:
        resumed.close()
    total = len(shards(units, 2, PER_WORKER))
    assert len(resumed.computed) == total - 2
    assert not set(resumed.computed) & set(finished)


def test_without_ray_workers_say_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(CswapError, match="need Ray, which is not installed") as error:
        make_options({"workers": 2})
    assert "pip install 'cswap[ray]'" in str(error.value)


def test_workers_refuse_the_sequential_levers_and_bad_counts():
    with pytest.raises(CswapError, match="--sequential and --screen run in one process"):
        make_options({"workers": 2, "screen": True})
    with pytest.raises(CswapError, match="workers must be >= 0"):
        make_options({"workers": -1})
    with pytest.raises(CswapError, match="workers=0 must be >= 1"):
        RayConfig(workers=0)


def test_prune_with_workers_removes_what_one_process_removes(runtime, trained_tiny, fashion_small):
    from torch.utils.data import TensorDataset

    import cswap

    _, _, held_x, held_y = fashion_small
    data = {
        "validation": TensorDataset(held_x[100:400], held_y[100:400]),
        "target_params": 0.2, "tolerance": 0.03, "progress": False, "min_class_size": 3,
        "rescore_every": 0.1,
    }  # fmt: skip
    calibration = TensorDataset(held_x[:100], held_y[:100])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = cswap.prune(trained_tiny, calibration, **data)
    finally:
        torch.set_num_threads(threads)
    spread = cswap.prune(trained_tiny, calibration, workers=2, **data)
    assert [u["removed_at_step"] for u in spread.report["units"]] == [
        u["removed_at_step"] for u in alone.report["units"]
    ]
    assert spread.report["scoring_rounds"] == alone.report["scoring_rounds"]
    totals = spread.report["timings"]["totals"]
    workers = [name for name, entry in totals.items() if name.startswith("worker ")]
    assert len(workers) == 2
    assert all(totals[name]["within"] == "scoring round" for name in workers)
    assert ray.is_initialized()  # the module's runtime: the run started none of its own
