"""MLflow helpers: one run per pipeline run with a nested run per stage, model registration and aliases.

Everything goes through an explicit `MlflowClient` and run ids (no fluent "active run"), so tasks running in
worker threads never log into each other's runs. The tracking URI is any MLflow URI; a relative SQLite path
(`sqlite:///mlflow.db`, the embedded default) resolves inside the project folder, and artifacts of experiments
created here then go to `<project>/mlartifacts`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from llmpress.gate import GateReport

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).with_name("mlflow_pyfunc.py")
SHAPES_FILE = Path(__file__).with_name("layer_shapes.py")
ALIAS_CANDIDATE = "candidate"
ALIAS_CHAMPION = "champion"
ALIASES_BEFORE_TAG = "registry.aliases_before"


def resolve_tracking_uri(uri: str | None, project_dir: str | Path) -> str:
    """params' tracking URI; when it is null, $MLFLOW_TRACKING_URI (what `llmpress services` writes), else the
    project's SQLite file. A relative sqlite path is made absolute in the project folder."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(Path(project_dir) / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def client(tracking_uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_id(c: MlflowClient, name: str, project_dir: str | Path) -> str:
    found = c.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if c.tracking_uri.startswith("sqlite:"):
        location = (Path(project_dir) / "mlartifacts").resolve().as_uri()
    return c.create_experiment(name, artifact_location=location)


def start_run(c: MlflowClient, experiment: str, name: str, parent_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:  # fmt: skip
    tags = dict(tags or {})
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    exp_id = c.get_run(parent_id).info.experiment_id if parent_id else experiment
    return c.create_run(exp_id, run_name=name, tags=tags).info.run_id


END_STATUSES = ("FINISHED", "FAILED", "KILLED")


def end_run(c: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run ended: FINISHED, FAILED (an error) or KILLED (stopped by a signal)."""
    if status not in END_STATUSES:
        raise ValueError(f"run status {status!r} is not one of {END_STATUSES}")
    c.set_terminated(run_id, status)


def log_params(c: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    for key, value in flatten(params).items():
        c.log_param(run_id, key, str(value)[:6000])


def log_metrics(c: MlflowClient, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
    for key, value in flatten(metrics).items():
        if not isinstance(value, int | float):
            continue
        c.log_metric(run_id, key, float(value), step=step)
        if not math.isfinite(float(value)):
            # MLflow stores NaN, but a reviewer should see it called out.
            c.set_tag(run_id, f"nonfinite.{key}", str(value))


def log_json(c: MlflowClient, run_id: str, obj: Any, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(obj, indent=2, default=str))
        c.log_artifact(run_id, str(path))


def flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def register_model(c: MlflowClient, run_id: str, model_dir: str | Path, name: str, tags: dict[str, str]) -> str:
    """Log `model_dir` as an MLflow pyfunc model in `run_id`, register it as a new version of `name`, tag it and
    point alias `candidate` at it; returns the version number."""
    existing = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:  # a retried task: this run already registered its version
        version = str(existing[0].version)
        c.set_registered_model_alias(name, ALIAS_CANDIDATE, version)
        return version
    # What the registry's aliases were, so that a run stopped mid-registration can put them back
    # (end_stopped_run); written before the version exists.
    c.set_tag(run_id, ALIASES_BEFORE_TAG, json.dumps(registry_aliases(c, name)))
    mlflow.set_tracking_uri(c.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            code_paths=[str(SHAPES_FILE)],  # the pyfunc's loader for blocks of different widths
            artifacts={"hf_model": str(model_dir)},
            pip_requirements=[
                "mlflow>=3.17,<3.18",
                "torch==2.13.0",
                "transformers==5.23.0",
                "safetensors",
                "compressed-tensors==0.20.0",
            ],
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, value)
    c.set_registered_model_alias(name, ALIAS_CANDIDATE, version)
    return version


def apply_gate(c: MlflowClient, name: str, version: str, report: GateReport) -> None:
    """Tag the version with the verdict and every failure; only a pass moves alias `champion`."""
    c.set_model_version_tag(name, version, "gate.passed", str(report.passed).lower())
    for check in report.checks:
        c.set_model_version_tag(
            name, version, f"gate.{check.name}", ("pass: " if check.passed else "FAIL: ") + check.reason
        )
    if report.passed:
        c.set_registered_model_alias(name, ALIAS_CHAMPION, version)
    else:
        c.set_model_version_tag(name, version, "gate.failures", "; ".join(report.failures))


def registry_aliases(c: MlflowClient, name: str) -> dict[str, str] | None:
    """Alias -> version of registered model `name`; None when there is no such model."""
    try:
        model = c.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        return None
    return {alias: str(version) for alias, version in model.aliases.items()}


def end_stopped_run(c: MlflowClient, run_id: str, model_name: str, summary: dict[str, Any]) -> list[str]:
    """A run stopped by a signal: the versions it registered are deleted and the aliases they took put back (a
    stopped run registers nothing), its summary logged, its status KILLED. Returns the deleted version numbers.

    No retries here: a stopped process has seconds left (a container's grace period), not minutes."""
    run = c.get_run(run_id)
    deleted = []
    if ALIASES_BEFORE_TAG in run.data.tags:  # registration began
        before = json.loads(run.data.tags[ALIASES_BEFORE_TAG])
        for version in c.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'"):
            c.delete_model_version(model_name, version.version)
            deleted.append(str(version.version))
        now = registry_aliases(c, model_name) or {}
        if before is None and not c.search_model_versions(f"name = '{model_name}'"):
            c.delete_registered_model(model_name)  # this run created it; nothing else is in it
        for alias, version in (before or {}).items():
            if alias not in now:  # it pointed at a deleted version
                try:
                    c.set_registered_model_alias(model_name, alias, version)
                except mlflow.exceptions.MlflowException as exc:  # that version was deleted meanwhile
                    log.warning("alias %s of %s not put back on version %s: %s", alias, model_name, version, exc)
    if "registered_version" in run.data.tags:  # also an earlier identical run's version it pointed at
        c.delete_tag(run_id, "registered_version")
    stages = c.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}' and "
                           "attributes.status = 'RUNNING'")  # fmt: skip
    for stage in stages:  # a stage's nested run being logged when the signal came
        end_run(c, stage.info.run_id, "KILLED")
    log_json(c, run_id, summary, "summary.json")
    end_run(c, run_id, "KILLED")
    return deleted


def alias_version(c: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def version_by_tag(c: MlflowClient, name: str, key: str, value: str | None) -> Any | None:
    """The newest version of `name` whose tag `key` is `value` (None when there is none, or no value)."""
    if not value:
        return None
    try:
        found = c.search_model_versions(f"name = '{name}' and tags.`{key}` = '{value}'")
    except mlflow.exceptions.MlflowException:  # no such registered model yet
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def version_metrics(c: MlflowClient, name: str, version: str) -> dict[str, float]:
    """The metrics of the run that produced a model version (what the gate compares a candidate against)."""
    run_id = c.get_model_version(name, version).run_id
    return dict(c.get_run(run_id).data.metrics) if run_id else {}
