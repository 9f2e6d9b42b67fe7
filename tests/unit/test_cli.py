"""The CLI refuses bad input with one clear line and exit status 2, before any work is done."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path)
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    return tmp_path


def test_check_accepts_shipped_recipes(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipes = sorted(str(p) for p in (project / "recipes").glob("*.yaml"))
    assert main(["--project", str(project), "check", *recipes]) == 0
    out = capsys.readouterr().out
    assert "params.yaml: ok" in out and out.count(": ok (") == len(recipes)


@pytest.mark.parametrize(
    ("recipe_text", "expected"),
    [
        ("name: x\nstages:\n  - method: wanda\n    sparsity: 1.5\n", "stages.0.wanda.sparsity"),
        ("name: x\nstages:\n  - method: wanda\n    sparsity: 0.5\n    target: ['.*']\n", "stages.0.wanda.target"),
        ("name: x\nstages:\n  - method: obc\n    sparsity: 0.5\n", "unknown method 'obc'; allowed: magnitude, wanda"),
        ("name: x\nstages:\n  - method: wanda\n    pattern: '4:2'\n", "0 < N < M"),
        ("name: x\nstages: []\n", "stages"),
        ("- just\n- a list\n", "a recipe is a mapping"),
        (
            "name: x\nstages:\n  - method: wanda\n    sparsity: 0.5\n    targets: ['(']\n",
            "not a valid regular expression",
        ),
    ],
)
def test_check_refuses_bad_recipes(project: Path, capsys: pytest.CaptureFixture[str], recipe_text: str,
                                   expected: str) -> None:  # fmt: skip
    bad = project / "bad.yaml"
    bad.write_text(recipe_text)
    assert main(["--project", str(project), "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
    assert "Traceback" not in err


def test_bad_params_refused(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "params.yaml").write_text("eval:\n  window: 4\n  strid: 2\n")
    assert main(["--project", str(project), "check"]) == 2
    err = capsys.readouterr().err
    assert "eval.window" in err and "eval.strid: unknown key" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "gate.max_perplexity_ratio"], "expected KEY=VALUE"),
        (["--set", "data.seed=3"], "data settings are DVC parameters"),
        (["--set", "compress.device=tpu"], "compress.device"),
        (["--set", "gate.max_perplexity_ratio=-1"], "gate.max_perplexity_ratio"),
        (["--recipe", "recipes/missing.yaml"], "file not found"),
    ],
)
def test_run_refuses_bad_arguments_before_any_work(project: Path, capsys: pytest.CaptureFixture[str],
                                                   args: list[str], expected: str) -> None:  # fmt: skip
    assert main(["--project", str(project), "run", *args]) == 2
    assert expected in capsys.readouterr().err
    assert not (project / "mlflow.db").exists() and not (project / "models").exists()


def test_unknown_model_source_is_refused(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--project", str(project), "resolve", "not a model"]) == 2
    assert "is not a local folder, a .gguf file" in capsys.readouterr().err
