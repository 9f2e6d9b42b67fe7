"""Data versioning with DVC: reproduce the `dvc.yaml` stages, push their outputs, read their hashes.

The md5 that DVC records in `dvc.lock` for an output is that data set's version; it travels with every result
made from it (MLflow params and model-version tags). The remote is whatever `.dvc/config` names as default
(a local folder by default; S3 with `dvc remote add -d` plus `endpointurl` for S3-compatible stores).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

from llmpress.errors import LlmpressError

log = logging.getLogger(__name__)

CALIBRATION = "data/calibration.jsonl"
EVALUATION = "data/eval.txt"


def reproduce(project_dir: str | Path, push: bool = True) -> dict[str, str]:
    """`dvc repro` then `dvc push` in `project_dir`; returns {output path: md5} from dvc.lock.

    DVC runs as a subprocess in the project folder: its repo state is tied to the working directory, and a
    subprocess keeps that (and DVC's logging) away from the flow's threads.
    """
    project_dir = Path(project_dir).resolve()
    check_project(project_dir)
    if use_remote_from_env(project_dir):
        # A checkout on a worker: fetch what dvc.lock names from the team remote rather than rebuild it.
        try:
            _dvc(project_dir, "repro", "--pull")
        except LlmpressError as exc:
            log.warning("dvc repro --pull failed, rebuilding the data instead: %s", str(exc).splitlines()[0])
            _dvc(project_dir, "repro")
    else:
        _dvc(project_dir, "repro")
    if push:
        _dvc(project_dir, "push")
    return data_versions(project_dir)


def check_project(project_dir: str | Path) -> None:
    """A project the data stages can run in: its dvc.yaml, and a DVC repository (`.dvc/`) to version with."""
    project_dir = Path(project_dir)
    if not (project_dir / "dvc.yaml").is_file():
        raise LlmpressError(f"{project_dir} has no dvc.yaml: run from the project folder or pass --project")
    if not (project_dir / ".dvc").is_dir():
        raise LlmpressError(f"{project_dir} is not a DVC repository (no .dvc/): run `dvc init` there (with `--no-scm` "
                            "outside git) and `dvc remote add -d NAME URL` for where data versions go")  # fmt: skip


def use_remote_from_env(project_dir: str | Path) -> str | None:
    """With LLMPRESS_DVC_REMOTE set (an s3:// URL; `llmpress services` writes it), make it the checkout's default
    DVC remote `team` in `.dvc/config.local` (not committed), with AWS_ENDPOINT_URL as its endpoint."""
    url = os.environ.get("LLMPRESS_DVC_REMOTE")
    if not url:
        return None
    project_dir = Path(project_dir)
    _dvc(project_dir, "remote", "add", "--local", "--force", "--default", "team", url)
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and url.startswith("s3://"):
        _dvc(project_dir, "remote", "modify", "--local", "team", "endpointurl", endpoint)
    return url


def _dvc(project_dir: Path, *args: str) -> str:
    # dvc.yaml stages call `python -m llmpress.data`: make that the interpreter running us.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.setdefault("DVC_NO_ANALYTICS", "1")  # its daemon would phone home and leave a file in the temp folder
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project_dir, env=env, capture_output=True,
                            text=True)  # fmt: skip
    output = (result.stdout + result.stderr).strip()
    for line in output.splitlines():
        log.info("dvc %s: %s", args[0], line)
    if result.returncode != 0:
        raise LlmpressError(f"`dvc {' '.join(args)}` failed in {project_dir}:\n{output[-2000:]}")
    return output


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

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True, check=True).stdout

    try:
        sha = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha
