"""Data versioning task: `dvc repro` + `dvc push`; returns the data sets' paths and DVC hashes."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from llmpress import versioning
from tasks import transient


@task(name="version-data", retries=1, retry_delay_seconds=5, retry_condition_fn=transient)
def version_data(project_dir: str, push: bool = True) -> dict:
    versions = versioning.reproduce(project_dir, push=push)
    root = Path(project_dir)
    return {
        "calibration": str(root / versioning.CALIBRATION),
        "eval": str(root / versioning.EVALUATION),
        "calibration_version": versions[versioning.CALIBRATION],
        "eval_version": versions[versioning.EVALUATION],
    }
