"""The team-setup files that cannot run here, checked against what would read them: prefect.yaml against the flows
it names and Prefect's own schemas, the Kubernetes base job template against Prefect's work-pool validation, and
infra/docker-compose.yml against the Compose specification's JSON schema (from the docker-compose wheel on PyPI)."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def test_prefect_yaml_deployments_match_their_flows() -> None:
    from prefect import Flow
    from prefect.client.schemas.schedules import CronSchedule

    from flows.deploy import POOLS

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"compress-nightly", "compress", "sweep", "promote"}
    for name, d in deployments.items():
        path, func = d["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        assert isinstance(flow, Flow), f"{name}: {d['entrypoint']} is not a Prefect flow"
        flow.validate_parameters(d.get("parameters") or {})  # raises on unknown or ill-typed parameters
        assert d["work_pool"]["name"] in POOLS
    assert deployments["compress-nightly"]["work_pool"]["name"] == "gpu"
    assert deployments["compress"]["work_pool"]["name"] == "gpu"
    assert {deployments[n]["work_pool"]["name"] for n in ("sweep", "promote")} == {"cpu"}
    (schedule,) = deployments["compress-nightly"]["schedules"]
    assert CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"]).cron == "0 2 * * *"
    # the sweep's default fan-out target is a deployment defined here
    flow_name, dep_name = deployments["sweep"]["parameters"]["deployment"].split("/")
    assert flow_name == "compress" and dep_name in deployments
    for recipe in deployments["sweep"]["parameters"]["recipes"]:
        assert (REPO / recipe).is_file(), recipe


def test_pull_steps_read_what_deploy_records() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    steps = [next(iter(step.items())) for step in spec["pull"]]
    assert [s[0].rsplit(".", 1)[-1] for s in steps] == ["set_working_directory", "git_clone", "set_working_directory"]
    clone = steps[1][1]
    assert clone["repository"] == "{{ prefect.variables.llmpress_git_url }}"
    assert clone["commit_sha"] == "{{ prefect.variables.llmpress_git_commit }}"  # the deployed commit, not a branch
    assert steps[0][1]["directory"] == "{{ $LLMPRESS_WORKER_DIR }}"
    assert steps[2][1]["directory"] == "{{ clone.directory }}"
    source = (REPO / "flows" / "deploy.py").read_text()
    assert 'Variable.set("llmpress_git_url"' in source and 'Variable.set("llmpress_git_commit"' in source


def test_kubernetes_gpu_job_template_is_a_valid_work_pool_template() -> None:
    import jsonschema
    from prefect.server.schemas.actions import WorkPoolCreate

    template = json.loads((REPO / "infra" / "k8s" / "gpu-job-template.json").read_text())
    WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=template)  # Prefect's server-side validation
    variables = template["variables"]
    jsonschema.Draft202012Validator.check_schema(variables)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.validate(defaults, variables)
    manifest = template["job_configuration"]["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert defaults["env"]["LLMPRESS_WORKER_DIR"] == "/work"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/dev/shm", "/work"}
    # every placeholder in the job configuration is a declared variable
    used = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used <= set(variables["properties"]), used - set(variables["properties"])


@pytest.fixture(scope="module")
def compose_schema(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The Compose specification's JSON schema, as shipped in the docker-compose 1.29.2 wheel on PyPI."""
    folder = tmp_path_factory.mktemp("compose")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "docker-compose==1.29.2",
                             "-d", str(folder)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, f"could not fetch the docker-compose wheel from the registry: {result.stderr}"
    (wheel,) = folder.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return json.loads(archive.read("compose/config/compose_spec.json"))


def test_docker_compose_file_follows_the_compose_spec(compose_schema: dict) -> None:
    import jsonschema

    compose = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    compose.pop("name")  # top-level `name` came to the spec after this schema; Compose v2 reads it
    jsonschema.validate(compose, compose_schema)
    services = compose["services"]
    assert {"postgres", "minio", "prefect", "mlflow", "worker"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(".") or source in compose["volumes"], f"{name}: volume {source} undeclared"
    assert "--app-name=basic-auth" in services["mlflow"]["command"]  # MLflow with authentication
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for path in ("mlflow.Dockerfile", "worker.Dockerfile", "postgres-init.sql", "mlflow-auth/basic_auth.ini"):
        assert (REPO / "infra" / path).is_file(), path


def test_compose_secrets_come_from_the_env_file_only() -> None:
    text = (REPO / "infra" / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+)(?::\?[^}]*)?\}", text))
    example = {line.split("=")[0] for line in (REPO / "infra" / "env.example").read_text().splitlines()
               if line and not line.startswith("#")}  # fmt: skip
    assert required <= example, f"variables missing from infra/env.example: {required - example}"
    assert "/infra/.env" in (REPO / ".gitignore").read_text().splitlines()
    compose = yaml.safe_load(text)
    secret = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY|USER")
    for name, service in compose["services"].items():  # every credential is a reference, never a literal value
        for key, value in (service.get("environment") or {}).items():
            if secret.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}|llmpress", str(value)), f"{name}: {key} is a literal"
