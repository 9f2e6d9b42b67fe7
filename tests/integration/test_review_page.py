"""The review page: a real MLflow server on 127.0.0.1, the flow run against it, the pages opened in Chromium.

A candidate that fails the gate is the case a reviewer must understand from the page alone: the test asserts
the model card (verdict, reason, metrics against base) renders on the model version page, and the run's metrics
render on the run page. Screenshots are kept under test-artifacts/.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from flows.cli import main as cli
from llmpress.sources import SHIPPED_NAME
from tests.servers import chromium, mlflow_server, render_page

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
MODEL_NAME = "review-page-test"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if chromium() is None:
        pytest.fail("chromium is not installed; `make test` installs it (Debian package chromium)")
    root = tmp_path_factory.mktemp("review")
    with mlflow_server(root / "mlflow") as url:
        project = root / "project"
        project.mkdir()
        shutil.copy(REPO / "dvc.yaml", project)
        shutil.copytree(REPO / "recipes", project / "recipes")
        (project / "llmpress").symlink_to(REPO / "llmpress")
        (project / "models").mkdir()
        (project / "models" / SHIPPED_NAME).symlink_to(REPO / "models" / SHIPPED_NAME)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["recipe"] = "recipes/magnitude-50.yaml"  # fails the default gate: a reason to explain
        params["data"] |= {"calibration_samples": 4, "seq_len": 64}
        params["eval"] |= {"max_tokens": 1024, "cloze": {"max_examples": 20, "max_context_tokens": 48},
                           "generation": {"max_new_tokens": 8, "prompts": ["The bushfire near the town"]},
                           "speed": {"enabled": False}}  # fmt: skip
        params["export"]["formats"] = []
        params["tracking"] = {"tracking_uri": url, "experiment": "review", "registered_model": MODEL_NAME}
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        for args in (["init", "--no-scm"], ["remote", "add", "-d", "local", str(root / "remote")]):
            subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, check=True, capture_output=True)
        assert cli(["--project", str(project), "run"]) == 0
        c = MlflowClient(url)
        version = c.get_model_version_by_alias(MODEL_NAME, "candidate")
        run = c.get_run(version.run_id)
        version_dom = render_page(f"{url}/#/models/{MODEL_NAME}/versions/{version.version}",
                                  ARTIFACTS / "model_version_page.png")  # fmt: skip
        run_dom = render_page(f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}",
                              ARTIFACTS / "run_page.png")  # fmt: skip
        yield {"version": version, "run": run, "version_dom": version_dom, "run_dom": run_dom}


def test_model_version_page_shows_the_card_and_why_the_gate_failed(reviewed: dict) -> None:
    dom = reviewed["version_dom"]
    assert reviewed["version"].tags["gate.passed"] == "false"
    assert f"{MODEL_NAME} v{reviewed['version'].version}" in dom  # the card's title, rendered
    assert "Gate: FAILED" in dom and "perplexity_ratio" in dom  # the verdict and its reason
    assert "KL to base (nats/token)" in dom and "top-1 agreement with base" in dom  # the metrics table
    ppl = reviewed["run"].data.metrics["perplexity"]
    assert f"{ppl:.3f}" in dom
    assert (ARTIFACTS / "model_version_page.png").stat().st_size > 10_000


def test_run_page_shows_metrics(reviewed: dict) -> None:
    dom = reviewed["run_dom"]
    assert "perplexity" in dom and "kl_to_base" in dom and "gate_passed" in dom
    assert "Gate: FAILED" in dom  # the model card is the run's description too
    assert (ARTIFACTS / "run_page.png").stat().st_size > 10_000
