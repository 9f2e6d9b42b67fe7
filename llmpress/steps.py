"""The pipeline's steps as plain functions over paths and small dicts (what Prefect tasks wrap, one each).

No step takes or returns a tensor or a model: a step loads what it needs from disk and writes what it makes to
disk, so each can run in another process, on another machine, or be skipped when its result is cached.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from llmpress.compress import compress_
from llmpress.config import CompressParams, DataParams, EvalParams, ExportParams, load_recipe
from llmpress.data import calibration_windows
from llmpress.errors import LlmpressError
from llmpress.evaluate.perplexity import perplexity
from llmpress.export.onnx import check_parity, export_onnx
from llmpress.hashing import data_hash
from llmpress.sources import load_model, load_tokenizer

log = logging.getLogger(__name__)

METADATA = "llmpress.json"


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise LlmpressError("compress.device is 'cuda' but no CUDA device is available here")
    return setting


def recipe_info(recipe_path: str | Path) -> dict[str, Any]:
    recipe = load_recipe(recipe_path)
    dumped = recipe.model_dump(mode="json")
    return {"name": recipe.name, "hash": data_hash(dumped), "recipe": dumped}


def compress(model_path: str, recipe_path: str, calibration_path: str, out_dir: str, data: DataParams,
             eval_params: EvalParams, params: CompressParams, lineage: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """Compress the model at `model_path` with the recipe; write an HF folder to `out_dir`."""
    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len is not None and data.seq_len > max_len:
        raise LlmpressError(f"data.seq_len={data.seq_len} exceeds the model's context ({max_len} tokens)")
    ids = calibration_windows(tokenizer, calibration_path, data.seq_len, eval_params.add_bos)
    device = pick_device(params.device)
    bar = tqdm(total=len(getattr_blocks(model)), desc=f"compress {recipe.name}", unit="block")
    report = compress_(model, recipe, ids, device=device, batch_size=params.batch_size,
                       progress=lambda msg: (bar.update(1), log.info(msg)))  # fmt: skip
    bar.close()
    _check_finite(model)
    meta = {"recipe": recipe.name, "recipe_hash": data_hash(recipe.model_dump(mode="json")), **lineage,
            "report": report.to_dict()}  # fmt: skip
    save_model(model, tokenizer, Path(out_dir), extra_files={
        "recipe.yaml": yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False),
        METADATA: json.dumps(meta, indent=2),
    })  # fmt: skip
    by_stage = {}
    for rec in report.layers:
        by_stage.setdefault(rec.stage, []).append(rec)
    return {
        "path": str(Path(out_dir).resolve()),
        "seconds": report.total_seconds,
        "calibration_tokens": report.calibration_tokens,
        "device": device,
        "layers": len(report.layers),
        "targeted_layers": sorted({rec.name for rec in report.layers}),
        "stage_seconds": report.stage_seconds,
    }


def getattr_blocks(model: nn.Module) -> nn.ModuleList:
    from llmpress.compress import find_decoder_blocks

    return find_decoder_blocks(model)[1]


def save_model(model: nn.Module, tokenizer, out: Path, extra_files: dict[str, str]) -> None:
    """Write the HF folder to a temporary sibling and rename it into place: never a half-written `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def evaluate(model_path: str, eval_path: str, params: EvalParams, layer_names: list[str] | None = None,
             label: str = "model") -> dict[str, Any]:  # fmt: skip
    """Perplexity under the pinned protocol, sparsity of `layer_names` (as saved), bytes on disk."""
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    text = Path(eval_path).read_text(encoding="utf-8")
    start = time.perf_counter()
    bar = tqdm(desc=f"perplexity {label}", unit="window")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    result = perplexity(model, tokenizer, text, params, progress=progress)
    bar.close()
    out: dict[str, Any] = {
        "perplexity": result.perplexity,
        "eval_tokens": result.tokens,
        "eval_seconds": time.perf_counter() - start,
        "bytes_on_disk": folder_bytes(model_path),
        "weights_bytes": folder_bytes(model_path, "*.safetensors"),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if layer_names:
        per_layer = measure_sparsity(model, layer_names)
        modules = dict(model.named_modules())
        sizes = {n: modules[n].weight.numel() for n in layer_names}
        out["sparsity"] = sum(per_layer[n] * sizes[n] for n in layer_names) / sum(sizes.values())
        out["sparsity_min_layer"] = min(per_layer.values())
        out["sparsity_max_layer"] = max(per_layer.values())
        out["sparsity_per_layer"] = per_layer
    return out


def export(model_path: str, out_dir: str, eval_path: str, params: ExportParams) -> dict[str, Any]:
    """ONNX export and parity against PyTorch on the first `parity_tokens` tokens of the held-out text."""
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    start = time.perf_counter()
    path = export_onnx(model, out_dir, opset=params.opset)
    seconds = time.perf_counter() - start
    ids = tokenizer(Path(eval_path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    ids = ids[: params.parity_tokens]
    if len(ids) < 2:
        raise LlmpressError("the held-out text is too short for the ONNX parity check")
    parity = check_parity(model, path, torch.tensor([ids]))
    return {
        "onnx_path": str(path.resolve()),
        "onnx_bytes": folder_bytes(out_dir),
        "export_seconds": seconds,
        "onnx_max_abs_diff": parity.max_abs_diff,
        "onnx_mean_abs_diff": parity.mean_abs_diff,
        "onnx_argmax_agreement": parity.argmax_agreement,
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
