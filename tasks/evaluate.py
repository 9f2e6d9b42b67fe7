"""Evaluation tasks: perplexity, sparsity and size of a model folder; ONNX export with a parity check; the
exported graph scored on its own in onnxruntime (the bundle); speed.
Each is cached by content (tasks/cache.py)."""

from __future__ import annotations

from prefect import task

from llmpress import steps
from tasks.cache import CACHED


@task(name="baseline")
def evaluate_base(job: steps.BaselineJob) -> dict:
    """Not cached by Prefect: the baseline folder is its own cache, keyed by what it is a function of."""
    return steps.baseline(job)


@task(name="evaluate", **CACHED)
def evaluate_model(job: steps.EvaluateJob, content_key: str | None = None) -> dict:
    return steps.evaluate(job)


@task(name="export-onnx", **CACHED)
def export_model(job: steps.ExportJob, content_key: str | None = None) -> dict:
    return steps.export(job)


@task(name="export-gguf", **CACHED)
def export_gguf(job: steps.GgufJob, content_key: str | None = None) -> dict:
    return steps.gguf(job)


@task(name="evaluate-bundle", **CACHED)
def evaluate_bundle(job: steps.BundleJob, content_key: str | None = None) -> dict:
    return steps.evaluate_bundle(job)


@task(name="measure-speed", **CACHED)
def measure_speed(job: steps.SpeedJob, content_key: str | None = None) -> dict:
    return steps.speed(job)
