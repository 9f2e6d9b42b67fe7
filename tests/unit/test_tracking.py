"""Registry semantics on a real MLflow SQLite store with a tiny model: aliases, gate tags, idempotent registration,
and the model card that reviewers read."""

from __future__ import annotations

import pytest

from llmpress import tracking
from llmpress.card import model_card
from llmpress.config import GateParams
from llmpress.gate import run_gate

NAME = "tiny-edge"


def _candidate(c, exp, folder, ppl: float, base_ppl: float = 15.0):
    run_id = tracking.start_run(c, exp, f"run-{ppl}")
    tracking.log_metrics(c, run_id, {"perplexity": ppl})
    champion_version = tracking.alias_version(c, NAME, tracking.ALIAS_CHAMPION)
    champion = tracking.version_metrics(c, NAME, champion_version) if champion_version else None
    report = run_gate(
        {"perplexity": ppl},
        {"perplexity": base_ppl},
        GateParams(max_onnx_logit_diff=None, max_repetition_increase=None),
        champion,
    )
    version = tracking.register_model(c, run_id, folder, NAME, {"recipe_hash": "abc"})
    tracking.apply_gate(c, NAME, version, report)
    return run_id, version, report


def test_champion_moves_only_on_a_pass(registry) -> None:
    c, exp, folder = registry
    _, v1, r1 = _candidate(c, exp, folder, ppl=20.0)
    assert r1.passed and tracking.alias_version(c, NAME, "champion") == v1 == "1"
    _, v2, r2 = _candidate(c, exp, folder, ppl=40.0)  # ratio 2.67 > 1.6 and 2x the champion
    assert not r2.passed
    assert tracking.alias_version(c, NAME, "champion") == v1
    assert tracking.alias_version(c, NAME, "candidate") == v2
    tags = c.get_model_version(NAME, v2).tags
    assert tags["gate.passed"] == "false"
    assert "perplexity_ratio" in tags["gate.failures"] and "perplexity_vs_champion" in tags["gate.failures"]
    assert tags["recipe_hash"] == "abc"
    _, v3, r3 = _candidate(c, exp, folder, ppl=20.5)  # within 5 % of the champion
    assert r3.passed and tracking.alias_version(c, NAME, "champion") == v3


def test_registration_is_idempotent_per_run(registry) -> None:
    c, exp, folder = registry
    run_id, v1, _ = _candidate(c, exp, folder, ppl=20.0)
    again = tracking.register_model(c, run_id, folder, NAME, {"recipe_hash": "abc"})
    assert again == v1
    assert len(c.search_model_versions(f"name = '{NAME}'")) == 1


def test_model_card_explains_a_failure() -> None:
    report = run_gate({"perplexity": 40.0}, {"perplexity": 10.0}, GateParams(max_onnx_logit_diff=None),
                      {"perplexity": 20.0})  # fmt: skip
    card = model_card(NAME, "7", "run123", {"recipe": "wanda-50", "base_model": "default", "git_commit": "deadbeef"},
                      {"perplexity": 40.0, "kl_to_base": 0.5, "top1_agreement": 0.6, "sparsity": 0.5},
                      {"perplexity": 10.0}, {"perplexity": 20.0}, "3", report,
                      [{"prompt": "Hi | there", "base": "a", "compressed": "b"}], "bundle/model.onnx")  # fmt: skip
    assert card.startswith(f"# {NAME} v7")
    assert "**Gate: FAILED** — perplexity_ratio = 4, required <= 1.6" in card
    assert "| perplexity (held-out) | 10.000 | 40.000 | 20.000 |" in card
    assert "champion (v3)" in card and "| perplexity_vs_champion | 2 | <= 1.05 | **FAIL** |" in card
    assert "Hi \\| there" in card  # table cells escaped
    assert "`deadbeef`" in card and "models:/tiny-edge/7" in card and "bundle/model.onnx" in card


def test_a_stopped_run_takes_back_its_registration_and_the_aliases_it_moved(registry) -> None:
    """A run stopped after its version was registered and made champion: the version is deleted, champion and
    candidate point where they did before it, the run is KILLED with its summary; an earlier run is untouched."""
    c, exp, folder = registry
    first, v1, _ = _candidate(c, exp, folder, ppl=20.0)
    tracking.end_run(c, first)
    stopped, v2, report = _candidate(c, exp, folder, ppl=19.0)  # a pass: champion and candidate moved to it
    assert report.passed and tracking.alias_version(c, NAME, "champion") == v2
    assert tracking.end_stopped_run(c, stopped, NAME, {"stopped": "SIGTERM"}) == [v2]
    assert [str(v.version) for v in c.search_model_versions(f"name = '{NAME}'")] == [v1]
    assert tracking.registry_aliases(c, NAME) == {"champion": v1, "candidate": v1}
    assert c.get_run(stopped).info.status == "KILLED" and c.get_run(first).info.status == "FINISHED"
    assert "summary.json" in [a.path for a in c.list_artifacts(stopped)]


def test_a_stopped_first_registration_leaves_no_registered_model(registry) -> None:
    c, exp, folder = registry
    stopped, v1, _ = _candidate(c, exp, folder, ppl=20.0)
    assert tracking.end_stopped_run(c, stopped, NAME, {}) == [v1]
    assert tracking.registry_aliases(c, NAME) is None  # the model it created is gone with its only version


def test_a_run_stopped_before_registering_only_ends_killed(registry) -> None:
    c, exp, folder = registry
    _, v1, _ = _candidate(c, exp, folder, ppl=20.0)
    stopped = tracking.start_run(c, exp, "stopped-early")
    done = tracking.start_run(c, exp, "data", parent_id=stopped)
    tracking.end_run(c, done)
    cut = tracking.start_run(c, exp, "baseline", parent_id=stopped)  # the stage being logged when it stopped
    assert tracking.end_stopped_run(c, stopped, NAME, {}) == []
    assert [c.get_run(r).info.status for r in (stopped, done, cut)] == ["KILLED", "FINISHED", "KILLED"]
    assert tracking.registry_aliases(c, NAME) == {"champion": v1, "candidate": v1}
    with pytest.raises(ValueError, match="KILLED"):
        tracking.end_run(c, stopped, "STOPPED")
