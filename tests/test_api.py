"""cswap.prune / cswap.score / cswap.load end to end on a small trained model."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import cswap
from conftest import TinyNet
from cswap import session as session_module
from cswap.errors import CswapError
from cswap.intervene import hook_count

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
    with pytest.raises(CswapError, match="already holds a report"):
        result.save(tmp_path / "out")
    result.save(tmp_path / "out", overwrite=True)


def test_resume_continues_exactly(trained_tiny, data, tmp_path, monkeypatch):
    settings = dict(target_params=0.4, allow_critical=True)
    full = run(trained_tiny, data, checkpoint_dir=tmp_path / "a", **settings)
    calls = {"n": 0}
    original = session_module.masked_validation

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:
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
    result = cswap.score(model, unlabeled, label_free=True, progress=False)
    report = result.report
    assert report["calibration"]["label_free"]
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
def test_oneshot_lands_on_the_target_within_one_unit(trained_tiny, data, method):
    result = run(trained_tiny, data, method=method, mode="oneshot", target_params=0.4)
    report = result.report
    assert report["mode"] == "oneshot" and report["method"] == method
    assert report["stop_reason"] == "target_reached" and report["steps"] == []
    limit = 0.6 * report["params_before"]
    assert report["params_after"] <= limit
    removed = [u for u in report["units"] if u["removed_at_step"] is not None]
    largest = max(u["params"] for u in removed)
    assert report["params_after"] > limit - largest  # not one unit more than needed
    if method == "cswap":
        assert report["categories"] is not None
    else:
        assert report["categories"] is None and all("score" in u for u in report["units"])
        # the criterion's lowest-scored units went first
        kept = [u["score"] for u in report["units"] if u["removed_at_step"] is None]
        assert max(u["score"] for u in removed) <= max(kept)


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
    assert info["border_gap_max_abs_logit"] >= 0.0
    refit = run(trained_tiny, data, method="l1", mode="oneshot", compensate="lstsq")
    assert refit.report["compensation"]["mode"] == "lstsq"
    assert refit.report["compensation"]["mean_instead_of_lstsq"] == {}  # TinyNet: all refitted
    assert refit.report["equivalence_max_abs_diff"] < 1e-4


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
    report = run(trained_tiny, data, target_params=0.9, tolerance=0.99, margin=0.0).report
    assert report["stop_reason"] == "candidates_exhausted"
    hint = [w for w in report["warnings"] if "candidates ran out" in w]
    assert len(hint) == 1 and "--allow-critical" in hint[0]
    critical = report["scoring_rounds"][-1]["categories"]["critical"]
    assert critical > 0 and f"found {critical} of the" in hint[0]
    allowed = run(trained_tiny, data, target_params=0.9, tolerance=0.99, allow_critical=True)
    assert not [w for w in allowed.report["warnings"] if "candidates ran out" in w]
