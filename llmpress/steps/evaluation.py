"""The evaluation steps: the base model's baseline, the compressed model against it (perplexity, agreement, cloze,
greedy text), the exported bundle scored on its own in onnxruntime, and speed in the runtime that serves it."""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmpress.errors import LlmpressError
from llmpress.evaluate.agreement import compare_to_base
from llmpress.evaluate.baseline import baseline_key, compute_baseline, load_baseline
from llmpress.evaluate.cloze import build_examples, cloze_accuracy
from llmpress.evaluate.generate import greedy_generations
from llmpress.evaluate.repetition import repetition_rate, torch_continuations, until_eos
from llmpress.evaluate.speed import measure_in_subprocess, prompt_ids
from llmpress.hashing import data_hash
from llmpress.progress import Progress, phase
from llmpress.sources import load_model, load_tokenizer
from llmpress.steps.common import check_data_version, folder_bytes, measure_sparsity
from llmpress.steps.jobs import BaselineJob, BaselineRef, BundleJob, EvaluateJob, SpeedJob

log = logging.getLogger(__name__)


def baseline(job: BaselineJob) -> dict[str, Any]:
    """The base model's evaluation (`llmpress.evaluate.baseline`) in `baselines_dir/<key>`: read back when it was made
    for the same base model, held-out text, protocol and code, computed and written there otherwise."""
    held_out = job.held_out
    check_data_version(held_out.path, held_out.md5)
    text = Path(held_out.path).read_text(encoding="utf-8")
    key = baseline_key(job.base_sha256, held_out.md5 or data_hash(text), job.params)
    out_dir = Path(job.baselines_dir) / key[:16]
    found = load_baseline(out_dir, key)
    if found is not None:
        log.info("baseline of %s reused from %s", job.base_path, out_dir)
        return {"path": str(Path(out_dir).resolve()), "key": key, "reused": True, "metrics": found[0]}
    tokenizer, base = load_tokenizer(job.base_path), load_model(job.base_path)
    sizes = {"bytes_on_disk": folder_bytes(job.base_path),
             "weights_bytes": folder_bytes(job.base_path, "*.safetensors")}  # fmt: skip
    metrics = compute_baseline(base, tokenizer, text, job.params, out_dir, key, sizes)
    return {"path": str(Path(out_dir).resolve()), "key": key, "reused": False, "metrics": metrics}


