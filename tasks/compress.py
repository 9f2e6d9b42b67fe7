"""Compression task: runs on a GPU worker when one is there (tag `gpu`); never retried blindly; cached by content."""

from __future__ import annotations

from prefect import task

from llmpress import steps
from tasks.cache import CACHED


# The only tagged task: a tag costs a concurrency-lease round trip to the API at the start and end of every run of
# the task (~2 s each on a busy 2-core machine), so tags are kept for what uses them - `gpu`'s concurrency limit
# (flows/deploy.py).
@task(name="compress", tags=["gpu"], **CACHED)
def compress_model(job: steps.CompressJob, content_key: str | None = None) -> dict:
    return steps.compress(job)
