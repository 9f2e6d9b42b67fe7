"""Promotion tasks: thin wrappers over `llmpress.promote`. Refusals (not approved, gate failed, a bundle that does
not verify) fail at once; S3 and MLflow I/O retries with backoff, which the idempotent upload makes safe."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from llmpress import promote, tracking
from llmpress.bundle import verify_bundle
from tasks import failure, transient


def _transient(task: Any, run: Any, state: Any) -> bool:
    """Retry I/O trouble, never a refusal; a failed upload is I/O trouble."""
    return transient(task, run, state) or isinstance(failure(state), promote.UploadError)


RETRY = {"retries": 3, "retry_delay_seconds": [2, 10, 30], "retry_condition_fn": _transient}


@task(name="check-version", **RETRY)
def check_version(tracking_uri: str, name: str, version_or_alias: str) -> dict[str, str]:
    c = tracking.client(tracking_uri)
    version = promote.resolve_version(c, name, version_or_alias)
    promote.check_promotable(version)
    return {"version": str(version.version), "run_id": version.run_id}


@task(name="publish-bundle", **RETRY)
def publish_bundle(tracking_uri: str, run_id: str, uri: str) -> dict[str, Any]:
    """Fetch the run's bundle, verify it, upload it to `uri` and check what S3 stored."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="bundle", dst_path=tmp,
                                                         tracking_uri=tracking_uri)  # fmt: skip
        except mlflow.exceptions.MlflowException as exc:
            raise promote.PromotionError(f"run {run_id} has no edge bundle (was the model exported?): {exc}") from exc
        verify_bundle(folder)
        published = promote.publish_bundle(Path(folder), uri)
    return vars(published)


@task(name="move-production", **RETRY)
def move_production(tracking_uri: str, name: str, version: str, published: dict[str, Any]) -> dict[str, Any]:
    return promote.move_production(tracking.client(tracking_uri), name, version, promote.Published(**published))
