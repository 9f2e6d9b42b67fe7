"""The pipeline's steps as plain functions over paths and small dicts (what Prefect tasks wrap, one each).

No step takes or returns a tensor or a model: a step loads what it needs from disk and writes what it makes to
disk, so each can run in another process, on another machine, or be skipped when its result is cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from llmpress.compress import compress_
from llmpress.compress.storage import LowRankLinear, save_compressed
from llmpress.config import CompressParams, DataParams, EvalParams, ExportParams, Recipe, SpeedParams, load_recipe
from llmpress.data import calibration_windows
from llmpress.errors import LlmpressError
from llmpress.evaluate.agreement import compare_to_base
from llmpress.evaluate.cloze import build_examples, cloze_accuracy
from llmpress.evaluate.generate import greedy_generations
from llmpress.evaluate.speed import measure_in_subprocess, peak_rss_mb
from llmpress.export.onnx import check_parity, export_onnx
from llmpress.hashing import data_hash
from llmpress.services import alive
from llmpress.sources import CHECKSUMS, load_model, load_tokenizer

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
             calibration_md5: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Compress the model at `model_path` with the recipe; write an HF folder to `out_dir`. With `calibration_md5`
    (the data version DVC recorded), the calibration file must still be that version."""
    check_data_version(calibration_path, calibration_md5)
    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len is not None and data.seq_len > max_len:
        raise LlmpressError(f"data.seq_len={data.seq_len} exceeds the model's context ({max_len} tokens)")
    ids = calibration_windows(tokenizer, calibration_path, data.seq_len, eval_params.add_bos)
    device = pick_device(params.device)
    bar = tqdm(total=len(_decoder_blocks(model)), desc=f"compress {recipe.name}", unit="block")
    report = compress_(model, recipe, ids, device=device, batch_size=params.batch_size,
                       progress=lambda msg: (bar.update(1), log.info(msg)))  # fmt: skip
    bar.close()
    _check_finite(model)
    meta = {"recipe": recipe.name, "recipe_hash": recipe_info(recipe)["hash"], **lineage,
            "report": report.to_dict()}  # fmt: skip
    save_model(model, tokenizer, Path(out_dir), extra_files={
        "recipe.yaml": yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False),
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
    """Write the HF folder to a temporary sibling, fsync every file with the sha256 of each in `checksums.json`
    (which `sources.load_model` verifies), and rename it into place: never a half-written `out`. A failure
    (disk full, a kill) leaves at most the temporary sibling, which the next save into the same parent removes
    once its writer is gone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent)
    from safetensors import SafetensorError

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-{os.getpid()}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        # Quantized layers as packed integers + scales, low-rank layers as two linears (storage.py).
        save_compressed(model, tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
        write_checksums(tmp)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        fsync_dir(out.parent)
    except (OSError, SafetensorError) as exc:  # disk full, quota, I/O error: say so, leave nothing
        raise LlmpressError(f"writing the model folder {out} failed, nothing was saved: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_checksums(folder: Path) -> None:
    """fsync each file of `folder` and record its sha256 in `checksums.json` (itself fsynced), then the folder."""
    from llmpress.bundle import sha256_file

    sums = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
        sums[path.relative_to(folder).as_posix()] = sha256_file(path)
    with open(folder / CHECKSUMS, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(sums, indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(parent: Path) -> None:
    """Remove `.NAME-PID-*` folders whose writing process no longer exists (killed mid-save)."""
    for tmp in parent.glob(".*-*-*"):
        pid = tmp.name.rsplit("-", 2)[-2]
        if tmp.is_dir() and pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def dequantize(src: str | Path, dst: str | Path) -> str:
    """Write the compressed folder `src` as a plain HF folder `dst` (dense float weights, stock transformers).

    Quantized weights keep their dequantized values and factorised layers are multiplied back, so the plain
    model computes what the compressed one does, except W8A8 activation quantization, which has no stock form.
    """
    from llmpress.compress.storage import to_plain_

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise LlmpressError("dequantize: the destination must differ from the source folder")
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


def evaluate(model_path: str, base_path: str, eval_path: str, params: EvalParams,
             layer_names: list[str] | None = None, eval_md5: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Everything measured on the held-out text, base and compressed side by side (README, "Evaluation").

    Returns {"metrics": compressed model's, "base": base model's, "generations": [{prompt, base, compressed}]}.
    """
    check_data_version(eval_path, eval_md5)
    tokenizer = load_tokenizer(model_path)
    model, base = load_model(model_path), load_model(base_path)
    text = Path(eval_path).read_text(encoding="utf-8")
    start = time.perf_counter()
    with _bar("perplexity, KL, top-1 (base and compressed)", "window") as progress:
        agreement = compare_to_base(model, base, tokenizer, text, params, progress=progress)
    examples = build_examples(text, params.cloze)
    with _bar("cloze (compressed)", "example") as progress:
        cloze = cloze_accuracy(model, tokenizer, examples, params.cloze, params.add_bos, progress)
    with _bar("cloze (base)", "example") as progress:
        base_cloze = cloze_accuracy(base, tokenizer, examples, params.cloze, params.add_bos, progress)
    prompts, new = params.generation.prompts, params.generation.max_new_tokens
    base_texts = greedy_generations(base, tokenizer, prompts, new)
    texts = greedy_generations(model, tokenizer, prompts, new)
    generations = [
        {"prompt": p, "base": b, "compressed": c} for p, b, c in zip(prompts, base_texts, texts, strict=True)
    ]
    metrics: dict[str, Any] = {
        "perplexity": agreement.perplexity,
        "kl_to_base": agreement.kl_to_base,
        "top1_agreement": agreement.top1_agreement,
        "cloze_accuracy": cloze,
        "cloze_examples": len(examples),
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
    base_metrics = {
        "perplexity": agreement.base_perplexity,
        "cloze_accuracy": base_cloze,
        "bytes_on_disk": folder_bytes(base_path),
        "weights_bytes": folder_bytes(base_path, "*.safetensors"),
        "parameters": sum(p.numel() for p in base.parameters()),
    }
    return {"metrics": metrics, "base": base_metrics, "generations": generations}


@contextmanager
def _bar(desc: str, unit: str) -> Iterator[Callable[[int, int], None]]:
    bar = tqdm(desc=desc, unit=unit)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield progress
    finally:
        bar.close()


def speed(model_path: str, base_path: str, eval_path: str, params: SpeedParams,
          onnx_path: str | None) -> dict[str, Any]:  # fmt: skip
    """Latency, throughput and peak memory of base (PyTorch) and compressed (PyTorch, ONNX Runtime)."""
    log.info("measuring speed of the base model (PyTorch) in a child process")
    base = measure_in_subprocess(base_path, eval_path, params)
    log.info("measuring speed of the compressed model (PyTorch%s) in a child process", ", ORT" if onnx_path else "")
    return {"base": base, "compressed": measure_in_subprocess(model_path, eval_path, params, onnx_path)}


def plot_cost(base: dict[str, Any], compressed: dict[str, Any], out_path: str | Path) -> Path:
    """Bars of latency, throughput, memory and size, base against compressed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("torch_b1_prefill_ms", "prefill latency, batch 1 (ms)"),
        ("torch_b1_decode_tokens_per_s", "decode tokens/s, batch 1"),
        ("torch_peak_rss_mb", "peak memory, PyTorch generating (MB)"),
        ("weights_bytes", "weights on disk (MB)"),
    ]
    panels = [(k, t) for k, t in panels if k in base and k in compressed]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (key, title) in zip(list(axes) if len(panels) > 1 else [axes], panels, strict=True):
        scale = 2**20 if key == "weights_bytes" else 1
        values = [base[key] / scale, compressed[key] / scale]
        ax.bar(["base", "compressed"], values, color=["#8c8c8c", "#4878d0"])
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(values):
            ax.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return Path(out_path)


def export(model_path: str, out_dir: str, eval_path: str, params: ExportParams) -> dict[str, Any]:
    """ONNX export (KV cache) and parity against PyTorch: prefill of the first `parity_tokens` held-out tokens, then
    `parity_decode_steps` greedy steps."""
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    start = time.perf_counter()
    path = export_onnx(model, out_dir, opset=params.opset)
    seconds = time.perf_counter() - start
    ids = tokenizer(Path(eval_path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    ids = ids[: params.parity_tokens]
    if len(ids) < 2:
        raise LlmpressError("the held-out text is too short for the ONNX parity check")
    parity = check_parity(model, path, torch.tensor([ids]), decode_steps=params.parity_decode_steps)
    return {
        "tensorrt": tensorrt_engine(path, Path(out_dir)),
        "onnx_path": str(path.resolve()),
        "onnx_bytes": folder_bytes(out_dir),
        "export_seconds": seconds,
        "onnx_max_abs_diff": parity.max_abs_diff,
        "onnx_mean_abs_diff": parity.mean_abs_diff,
        "onnx_noise_max_abs_diff": parity.noise_max_abs_diff,
        "onnx_noise_mean_abs_diff": parity.noise_mean_abs_diff,
        "onnx_argmax_agreement": parity.argmax_agreement,
        "onnx_decode_steps": parity.decode_steps,
        "onnx_greedy_identical": float(parity.greedy_identical),
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

    graph = onnx.load(onnx_path, load_external_data=False)
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), 0)
    path = build_bundle(out_dir, Path(onnx_path).parent, model_dir, precision="fp32", opset=opset, metrics=metrics,
                        gate=gate, lineage=lineage)  # fmt: skip
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
