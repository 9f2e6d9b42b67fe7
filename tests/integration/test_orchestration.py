"""The team setup for real, on 127.0.0.1: `llmpress services` (SeaweedFS, MLflow with S3 artifacts, Prefect server),
`llmpress deploy`, and a process worker on the `gpu` pool running `compress-nightly` from a git checkout.

One module-scoped scenario, asserted step by step:
  1. a triggered run of compress-nightly goes through the worker; the MLflow server is killed while the compress
     task runs and restarted only once a logging task is waiting to retry: the run finishes on that retry, with
     exactly one registered version and its artifacts in S3;
  2. the same run again: every compute task comes from the cache and nothing new is registered.
Short evaluation settings (as deployment-run parameters) keep it to a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from llmpress import services
from llmpress.sources import SHIPPED_NAME

REPO = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-edge"
pytestmark = pytest.mark.integration

# compress-nightly with Wanda 50 % (long enough a compression for the outage to hit it) and params.yaml's
# calibration set; shorter evaluation, no export.
OVERRIDES = {"recipe": "recipes/wanda-50.yaml", "eval.max_tokens": 2048, "eval.speed.enabled": False,
             "export.formats": [], "eval.cloze.max_examples": 20, "eval.generation.max_new_tokens": 8,
             "tracking.experiment": "orchestration"}  # fmt: skip


def _prefect(env: dict[str, str]):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class Session:
        def __enter__(self):
            self.settings = temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]})
            self.settings.__enter__()
            self.client = get_client(sync_client=True)
            return self.client.__enter__()

        def __exit__(self, *exc):
            self.client.__exit__(*exc)
            self.settings.__exit__(*exc)

    return Session()


def _task_runs(env: dict[str, str], flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _prefect(env) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _trigger(env: dict[str, str], name: str = "compress/compress-nightly", **parameters):
    with _prefect(env) as client:
        deployment = client.read_deployment_by_name(name)
        return client.create_flow_run_from_deployment(deployment.id, parameters={"overrides": OVERRIDES} | parameters)


def _wait(env: dict[str, str], flow_run_id, timeout: float = 1200, on_poll=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with _prefect(env) as client:
            run = client.read_flow_run(flow_run_id)
        if run.state and run.state.is_final():
            return run
        if on_poll:
            on_poll()
        time.sleep(2)
    pytest.fail(f"flow run {flow_run_id} did not finish in {timeout}s")


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("team")
    state = services.up(root / "services", {"s3": 0, "mlflow": 0, "prefect": 0}, log=lambda _: None)
    env = os.environ | state.env() | {
        "LLMPRESS_WORKER_DIR": str(root / "worker"),
        "PREFECT_LOCAL_STORAGE_PATH": str(root / "results"),  # persisted task results: the cache
        # one HTTP attempt per MLflow call, so an outage is seen by the task (and retried by Prefect)
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    }  # fmt: skip
    workers: list[subprocess.Popen] = []
    try:
        # The data sets DVC versioned in this checkout, pushed to the team remote as `dvc push` lays them out.
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=state.access_key,
                          aws_secret_access_key=state.secret_key, region_name="us-east-1")  # fmt: skip
        for path in (REPO / ".dvcstore").rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), "dvc", f"llmpress/{path.relative_to(REPO / '.dvcstore').as_posix()}")
        # A warm worker: its checkout already cloned, with the converted model (what its first run would leave).
        checkout = root / "worker" / "llmpress-checkout"
        subprocess.run(["git", "clone", "-q", str(REPO), str(checkout)], check=True)
        (checkout / "models" / SHIPPED_NAME).symlink_to(REPO / "models" / SHIPPED_NAME)

        command = ["deploy", "--gpus", "1", "--git-url", str(REPO)]
        deploy = subprocess.run([sys.executable, "-m", "flows.cli", "--project", str(REPO), *command], env=env,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert deploy.returncode == 0, deploy.stderr + deploy.stdout
        # The workers' environment has no S3 keys: their flow runs take them from a Prefect Secret block.
        keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        with _prefect(env):
            from prefect.blocks.system import Secret

            Secret(value={k: env[k] for k in keys}).save("llmpress-credentials", overwrite=True)
        worker_env = {k: v for k, v in env.items() if k not in keys} | {"PREFECT_WORKER_QUERY_SECONDS": "2"}
        for pool in ("gpu", "cpu"):
            log = open(root / f"worker-{pool}.log", "wb")  # noqa: SIM115 - the worker's life
            command = [sys.executable, "-m", "flows.cli", "worker", pool]
            workers.append(subprocess.Popen(command, env=worker_env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=root))  # fmt: skip
        yield {"root": root, "state": state, "env": env, "deploy": deploy.stdout, "s3": s3}
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGINT)  # a Prefect worker stops on SIGINT
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        for service in state.services.values():  # includes the MLflow server restarted by the outage test
            services.stop(service)
        services.down(root / "services", log=lambda _: None)
        shutil.copytree(root / "services" / "logs", REPO / "test-artifacts" / "orchestration-logs", dirs_exist_ok=True)


@pytest.fixture(scope="module")
def first_run(team: dict) -> dict:
    """Run 1, with the MLflow server killed during compression and restarted once a task waits to retry."""
    env, state, root = team["env"], team["state"], team["root"]
    mlflow_service = state.services["mlflow"]
    events: dict[str, float] = {}
    start = time.monotonic()
    flow_run = _trigger(env)

    def chaos() -> None:
        runs = _task_runs(env, flow_run.id)
        if "killed" not in events and any(r.name.startswith("compress") and r.state_name == "Running" for r in runs):
            services.stop(mlflow_service)
            events["killed"] = time.monotonic() - start
        elif (
            "killed" in events
            and "restarted" not in events
            and any(r.state_name in ("AwaitingRetry", "Retrying") for r in runs)
        ):
            restarted = services.start_mlflow(root / "services", mlflow_service.port, state.services["s3"],
                                              state.access_key, state.secret_key)  # fmt: skip
            state.services["mlflow"] = restarted
            events["restarted"] = time.monotonic() - start

    run = _wait(env, flow_run.id, on_poll=chaos)
    return {"run": run, "events": events, "seconds": time.monotonic() - start, "tasks": _task_runs(env, flow_run.id)}


def test_deploy_created_pools_limits_and_deployments(team: dict) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate

    with _prefect(team["env"]) as client:
        names = {d.name for d in client.read_deployments()}
        assert names == {"compress-nightly", "compress", "sweep", "promote"}
        nightly = client.read_deployment_by_name("compress/compress-nightly")
        assert nightly.work_pool_name == "gpu" and nightly.schedules[0].schedule.cron == "0 2 * * *"
        assert client.read_work_pool("gpu").concurrency_limit == 1
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1
        assert client.read_variable_by_name("llmpress_git_url").value == str(REPO)
        # The Kubernetes GPU template is accepted by a real server as a work pool's base job template.
        template = json.loads((REPO / "infra" / "k8s" / "gpu-job-template.json").read_text())
        pool = client.create_work_pool(WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=template))
        assert "gpu_count" in pool.base_job_template["variables"]["properties"]


def test_run_survives_mlflow_outage_with_one_version(team: dict, first_run: dict) -> None:
    run, events = first_run["run"], first_run["events"]
    log = (team["root"] / "worker-gpu.log").read_text(errors="replace")
    assert run.state.is_completed(), f"{run.state}: {log[-3000:]}"
    assert "killed" in events and "restarted" in events, f"the outage did not happen as planned: {events}"
    assert "credentials from Prefect Secret block llmpress-credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in log
    assert "dvc repro --pull failed" not in log  # the data came from the team remote, with the block's keys
    retried = [t for t in first_run["tasks"] if t.run_count > 1]
    assert retried, "no task was retried: the outage was not seen"
    c = MlflowClient(team["env"]["MLFLOW_TRACKING_URI"])
    versions = c.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 1
    version = versions[0]
    assert version.tags["gate.passed"] in ("true", "false") and version.tags["run_key"]
    # the run's artifacts are in S3, under the MLflow artifact bucket, through the tracking server
    keys = [o["Key"] for o in team["s3"].list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
    assert any(version.run_id in k and k.endswith("summary.json") for k in keys), keys[:20]
    summary = json.loads(Path(c.download_artifacts(version.run_id, "summary.json", str(team["root"]))).read_text())
    assert 15 < summary["base"]["perplexity"] < 60 and summary["compressed"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_identical_rerun_is_cached_and_registers_nothing(team: dict, first_run: dict) -> None:
    env = team["env"]
    start = time.monotonic()
    flow_run = _trigger(env)
    run = _wait(env, flow_run.id)
    seconds = time.monotonic() - start
    assert run.state.is_completed(), run.state
    states = {t.name.rsplit("-", 1)[0]: t.state_name for t in _task_runs(env, flow_run.id)}
    assert states["compress"] == "Cached" and states["evaluate"] == "Cached", states
    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert len(c.search_model_versions(f"name = '{MODEL}'")) == 1
    reruns = c.search_runs([c.get_experiment_by_name("orchestration").experiment_id],
                           "tags.reused_version = 'true'")  # fmt: skip
    assert len(reruns) == 1
    timings = {"first_run_s": round(first_run["seconds"], 1), "rerun_s": round(seconds, 1),
               "outage": {k: round(v, 1) for k, v in first_run["events"].items()}}  # fmt: skip
    out = REPO / "test-artifacts" / "orchestration.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(timings, indent=2))
    print(f"orchestration timings: {timings}")


def test_sweep_fans_out_to_the_gpu_pool_and_plots_the_pareto_front(team: dict, first_run: dict) -> None:
    """Two recipes through the `sweep` deployment (cpu pool) as `compress/compress` runs on the gpu pool: Wanda 50 %
    (identical to run 1: served from the cache) and magnitude 50 % (same bytes, far higher perplexity)."""
    env = team["env"]
    recipes = ["recipes/wanda-50.yaml", "recipes/magnitude-50.yaml"]
    flow_run = _trigger(env, "sweep/sweep", recipes=recipes, deployment="compress/compress")
    run = _wait(env, flow_run.id)
    log = (team["root"] / "worker-cpu.log").read_text(errors="replace")
    assert run.state.is_completed(), f"{run.state}: {log[-3000:]}"
    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = c.get_experiment_by_name("orchestration").experiment_id
    (parent,) = c.search_runs([experiment], "tags.sweep = 'true'")
    children = c.search_runs([experiment], f"tags.`sweep.parent` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["recipe"] for r in children) == ["magnitude-50", "wanda-50"]
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {"sweep.md", "sweep.json", "plots"}
    assert [a.path for a in c.list_artifacts(parent.info.run_id, "plots")] == ["plots/pareto.png"]
    result = json.loads(Path(c.download_artifacts(parent.info.run_id, "sweep.json", str(team["root"]))).read_text())
    points = {p["label"].split(" / ")[1]: p for p in result["points"]}
    assert set(points) == {"wanda-50", "magnitude-50"} and not result["failed"]
    assert points["wanda-50"]["on_front"] and not points["magnitude-50"]["on_front"]
    assert points["magnitude-50"]["perplexity"] > 3 * points["wanda-50"]["perplexity"]
    assert points["magnitude-50"]["gate_passed"] is False  # 16x dense, over the 2.5x bar
    assert parent.data.metrics["pareto_points"] == 1
