"""What each step is given: one frozen, typed object per step. A Prefect task passes its job through whole (its
fields, with the content key, are the task's cache key); a test or a notebook builds one and calls the step.
Paths are strings, so a job crosses processes and machines as JSON."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from llmpress.config import CompressParams, DataParams, EvalParams, ExportParams, SpeedParams


class Job(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataFile(Job):
    """A versioned data set: its path, and the DVC md5 it must still have (None: not checked)."""

    path: str
    md5: str | None = None


class BaselineRef(Job):
    """The base model's evaluation on disk (what `steps.baseline` returns) and the key it was made under."""

    path: str
    key: str


class ModelJob(Job):
    """A step on the model folder at `model_path`."""

    model_path: str


class ComparedJob(ModelJob):
    """A step that measures the model against the base model at `base_path`."""

    base_path: str


class BaselineJob(Job):
    base_path: str
    base_sha256: str
    held_out: DataFile
    params: EvalParams
    baselines_dir: str


class CompressJob(ModelJob):
    """The recipe, followed by the quantization `precision` asks for (`config.export_recipe`), on `model_path`."""

    recipe_path: str
    calibration: DataFile
    out_dir: str
    data: DataParams
    add_bos: bool
    params: CompressParams
    lineage: dict[str, str]
    precision: str = "recipe"
    quantizer: str = "rtn"


class EvaluateJob(ComparedJob):
    """`layer_names`: the layers whose sparsity is measured. `bundle_follows`: the model is exported and its graph
    scored (`BundleJob`), so the measures that graph gives are not taken twice."""

    baseline: BaselineRef
    held_out: DataFile
    params: EvalParams
    layer_names: list[str] = []
    bundle_follows: bool = False


class ExportJob(ModelJob):
    """`template_dir`: where the traced graph of each architecture is kept and reused (`llmpress.export.template`)."""

    out_dir: str
    eval_path: str
    params: ExportParams
    template_dir: str | None = None


class GgufJob(ModelJob):
    """The GGUF written to `out_dir` and scored in llama.cpp on the held-out text at `eval_path`."""

    out_dir: str
    eval_path: str
    export: ExportParams
    params: EvalParams


class BundleJob(ComparedJob):
    onnx_path: str
    baseline: BaselineRef
    eval_path: str
    params: EvalParams
    export: ExportParams


class SpeedJob(ComparedJob):
    """`onnx_path`: the exported graph, served by onnxruntime; None: the compressed model runs in PyTorch."""

    eval_path: str
    params: SpeedParams
    onnx_path: str | None = None
