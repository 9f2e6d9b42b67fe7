"""Model tasks: resolve a model source to a local safetensors folder with a content hash."""

from __future__ import annotations

from prefect import task

from llmpress import sources
from tasks import transient


@task(name="resolve-model", retries=1, retry_delay_seconds=5, retry_condition_fn=transient)
def resolve_model(source: str, models_dir: str) -> dict:
    return sources.resolve(source, models_dir).to_dict()
