"""cswap.prune / cswap.score / cswap.load end to end on a small trained model."""

import json
import re

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import cswap
from conftest import TinyNet
from cswap import session as session_module
from cswap.errors import CswapError
from cswap.intervene import hook_count
from cswap.units import discover_units

REPORT_KEYS = {
    "model",
    "method",
    "target",
    "stop_reason",
    "params_before",
    "params_after",
    "macs_before",
    "macs_after",
    "latency_ms_before",
    "latency_ms_after",
    "val_accuracy_before",
    "val_accuracy_after",
    "test_accuracy_before",
    "test_accuracy_after",
    "steps",
    "units",
}
UNIT_KEYS = {
    "id",
    "kind",
    "group",
    "layers",
    "index",
    "params",
    "macs",
    "xi",
    "category",
    "removed_at_step",
}


@pytest.fixture(scope="module")
def data(fashion_small):
    _, _, held_x, held_y = fashion_small
    calibration = TensorDataset(held_x[:150], held_y[:150])
    validation = TensorDataset(held_x[150:650], held_y[150:650])
    test = TensorDataset(held_x[650:], held_y[650:])
    return calibration, validation, test


def run(model, data, **kwargs):
    calibration, validation, test = data
    settings = dict(target_params=0.3, tolerance=0.03, progress=False, min_class_size=3)
    settings |= kwargs
    return cswap.prune(model, calibration, validation=validation, test=test, **settings)


@pytest.fixture(scope="module")
def result(trained_tiny, data):
    return run(trained_tiny, data)


def test_prune_reaches_the_target_within_the_tolerance(result):
    report = result.report
    assert set(report) >= REPORT_KEYS
    assert report["target"] == {"kind": "params", "value": 0.3}
    assert report["stop_reason"] in ("target_reached", "candidates_exhausted", "tolerance_unmet")
    if report["stop_reason"] == "target_reached":
        assert report["params_after"] <= 0.7 * report["params_before"]
    assert report["val_accuracy_after"] >= report["val_accuracy_before"] - 0.03
    assert report["params_after"] == report["params_after_accounted"]
    for key in ("val_accuracy_after", "test_accuracy_before", "test_accuracy_after"):
        assert 0.0 <= report[key] <= 1.0
    assert sum(p.numel() for p in result.model.parameters()) == report["params_after"]


def test_report_explains_every_unit(result):
    units = result.report["units"]
    assert all(set(unit) >= UNIT_KEYS for unit in units)
    removed = [u for u in units if u["removed_at_step"] is not None]
    assert len(removed) == result.report["units_removed"] > 0
    accepted = {s["index"] for s in result.report["steps"] if s["accepted"]}
    assert {u["removed_at_step"] for u in removed} <= accepted
    assert all(u["kept_reason"] is None for u in removed)
    assert all(u["kept_reason"] for u in units if u["removed_at_step"] is None)
    # nothing critical is removed by default
    assert all(u["category_at_removal"] != "critical" for u in removed)
    assert {u["kind"] for u in units} == {"channel", "neuron"}


def test_the_users_model_is_untouched(trained_tiny, data):
    state = {k: v.clone() for k, v in trained_tiny.state_dict().items()}
    run(trained_tiny, data, target_params=0.1)
    assert hook_count(trained_tiny) == 0
    assert all(torch.equal(v, trained_tiny.state_dict()[k]) for k, v in state.items())


def test_same_seed_same_removed_set(trained_tiny, data, result):
    again = run(trained_tiny, data)
    assert again.plan == result.plan
    assert [s["units"] for s in again.report["steps"]] == [
        s["units"] for s in result.report["steps"]
    ]


def test_save_and_load_a_model_built_in_python(result, tmp_path, data):
    out = result.save(tmp_path / "out", export=["onnx"])
    for name in (
        "report.json",
        "units.npz",
        "report.html",
        "model/spec.json",
        "model/model.safetensors",
        "model.onnx",
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob(".cswap-*"))
    with pytest.raises(CswapError, match="built in Python"):
        cswap.load(out)
    loaded = cswap.load(out, base_model=TinyNet())
    x = data[2].tensors[0][:8]
    assert torch.equal(loaded(x), result.model(x))
    report = json.loads((out / "report.json").read_text())
    assert report["units"][0]["id"] == 0
    arrays = np.load(out / "units.npz")
    assert arrays["class_means"].shape[0] == len(report["units"])


