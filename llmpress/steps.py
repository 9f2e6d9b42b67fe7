"""The pipeline's steps as plain functions over paths and small dicts (what Prefect tasks wrap, one each).

No step takes or returns a tensor or a model: a step loads what it needs from disk and writes what it makes to
disk, so each can run in another process, on another machine, or be skipped when its result is cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from llmpress.compress import compress_
from llmpress.compress.storage import LowRankLinear, save_compressed
from llmpress.config import (
    CompressParams,
    DataParams,
    EvalParams,
    ExportParams,
    Recipe,
    SpeedParams,
    export_recipe,
    load_recipe,
)
from llmpress.data import calibration_windows
from llmpress.errors import LlmpressError
from llmpress.evaluate.agreement import compare_to_base
from llmpress.evaluate.baseline import baseline_key, compute_baseline, load_baseline
from llmpress.evaluate.cloze import build_examples, cloze_accuracy
from llmpress.evaluate.generate import greedy_generations
from llmpress.evaluate.repetition import repetition_rate, torch_continuations, until_eos
from llmpress.evaluate.speed import measure_in_subprocess, peak_rss_mb, prompt_ids, served
from llmpress.export.onnx import check_parity, export_onnx, torch_trajectory
from llmpress.files import atomic_folder
from llmpress.hashing import data_hash
from llmpress.progress import Progress, phase
from llmpress.sources import load_model, load_tokenizer

log = logging.getLogger(__name__)

METADATA = "llmpress.json"


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise LlmpressError("compress.device is 'cuda' but no CUDA device is available here")
    return setting


def recipe_info(recipe: Recipe) -> dict[str, Any]:
    """Name, content hash (of the validated recipe, so formatting and comments don't change it) and contents."""
    dumped = recipe.model_dump(mode="json")
    return {"name": recipe.name, "hash": data_hash(dumped), "recipe": dumped}


def compress(model_path: str, recipe_path: str, calibration_path: str, out_dir: str, data: DataParams,
             eval_params: EvalParams, params: CompressParams, lineage: dict[str, str],
             calibration_md5: str | None = None, precision: str = "recipe", quantizer: str = "rtn"
             ) -> dict[str, Any]:  # fmt: skip
    """Compress the model at `model_path` with the recipe (followed by the quantization `precision` asks for, see
    `config.export_recipe`); write an HF folder to `out_dir`. With `calibration_md5` (the data version DVC
    recorded), the calibration file must still be that version."""
    check_data_version(calibration_path, calibration_md5)
    recipe = export_recipe(load_recipe(recipe_path), precision, quantizer)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len is not None and data.seq_len > max_len:
        raise LlmpressError(f"data.seq_len={data.seq_len} exceeds the model's context ({max_len} tokens)")
    ids = calibration_windows(tokenizer, calibration_path, data.seq_len, eval_params.add_bos)
    device = pick_device(params.device)
    bar = tqdm(total=len(_decoder_blocks(model)), desc=f"compress {recipe.name}", unit="block", leave=False)
    start = time.perf_counter()

    def progress(message: str) -> None:  # per block (and per stage, distillation step): with the elapsed time
        if message.startswith("block "):
            bar.update(1)
        log.info("compress %s: %s, %.1f s elapsed", recipe.name, message, time.perf_counter() - start)

    report = compress_(model, recipe, ids, device=device, batch_size=params.batch_size, progress=progress)
    bar.close()
    _check_finite(model)
    meta = {"recipe": recipe.name, "recipe_hash": recipe_info(recipe)["hash"], **lineage,
            "report": report.to_dict()}  # fmt: skip
    save_model(model, tokenizer, Path(out_dir), extra_files={
        "recipe.yaml": yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False),  # what ran, nulls too
        METADATA: json.dumps(meta, indent=2),
    })  # fmt: skip
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear | LowRankLinear)}
    return {
        "path": str(Path(out_dir).resolve()),
        "seconds": report.total_seconds,
        "calibration_tokens": report.calibration_tokens,
        "device": device,
        "layers": len(report.layers),
        # layers a stage touched that still exist as linears (dropped blocks and factorised halves excluded)
        "targeted_layers": sorted({rec.name for rec in report.layers} & linears),
        "stage_seconds": report.stage_seconds,
        "stages": {
            f"{s.index}_{s.method}": {"seconds": s.seconds, "layers": s.layers, **_scalars(s.summary)}
            for s in report.stages
        },
        "peak_memory": peak_memory(),
    }


