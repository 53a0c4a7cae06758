"""Every kind of bad input gets one CswapError naming the problem and the fix, before any work:
from the CLI as one line and exit status 2 (no traceback), and nothing written to --out."""

from __future__ import annotations

import json
import os
import re
import signal

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

import cswap
from conftest import TinyNet
from cswap.checkpoint import Checkpoint
from cswap.cli.common import fail_cleanly
from cswap.cli.main import app
from cswap.data.calibration import draw_calibration
from cswap.errors import CswapError
from cswap.export import save_model
from cswap.models import load_model, load_weights_file
from cswap.report_page import describe_targets
from cswap.zoo.registry import get_entry

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args))


def assert_clean_error(result, *phrases: str, code: int = 2) -> None:
    """One line on stderr with every phrase, the exit code, and no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, (phrase, message)


def prune_args(out, *extra: str) -> list[str]:
    return ["prune", "--model", "zoo:vgg", "--target-params", "0.3", "--out", str(out), *extra]


# ----------------------------------------------------------------------------- output directory


def test_resume_never_reruns_a_finished_run(tmp_path):
    report = tmp_path / "report.json"
    target = {"kind": "params", "value": 0.5}
    report.write_text(json.dumps({"stop_reason": "target_reached", "target": target}) + "\n")
    before = report.read_bytes()
    result = cli(*prune_args(tmp_path, "--resume"))
    assert_clean_error(
        result,
        "holds a finished run (target 50% of the params, stop reason target_reached)",
        "--resume only continues",
    )
    assert report.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_api_resume_refuses_a_finished_run(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    model = TinyNet()
    data = TensorDataset(torch.zeros(4, 1, 14, 14), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(CswapError, match="--resume only continues an interrupted run"):
        cswap.prune(model, data, target_params=0.3, checkpoint_dir=tmp_path, resume=True)


@pytest.mark.parametrize("kind", ["file", "under_file", "unwritable"])
def test_out_that_cannot_be_written_is_refused_first(tmp_path, kind):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out, phrase = {
        "file": (blocker, "is a file, not a directory"),
        "under_file": (blocker / "run", "which is a file"),
        # /proc refuses new files even to root, for whom a chmod-ed directory is writable
        "unwritable": (os.path.join("/proc", "cswap-run"), "Cannot write to /proc"),
    }[kind]
    result = cli(*prune_args(out))
    assert_clean_error(result, phrase, "pick a directory")
    assert blocker.read_text() == "x"


def test_unknown_export_format_is_refused_before_the_run(tmp_path):
    out = tmp_path / "run"
    result = cli(*prune_args(out, "--export", "tflite"))
    assert_clean_error(result, "Unknown export format(s) ['tflite']", "--export onnx")
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "phrases"),
    [
        (["--validation-size", "0"], ["--validation-size 0 leaves no image"]),
        (["--calib-per-class", "0"], ["--calib-per-class 0 draws no calibration image"]),
    ],
)
def test_empty_data_sizes_are_refused_before_the_run(tmp_path, args, phrases):
    out = tmp_path / "run"
    assert_clean_error(cli(*prune_args(out, *args)), *phrases)
    assert not out.exists()


@pytest.mark.parametrize(
    ("data", "phrase"),
    [
        ("imagefolder:/nonexistent/images", "Image folder /nonexistent/images does not exist"),
        ("imagefolder:.?test_fraction=1.5", "test_fraction=1.5 in 'imagefolder:.?test_fraction"),
        ("imagefolder:.?test_fraction=a", "test_fraction is a number"),
        ("fashion-mnist?size=64", "Unknown data spec"),
    ],
)
def test_bad_data_specs_are_refused_before_the_model_is_loaded(tmp_path, monkeypatch, data, phrase):
    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the data spec was checked")

    monkeypatch.setattr("cswap.api.load_spec", no_model)
    result = cli(*prune_args(tmp_path / "run", "--data", data))
    assert_clean_error(result, phrase)


def test_no_target_names_the_cli_option(tmp_path):
    result = cli("prune", "--model", "zoo:vgg", "--out", str(tmp_path / "run"))
    assert_clean_error(result, "No target given", "--target-params 0.3", "--target-macs")


def test_bench_with_an_unknown_model_writes_nothing(tmp_path):
    out = tmp_path / "bench"
    result = cli("bench", "--models", "zoo:nope", "--out", str(out), "--quiet")
    assert_clean_error(result, "Unknown zoo model 'nope'")
    assert not (out / "results.csv").exists()


# ----------------------------------------------------------------------------- models and specs


def test_headless_backbone_is_refused_as_features(tmp_path):
    out = tmp_path / "run"
    result = cli(
        "prune", "--model", "timm:resnet18?num_classes=0", "--target-params", "0.3",
        "--out", str(out),
    )  # fmt: skip
    assert_clean_error(result, "512 outputs look like features", "num_classes=0", "num_classes=10")
    assert not out.exists()


def test_a_model_ending_in_a_normalization_is_refused_as_features():
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(196, 32), torch.nn.BatchNorm1d(32)
    )
    data = TensorDataset(torch.randn(20, 1, 14, 14), torch.arange(20) % 10)
    with pytest.raises(CswapError, match=r"BatchNorm1d \(2\) after the last Linear/conv layer"):
        cswap.prune(model, data, target_params=0.3, progress=False)


def test_a_model_that_outputs_probabilities_is_refused():
    model = torch.nn.Sequential(TinyNet(), torch.nn.Softmax(dim=1))
    data = TensorDataset(torch.randn(20, 1, 14, 14), torch.arange(20) % 10)
    with pytest.raises(CswapError, match="outputs probabilities") as error:
        cswap.prune(model, data, target_params=0.3, progress=False)
    assert "without its final softmax" in str(error.value)
    # log-probabilities are logits up to a constant per row: accepted
    logp = torch.nn.Sequential(TinyNet(), torch.nn.LogSoftmax(dim=1))
    result = cswap.score(logp, data, correct_only=False, progress=False, compensate="none")
    assert result.report["units_total"] > 0


def test_a_segmentation_spec_builds_offline_and_is_refused_as_no_classifier(tmp_path, monkeypatch):
    def no_downloads(*_args, **_kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_downloads)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_downloads)
    loaded = load_model("torchvision:lraspp_mobilenet_v3_large")  # its default fetches a backbone
    assert loaded.model.training is False
    out = tmp_path / "run"
    result = cli(
        "prune", "--model", "torchvision:fcn_resnet50?weights_backbone=None",
        "--target-params", "0.3", "--out", str(out),
    )  # fmt: skip
    assert_clean_error(result, "output is OrderedDict, not (batch, classes)", "returns logits")
    assert not out.exists()


@pytest.mark.parametrize(
    "spec", ["torchvision:resnet18?weights=DEFAULT", "timm:resnet18?pretrained=true"]
)
def test_a_spec_asking_for_pretrained_weights_is_refused(spec):
    with pytest.raises(CswapError, match="never downloads") as error:
        load_model(spec)
    assert "--weights FILE" in str(error.value)


def test_unusable_builder_options_are_one_clear_error():
    with pytest.raises(CswapError, match="could not be built with the options") as error:
        load_model("torchvision:resnet18?num_classes=ten")
    assert "valid values" in str(error.value)


def test_corrupt_weights_files(tmp_path):
    model = TinyNet()
    broken = tmp_path / "w.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CswapError, match="not a valid safetensors file"):
        load_weights_file(model, broken)
    garbage = tmp_path / "w.pt"
    garbage.write_bytes(b"this is not a pickle")
    with pytest.raises(CswapError, match="as a PyTorch state dict") as error:
        load_weights_file(model, garbage)
    assert "weights_only=False" not in str(error.value)
    assert "never unpickles" in str(error.value)
    result = cli(*prune_args(tmp_path / "run", "--weights", str(broken)))
    assert_clean_error(result, "not a valid safetensors file")


# ----------------------------------------------------------------------------- saved models


@pytest.fixture
def saved(tmp_path):
    """A saved zoo:resnet20 with its first stem channels removed, as `cswap prune` writes it."""
    loaded = load_model("zoo:resnet20")
    directory = tmp_path / "saved"
    save_model(
        directory / "model",
        loaded.model,
        base_spec="zoo:resnet20",
        plan={},
        example_shape=(1, 1, 28, 28),
        preprocessing=get_entry("resnet20").preprocessing,
    )
    return directory


def test_a_saved_model_loads_and_computes_what_it_saved(saved):
    model = cswap.load(saved)
    reference = load_model("zoo:resnet20").model
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(model(x), reference(x))


def test_an_edited_removal_plan_is_refused(saved):
    spec_path = saved / "model" / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["removed"] = {"conv1": [3]}
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(
        CswapError, match=re.escape("removal plan in spec.json does not match the hash")
    ):
        cswap.load(saved)


def test_edited_weights_are_refused(saved):
    weights = saved / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CswapError, match=re.escape("model.safetensors does not match the hash")):
        cswap.load(saved)


def test_incomplete_or_corrupt_saved_models(saved, tmp_path):
    spec_path = saved / "model" / "spec.json"
    good = spec_path.read_text()
    spec_path.write_text(good[:40])
    with pytest.raises(CswapError, match="is not readable JSON"):
        cswap.load(saved)
    result = cli(*prune_args(tmp_path / "run")[:2], str(saved), *prune_args(tmp_path / "run")[3:])
    assert_clean_error(result, "is not readable JSON", "prune and save the model again")
    spec_path.write_text(good)
    (saved / "model" / "model.safetensors").unlink()
    with pytest.raises(CswapError, match=re.escape("incomplete: model.safetensors is missing")):
        cswap.load(saved)


def test_a_damaged_checkpoint_is_one_clear_error(tmp_path):
    from cswap.categorize import CategoryConfig

    (tmp_path / "checkpoint.json").write_text('{"fingerprint": {"a": 1}, "state": {')
    with pytest.raises(CswapError, match=r"checkpoint in .* is damaged") as error:
        Checkpoint(tmp_path, {"a": 1}).load(CategoryConfig())
    assert "without --resume and with --overwrite" in str(error.value)


# ----------------------------------------------------------------------------- Python API and data


def test_api_refuses_specs_and_strings_where_objects_and_numbers_belong():
    data = TensorDataset(torch.randn(20, 1, 14, 14), torch.arange(20) % 10)
    with pytest.raises(CswapError, match="is a spec or path, not a torch module") as error:
        cswap.prune("zoo:vgg", data, target_params=0.3)
    assert "cswap.load_spec(spec).model" in str(error.value)
    with pytest.raises(CswapError, match=re.escape("target_params='0.3' is a str, not a number")):
        cswap.prune(TinyNet(), data, target_params="0.3")
    with pytest.raises(CswapError, match=re.escape("not a torch.nn.Module")):
        cswap.score(object(), data)


def test_data_that_do_not_fit_the_model():
    model = TinyNet()  # one channel in
    rgb = TensorDataset(torch.randn(20, 3, 14, 14), torch.arange(20) % 10)
    with pytest.raises(
        CswapError, match=r"cannot run on the calibration images .*\(1, 3, 14, 14\)"
    ):
        cswap.prune(model, rgb, target_params=0.3, progress=False)
    large = TensorDataset(torch.randn(20, 1, 28, 28), torch.arange(20) % 10)  # flatten: 14x14
    with pytest.raises(CswapError, match="channels and size the model expects"):
        cswap.prune(model, large, target_params=0.3, progress=False)


def test_empty_validation_is_named_as_validation():
    data = TensorDataset(torch.randn(20, 1, 14, 14), torch.arange(20) % 10)
    empty = TensorDataset(torch.zeros(0, 1, 14, 14), torch.zeros(0, dtype=torch.long))
    with pytest.raises(CswapError, match="The validation data are empty"):
        cswap.prune(TinyNet(), data, validation=empty, target_params=0.3, progress=False)


def test_float_labels_must_be_whole_numbers():
    x = torch.randn(20, 1, 14, 14)
    fractional = TensorDataset(x, (torch.arange(20) % 10).float() + 0.5)
    with pytest.raises(CswapError, match=r"labels are not class indices \(e.g. 0.5\)"):
        cswap.score(TinyNet(), fractional, correct_only=False, progress=False)
    whole = TensorDataset(x, (torch.arange(20) % 10).double())
    report = cswap.score(TinyNet(), whole, correct_only=False, progress=False).report
    assert report["units_total"] > 0


def test_correct_only_filtering_that_leaves_one_class_says_so():
    labels = np.array([0] * 10 + [1] * 10)
    predictions = np.array([0] * 10 + [7] * 10)  # class 1 is never recognised
    split = draw_calibration(np.arange(20), labels, per_class=5, predictions=predictions)
    assert set(split.calibration_labels) == {0}  # the run goes on, testing class 0 alone
    message = split.summary()["note"]
    assert "the class-conditional test runs on that class alone" in message
    assert "classifies only 50.0% of the 20 labelled images correctly" in message
    assert "keeps 1 of the data's 2 classes" in message
    assert "--no-correct-only" in message


# ----------------------------------------------------------------------------- targets


def test_both_targets_say_which_one_stopped_the_run():
    report = {
        "target_status": [
            {"kind": "params", "goal": 0.3, "removed": 0.235, "met": False,
             "stopped_the_run": False},
            {"kind": "macs", "goal": 0.2, "removed": 0.2013, "met": True,
             "stopped_the_run": True},
        ]
    }  # fmt: skip
    assert describe_targets(report) == [
        "remove 30.0% of the parameters: removed 23.5% (NOT met)",
        "remove 20.0% of the MACs: removed 20.1% (met, stopped the run)",
    ]


def test_target_status_from_the_schedule_config():
    from cswap.api import _target_status
    from cswap.schedule import ScheduleConfig

    config = ScheduleConfig(target_params=0.3, target_macs=0.2)
    status = _target_status(config, {"params": 0.235, "macs": 0.2013}, "target_reached")
    assert [(s["kind"], s["met"], s["stopped_the_run"]) for s in status] == [
        ("params", False, False),
        ("macs", True, True),
    ]


# ----------------------------------------------------------------------------- interrupts, bugs


def test_interrupt_says_how_to_resume(tmp_path):
    (tmp_path / "checkpoint.json").write_text("{}")

    @fail_cleanly
    def command(out):
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop: handled like Ctrl-C
        raise AssertionError("SIGTERM did not interrupt")

    with pytest.raises(SystemExit) as exit_info:
        command(out=tmp_path)
    assert exit_info.value.code == 130
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_interrupt_message_names_resume_only_with_a_checkpoint(tmp_path, capsys):
    @fail_cleanly
    def command(out):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit):
        command(out=tmp_path)
    assert "nothing to resume" in capsys.readouterr().err
    (tmp_path / "checkpoint.json").write_text("{}")
    with pytest.raises(SystemExit):
        command(out=tmp_path)
    assert "rerun the same command with --resume" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_unless_debug(monkeypatch):
    def broken(*_args, **_kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("cswap.zoo.store.read_manifest", broken)
    result = cli("zoo", "list")
    assert_clean_error(result, "unexpected ZeroDivisionError", "cswap --debug", code=1)
    debug = cli("--debug", "zoo", "list")
    assert isinstance(debug.exception, ZeroDivisionError)


class _ShuffleBlock(torch.nn.Module):
    """ShuffleNet-V2's unit: split the channels, transform one half, concatenate, shuffle."""

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.branch = torch.nn.Sequential(
            torch.nn.Conv2d(half, half, 1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(half, half, 3, padding=1),
        )

    def forward(self, x):
        kept, changed = x.chunk(2, dim=1)
        x = torch.cat((kept, self.branch(changed)), dim=1)
        b, c, h, w = x.shape
        return x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


class _ShuffleNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.Sequential(_ShuffleBlock(8), _ShuffleBlock(8))
        self.head = torch.nn.Conv2d(8, 16, 1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        return self.fc(torch.relu(self.head(x)).mean((2, 3)))


def test_an_operation_torch_pruning_cannot_follow_costs_only_the_groups_across_it(monkeypatch):
    """Torch-Pruning fails on ShuffleNet-V2's channel-shuffle reshape (ZeroDivisionError in its
    reshape index mapping). Made to fail the same way here, the reshape is cut out of the graph:
    the groups whose channels reach it (each block's last conv; the stem, through the
    concatenation) are excluded with the reason; every other group is found, and removing
    units from all of them at once equals masking them."""
    from torch_pruning.dependency import index_mapping

    from cswap.surgery import check_equivalence, prune_copy, verify_groups
    from cswap.units import discover_units

    def fails(graph, node):  # as Torch-Pruning's: nothing to map without both neighbours
        if node.inputs and node.outputs:
            raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(index_mapping, "update_reshape_index_mapping", fails)
    model, x = _ShuffleNet().eval(), torch.randn(2, 3, 8, 8)
    space = discover_units(model, x)
    # each block's last conv: nothing past the cut reads its channels any more
    assert {g.root: g.reason for g in space.excluded} == {
        f"blocks.{i}.branch.2": "no layer reads these channels (they reach the output "
        "directly, or pass an operation the dependency graph cannot follow)"
        for i in (0, 1)
    }
    # the stem reaches the cut through the concatenation: its removal cannot run
    failed = verify_groups(model, space, x)
    assert list(failed) == ["stem"] and failed["stem"].startswith("removing a unit fails")
    space = discover_units(model, x, excluded_roots=failed)
    assert [g.root for g in space.groups] == ["blocks.0.branch.0", "blocks.1.branch.0", "head"]
    units = [unit for group in space.groups for unit in group.unit_ids[1::2]]
    pruned = prune_copy(model, space, units, x)
    assert check_equivalence(model, pruned, space, units, x) < 1e-5
    assert pruned.head.out_channels == 8 and pruned.blocks[1].branch[0].out_channels == 2


def test_verification_in_slices_on_shared_tensors_finds_the_same_failures(monkeypatch):
    """Large models are verified slice by slice on copies that share the untouched tensors: the
    failures found are those of one copy of everything, and the model is left as it was."""
    from torch_pruning.dependency import index_mapping

    from cswap.surgery import shared_copy, verify_groups
    from cswap.units import discover_units

    def fails(graph, node):  # the channel shuffle, as in the test above
        if node.inputs and node.outputs:
            raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(index_mapping, "update_reshape_index_mapping", fails)
    model = _ShuffleNet().eval()
    x = torch.randn(2, 3, 8, 8)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    space = discover_units(model, x)
    whole = verify_groups(model, space, x)
    for budget in (1, 200):  # one group per slice; a few groups per slice
        assert verify_groups(model, space, x, slice_params=budget) == whole
    assert list(whole) == ["stem"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    copied = shared_copy(model)
    assert copied.head.weight is model.head.weight and copied.head is not model.head


def test_band_options_out_of_range_are_one_clear_error():
    from cswap.session import make_options

    bad_values = (
        {"exact_band": -1.0},
        {"exact_band": float("inf")},
        {"exact_max": -5},
        {"score_images": -1},
        {"score_images": 3},
        {"sample_fraction": 1.0},
        {"sample_fraction": -0.1},
        {"early_fraction": 1.0},
        {"early_fraction": -0.1},
    )
    for bad in bad_values:
        with pytest.raises(CswapError) as raised:
            make_options(bad)
        assert next(iter(bad)) in str(raised.value)
    assert make_options({"exact_max": 300}).exact_max == 300
    assert make_options({"sample_fraction": 0.0}).band_config().sample_fraction == 0.0


# ----------------------------------------------------------------------------- memory


def test_the_memory_lower_bound_counts_every_tensor_once():
    from cswap.inputs import memory_lower_bound, model_bytes

    first, second = torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 1000, bias=False)
    second.weight = first.weight  # tied: one storage
    model = torch.nn.Sequential(first, torch.nn.BatchNorm1d(1000), second)
    params = (1000 * 1000 + 1000 + 2 * 1000) * 4  # linear weight and bias, BN weight and bias
    buffers = 2 * 1000 * 4 + 8  # running mean and var (float32), num_batches_tracked (int64)
    assert model_bytes(model) == params + buffers
    assert memory_lower_bound(model, 123, copies=2) == 123 + 2 * (params + buffers)


def test_a_run_that_cannot_fit_the_memory_budget_is_refused_before_any_copy(monkeypatch):
    import cswap.api

    def no_prepare(*args, **kwargs):
        raise AssertionError("the model was copied before the memory check")

    monkeypatch.setattr(cswap.api, "_prepare", no_prepare)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorDataset(torch.randn(20, 1, 14, 14), torch.arange(20) % 10)
    for run in (cswap.prune, cswap.score):
        target = {"target_params": 0.3} if run is cswap.prune else {}
        with pytest.raises(CswapError) as raised:
            # 10 MiB: torch alone holds more
            run(model, data, max_memory_gb=0.01, progress=False, **target)
        message = str(raised.value)
        assert "The run needs at least" in message and "0.01 GiB budget (max_memory_gb)" in message
        copied = "2 x" if run is cswap.prune else "1 x"
        assert copied in message and "--max-memory-gb" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CswapError, match="max_memory_gb must be > 0"):
        cswap.prune(model, data, target_params=0.3, max_memory_gb=0)


def test_a_grouping_over_its_budget_excludes_that_layer_and_leaves_no_timer(monkeypatch):
    """Torch-Pruning's grouping of one root made to spin (as its grouping of Swin's residual
    stream grew without end): that root is excluded with the reason within the budget, the
    other groups are found, and the timer and signal handler are as before."""
    import signal

    import torch_pruning as tp

    from cswap.units import OVER_BUDGET

    model = TinyNet().eval()
    real = tp.DependencyGraph.get_pruning_group

    def spins_on_down(graph, module, *args, **kwargs):
        if getattr(module, "stride", None) == (2, 2):  # down.0 (of cswap's working copy)
            while True:  # interrupted by the budget's timer signal
                pass
        return real(graph, module, *args, **kwargs)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", spins_on_down)
    handler = signal.getsignal(signal.SIGALRM)
    data = TensorDataset(torch.randn(20, 1, 14, 14), torch.arange(20) % 10)
    report = cswap.score(
        model, data, correct_only=False, progress=False, grouping_seconds=0.5
    ).report
    excluded = {g["root"]: g["reason"] for g in report["excluded_groups"]}
    assert list(excluded) == ["down.0"]
    assert excluded["down.0"] == f"{OVER_BUDGET} (more than 0.5 s)"
    assert {g["root"] for g in report["groups"]} == {"body.0", "body.3", "hidden"}
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is handler
    with pytest.raises(CswapError, match="grouping_seconds must be > 0"):
        cswap.score(model, data, grouping_seconds=0)
