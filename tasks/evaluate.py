"""Evaluation tasks: perplexity, sparsity and size of a model folder; ONNX export with a parity check; the
exported graph scored on its own in onnxruntime (the bundle); speed.
Each is cached by content (tasks/cache.py)."""

from __future__ import annotations

from prefect import task

from llmpress import steps
from llmpress.config import EvalParams, ExportParams, SpeedParams
from tasks.cache import CACHED


@task(name="baseline")
def evaluate_base(base_path: str, eval_path: str, params: EvalParams, baselines_dir: str, base_sha256: str,
                  eval_md5: str | None = None) -> dict:  # fmt: skip
    """Not cached by Prefect: the baseline folder is its own cache, keyed by what it is a function of."""
    return steps.baseline(base_path, eval_path, params, baselines_dir, base_sha256, eval_md5)


@task(name="evaluate", **CACHED)
def evaluate_model(model_path: str, base_path: str, baseline_dir: str, baseline_key: str, eval_path: str,
                   params: EvalParams, layer_names: list[str] | None = None, eval_md5: str | None = None,
                   bundle_follows: bool = False, content_key: str | None = None) -> dict:  # fmt: skip
    return steps.evaluate(model_path, base_path, baseline_dir, baseline_key, eval_path, params, layer_names, eval_md5,
                          bundle_follows)  # fmt: skip


@task(name="export-onnx", **CACHED)
def export_model(model_path: str, out_dir: str, eval_path: str, params: ExportParams,
                 template_dir: str | None = None, content_key: str | None = None) -> dict:  # fmt: skip
    return steps.export(model_path, out_dir, eval_path, params, template_dir)


@task(name="evaluate-bundle", **CACHED)
def evaluate_bundle(onnx_path: str, model_path: str, base_path: str, baseline_dir: str, baseline_key: str,
                    eval_path: str, params: EvalParams, export_params: ExportParams,
                    content_key: str | None = None) -> dict:  # fmt: skip
    return steps.evaluate_bundle(onnx_path, model_path, base_path, baseline_dir, baseline_key, eval_path, params,
                                 export_params)  # fmt: skip


@task(name="measure-speed", **CACHED)
def measure_speed(model_path: str, base_path: str, eval_path: str, params: SpeedParams,
                  onnx_path: str | None = None, content_key: str | None = None) -> dict:  # fmt: skip
    return steps.speed(model_path, base_path, eval_path, params, onnx_path)