def _scalars(summary: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in summary.items():
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, int | float):
            out[key] = value
    return out


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process so far (VmHWM, MB) and peak CUDA memory allocated (MB)."""
    out = {"host_peak_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _decoder_blocks(model: nn.Module) -> nn.ModuleList:
    from llmpress.compress import find_decoder_blocks

    return find_decoder_blocks(model)[1]


def save_model(model: nn.Module, tokenizer, out: Path, extra_files: dict[str, str]) -> None:
    """Write the HF folder atomically (`files.atomic_folder`: temporary sibling, every file fsynced with its sha256
    in `checksums.json`, which `sources.load_model` verifies, then renamed into place): never a half-written
    `out`. A failure (disk full, a kill) leaves at most the temporary sibling, which the next save removes."""
    from safetensors import SafetensorError

    try:
        with atomic_folder(out) as tmp:
            model.save_pretrained(tmp)
            # Quantized layers as packed integers + scales, low-rank layers as two linears (storage.py).
            save_compressed(model, tmp)
            tokenizer.save_pretrained(tmp)
            for name, text in extra_files.items():
                (tmp / name).write_text(text)
    except (OSError, SafetensorError) as exc:  # disk full, quota, I/O error: say so, leave nothing
        raise LlmpressError(f"writing the model folder {out} failed, nothing was saved: {exc}") from exc


def dequantize(src: str | Path, dst: str | Path, overwrite: bool = False) -> str:
    """Write the compressed folder `src` as a plain HF folder `dst` (dense float weights, stock transformers).

    Quantized weights keep their dequantized values and factorised layers are multiplied back, so the plain
    model computes what the compressed one does, except W8A8 activation quantization, which has no stock form.
    """
    from llmpress.compress.storage import to_plain_
    from llmpress.files import check_destination

    src, dst = Path(src), Path(dst)
    check_destination(dst, [src], overwrite)
    model = to_plain_(load_model(src))
    extra = {name: (src / name).read_text() for name in ("recipe.yaml", METADATA) if (src / name).is_file()}
    save_model(model, load_tokenizer(src), dst, extra_files=extra)
    return f"{dst}: plain safetensors folder, {folder_bytes(dst, '*.safetensors')} bytes of weights"


def check_data_version(path: str | Path, expected_md5: str | None) -> None:
    """Refuse a data file that is no longer the version DVC recorded (edited or replaced after `dvc repro`)."""
    if expected_md5 is None:
        return
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected_md5:
        raise LlmpressError(
            f"{path} changed after DVC versioned it (md5 {digest.hexdigest()}, dvc.lock says {expected_md5}); "
            "run `llmpress data` (dvc repro) to rebuild it, or `dvc checkout` to restore it"
        )


def _check_finite(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise LlmpressError(f"compression produced NaN/Inf in {name}; the model was not saved")


def measure_sparsity(model: nn.Module, layer_names: list[str]) -> dict[str, float]:
    modules = dict(model.named_modules())
    missing = [n for n in layer_names if n not in modules]
    if missing:
        raise LlmpressError(f"layers not found in the saved model: {missing[:3]}")
    return {n: (modules[n].weight == 0).float().mean().item() for n in layer_names}


def folder_bytes(folder: str | Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob(pattern) if p.is_file())


def baseline(base_path: str, eval_path: str, params: EvalParams, baselines_dir: str, base_sha256: str,
             eval_md5: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The base model's evaluation (`llmpress.evaluate.baseline`) in `baselines_dir/<key>`: read back when it was made
    for the same base model, held-out text, protocol and code, computed and written there otherwise."""
    check_data_version(eval_path, eval_md5)
    key = baseline_key(base_sha256, eval_md5 or data_hash(Path(eval_path).read_text(encoding="utf-8")), params)
    out_dir = Path(baselines_dir) / key[:16]
    found = load_baseline(out_dir, key)
    if found is not None:
        log.info("baseline of %s reused from %s", base_path, out_dir)
        return {"path": str(Path(out_dir).resolve()), "key": key, "reused": True, "metrics": found[0]}
    tokenizer, base = load_tokenizer(base_path), load_model(base_path)
    text = Path(eval_path).read_text(encoding="utf-8")
    sizes = {"bytes_on_disk": folder_bytes(base_path), "weights_bytes": folder_bytes(base_path, "*.safetensors")}
    metrics = compute_baseline(base, tokenizer, text, params, out_dir, key, sizes)
    return {"path": str(Path(out_dir).resolve()), "key": key, "reused": False, "metrics": metrics}


