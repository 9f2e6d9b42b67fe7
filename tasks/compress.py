"""Compression task: runs on a GPU worker when one is there (tag `gpu`); never retried blindly; cached by content."""

from __future__ import annotations

from prefect import task

from llmpress import steps
from llmpress.config import CompressParams, DataParams, EvalParams
from tasks.cache import CACHED


# The only tagged task: a tag costs a concurrency-lease round trip to the API at the start and end of every run of
# the task (~2 s each on a busy 2-core machine), so tags are kept for what uses them - `gpu`'s concurrency limit
# (flows/deploy.py).
@task(name="compress", tags=["gpu"], **CACHED)
def compress_model(model_path: str, recipe_path: str, calibration_path: str, out_dir: str, data: DataParams,
                   eval_params: EvalParams, params: CompressParams, lineage: dict, calibration_md5: str | None = None,
                   precision: str = "recipe", quantizer: str = "rtn", content_key: str | None = None
                   ) -> dict:  # fmt: skip
    return steps.compress(model_path, recipe_path, calibration_path, out_dir, data, eval_params, params, lineage,
                          calibration_md5, precision, quantizer)  # fmt: skip
