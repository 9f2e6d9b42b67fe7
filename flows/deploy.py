"""`llmpress deploy` and `llmpress worker`: put prefect.yaml's deployments on a Prefect server, and serve a pool.

deploy, against the server in PREFECT_API_URL (`llmpress services up` then `source .services/env.sh`):
    1. records the code to run: Prefect variables `llmpress_git_url` (origin's URL, else this checkout's path) and
       `llmpress_git_commit` (HEAD), read by prefect.yaml's pull steps; uncommitted edits are not deployed (said so);
    2. creates the work pools `gpu` and `cpu` if missing (process pools here; `--pool-type kubernetes` with
       infra/k8s/gpu-job-template.json for a cluster), with `gpu`'s concurrency = GPUs per worker;
    3. sets the tag concurrency limit `gpu` (the compress task's tag) to the same number;
    4. runs `prefect deploy --all` on prefect.yaml.
worker: creates $LLMPRESS_WORKER_DIR (the checkout's home on this machine) and runs `prefect worker start --pool`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from llmpress.errors import LlmpressError

POOLS = ("gpu", "cpu")
GPU_TAG = "gpu"


def _git(project: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    if result.returncode != 0:
        raise LlmpressError(f"`git {' '.join(args)}` failed in {project}: {result.stderr.strip()}")
    return result.stdout.strip()


def code_location(project: Path, git_url: str | None = None) -> tuple[str, str, bool]:
    """(repository URL, HEAD commit, whether tracked files have uncommitted changes)."""
    commit = _git(project, "rev-parse", "HEAD")
    if git_url is None:
        try:
            git_url = _git(project, "remote", "get-url", "origin")
        except LlmpressError:
            git_url = str(project.resolve())
    dirty = bool(_git(project, "status", "--porcelain", "--untracked-files=no"))
    return git_url, commit, dirty


def gpus_here() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:
        return 1


def deploy(project_dir: str | Path = ".", gpus: int | None = None, git_url: str | None = None,
           pool_type: str = "process", log=print) -> list[dict[str, Any]]:  # fmt: skip
    """Steps 1-4 above; returns the deployments now on the server (name, pool, schedules)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL
    from prefect.variables import Variable

    project = Path(project_dir).resolve()
    if not (project / "prefect.yaml").is_file():
        raise LlmpressError(f"{project} has no prefect.yaml")
    if not PREFECT_API_URL.value():
        raise LlmpressError("no Prefect server: set PREFECT_API_URL (`llmpress services up`, then "
                            "`source .services/env.sh`), or point it at the team's server")  # fmt: skip
    if pool_type not in ("process", "kubernetes"):
        raise LlmpressError(f"--pool-type {pool_type!r}: choose process or kubernetes")
    gpus = gpus or gpus_here()
    if gpus < 1:
        raise LlmpressError(f"--gpus {gpus}: a gpu worker has at least 1 GPU")
    url, commit, dirty = code_location(project, git_url)
    if dirty:
        log(f"warning: uncommitted changes are not deployed; workers run commit {commit[:12]}")
    Variable.set("llmpress_git_url", url, overwrite=True)
    Variable.set("llmpress_git_commit", commit, overwrite=True)
    log(f"code: {url} at {commit[:12]}")

    template = None
    if pool_type == "kubernetes":
        template = json.loads((project / "infra" / "k8s" / "gpu-job-template.json").read_text())
    with get_client(sync_client=True) as client:
        for pool in POOLS:
            limit = gpus if pool == "gpu" else None
            try:
                client.read_work_pool(pool)
                client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=limit))
                log(f"work pool {pool}: exists; concurrency {limit or 'unlimited'}")
            except ObjectNotFound:
                create = {"name": pool, "type": pool_type, "concurrency_limit": limit}
                if template is not None and pool == "gpu":
                    create["base_job_template"] = template
                client.create_work_pool(WorkPoolCreate(**create))
                log(f"work pool {pool}: created ({pool_type}); concurrency {limit or 'unlimited'}")
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=gpus)
        log(f"tag concurrency limit {GPU_TAG!r}: {gpus} (tasks tagged {GPU_TAG!r} never share a GPU)")

    env = os.environ | {"PREFECT_CLI_PROMPT": "false"}
    prefect = str(Path(sys.executable).parent / "prefect")
    result = subprocess.run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "prefect.yaml"], cwd=project,
                            capture_output=True, text=True, env=env)  # fmt: skip
    if result.returncode != 0:
        raise LlmpressError(f"`prefect deploy --all` failed:\n{(result.stdout + result.stderr)[-3000:]}")
    with get_client(sync_client=True) as client:
        deployments = client.read_deployments()
        flows = {f.id: f.name for f in client.read_flows()}
    out = [{"name": f"{flows.get(d.flow_id, '?')}/{d.name}", "pool": d.work_pool_name,
            "schedules": [getattr(s.schedule, "cron", None) for s in d.schedules]} for d in deployments]  # fmt: skip
    for d in out:
        log(f"deployment {d['name']} on pool {d['pool']}" + (f", cron {d['schedules']}" if any(d["schedules"]) else ""))
    return out


def worker_command(pool: str) -> tuple[list[str], dict[str, str]]:
    """The `prefect worker start` command line and environment for a worker on `pool` on this machine."""
    if pool not in POOLS:
        raise LlmpressError(f"pool {pool!r}: choose one of {list(POOLS)}")
    if not os.environ.get("PREFECT_API_URL"):
        raise LlmpressError("no Prefect server: set PREFECT_API_URL (source .services/env.sh)")
    work_dir = Path(os.environ.get("LLMPRESS_WORKER_DIR") or Path.cwd() / ".services" / "worker").resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    prefect = str(Path(sys.executable).parent / "prefect")
    env = os.environ | {"LLMPRESS_WORKER_DIR": str(work_dir)}
    # Flow runs start `python -m prefect.engine` from PATH: make it this environment's interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return [prefect, "worker", "start", "--pool", pool, "--type", "process"], env
