"""`cswap prune` end to end on a zoo model (small settings), then `cswap.load` from its spec."""

import json
from html.parser import HTMLParser

import torch
from typer.testing import CliRunner

import cswap
from cswap.cli.main import app
from cswap.data.fashion_mnist import FashionMNIST
from cswap.zoo.registry import ZOO


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images = [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img" and dict(attrs)["src"].startswith("data:image/png;base64,"):
            self.images += 1


def test_prune_cli_writes_a_loadable_model_and_a_readable_report(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "prune",
            "--model",
            "zoo:resnet20",
            "--data",
            "fashion-mnist",
            "--target-params",
            "0.03",
            "--tolerance",
            "0.02",
            "--calib-per-class",
            "3",
            "--validation-size",
            "300",
            "--min-class-size",
            "3",
            "--rescore-every",
            "1.0",
            "--export",
            "onnx",
            "--out",
            str(out),
            "--quiet",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    report = json.loads((out / "report.json").read_text())
    assert summary["stop_reason"] == report["stop_reason"]
    if report["stop_reason"] == "target_reached":
        assert report["params_after"] <= 0.97 * report["params_before"]
    assert report["model"] == "zoo:resnet20"
    assert report["test_images"] == 10_000
    assert report["data"]["calibration_size"] == 30
    parser = _Collector()
    parser.feed((out / "report.html").read_text())
    assert "table" in parser.tags and parser.images >= 2
    assert (out / "model.onnx").is_file()
    assert not (out / "checkpoint.json").exists()
    # rebuilt from the spec alone: zoo:resnet20, replayed removal, safetensors weights
    loaded = cswap.load(out)
    test = FashionMNIST("test", preprocessing=ZOO["resnet20"].preprocessing)
    images = torch.stack([test[i][0] for i in range(16)])
    again = cswap.load(out / "model")
    assert torch.equal(loaded(images), again(images))
    # the ONNX file was exported from the in-memory pruned model: the reload matches it
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    (logits,) = session.run(None, {"images": images.numpy()})
    assert torch.allclose(loaded(images), torch.from_numpy(logits), rtol=1e-4, atol=1e-5)
    params = sum(p.numel() for p in loaded.parameters())
    assert params == report["params_after"]


def test_prune_cli_runs_a_baseline_oneshot_and_refuses_unknown_choices(tmp_path):
    out = tmp_path / "l1"
    arguments = ["prune", "--model", "zoo:vit", "--target-params", "0.1", "--quiet"]
    arguments += ["--calib-per-class", "2", "--validation-size", "100", "--out", str(out)]
    result = CliRunner().invoke(
        app,
        # with both targets the first one reached stops the run
        [
            *arguments,
            "--method",
            "l1",
            "--mode",
            "oneshot",
            "--compensate",
            "lstsq",
            "--target-macs",
            "0.9",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    params_line = (
        f"  target: remove 10.0% of the parameters: removed {report['params_reduction']:.1%} "
        "(met, stopped the run)"
    )
    macs_line = (
        f"  target: remove 90.0% of the MACs: removed {report['macs_reduction']:.1%} (NOT met)"
    )
    assert params_line in result.stdout.splitlines()
    assert macs_line in result.stdout.splitlines()
    assert (report["method"], report["mode"], report["compensation"]["mode"]) == (
        "l1",
        "oneshot",
        "lstsq",
    )
    assert report["params_reduction"] >= 0.1 and report["categories"] is None
    loaded = cswap.load(out)
    assert sum(p.numel() for p in loaded.parameters()) == report["params_after"]
    bad = CliRunner().invoke(app, [*arguments, "--method", "magic", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "Unknown method 'magic'" in bad.output
    assert not (tmp_path / "x").exists()