def test_onnx_export_matches_under_onnxruntime(result, tmp_path, data):
    import onnxruntime

    out = result.save(tmp_path / "onnx", export=["onnx"])
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    x = data[2].tensors[0][:7]
    (logits,) = session.run(None, {"images": x.numpy()})
    assert np.allclose(logits, result.model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_refuses_to_overwrite_a_report(result, tmp_path):
    result.save(tmp_path / "out")
    finished = re.escape("finished run (target 30% of the params, stop reason target_reached)")
    with pytest.raises(CswapError, match=finished):
        result.save(tmp_path / "out")
    result.save(tmp_path / "out", overwrite=True)


def test_resume_continues_exactly(trained_tiny, data, tmp_path, monkeypatch):
    # the step-by-step loop (no one-shot start) makes enough steps to interrupt after a rescoring
    settings = dict(target_params=0.4, allow_critical=True, oneshot_start=False)
    full = run(trained_tiny, data, checkpoint_dir=tmp_path / "a", **settings)
    calls = {"n": 0}
    original = session_module.masked_validation

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(session_module, "masked_validation", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(trained_tiny, data, checkpoint_dir=tmp_path / "b", **settings)
    assert (tmp_path / "b" / "checkpoint.json").is_file()
    monkeypatch.setattr(session_module, "masked_validation", original)
    resumed = run(trained_tiny, data, checkpoint_dir=tmp_path / "b", resume=True, **settings)
    assert resumed.plan == full.plan
    assert resumed.report["steps"] == full.report["steps"]
    assert resumed.report["units"] == full.report["units"]
    assert resumed.report["scoring_rounds"] == full.report["scoring_rounds"]
    assert len(full.report["scoring_rounds"]) >= 2  # the interruption came after a re-scoring


def test_label_free_with_many_classes_and_few_images():
    torch.manual_seed(0)
    model = TinyNet(classes=100).eval()
    images = torch.randn(120, 1, 14, 14)
    unlabeled = TensorDataset(images, torch.zeros(120, dtype=torch.long))
    with torch.no_grad():
        own_top1 = model(images).argmax(1)  # the unmodified model's predictions, computed here
    result = cswap.score(model, unlabeled, label_free=True, progress=False)
    report = result.report
    assert report["calibration"]["label_free"]
    # the labels the run tested with are the model's own top-1, not the dummy zeros
    classes, counts = np.unique(own_top1.numpy(), return_counts=True)
    assert len(classes) >= 2
    assert report["calibration"]["calibration_per_class"] == {
        str(int(k)): int(v) for k, v in zip(classes, counts, strict=True)
    }
    assert report["calibration"]["calibration_size"] == len(images)  # none dropped
    assert report["prefix_reuse"] == "fx graph"  # TinyNet traces
    prepared = session_module.prepare(
        model,
        unlabeled,
        None,
        example_input=None,
        label_free=True,
        device="cpu",
        options=session_module.make_options({}),
        split_validation=False,
    )
    assert torch.equal(prepared.calibration_images, images)
    assert torch.equal(prepared.calibration_labels, own_top1)
    assert sum(report["categories"].values()) == report["units_total"]
    # 100 classes with one or two images each: every class is too small, they are pooled
    labeled = TensorDataset(images, torch.arange(120) % 100)
    result = cswap.score(model, labeled, correct_only=False, progress=False)
    assert list(result.arrays["tested_classes"]) == [-1]
    assert result.arrays["class_means"].shape == (report["units_total"], 1)


def test_bad_input_is_refused_with_one_clear_error(trained_tiny, data):
    calibration, _validation, _ = data
    with pytest.raises(CswapError, match="outside"):
        run(trained_tiny, data, target_params=1.5)
    with pytest.raises(CswapError, match="No target"):
        run(trained_tiny, data, target_params=None)
    not_a_classifier = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3))
    with pytest.raises(CswapError, match="not an image classifier"):
        cswap.prune(not_a_classifier, calibration, target_params=0.5, progress=False)
    x, y = calibration.tensors
    with pytest.raises(CswapError, match="labels span"):
        cswap.prune(trained_tiny, TensorDataset(x, y + 5), target_params=0.5, progress=False)
    broken = TinyNet()
    broken.hidden.weight.data[0, 0] = float("nan")
    with pytest.raises(CswapError, match="NaN"):
        cswap.prune(broken, calibration, target_params=0.5, progress=False)
    with pytest.raises(CswapError, match="Unknown option"):
        run(trained_tiny, data, colour="red")
    with pytest.raises(CswapError, match="Unknown method"):
        run(trained_tiny, data, method="magic")
    with pytest.raises(CswapError, match="empty"):
        cswap.prune(trained_tiny, TensorDataset(x[:0], y[:0]), target_params=0.5)


