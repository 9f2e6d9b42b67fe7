"""The data sets pushed to an S3 DVC remote on a real S3-compatible server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmpress.versioning import reproduce
from tests.s3server import seaweedfs

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_reproduce_pushes_every_data_set_to_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "dvc.yaml", project)
    shutil.copy(REPO / "params.yaml", project)
    (project / "llmpress").symlink_to(REPO / "llmpress")
    with seaweedfs(tmp_path / "seaweedfs") as s3:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        s3.client().create_bucket(Bucket="dvc")
        for args in (["init", "--no-scm"], ["remote", "add", "-d", "team", "s3://dvc/llmpress"],
                     ["remote", "modify", "team", "endpointurl", s3.endpoint]):  # fmt: skip
            subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, check=True, capture_output=True)

        versions = reproduce(project)

        lock = yaml.safe_load((project / "dvc.lock").read_text())
        assert versions["data/eval.txt"] == next(
            o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/eval.txt"
        )
        keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="dvc", Prefix="llmpress/").get("Contents", [])}
        for path in ("data/calibration.jsonl", "data/eval.txt"):
            md5 = versions[path]
            assert f"llmpress/files/md5/{md5[:2]}/{md5[2:]}" in keys, f"{path} ({md5}) not in the S3 remote"
        # Same data, same versions: a second run changes nothing and pushes nothing new.
        assert reproduce(project) == versions
        # The credentials never land in the project's DVC config (they came from the environment).
        assert s3.secret_key not in (project / ".dvc" / "config").read_text()
