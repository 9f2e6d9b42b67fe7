"""Registering a compressed model and gating it: the decision at the end of a compress run.

`register_and_gate` computes the gate's verdict once (against the base model and the current champion), logs the
verdict, plots, reports and model card to the run, registers the model as a new version with its lineage tags and
the card as its description, points alias `candidate` at it, and moves `champion` only on a pass. It is idempotent
per run (a retry never adds a second version) and per content (tag `run_key`, `llmpress.lineage`): an identical
re-run points at the version already there and registers nothing.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from llmpress import steps, tracking
from llmpress.card import model_card
from llmpress.config import GateParams
from llmpress.evaluate.speed import served
from llmpress.gate import run_gate


@dataclass
class Candidate:
    """A compressed model a run offers for registration, with what it was measured at."""

    run_id: str
    model_name: str  # the registered model
    model_dir: str  # the compressed HF folder
    metrics: dict[str, Any]  # the compressed model's (and its bundle's)
    base_metrics: dict[str, Any]
    version_tags: dict[str, str]  # lineage, with `run_key`
    sparsity_target: float | None = None
    generations: list[dict[str, str]] = field(default_factory=list)
    onnx_path: str | None = None  # the exported graph: the version's edge bundle is built from it
    gguf_path: str | None = None  # the GGUF for llama.cpp: it goes into the bundle too


def register_and_gate(c: MlflowClient, candidate: Candidate, gate: GateParams) -> dict[str, Any]:
    """Gate, log, register and alias `candidate` (the module docstring); returns the verdict and versions."""
    run_id, model_name, model_dir = candidate.run_id, candidate.model_name, candidate.model_dir
    metrics, base_metrics, version_tags = candidate.metrics, candidate.base_metrics, candidate.version_tags
    onnx_path = candidate.onnx_path
    champion_before = tracking.alias_version(c, model_name, tracking.ALIAS_CHAMPION)
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    scalars |= {f"base_{k}": v for k, v in base_metrics.items() if isinstance(v, int | float)}
    scalars["perplexity_ratio"] = metrics["perplexity"] / base_metrics["perplexity"]
    same = tracking.version_by_tag(c, model_name, "run_key", version_tags.get("run_key"))
    if same is not None and same.run_id != run_id:  # an identical earlier run: its version and verdict stand
        passed = same.tags.get("gate.passed") == "true"
        tracking.log_metrics(c, run_id, scalars | {"gate_passed": passed})
        c.set_tag(run_id, "registered_version", str(same.version))
        c.set_tag(run_id, "reused_version", "true")
        failures = (same.tags.get("gate.failures") or "").split("; ")
        return {"version": str(same.version), "passed": passed, "failures": [f for f in failures if f],
                "champion_before": champion_before, "champion": champion_before, "reused": True}  # fmt: skip
    champion = tracking.version_metrics(c, model_name, champion_before) if champion_before else None
    report = run_gate(metrics, base_metrics, gate, champion)
    tracking.log_metrics(c, run_id, scalars | {"gate_passed": report.passed})
    # The graph is logged once, inside the edge bundle (below), and the card points there.
    onnx_artifact = f"bundle/{Path(onnx_path).name}" if onnx_path else None
    version = tracking.register_model(c, run_id, model_dir, model_name, version_tags)
    card = model_card(model_name, version, run_id, version_tags, metrics, base_metrics, champion, champion_before,
                      report, candidate.generations, onnx_artifact)  # fmt: skip
    tracking.log_json(c, run_id, report.to_dict(), "gate_report.json")
    c.log_text(run_id, card, "model_card.md")
    tracking.log_json(c, run_id, candidate.generations, "generations.json")
    with tempfile.TemporaryDirectory() as tmp:
        if per_layer := metrics.get("sparsity_per_layer"):
            plot = steps.plot_sparsity(per_layer, candidate.sparsity_target, Path(tmp) / "sparsity_per_layer.png")
            c.log_artifact(run_id, str(plot), "plots")
        if expert_tokens := metrics.get("expert_tokens"):  # a mixture of experts: its calibration coverage
            plot = steps.plot_expert_tokens(expert_tokens, int(metrics.get("expert_floor", 0)),
                                            Path(tmp) / "expert_tokens.png")  # fmt: skip
            c.log_artifact(run_id, str(plot), "plots")
        if served(metrics, "b1_prefill_ms") is not None and "torch_b1_prefill_ms" in base_metrics:
            plot = steps.plot_cost(base_metrics, metrics, Path(tmp) / "cost_vs_base.png")
            c.log_artifact(run_id, str(plot), "plots")
        if onnx_path or candidate.gguf_path:
            # the edge bundle of this version: graph and/or GGUF, tokenizer, runner, manifest with hashes and verdict
            lineage = version_tags | {"model": model_name, "version": str(version), "run_id": run_id}
            bundle = steps.edge_bundle(onnx_path, model_dir, Path(tmp) / "bundle", metrics, report.to_dict(), lineage,
                                       candidate.gguf_path)  # fmt: skip
            c.log_artifacts(run_id, str(bundle), "bundle")
    c.update_model_version(model_name, version, description=card)
    c.set_tag(run_id, "mlflow.note.content", card)  # the run page's description, too
    tracking.apply_gate(c, model_name, version, report)
    c.set_tag(run_id, "gate.passed", str(report.passed).lower())
    c.set_tag(run_id, "registered_version", version)
    return {
        "version": version,
        "passed": report.passed,
        "failures": report.failures,
        "checks": report.to_dict()["checks"],
        "champion_before": champion_before,
        "champion": tracking.alias_version(c, model_name, tracking.ALIAS_CHAMPION),
        "reused": False,
    }
