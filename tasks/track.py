"""MLflow tasks: open the pipeline run, log each stage as a nested run, register, gate and alias, close.

These talk to a server (or a SQLite file) over I/O, so they retry with backoff; none of them recomputes a metric.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from llmpress import registration, tracking
from llmpress.config import GateParams
from llmpress.registration import Candidate
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
def register_and_gate(tracking_uri: str, candidate: Candidate, gate: GateParams) -> dict[str, Any]:
    """`llmpress.registration.register_and_gate` against the tracking server; retried on I/O errors."""
    return registration.register_and_gate(tracking.client(tracking_uri), candidate, gate)


@task(name="close-run", **RETRY)
def close_run(tracking_uri: str, run_id: str, ok: bool, summary: dict[str, Any]) -> None:
    c = tracking.client(tracking_uri)
    tracking.log_json(c, run_id, summary, "summary.json")
    tracking.end_run(c, run_id, "FINISHED" if ok else "FAILED")


def close_stopped_run(tracking_uri: str, run_id: str, model_name: str, summary: dict[str, Any]) -> list[str]:
    """A run stopped by a signal: status KILLED, registration taken back (tracking.end_stopped_run). Not a Prefect
    task: the flow run is crashing, and a stopped process has seconds for this, not retries."""
    return tracking.end_stopped_run(tracking.client(tracking_uri), run_id, model_name, summary)
