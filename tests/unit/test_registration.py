"""Registration and gating as a library function (llmpress/registration.py), on a SQLite MLflow and a tiny model."""

from __future__ import annotations

import pytest

from llmpress import tracking
from llmpress.config import GateParams
from llmpress.registration import Candidate, register_and_gate

NAME = "tiny-edge"
GATE = GateParams(max_onnx_logit_diff=None, max_repetition_increase=None)  # perplexity checks only: no ONNX here


def _offer(c, exp, folder, ppl: float, run_key: str) -> tuple[str, dict]:
    run_id = tracking.start_run(c, exp, f"run-{ppl}")
    candidate = Candidate(run_id, NAME, str(folder), {"perplexity": ppl, "sparsity_per_layer": {"a": 0.5, "b": 0.4}},
                          {"perplexity": 15.0}, {"run_key": run_key, "recipe_hash": "abc"}, 0.5,
                          [{"prompt": "p", "base": "b", "compressed": "c"}])  # fmt: skip
    return run_id, register_and_gate(c, candidate, GATE)


def test_a_pass_is_registered_with_its_card_tags_plots_and_champion(registry) -> None:
    c, exp, folder = registry
    run_id, verdict = _offer(c, exp, folder, 20.0, "k1")  # ratio 1.33, under the default 2.5
    assert verdict["passed"] and verdict["version"] == "1" and verdict["champion"] == "1" and not verdict["reused"]
    version = c.get_model_version(NAME, "1")
    assert version.tags["run_key"] == "k1" and version.tags["gate.passed"] == "true"
    assert version.description.startswith("#") and "perplexity" in version.description
    assert tracking.registry_aliases(c, NAME) == {"candidate": "1", "champion": "1"}
    logged = {a.path for a in c.list_artifacts(run_id)} | {a.path for a in c.list_artifacts(run_id, "plots")}
    assert {"gate_report.json", "model_card.md", "generations.json", "plots/sparsity_per_layer.png"} <= logged
    run = c.get_run(run_id)
    assert run.data.tags["registered_version"] == "1" and run.data.metrics["perplexity_ratio"] == pytest.approx(4 / 3)


def test_a_failure_is_registered_as_candidate_only_with_its_reasons(registry) -> None:
    c, exp, folder = registry
    _offer(c, exp, folder, 20.0, "k1")
    _, verdict = _offer(c, exp, folder, 60.0, "k2")  # 4x the base, 3x the champion
    assert not verdict["passed"] and verdict["version"] == "2" and verdict["champion"] == "1"
    assert any("perplexity_ratio" in f for f in verdict["failures"])
    assert tracking.registry_aliases(c, NAME) == {"candidate": "2", "champion": "1"}
    assert "perplexity_ratio" in c.get_model_version(NAME, "2").tags["gate.failures"]


def test_an_identical_rerun_registers_nothing_and_keeps_the_verdict(registry) -> None:
    c, exp, folder = registry
    _offer(c, exp, folder, 20.0, "same")
    rerun, verdict = _offer(c, exp, folder, 20.0, "same")
    assert verdict["reused"] and verdict["version"] == "1" and verdict["passed"]
    assert len(c.search_model_versions(f"name = '{NAME}'")) == 1
    assert c.get_run(rerun).data.tags["reused_version"] == "true"