@pytest.mark.parametrize("method", ["l1", "taylor", "cswap"])
def test_oneshot_lands_on_the_target_within_one_unit(trained_tiny, data, method, monkeypatch):
    import cswap.api as api_module

    seen = {}
    original = api_module.oneshot_result

    def spy(space, config, ranking, *args, **kwargs):
        outcome = original(space, config, ranking, *args, **kwargs)
        seen.update(space=space, ranking=ranking, removed=outcome.removed)
        return outcome

    monkeypatch.setattr(api_module, "oneshot_result", spy)
    result = run(
        trained_tiny,
        data,
        method=method,
        mode="oneshot",
        target_params=0.4,
        compensate="mean",
        round_to=1,
        min_keep=1,
    )
    report = result.report
    assert report["mode"] == "oneshot" and report["method"] == method
    assert report["prefix_reuse"] == ("fx graph" if method == "cswap" else None)
    assert report["stop_reason"] == "target_reached" and report["steps"] == []
    limit = 0.6 * report["params_before"]
    assert report["params_after"] <= limit
    removed = [u for u in report["units"] if u["removed_at_step"] is not None]
    largest = max(u["params"] for u in removed)
    assert report["params_after"] > limit - largest  # not one unit more than needed
    # the cut, in the order it was made, is exactly what the report and the model removed
    space, order, cut = seen["space"], seen["ranking"].order, seen["removed"]
    assert sorted(cut) == sorted(u["id"] for u in removed)
    assert space.params_after(cut) == report["params_after"]
    # minimal: the cut one unit shorter does not reach the target
    assert space.params_after(cut[:-1]) > limit
    # the cut follows the ranking: a subsequence of it, and every unit the ranking put before
    # the last cut unit but that stayed is in a group left with only min_keep = 1 unit
    position = {unit: i for i, unit in enumerate(order)}
    assert [position[u] for u in cut] == sorted(position[u] for u in cut)
    kept = {g.id: sum(1 for u in g.unit_ids if u not in set(cut)) for g in space.groups}
    skipped = [u for u in order[: position[cut[-1]]] if u not in set(cut)]
    assert all(kept[space.units[u].group] == 1 for u in skipped)
    if method == "cswap":
        assert report["categories"] is not None
    else:
        assert report["categories"] is None and all("score" in u for u in report["units"])
        # the criterion's lowest-scored units went first
        kept_scores = [u["score"] for u in report["units"] if u["removed_at_step"] is None]
        assert max(u["score"] for u in removed) <= max(kept_scores)
        by_score = sorted(report["units"], key=lambda u: (u["score"], u["id"]))
        assert list(order) == [u["id"] for u in by_score]


def ideal_replacement_logits(model, removed, calibration, batch):
    """Logits of ``model`` with the ``removed`` units' inputs replaced, at every consumer, by
    their mean over ``calibration`` (what mean compensation approximates), computed by hand."""
    space = discover_units(model, calibration[:1])
    consumers: dict[str, tuple[int, set[int]]] = {}
    for unit in removed:
        for target in space.units[unit].targets:
            consumers.setdefault(target.layer, (target.dim, set()))[1].update(target.indices)
    modules = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}

    def keep(layer):
        def hook(_module, args):
            inputs[layer] = args[0].detach().double()

        return hook

    handles = [modules[layer].register_forward_pre_hook(keep(layer)) for layer in consumers]
    with torch.no_grad():
        model(calibration)
    for handle in handles:
        handle.remove()
    means = {}
    for layer, (dim, _) in consumers.items():
        x = inputs[layer].movedim(dim, -1)
        means[layer] = x.reshape(-1, x.shape[-1]).mean(0)

    def replace(layer, dim, indices):
        index = torch.tensor(sorted(indices))

        def hook(_module, args):
            x = args[0].movedim(dim, -1).clone()
            x[..., index] = means[layer][index].to(x)
            return (x.movedim(-1, dim), *args[1:])

        return hook

    handles = [
        modules[layer].register_forward_pre_hook(replace(layer, dim, indices))
        for layer, (dim, indices) in consumers.items()
    ]
    try:
        with torch.no_grad():
            return model(batch)
    finally:
        for handle in handles:
            handle.remove()


