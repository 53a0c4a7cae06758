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
