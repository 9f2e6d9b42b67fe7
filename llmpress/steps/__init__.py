"""The pipeline's steps as plain functions, each given one typed job (`jobs`: paths, settings, versions) and
returning a small dict; what Prefect tasks wrap, one each.

No step takes or returns a tensor or a model: a step loads what it needs from disk and writes what it makes to
disk, so each can run in another process, on another machine, or be skipped when its result is cached. One module
per step: `compression`, `evaluation` (baseline, evaluation, the bundle's, speed), `exporting` (graph, engine, bundle),
`plots`, and what they share in `common`.
"""

from .common import check_data_version, folder_bytes, measure_sparsity, peak_memory
from .compression import METADATA, compress, dequantize, pick_device, recipe_info, save_model, to_gguf
from .evaluation import baseline, evaluate, evaluate_bundle, speed
from .exporting import edge_bundle, export, gguf, tensorrt_engine
from .jobs import BaselineJob, BaselineRef, BundleJob, CompressJob, DataFile, EvaluateJob, ExportJob, GgufJob, SpeedJob
from .plots import plot_cost, plot_expert_tokens, plot_sparsity

__all__ = ["METADATA", "BaselineJob", "BaselineRef", "BundleJob", "CompressJob", "DataFile", "EvaluateJob",
           "ExportJob", "GgufJob", "SpeedJob", "baseline", "check_data_version", "compress", "dequantize",
           "edge_bundle", "evaluate", "evaluate_bundle", "export", "folder_bytes", "gguf", "measure_sparsity",
           "peak_memory", "pick_device", "plot_cost", "plot_expert_tokens", "plot_sparsity", "recipe_info",
           "save_model", "speed", "tensorrt_engine", "to_gguf"]  # fmt: skip