def test_compensation_is_recorded_and_removal_stays_equivalent(trained_tiny, data):
    plain = run(trained_tiny, data, method="l1", mode="oneshot", compensate="none")
    mean = run(trained_tiny, data, method="l1", mode="oneshot", compensate="mean")
    assert plain.report["compensation"] == {"mode": "none"}
    info = mean.report["compensation"]
    assert info["mode"] == "mean" and info["mean_images"] > 0 and info["folded_into"]
    # same ranking, same cut: only the folded constants differ
    removed = [u["id"] for u in plain.report["units"] if u["removed_at_step"] is not None]
    assert removed == [u["id"] for u in mean.report["units"] if u["removed_at_step"] is not None]
    assert mean.report["equivalence_max_abs_diff"] < 1e-4
    # the gap, recomputed by hand: the folded, pruned model against the ideal replacement (each
    # removed input set to its calibration mean at every consumer), on the first 16 calibration
    # images (correct_only: the correctly classified ones)
    x, y = data[0].tensors
    with torch.no_grad():
        calibration = x[trained_tiny(x).argmax(1) == y]
    assert info["mean_images"] == len(calibration)
    ideal = ideal_replacement_logits(trained_tiny, removed, calibration, calibration[:16])
    with torch.no_grad():
        gap = float((mean.model(calibration[:16]) - ideal).abs().max())
    assert gap > 1e-3  # zero-padded convolutions lost units: the fold is not the ideal there
    assert info["border_gap_max_abs_logit"] == pytest.approx(gap, rel=1e-3, abs=1e-4)
    refit = run(trained_tiny, data, method="l1", mode="oneshot", compensate="lstsq")
    assert refit.report["compensation"]["mode"] == "lstsq"
    # TinyNet: every conv refitted; the Linear "hidden" reads the flattened features, one row per
    # image, too few per feature for a refit that holds beyond the calibration images
    fallback = refit.report["compensation"]["mean_instead_of_lstsq"]
    assert list(fallback) == ["hidden"] and "lstsq_min_rows" in fallback["hidden"]
    rows = len(calibration)  # the same calibration images, one row each
    assert fallback["hidden"].startswith(f"{rows:,} rows of calibration inputs")
    assert refit.report["equivalence_max_abs_diff"] < 1e-4
    # the kept removal was refitted on its own pruned inputs; the better validation was kept
    correction = refit.report["compensation"]["error_correction"]
    folded = refit.report["compensation"]["folded_into"]
    assert correction["layers_shifted"] == 1 and correction["layers_refitted"] == len(folded) - 1
    kept = correction["val_accuracy" if correction["applied"] else "val_accuracy_without"]
    assert refit.report["val_accuracy_after"] == pytest.approx(kept)
    floor = min(
        refit.report["val_accuracy_before"] - refit.report["tolerance"],
        correction["val_accuracy_without"],
    )
    closer = correction["val_kl"] <= correction["val_kl_without"]
    assert correction["applied"] == (closer and correction["val_accuracy"] >= floor)


def test_border_gap_is_zero_when_every_consumer_is_linear(data):
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(196, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 10)
    ).eval()
    result = run(model, data, method="l1", mode="oneshot", compensate="mean", correct_only=False)
    report = result.report
    removed = [u["id"] for u in report["units"] if u["removed_at_step"] is not None]
    assert removed and report["compensation"]["folded_into"]
    # no padding anywhere: folding the means is the ideal mean replacement
    assert report["compensation"]["border_gap_max_abs_logit"] <= 1e-6
    x = data[0].tensors[0]
    ideal = ideal_replacement_logits(model, removed, x, x[:16])
    with torch.no_grad():
        assert torch.allclose(result.model(x[:16]), ideal, rtol=1e-5, atol=1e-5)


