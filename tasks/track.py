"""MLflow tasks: open the pipeline run, log each stage as a nested run, register, gate and alias, close.

These talk to a server (or a SQLite file) over I/O, so they retry with backoff; none of them recomputes a metric.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from llmpress import steps, tracking
from llmpress.card import model_card
from llmpress.config import GateParams
from llmpress.evaluate.speed import served
from llmpress.gate import run_gate
from tasks import transient

RETRY = {"retries": 3, "retry_delay_seconds": [2, 10, 30], "retry_condition_fn": transient}


@task(name="open-run", **RETRY)
def open_run(tracking_uri: str, experiment: str, project_dir: str, run_name: str, tags: dict[str, str],
             params: dict[str, Any]) -> str:  # fmt: skip
    c = tracking.client(tracking_uri)
    exp_id = tracking.experiment_id(c, experiment, project_dir)
    run_id = tracking.start_run(c, exp_id, run_name, tags=tags)
    tracking.log_params(c, run_id, params)
    return run_id


@task(name="log-stage", **RETRY)
def log_stage(tracking_uri: str, parent_id: str, stage: str, metrics: dict[str, Any], seconds: float,
              artifacts: dict[str, str] | None = None) -> str:  # fmt: skip
    """A nested run for one stage: its scalar metrics, its wall time, the files it made worth keeping."""
    c = tracking.client(tracking_uri)
    run_id = tracking.start_run(c, "", stage, parent_id=parent_id)
    flat = tracking.flatten(metrics)
    scalars = {k: v for k, v in flat.items() if isinstance(v, int | float) and "per_layer" not in k}
    tracking.log_metrics(c, run_id, scalars | {"seconds": seconds})
    tracking.log_json(c, run_id, metrics, f"{stage}.json")
    for path in (artifacts or {}).values():
        c.log_artifact(run_id, path)
    tracking.end_run(c, run_id)
    return run_id


@task(name="register-and-gate", **RETRY)
def register_and_gate(tracking_uri: str, run_id: str, model_name: str, model_dir: str, metrics: dict[str, Any],
                      base_metrics: dict[str, Any], gate: GateParams, version_tags: dict[str, str],
                      sparsity_target: float | None, generations: list[dict[str, str]],
                      onnx_path: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Gate verdict (computed once, here, against base and the current champion), plots, reports and the model
    card to the run; a registered version with lineage tags, the card as its description, alias `candidate`;
    `champion` moves only on a pass. Registering is idempotent per run, so a retry never adds a second version, and
    per content (tag `run_key`): an identical re-run points at the version already there."""
    c = tracking.client(tracking_uri)
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
                      report, generations, onnx_artifact)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        files = {"gate_report.json": json.dumps(report.to_dict(), indent=2), "model_card.md": card,
                 "generations.json": json.dumps(generations, indent=2)}  # fmt: skip
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
            c.log_artifact(run_id, str(Path(tmp) / name))
        if metrics.get("sparsity_per_layer"):
            plot = steps.plot_sparsity(
                metrics["sparsity_per_layer"], sparsity_target, Path(tmp) / "sparsity_per_layer.png"
            )
            c.log_artifact(run_id, str(plot), "plots")
        if served(metrics, "b1_prefill_ms") is not None and "torch_b1_prefill_ms" in base_metrics:
            plot = steps.plot_cost(base_metrics, metrics, Path(tmp) / "cost_vs_base.png")
            c.log_artifact(run_id, str(plot), "plots")
        if onnx_path:  # the edge bundle of this version: graph, tokenizer, runner, manifest with hashes and verdict
            lineage = version_tags | {"model": model_name, "version": str(version), "run_id": run_id}
            bundle = steps.edge_bundle(onnx_path, model_dir, Path(tmp) / "bundle", metrics, report.to_dict(), lineage)
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


@task(name="close-run", **RETRY)
def close_run(tracking_uri: str, run_id: str, ok: bool, summary: dict[str, Any]) -> None:
    c = tracking.client(tracking_uri)
    tracking.log_json(c, run_id, summary, "summary.json")
    tracking.end_run(c, run_id, "FINISHED" if ok else "FAILED")


def close_stopped_run(tracking_uri: str, run_id: str, model_name: str, summary: dict[str, Any]) -> list[str]:
    """A run stopped by a signal: status KILLED, registration taken back (tracking.end_stopped_run). Not a Prefect
    task: the flow run is crashing, and a stopped process has seconds for this, not retries."""
    return tracking.end_stopped_run(tracking.client(tracking_uri), run_id, model_name, summary)
