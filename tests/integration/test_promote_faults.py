"""Promotion under faults, against a real S3-compatible server (SeaweedFS on 127.0.0.1) and a real MLflow registry:
S3 failing mid-upload (once: the retry completes; always: the flow fails and nothing is promoted), S3 slow, and two
promotions of different versions at once. Afterwards `production` names exactly one version whose bundle is
complete in S3 and verifies file by file, or nothing at all.

The bundles are small (a 12 MiB graph file, uploaded in 5 MiB parts): what is under test is the upload, the
checks and the registry, for which the graph's bytes do not matter.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
from botocore.exceptions import EndpointConnectionError
from mlflow import MlflowClient

from llmpress import promote as promote_lib
from llmpress.bundle import build_bundle, verify_bundle
from llmpress.tracking import alias_version
from tests.s3server import seaweedfs

pytestmark = pytest.mark.integration
MODEL = "faulty-edge"
PARAMS = str(Path(__file__).resolve().parents[2] / "params.yaml")


def _bundle(root: Path, seed: int) -> Path:
    onnx_dir, tok = root / f"onnx{seed}", root / f"tok{seed}"
    onnx_dir.mkdir(parents=True)
    tok.mkdir()
    (onnx_dir / "model.onnx").write_bytes(os.urandom(12 * 2**20))
    (tok / "tokenizer.json").write_text(json.dumps({"version": "1.0", "seed": seed}))
    return build_bundle(root / f"bundle{seed}", onnx_dir, tok, precision="fp32", opset=18)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[MlflowClient, str, dict[str, str]]:
    """Two versions of MODEL, each from a run that logged a bundle, both gate-passed and approved; the promote
    flow finds this registry through MLFLOW_TRACKING_URI, and retries its tasks after 0.2 s instead of 2-30 s."""
    import tasks.promote

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for task in (tasks.promote.check_version, tasks.promote.publish_bundle, tasks.promote.move_production):
        monkeypatch.setattr(task, "retry_delay_seconds", [0.2, 0.2, 0.2])
    c = MlflowClient(uri)
    experiment = c.create_experiment("faults", artifact_location=(tmp_path / "artifacts").as_uri())
    c.create_registered_model(MODEL)
    versions = {}
    for seed in (1, 2):
        run = c.create_run(experiment).info.run_id
        c.log_artifacts(run, str(_bundle(tmp_path, seed)), "bundle")
        v = c.create_model_version(MODEL, f"runs:/{run}/bundle", run_id=run).version
        for key, value in {"gate.passed": "true", "review.approved": "true", "review.approved_by": "r@x"}.items():
            c.set_model_version_tag(MODEL, v, key, value)
        versions[str(seed)] = str(v)
    return c, uri, versions


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with seaweedfs(tmp_path / "seaweedfs") as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        server.client().create_bucket(Bucket="edge")
        monkeypatch.setattr(promote_lib, "MULTIPART_THRESHOLD", 5 * 2**20)
        yield server


def _inject(monkeypatch: pytest.MonkeyPatch, operation: str, fail_calls: set[int] | None = None,
            delay: float = 0.0) -> dict[str, int]:  # fmt: skip
    """Every S3 client the promotion makes raises a connection error on the given calls of `operation` (counted
    across clients, 1-based) and/or waits `delay` s before each such call."""
    calls = {"n": 0}
    make = promote_lib.s3_client

    lock = threading.Lock()

    def hook(**_: object) -> None:
        with lock:  # parts go up from several threads
            calls["n"] += 1
            n = calls["n"]
        time.sleep(delay)
        if fail_calls is not None and (not fail_calls or n in fail_calls):
            raise EndpointConnectionError(endpoint_url="injected fault")

    def client():
        c = make()
        c.meta.events.register(f"before-call.s3.{operation}", hook)
        return c

    monkeypatch.setattr(promote_lib, "s3_client", client)
    return calls


def _published_ok(s3, uri: str) -> dict:
    """Download what S3 holds under `uri` and verify it as a bundle."""
    bucket, prefix = promote_lib.parse_s3_uri(uri.rstrip("/"))
    local = Path(tempfile.mkdtemp(prefix="from-s3-"))
    for obj in s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", []):
        target = local / obj["Key"].removeprefix(prefix + "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.client().download_file(bucket, obj["Key"], str(target))
    return verify_bundle(local)


def test_s3_failing_once_mid_upload_is_retried_to_a_verified_bundle(registry, s3, monkeypatch) -> None:
    from flows.promote import promote

    c, _, versions = registry
    calls = _inject(monkeypatch, "UploadPart", fail_calls={2})  # the graph's second part, first attempt
    record = promote(MODEL, versions["1"], s3_prefix="s3://edge/rel", params_file=PARAMS)
    assert calls["n"] > 3  # the failed attempt and the complete retry
    assert alias_version(c, MODEL, "production") == versions["1"]
    assert _published_ok(s3, record["published"]["uri"])["format"]


def test_s3_failing_for_good_promotes_nothing(registry, s3, monkeypatch) -> None:
    from flows.promote import promote

    c, _, versions = registry
    _inject(monkeypatch, "PutObject", fail_calls=set())  # every single-part upload fails
    with pytest.raises(promote_lib.UploadError, match="injected fault"):
        promote(MODEL, versions["1"], s3_prefix="s3://edge/rel", params_file=PARAMS)
    assert alias_version(c, MODEL, "production") is None
    assert "bundle.s3_uri" not in c.get_model_version(MODEL, versions["1"]).tags
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="edge").get("Contents", [])]
    assert not any(k.endswith("manifest.json") for k in keys)  # no reader can take it for a complete bundle


def test_slow_s3_still_ends_verified(registry, s3, monkeypatch, tmp_path) -> None:
    c, _, versions = registry
    calls = _inject(monkeypatch, "UploadPart", delay=1.0)
    folder = Path(c.download_artifacts(c.get_model_version(MODEL, versions["2"]).run_id, "bundle", str(tmp_path)))
    published = promote_lib.publish_bundle(folder, "s3://edge/slow/")
    assert calls["n"] >= 3 and published.uploaded == len(verify_bundle(folder)["files"]) + 1
    assert _published_ok(s3, published.uri)


def test_two_promotions_at_once_leave_one_verified_production(registry, s3, tmp_path) -> None:
    """Both versions published and promoted concurrently, as two flow runs would: whichever moves the alias last
    wins, and it is a version whose bundle is complete and verified in S3."""
    c, _, versions = registry
    errors: list[BaseException] = []

    def promote_one(version: str) -> None:
        try:
            run_id = c.get_model_version(MODEL, version).run_id
            folder = Path(c.download_artifacts(run_id, "bundle", str(tmp_path / f"dl{version}")))
            uri = promote_lib.bundle_uri("s3://edge/prod", MODEL, version)
            published = promote_lib.publish_bundle(folder, uri)
            promote_lib.move_production(c, MODEL, version, published)
        except BaseException as exc:
            errors.append(exc)

    (tmp_path / "dl1").mkdir()
    (tmp_path / "dl2").mkdir()
    threads = [threading.Thread(target=promote_one, args=(v,)) for v in versions.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    production = alias_version(c, MODEL, "production")
    assert production in versions.values()
    tags = c.get_model_version(MODEL, production).tags
    manifest = _published_ok(s3, tags["bundle.s3_uri"])
    assert {f["path"] for f in manifest["files"]} >= {"model.onnx", "tokenizer.json"}