def test_unknown_method_mode_and_compensation_are_refused(trained_tiny, data):
    for kwargs, word in (
        ({"method": "magic"}, "method"),
        ({"mode": "sometimes"}, "mode"),
        ({"compensate": "lots"}, "compensate"),
    ):
        with pytest.raises(CswapError, match=f"Unknown {word}"):
            run(trained_tiny, data, **kwargs)


def test_a_run_out_of_candidates_says_that_critical_units_were_never_tried(trained_tiny, data):
    # a tolerance that accepts everything: only the categories can stop the loop before 90%
    report = run(
        trained_tiny, data, target_params=0.9, tolerance=0.99, margin=0.0, allow_critical=False
    ).report
    assert report["stop_reason"] == "candidates_exhausted"
    hint = [w for w in report["warnings"] if "candidates ran out" in w]
    assert len(hint) == 1 and "--protect-critical" in hint[0]
    critical = report["scoring_rounds"][-1]["categories"]["critical"]
    assert critical > 0 and f"found {critical} of the" in hint[0]
    allowed = run(trained_tiny, data, target_params=0.9, tolerance=0.99, allow_critical=True)
    assert not [w for w in allowed.report["warnings"] if "candidates ran out" in w]


def test_the_progressive_run_starts_by_validating_its_first_rankings_oneshot_cut(
    trained_tiny, data
):
    report = run(trained_tiny, data, target_params=0.5, tolerance=0.02).report
    probes = [step for step in report["steps"] if step["probe"]]
    assert probes and all(step["index"] == i for i, step in enumerate(probes))
    first = probes[0]
    removed = {u["id"] for u in report["units"] if u["removed_at_step"] is not None}
    if first["accepted"]:  # one scoring round, and the cut is the model returned
        assert report["stop_reason"] == "target_reached" and len(report["scoring_rounds"]) == 1
        assert removed == set(first["units"])
    else:  # then the cut re-scored along the way (a second round at least), then bisection
        assert len(probes) >= 2 and set(probes[1]["units"]) != set(first["units"])
        assert len(report["scoring_rounds"]) >= 2


def test_timings_account_for_every_stage(result):
    report = result.report
    totals = report["timings"]["totals"]
    assert {"prepare", "compensation statistics", "surgery", "final evaluation"} <= set(totals)
    assert totals["scoring round"]["count"] == len(report["scoring_rounds"])
    assert totals["validation step"]["count"] >= len(report["steps"])
    assert totals["lstsq refit"]["within"] == "scoring round"
    assert totals["paired latency"]["within"] == "final evaluation"
    top_level = sum(entry["seconds"] for entry in totals.values() if entry["within"] is None)
    assert top_level <= report["total_seconds"] + 0.01
    stages = report["timings"]["stages"]
    assert sum(s["seconds"] for s in stages if s["stage"] == "validation step") == pytest.approx(
        totals["validation step"]["seconds"], abs=1e-2
    )


def test_single_class_data_runs_and_cswap_tests_that_class_alone(trained_tiny, fashion_small):
    """One class of Fashion-MNIST only: no class-conditional test is needed by a baseline, and
    C-SWAP's critical test runs over that class (issue: real models, single-class data)."""
    _, _, held_x, held_y = fashion_small
    coats = held_x[held_y == 4]
    calibration = TensorDataset(coats[:40], torch.full((40,), 4))
    validation = TensorDataset(coats[40:], torch.full((len(coats) - 40,), 4))
    common = dict(validation=validation, target_params=0.2, progress=False, correct_only=False)
    l1 = cswap.prune(trained_tiny, calibration, method="l1", mode="oneshot", **common)
    assert l1.report["stop_reason"] == "target_reached"
    causal = cswap.prune(trained_tiny, calibration, mode="oneshot", min_class_size=3, **common)
    report = causal.report
    assert report["calibration"]["calibration_per_class"] == {"4": 40}
    assert "one class" in report["calibration"]["note"]
    assert any(
        "the class-conditional test runs on that class alone" in w for w in report["warnings"]
    )
    assert report["stop_reason"] == "target_reached"
    assert sum(report["categories"].values()) == report["units_total"]
