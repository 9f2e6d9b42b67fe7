"""The export steps: the ONNX graph with a KV cache, checked against PyTorch; the TensorRT engine where possible;
the GGUF for llama.cpp, scored in llama.cpp; the edge bundle a registered version ships as."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from llmpress.config import ExportParams
from llmpress.errors import LlmpressError
from llmpress.export.onnx import check_parity, export_onnx, torch_trajectory
from llmpress.files import atomic_folder
from llmpress.progress import phase
from llmpress.sources import load_model, load_tokenizer
from llmpress.steps.common import folder_bytes
from llmpress.steps.jobs import ExportJob, GgufJob

log = logging.getLogger(__name__)


def export(job: ExportJob) -> dict[str, Any]:
    """ONNX export (KV cache) and parity against PyTorch: prefill of the first `parity_tokens` held-out tokens, then
    `parity_decode_steps` greedy steps."""
    tokenizer = load_tokenizer(job.model_path)
    model = load_model(job.model_path)
    # The folder appears only once its graph was written, checked against PyTorch and set to its serving level: a
    # stopped or failed export leaves nothing a later step could take for a finished one.
    with atomic_folder(job.out_dir) as staging:
        path, record = _export_checked(model, tokenizer, staging, job.eval_path, job.params, job.template_dir)
    path = Path(job.out_dir) / path.name
    return record | {"onnx_path": str(path.resolve()), "onnx_bytes": folder_bytes(job.out_dir)}


def _export_checked(model: torch.nn.Module, tokenizer: Any, out_dir: Path, eval_path: str, params: ExportParams,
                    template_dir: str | None) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    import onnx

    from llmpress.export.packed import set_accuracy_level

    start = time.perf_counter()
    with phase("export: ONNX graph with KV cache"):
        path = export_onnx(model, out_dir, opset=params.opset, cache_dir=template_dir)
    seconds = time.perf_counter() - start
    ids = tokenizer(Path(eval_path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    ids = ids[: params.parity_tokens]
    if len(ids) < 2:
        raise LlmpressError("the held-out text is too short for the ONNX parity check")
    ids = torch.tensor([ids])
    with phase("export: parity with PyTorch in onnxruntime"):
        reference = torch_trajectory(model, ids, params.parity_decode_steps)  # PyTorch's side, for both checks
        parity = check_parity(model, path, ids, params.parity_decode_steps, reference=reference)
    # Parity above is on the exact weights (accuracy level 0: float32 on the de-quantized codes); the graph that
    # ships runs its quantized matmuls at the serving level, and is scored as it is by `evaluate_bundle`.
    graph = onnx.load(str(path), load_external_data=False)
    served = parity
    if params.accuracy_level != 0 and set_accuracy_level(graph, params.accuracy_level):
        onnx.save(graph, str(path))  # the graph file only; its weights file is untouched
        with phase("export: the shipped graph against PyTorch in onnxruntime"):
            # the model's noise floor and its trajectory were measured just above
            served = check_parity(model, path, ids, params.parity_decode_steps, noise=False, reference=reference)
    return path, {
        "tensorrt": tensorrt_engine(path, out_dir),
        "export_seconds": seconds,
        "onnx_max_abs_diff": parity.max_abs_diff,
        "onnx_mean_abs_diff": parity.mean_abs_diff,
        "onnx_noise_max_abs_diff": parity.noise_max_abs_diff,
        "onnx_noise_mean_abs_diff": parity.noise_mean_abs_diff,
        "onnx_argmax_agreement": parity.argmax_agreement,
        "onnx_decode_steps": parity.decode_steps,
        "onnx_greedy_identical": float(parity.greedy_identical),
        # the graph as it ships (quantized matmuls at the serving accuracy level) against the PyTorch model
        "bundle_max_abs_diff": served.max_abs_diff,
        "bundle_mean_abs_diff": served.mean_abs_diff,
        "bundle_greedy_identical": float(served.greedy_identical),
        "opset": params.opset,
    }


def gguf(job: GgufJob) -> dict[str, Any]:
    """The compressed model as one GGUF file (`llmpress.export.gguf`), then scored in llama.cpp where
    llama-cpp-python is installed: perplexity under the pinned protocol, top-1 agreement with the PyTorch model on
    the parity tokens, and batch-1 speed (eval.speed). Without llama-cpp-python the file is written and
    `gguf_scored` is 0: a gate that asks for GGUF scores then fails."""
    from llmpress.evaluate import llamacpp
    from llmpress.evaluate.speed import measure_in_subprocess, prompt_ids
    from llmpress.export.gguf import export_gguf

    tokenizer = load_tokenizer(job.model_path)
    model = load_model(job.model_path)
    # the folder appears only once the file is complete
    with atomic_folder(job.out_dir) as staging, phase("export: GGUF for llama.cpp"):
        report = export_gguf(model, job.model_path, staging / "model.gguf", job.export.gguf_float_type,
                             job.export.gguf_fallback)  # fmt: skip
    path = (Path(job.out_dir) / "model.gguf").resolve()
    details = report.to_dict() | {"path": str(path)}
    out: dict[str, Any] = {"gguf_path": str(path), "gguf_bytes": report.bytes, "gguf_details": details,
                           "gguf_exact_tensors": len(report.exact) + len(report.near_exact),
                           "gguf_requantized_tensors": len(report.requantized), "gguf_scored": 0.0}  # fmt: skip
    if not llamacpp.available():
        log.warning("the GGUF was written but not scored: %s", llamacpp.INSTALL)
        return out
    ids = tokenizer(Path(job.eval_path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    parity = torch.tensor([ids[: job.export.parity_tokens]])
    # one load serves both: a context that holds a perplexity window and the parity tokens
    engine = llamacpp.LlamaCpp(path, max(job.params.window, parity.shape[1]), job.params.speed.threads)
    with phase("gguf: perplexity in llama.cpp"):
        result = llamacpp.window_perplexity(engine.logits, ids, job.params, tokenizer.bos_token_id)
    with torch.no_grad():
        reference = model(parity).logits[0].argmax(-1)
    agreement = (torch.from_numpy(engine.logits(parity[0].tolist())).argmax(-1) == reference).float().mean()
    del engine
    out |= {"gguf_perplexity": result.perplexity, "gguf_top1_agreement": float(agreement), "gguf_scored": 1.0}
    if job.params.speed.enabled:
        with phase("gguf: speed in llama.cpp"):
            timing = measure_in_subprocess("gguf", str(path), prompt_ids(tokenizer, job.eval_path, job.params.speed),
                                           job.params.speed)  # fmt: skip
        out |= {k: v for k, v in timing.items() if k.startswith("gguf_")}
    return out


def tensorrt_engine(onnx_path: Path, out_dir: Path) -> dict[str, Any]:
    """Build a TensorRT engine where this worker can; otherwise record why not (and whether the graph is ready)."""
    from llmpress.export.tensorrt import build_engine, plan_engine

    plan = plan_engine(onnx_path)
    assert plan.readiness is not None
    out: dict[str, Any] = {"ready": plan.readiness.ready, "built": False, "reason": plan.reason, "fp16": plan.fp16,
                           "int8": plan.int8, "sparse_weights": plan.sparse_weights}  # fmt: skip
    if plan.buildable:
        start = time.perf_counter()
        engine = build_engine(onnx_path, plan, out_dir / "model.plan")
        out |= {"built": True, "build_seconds": time.perf_counter() - start, "engine_bytes": engine.stat().st_size}
    else:
        log.info("no TensorRT engine: %s", plan.reason)
    return out


def edge_bundle(onnx_path: str | None, model_dir: str, out_dir: str | Path, metrics: dict[str, Any],
                gate: dict[str, Any], lineage: dict[str, str], gguf_path: str | None = None) -> Path:  # fmt: skip
    """The edge bundle (`llmpress.bundle`) of an exported model - its graph, its GGUF, or both - its layout and
    sizes checked after it is written (build_bundle hashed each file as it wrote it; promotion and `llmpress bundle
    verify` check every hash). The manifest gives each format its own scores."""
    from llmpress.bundle import build_bundle, verify_bundle

    formats: dict[str, dict[str, Any]] = {}
    graph: dict[str, Any] = {}  # what build_bundle is told about the graph
    if onnx_path is not None:
        import onnx

        from llmpress.export.packed import precision_counts, precision_label

        proto = onnx.load(onnx_path, load_external_data=False)
        counts = precision_counts(proto)  # read from the graph that ships, not assumed
        levels = {a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                  if a.name == "accuracy_level"}  # fmt: skip
        graph = {"precision": precision_label(counts), "precision_counts": counts,
                 "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0),
                 "accuracy_level": levels.pop() if len(levels) == 1 else None}  # fmt: skip
        formats["onnx"] = {"runtime": "onnxruntime", "precision": graph["precision"],
                           "scores": _scores(metrics, "bundle_", "ort_")}  # fmt: skip
    if gguf_path is not None:
        details = {k: v for k, v in metrics.get("gguf_details", {}).items() if k != "path"}
        formats["gguf"] = {"runtime": "llama.cpp", "scored": bool(metrics.get("gguf_scored")),
                           "scores": _scores(metrics, "gguf_"), **details}  # fmt: skip
    onnx_dir = Path(onnx_path).parent if onnx_path is not None else None
    path = build_bundle(out_dir, onnx_dir, model_dir, metrics=metrics, gate=gate, lineage=lineage, gguf=gguf_path,
                        formats=formats, **graph)  # fmt: skip
    verify_bundle(path, check_hashes=False)
    return path


SCORES = ("perplexity", "kl_to_base", "top1_agreement", "cloze_accuracy", "b1_prefill_ms", "b1_decode_tokens_per_s",
          "peak_rss_mb", "repeated_ngram_rate", "greedy_identical", "max_abs_diff")  # fmt: skip


def _scores(metrics: dict[str, Any], *prefixes: str) -> dict[str, float]:
    """A format's own measurements in its runtime, by score name (e.g. bundle_perplexity -> perplexity)."""
    found = {name: metrics.get(p + name) for name in SCORES for p in reversed(prefixes) if p + name in metrics}
    return {k: v for k, v in found.items() if isinstance(v, int | float) and not isinstance(v, bool)}
