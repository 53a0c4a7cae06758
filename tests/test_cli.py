import json

from typer.testing import CliRunner

from cswap.cli.main import app

runner = CliRunner()


def test_zoo_list_shows_every_model():
    result = runner.invoke(app, ["zoo", "list", "--json"])
    assert result.exit_code == 0
    names = [row["name"] for row in json.loads(result.stdout)]
    assert names == ["resnet20", "vgg", "vit"]


def test_unknown_zoo_model_is_one_clear_error_and_exit_2():
    result = runner.invoke(app, ["zoo", "eval", "alexnet"])
    assert result.exit_code == 2
    assert "Unknown zoo model 'alexnet'" in result.stderr
    assert "Traceback" not in result.output


def test_unavailable_cuda_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["zoo", "eval", "vgg", "--device", "cuda"])
    assert result.exit_code == 2
    assert "no CUDA GPU" in result.stderr


def test_prune_with_a_bad_target_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["prune", "--model", "zoo:vgg", "--target-params", "1.5", "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "outside (0, 1)" in result.stderr
    assert not out.exists()


def test_prune_refuses_an_output_directory_with_a_report(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    result = runner.invoke(
        app, ["prune", "--model", "zoo:vgg", "--target-params", "0.5", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "already holds a report" in result.stderr
    assert "--overwrite" in result.stderr


def test_prune_with_an_unknown_data_spec(tmp_path):
    result = runner.invoke(
        app,
        [
            "prune",
            "--model",
            "zoo:vgg",
            "--data",
            "mnist",
            "--target-params",
            "0.5",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert result.exit_code == 2
    assert "Unknown data spec" in result.stderr
    assert not (tmp_path / "x").exists()


def test_bench_commands_refuse_an_existing_out_file_before_any_work(tmp_path, monkeypatch):
    import cswap.bench

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("the benchmark ran although --out was refused")

    monkeypatch.setattr(cswap.bench, "speed_bench", must_not_run)
    monkeypatch.setattr(cswap.bench, "scale_bench", must_not_run)
    monkeypatch.setattr(cswap.bench, "latency_stability", must_not_run)
    finished = tmp_path / "speed.json"
    finished.write_text('{"speedup": 11.0}\n')
    for command in (["bench-speed"], ["bench-scale"], ["bench-latency", str(tmp_path)]):
        result = runner.invoke(app, [*command, "--out", str(finished)])
        assert result.exit_code == 2, result.output
        assert "already holds a result" in result.stderr
        assert "--overwrite" in result.stderr
    assert finished.read_text() == '{"speedup": 11.0}\n'
    result = runner.invoke(app, ["bench-speed", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "is a directory" in result.stderr


def test_bench_speed_overwrite_replaces_the_file_whole(tmp_path, monkeypatch):
    import cswap.bench

    monkeypatch.setattr(cswap.bench, "speed_bench", lambda *_a, **_k: {"speedup": 12.5})
    finished = tmp_path / "speed.json"
    finished.write_text('{"speedup": 11.0}\n')
    result = runner.invoke(app, ["bench-speed", "--out", str(finished), "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(finished.read_text()) == {"speedup": 12.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed.json"]
