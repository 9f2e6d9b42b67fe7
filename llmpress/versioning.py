"""Data versioning with DVC: reproduce the `dvc.yaml` stages, push their outputs, read their hashes.

The md5 that DVC records in `dvc.lock` for an output is that data set's version; it travels with every result
made from it (MLflow params and model-version tags). The remote is whatever `.dvc/config` names as default
(a local folder by default; S3 with `dvc remote add -d` plus `endpointurl` for S3-compatible stores).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import yaml

from llmpress.errors import LlmpressError

log = logging.getLogger(__name__)

CALIBRATION = "data/calibration.jsonl"
EVALUATION = "data/eval.txt"


def reproduce(project_dir: str | Path, push: bool = True) -> dict[str, str]:
    """`dvc repro` then `dvc push` in `project_dir`; returns {output path: md5} from dvc.lock."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    project_dir = Path(project_dir).resolve()
    if not (project_dir / "dvc.yaml").is_file():
        raise LlmpressError(f"{project_dir} has no dvc.yaml: run from the project folder or pass --project")
    # dvc.yaml stages call `python -m llmpress.data`: make that the interpreter running us.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        with Repo(str(project_dir)) as repo:
            stages = repo.reproduce()
            log.info("dvc repro: %s", ", ".join(s.addressing for s in stages) or "up to date, nothing ran")
            if push:
                pushed = repo.push()
                log.info("dvc push: %s file(s) sent to the remote", pushed)
    except DvcException as exc:
        raise LlmpressError(f"DVC failed in {project_dir}: {exc}") from None
    return data_versions(project_dir)


def data_versions(project_dir: str | Path) -> dict[str, str]:
    lock_path = Path(project_dir) / "dvc.lock"
    if not lock_path.is_file():
        raise LlmpressError(f"{lock_path} is missing: run `dvc repro` first")
    lock = yaml.safe_load(lock_path.read_text()) or {}
    versions = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs", []):
            versions[out["path"]] = out["md5"]
    for needed in (CALIBRATION, EVALUATION):
        if needed not in versions:
            raise LlmpressError(f"{lock_path} records no version for {needed}; is dvc.yaml the project's?")
    return versions


def git_commit(project_dir: str | Path) -> str:
    """HEAD's sha of the project checkout, with '-dirty' if tracked files changed; 'unknown' outside git."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True, check=True).stdout

    try:
        sha = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha
