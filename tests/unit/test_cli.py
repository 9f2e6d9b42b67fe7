"""The CLI refuses bad input with one clear line and exit status 2, before any work is done."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path)
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    (tmp_path / ".dvc").mkdir()  # a DVC repository as far as the CLI's checks go (these runs stop at Prefect)
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


def _cli(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "--project", str(project), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_prefect_that_cannot_start_is_one_error_line(project: Path, tmp_path: Path) -> None:
    """A fresh Prefect home (its database created here, in the CLI, before the server starts) and a server that
    cannot start in time: one line saying what failed and what to do, exit 2, no traceback, no flow run."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    done = _cli(project, env, "run", "--no-export")
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "did not start within 1 s" in errors[0]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in errors[0] and "Traceback" not in done.stderr
    assert (home / "prefect.db").is_file()  # created and migrated before the server was asked to start
    assert not (project / "mlflow.db").exists()  # nothing ran


def test_unreachable_prefect_server_is_one_error_line(project: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "home"), PREFECT_API_URL="http://127.0.0.1:9/api")
    done = _cli(project, env, "run", "--no-export")
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "PREFECT_API_URL=http://127.0.0.1:9/api does not answer" in errors[0]
    assert "Traceback" not in done.stderr and not (project / "mlflow.db").exists()


def test_summary_shows_base_in_pytorch_and_the_compressed_model_in_its_runtime(capsys) -> None:
    from flows.cli import print_summary

    speed = {"prefill_ms": 300.0, "decode_tokens_per_s": 10.0}
    base = {"perplexity": 30.0, "cloze_accuracy": 0.3, "bytes_on_disk": 2**29, "torch_peak_rss_mb": 1100.0}
    base |= {f"torch_b{b}_{k}": v for b in (1, 2) for k, v in speed.items()}
    comp = {"perplexity": 60.0, "kl_to_base": 0.8, "top1_agreement": 0.5, "cloze_accuracy": 0.2, "cloze_examples": 9,
            "sparsity": 0.5, "bytes_on_disk": 2**29, "runtime": "ort", "ort_peak_rss_mb": 800.0,
            "decode_speedup_b1": 2.5}  # fmt: skip
    comp |= {f"ort_b{b}_{k}": v * 2.5 for b in (1, 2) for k, v in speed.items()}
    print_summary({"base": base, "compressed": comp, "gate": {"passed": True, "failures": [], "version": "1",
                   "champion": "1"}, "registered_model": "m", "mlflow_run_id": "r", "run_name": "n",
                   "seconds": {"evaluate": 1.0}, "tracking_uri": "sqlite:///x.db"})  # fmt: skip
    out = capsys.readouterr().out
    assert "runtime measured" in out and "ONNX Runtime" in out
    assert "decode, batch 2 (tok/s)" in out and "25.0" in out and "2.50x" in out


def test_data_rewrites_only_the_corpus_line_of_params(tmp_path: Path) -> None:
    """`run --data` edits params.yaml like `dvc exp run -S`: the corpus value changes, every other byte stays."""
    from flows.cli import _set_corpus

    before = (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(before)
    _set_corpus(tmp_path / "params.yaml", "inputs/news.txt")
    after = (tmp_path / "params.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(before.splitlines(), after, strict=True) if a != b]
    assert len(changed) == 1 and "corpus: inputs/news.txt" in changed[0][1] and "corpus:" in changed[0][0]