def evaluate(model_path: str, base_path: str, baseline_dir: str, baseline_key: str, eval_path: str,
             params: EvalParams, layer_names: list[str] | None = None, eval_md5: str | None = None,
             bundle_follows: bool = False) -> dict[str, Any]:  # fmt: skip
    """Everything measured on the held-out text, the compressed model against the base model's baseline (README,
    "Evaluation"), whose side comes from `baseline_dir` (`steps.baseline`). With `bundle_follows` (the model is
    exported, and `evaluate_bundle` scores the graph that ships), cloze accuracy and the repetition of greedy
    continuations are measured on that graph instead: what the PyTorch model keeps is the reference the bundle is
    checked against - perplexity, KL, top-1 agreement, generations - and its sparsity and size.

    Returns {"metrics": compressed model's, "base": base model's, "generations": [{prompt, base, compressed}]}.
    """
    check_data_version(eval_path, eval_md5)
    found = load_baseline(baseline_dir, baseline_key)
    if found is None:
        raise LlmpressError(f"no baseline {baseline_key[:12]} of the base model in {baseline_dir}: run the baseline "
                            "step first")  # fmt: skip
    base_metrics, base_hidden = found
    tokenizer = load_tokenizer(model_path)
    model, base = load_model(model_path), load_model(base_path)
    text = Path(eval_path).read_text(encoding="utf-8")
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


def evaluate_bundle(onnx_path: str, model_path: str, base_path: str, baseline_dir: str, baseline_key: str,
                    eval_path: str, params: EvalParams, export_params: ExportParams) -> dict[str, Any]:  # fmt: skip
    """The graph that ships, judged on its own in onnxruntime at its serving settings (`export` leaves it so),
    scored under the pinned protocol against the base model's baseline - perplexity, KL to base, top-1 agreement,
    cloze accuracy, the repeated n-gram rate of its greedy continuations (its logit difference and greedy parity
    with the PyTorch model come from `export`, which has that model loaded) - with its bytes and what its matmuls
    and lookups hold (`llmpress.export.packed.precision_counts`).

    Returns `bundle_*` metrics."""
    import onnx

    from llmpress.export.generate import OrtGenerator, onnx_session
    from llmpress.export.packed import precision_counts, precision_label

    found = load_baseline(baseline_dir, baseline_key)
    if found is None:
        raise LlmpressError(f"no baseline {baseline_key[:12]} of the base model in {baseline_dir}: run the baseline "
                            "step first")  # fmt: skip
    _, base_hidden = found
    graph = onnx.load(onnx_path, load_external_data=False)
    counts = precision_counts(graph)
    quantized = bool(counts.get("matmul_4bit") or counts.get("matmul_8bit"))
    tokenizer = load_tokenizer(model_path)
    text = Path(eval_path).read_text(encoding="utf-8")
    generator = OrtGenerator(onnx_session(onnx_path, torch.get_num_threads()))

    def logits_fn(batch: torch.Tensor) -> torch.Tensor:
        ids = batch.numpy()
        logits, _ = generator.forward(ids, np.ones_like(ids), generator.empty_cache(ids.shape[0]))
        return torch.from_numpy(logits)

    base = load_model(base_path)
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
        "bundle_bytes": folder_bytes(Path(onnx_path).parent),
        "bundle_accuracy_level": export_params.accuracy_level if quantized else None,
        "bundle_precision": precision_label(counts),
        "bundle_precision_counts": counts,
    }


def speed(model_path: str, base_path: str, eval_path: str, params: SpeedParams,
          onnx_path: str | None) -> dict[str, Any]:  # fmt: skip
    """Latency, throughput and peak memory of the base model in PyTorch (what users would run instead) and of the
    compressed model in the runtime that serves it: onnxruntime when it was exported, else PyTorch. Measured in
    the same run, on the same machine and threads, one child process each (`llmpress.evaluate.speed`)."""
    prompt = prompt_ids(load_tokenizer(base_path), eval_path, params)
    params = params.model_copy(update={"threads": params.threads or torch.get_num_threads()})
    with phase("speed: base model in PyTorch (child process)"):
        base = measure_in_subprocess("torch", base_path, prompt, params)
    runtime, path = ("ort", onnx_path) if onnx_path else ("torch", model_path)
    with phase(f"speed: compressed model in {'onnxruntime' if onnx_path else 'PyTorch'} (child process)"):
        compressed = measure_in_subprocess(runtime, path, prompt, params)
    for batch in sorted({1, params.batch_size}):  # the deployable artifact against what users would run instead
        served = compressed[f"{runtime}_b{batch}_decode_tokens_per_s"]
        compressed[f"decode_speedup_b{batch}"] = served / base[f"torch_b{batch}_decode_tokens_per_s"]
    compressed["runtime"] = runtime
    return {"base": base, "compressed": compressed}