def evaluate(job: EvaluateJob) -> dict[str, Any]:
    """Everything measured on the held-out text, the compressed model against the base model's baseline (README,
    "Evaluation"), whose side comes from `job.baseline` (`steps.baseline`). With `bundle_follows` (the model is
    exported, and `evaluate_bundle` scores the graph that ships), cloze accuracy and the repetition of greedy
    continuations are measured on that graph instead: what the PyTorch model keeps is the reference the bundle is
    checked against - perplexity, KL, top-1 agreement, generations - and its sparsity and size.

    Returns {"metrics": compressed model's, "base": base model's, "generations": [{prompt, base, compressed}]}.
    """
    check_data_version(job.held_out.path, job.held_out.md5)
    base_metrics, base_hidden = _read_baseline(job.baseline)
    params, model_path, layer_names, bundle_follows = job.params, job.model_path, job.layer_names, job.bundle_follows
    tokenizer = load_tokenizer(model_path)
    model, base = load_model(model_path), load_model(job.base_path)
    text = Path(job.held_out.path).read_text(encoding="utf-8")
    start = time.perf_counter()
    with Progress("evaluate: perplexity, KL, top-1", "window") as progress:
        agreement = compare_to_base(model, base, tokenizer, text, params, progress=progress, base_hidden=base_hidden)
    del base, base_hidden  # the base model's head was all this pass needed of it
    metrics: dict[str, Any] = {}
    if not bundle_follows:
        examples = build_examples(text, params.cloze)
        with Progress("evaluate: cloze", "example") as progress:
            metrics["cloze_accuracy"] = cloze_accuracy(model, tokenizer, examples, params.cloze, params.add_bos,
                                                       progress)  # fmt: skip
        metrics["cloze_examples"] = len(examples)
    prompts, new = params.generation.prompts, params.generation.max_new_tokens
    with phase("evaluate: greedy generations"):
        texts = greedy_generations(model, tokenizer, prompts, new)
    generations = [{"prompt": p, "base": b, "compressed": c}
                   for p, b, c in zip(prompts, base_metrics["generations"], texts, strict=True)]  # fmt: skip
    if not bundle_follows:
        with phase("evaluate: greedy continuations of held-out prompts"):
            metrics["repeated_ngram_rate"] = repetition_rate(partial(torch_continuations, model), tokenizer, text,
                                                             params)  # fmt: skip
    metrics |= {
        "perplexity": agreement.perplexity,
        "kl_to_base": agreement.kl_to_base,
        "top1_agreement": agreement.top1_agreement,
        "eval_tokens": agreement.tokens,
        "eval_seconds": time.perf_counter() - start,
        "bytes_on_disk": folder_bytes(model_path),
        "weights_bytes": folder_bytes(model_path, "*.safetensors"),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    metrics |= _expert_coverage(Path(model_path))
    if layer_names:
        per_layer = measure_sparsity(model, layer_names)
        modules = dict(model.named_modules())
        sizes = {n: modules[n].weight.numel() for n in layer_names}
        metrics["sparsity"] = sum(per_layer[n] * sizes[n] for n in layer_names) / sum(sizes.values())
        metrics["sparsity_min_layer"] = min(per_layer.values())
        metrics["sparsity_max_layer"] = max(per_layer.values())
        metrics["sparsity_per_layer"] = per_layer
    base_out = {k: base_metrics[k] for k in ("cloze_accuracy", "bytes_on_disk", "weights_bytes", "parameters",
                                             "repeated_ngram_rate")}  # fmt: skip
    base_out["perplexity"] = agreement.base_perplexity  # on the very windows the compressed model was scored on
    return {"metrics": metrics, "base": base_out, "generations": generations}


def _expert_coverage(folder: Path) -> dict[str, Any]:
    """A mixture of experts' calibration coverage, from the compression report the folder keeps: how many experts,
    the fewest calibration tokens the router sent any of them, how many got fewer than the recipe's floor (what the
    gate's min_expert_tokens checks), and the counts per block (`expert_tokens`, plotted on the run). {} for a dense
    model or a recipe without calibration data."""
    from llmpress.loading import read_json_object
    from llmpress.steps.compression import METADATA

    path = folder / METADATA
    report = read_json_object(path, "compression metadata").get("report", {}) if path.is_file() else {}
    keys = ("experts", "expert_min_tokens", "expert_floor", "experts_below_floor")
    found: dict[str, Any] = {key: report[key] for key in keys if isinstance(report.get(key), int)}
    if found and isinstance(report.get("expert_tokens"), dict):
        found["expert_tokens"] = report["expert_tokens"]
    return found


def evaluate_bundle(job: BundleJob) -> dict[str, Any]:
    """The graph that ships, judged on its own in onnxruntime at its serving settings (`export` leaves it so),
    scored under the pinned protocol against the base model's baseline - perplexity, KL to base, top-1 agreement,
    cloze accuracy, the repeated n-gram rate of its greedy continuations (its logit difference and greedy parity
    with the PyTorch model come from `export`, which has that model loaded) - with its bytes and what its matmuls
    and lookups hold (`llmpress.export.packed.precision_counts`).

    Returns `bundle_*` metrics."""
    import onnx

    from llmpress.export.generate import OrtGenerator, onnx_session
    from llmpress.export.packed import precision_counts, precision_label

    _, base_hidden = _read_baseline(job.baseline)
    params = job.params
    graph = onnx.load(job.onnx_path, load_external_data=False)
    counts = precision_counts(graph)
    quantized = bool(counts.get("matmul_4bit") or counts.get("matmul_8bit"))
    tokenizer = load_tokenizer(job.model_path)
    text = Path(job.eval_path).read_text(encoding="utf-8")
    generator = OrtGenerator(onnx_session(job.onnx_path, torch.get_num_threads()))

    def logits_fn(batch: torch.Tensor) -> torch.Tensor:
        ids = batch.numpy()
        logits, _ = generator.forward(ids, np.ones_like(ids), generator.empty_cache(ids.shape[0]))
        return torch.from_numpy(logits)

    base = load_model(job.base_path)
    with Progress("bundle: perplexity, KL, top-1 in onnxruntime", "window") as progress:
        agreement = compare_to_base(None, base, tokenizer, text, params, progress=progress, base_hidden=base_hidden,
                                    logits_fn=logits_fn)  # fmt: skip
    del base
    examples = build_examples(text, params.cloze)
    with Progress("bundle: cloze in onnxruntime", "example") as progress:
        cloze = cloze_accuracy(None, tokenizer, examples, params.cloze, params.add_bos, progress, logits_fn=logits_fn)

    def ort_continuations(prompts: torch.Tensor, new_tokens: int, eos: int | None) -> list[list[int]]:
        rows = generator.generate(prompts.numpy(), new_tokens, eos_token_id=eos)
        return [until_eos(row[prompts.shape[1] :], eos) for row in rows]

    with phase("bundle: greedy continuations of held-out prompts in onnxruntime"):
        repetition = repetition_rate(ort_continuations, tokenizer, text, params)
    return {
        "bundle_perplexity": agreement.perplexity,
        "bundle_cloze_accuracy": cloze,
        "bundle_cloze_examples": len(examples),
        "bundle_repeated_ngram_rate": repetition,
        "bundle_kl_to_base": agreement.kl_to_base,
        "bundle_top1_agreement": agreement.top1_agreement,
        "bundle_bytes": folder_bytes(Path(job.onnx_path).parent),
        "bundle_accuracy_level": job.export.accuracy_level if quantized else None,
        "bundle_precision": precision_label(counts),
        "bundle_precision_counts": counts,
    }


def speed(job: SpeedJob) -> dict[str, Any]:
    """Latency, throughput and peak memory of the base model in PyTorch (what users would run instead) and of the
    compressed model in the runtime that serves it: onnxruntime when it was exported, else PyTorch. Measured in
    the same run, on the same machine and threads, one child process each (`llmpress.evaluate.speed`)."""
    prompt = prompt_ids(load_tokenizer(job.base_path), job.eval_path, job.params)
    params = job.params.model_copy(update={"threads": job.params.threads or torch.get_num_threads()})
    with phase("speed: base model in PyTorch (child process)"):
        base = measure_in_subprocess("torch", job.base_path, prompt, params)
    runtime, path = ("ort", job.onnx_path) if job.onnx_path else ("torch", job.model_path)
    with phase(f"speed: compressed model in {'onnxruntime' if job.onnx_path else 'PyTorch'} (child process)"):
        compressed = measure_in_subprocess(runtime, path, prompt, params)
    for batch in sorted({1, params.batch_size}):  # the deployable artifact against what users would run instead
        served = compressed[f"{runtime}_b{batch}_decode_tokens_per_s"]
        compressed[f"decode_speedup_b{batch}"] = served / base[f"torch_b{batch}_decode_tokens_per_s"]
    compressed["runtime"] = runtime
    return {"base": base, "compressed": compressed}


def _read_baseline(ref: BaselineRef) -> tuple[dict[str, Any], Any]:
    found = load_baseline(ref.path, ref.key)
    if found is None:
        raise LlmpressError(f"no baseline {ref.key[:12]} of the base model in {ref.path}: run the baseline step first")
    return found