def plot_cost(base: dict[str, Any], compressed: dict[str, Any], out_path: str | Path) -> Path:
    """Bars of latency, throughput, memory and size: the base model in PyTorch against the compressed model in the
    runtime that serves it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("b1_prefill_ms", "prefill latency, batch 1 (ms)", 1),
        ("b1_decode_tokens_per_s", "decode tokens/s, batch 1", 1),
        ("peak_rss_mb", "peak memory generating (MB)", 1),
        ("weights_bytes", "weights on disk (MB)", 2**20),
    ]
    values = {key: (base.get(key, base.get(f"torch_{key}")), compressed.get(key, served(compressed, key)))
              for key, _, _ in panels}  # fmt: skip
    panels = [p for p in panels if None not in values[p[0]]]
    runtime = "ONNX Runtime" if compressed.get("runtime") == "ort" else "PyTorch"
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (key, title, scale) in zip(list(axes) if len(panels) > 1 else [axes], panels, strict=True):
        pair = [v / scale for v in values[key]]
        ax.bar(["base\n(PyTorch)", f"compressed\n({runtime})"], pair, color=["#8c8c8c", "#4878d0"])
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(pair):
            ax.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return Path(out_path)


def export(model_path: str, out_dir: str, eval_path: str, params: ExportParams,
           template_dir: str | None = None) -> dict[str, Any]:  # fmt: skip
    """ONNX export (KV cache) and parity against PyTorch: prefill of the first `parity_tokens` held-out tokens, then
    `parity_decode_steps` greedy steps. With `template_dir`, the traced graph of each architecture is kept there
    and reused (`llmpress.export.template`)."""
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    # The folder appears only once its graph was written, checked against PyTorch and set to its serving level: a
    # stopped or failed export leaves nothing a later step could take for a finished one.
    with atomic_folder(out_dir) as staging:
        path, record = _export_checked(model, tokenizer, staging, eval_path, params, template_dir)
    path = Path(out_dir) / path.name
    return record | {"onnx_path": str(path.resolve()), "onnx_bytes": folder_bytes(out_dir)}


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


def plot_sparsity(per_layer: dict[str, float], target: float | None, out_path: str | Path) -> Path:
    """Bar chart of measured sparsity per targeted layer, in model order, with the target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_layer)
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.06), 4))
    ax.bar(range(len(names)), [per_layer[n] for n in names], width=1.0, color="#4878d0")
    if target is not None:
        ax.axhline(target, color="#d65f5f", linestyle="--", label=f"target {target:.2f}")
        ax.legend(loc="lower right")
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"targeted linear layers in model order ({len(names)})")
    ax.set_ylabel("fraction of weights that are zero")
    ax.set_title("Measured sparsity per layer")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return Path(out_path)


def edge_bundle(onnx_path: str, model_dir: str, out_dir: str | Path, metrics: dict[str, Any], gate: dict[str, Any],
                lineage: dict[str, str]) -> Path:  # fmt: skip
    """The edge bundle (`llmpress.bundle`) of an exported model, its layout and sizes checked after it is written
    (build_bundle hashed each file as it wrote it; promotion and `llmpress bundle verify` check every hash)."""
    import onnx

    from llmpress.bundle import build_bundle, verify_bundle
    from llmpress.export.packed import precision_counts, precision_label

    graph = onnx.load(onnx_path, load_external_data=False)
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), 0)
    counts = precision_counts(graph)  # read from the graph that ships, not assumed
    levels = {a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}  # fmt: skip
    path = build_bundle(out_dir, Path(onnx_path).parent, model_dir, precision=precision_label(counts), opset=opset,
                        metrics=metrics, gate=gate, lineage=lineage, precision_counts=counts,
                        accuracy_level=levels.pop() if len(levels) == 1 else None)  # fmt: skip
    verify_bundle(path, check_hashes=False)
    return path


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
