"""The compress step: a recipe applied to a model folder, written as a compressed folder with its report; and
the reverse, a compressed folder de-quantized to a plain one."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from llmpress import layer_shapes
from llmpress.compress import compress_, find_decoder_blocks
from llmpress.compress.experts import linear_experts, stock_layout
from llmpress.compress.storage import LowRankLinear, save_compressed, writes_plain
from llmpress.config import Recipe, export_recipe, load_recipe
from llmpress.data import calibration_windows
from llmpress.errors import LlmpressError
from llmpress.files import atomic_folder
from llmpress.hashing import data_hash
from llmpress.sources import load_model, load_tokenizer
from llmpress.steps.common import check_data_version, folder_bytes, peak_memory
from llmpress.steps.jobs import CompressJob

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


def compress(job: CompressJob) -> dict[str, Any]:
    """Compress the model at `job.model_path` with the recipe (followed by the quantization `job.precision` asks
    for, see `config.export_recipe`); write an HF folder to `job.out_dir`. The calibration file must still be the
    data version DVC recorded (`job.calibration.md5`)."""
    check_data_version(job.calibration.path, job.calibration.md5)
    recipe = export_recipe(load_recipe(job.recipe_path), job.precision, job.quantizer)
    tokenizer = load_tokenizer(job.model_path)
    model = load_model(job.model_path)
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len is not None and job.data.seq_len > max_len:
        raise LlmpressError(f"data.seq_len={job.data.seq_len} exceeds the model's context ({max_len} tokens)")
    ids = calibration_windows(tokenizer, job.calibration.path, job.data.seq_len, job.add_bos)
    device = pick_device(job.params.device)
    bar = tqdm(total=len(find_decoder_blocks(model)[1]), desc=f"compress {recipe.name}", unit="block", leave=False)
    start = time.perf_counter()

    def progress(message: str) -> None:  # per block (and per stage, distillation step): with the elapsed time
        if message.startswith("block "):
            bar.update(1)
        log.info("compress %s: %s, %.1f s elapsed", recipe.name, message, time.perf_counter() - start)

    report = compress_(model, recipe, ids, device=device, batch_size=job.params.batch_size, progress=progress)
    bar.close()
    _check_finite(model)
    meta = {"recipe": recipe.name, "recipe_hash": recipe_info(recipe)["hash"], **job.lineage,
            "report": report.to_dict()}  # fmt: skip
    layout = save_model(model, tokenizer, Path(job.out_dir), extra_files={
        "recipe.yaml": yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False),  # what ran, nulls too
        METADATA: json.dumps(meta, indent=2),
    }, layout=job.params.save_layout, sparse=job.params.sparse_storage)  # fmt: skip
    log.info("compress %s: saved %s", recipe.name, _layout_line(Path(job.out_dir), layout))
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear | LowRankLinear)}
    return {
        "path": str(Path(job.out_dir).resolve()),
        "saved_layout": layout or "plain",
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
    """The summary's numbers, a one-element list counting as its element."""
    values = {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in summary.items()}
    return {k: v for k, v in values.items() if isinstance(v, int | float)}


def _layout_line(folder: Path, layout: str | None) -> str:
    from llmpress.compress.storage import MANIFEST

    if layout is None:
        return f"{folder} as a plain HF folder"
    why = json.loads((folder / MANIFEST).read_text()).get("compressed_tensors")
    return f"{folder} in the {layout} layout" + (f" ({why})" if why else "")


def save_model(model: nn.Module, tokenizer, out: Path, extra_files: dict[str, str],
               layout: str = "compressed-tensors", sparse: str = "bitmask") -> str | None:  # fmt: skip
    """Write the HF folder atomically (`files.atomic_folder`: temporary sibling, every file fsynced with its sha256
    in `checksums.json`, which `sources.load_model` verifies, then renamed into place): never a half-written
    `out`. A failure (disk full, a kill) leaves at most the temporary sibling, which the next save removes."""
    from safetensors import SafetensorError

    try:
        with atomic_folder(out) as tmp:
            layer_shapes.record_(model)  # blocks of different widths: their sizes go into config.json
            if writes_plain(model, sparse):  # mixture-of-experts weights as transformers keeps them: stock loads it
                with stock_layout(model):
                    model.save_pretrained(tmp)
            else:  # per-expert linears keep their module names (no legacy renaming), which save_compressed packs
                model.save_pretrained(tmp, save_original_format=not linear_experts(model))
            # Quantized layers as packed integers + scales, low-rank layers as two linears (storage.py).
            written = save_compressed(model, tmp, layout=layout, sparse=sparse)
            tokenizer.save_pretrained(tmp)
            for name, text in extra_files.items():
                (tmp / name).write_text(text)
    except (OSError, SafetensorError) as exc:  # disk full, quota, I/O error: say so, leave nothing
        raise LlmpressError(f"writing the model folder {out} failed, nothing was saved: {exc}") from exc
    return written


def dequantize(src: str | Path, dst: str | Path, overwrite: bool = False) -> str:
    """Write the compressed folder `src` as a plain HF folder `dst` (dense float weights, stock transformers).

    Quantized weights keep their dequantized values and factorised layers are multiplied back, so the plain
    model computes what the compressed one does, except W8A8 activation quantization, which has no stock form.
    """
    from llmpress.compress.storage import MANIFEST, to_plain_
    from llmpress.files import check_destination

    src, dst = Path(src), Path(dst)
    check_destination(dst, [src], overwrite)
    if not (src / MANIFEST).is_file():
        raise LlmpressError(f"{src} is not a compressed folder llmpress wrote (no {MANIFEST}): its weights are "
                            "plain already, nothing to de-quantize")  # fmt: skip
    model = to_plain_(load_model(src))
    extra = {name: (src / name).read_text() for name in ("recipe.yaml", METADATA) if (src / name).is_file()}
    save_model(model, load_tokenizer(src), dst, extra_files=extra, sparse="dense")
    return f"{dst}: plain safetensors folder, {folder_bytes(dst, '*.safetensors')} bytes of weights"


def to_gguf(src: str | Path, dst: str | Path, float_type: str = "f16", fallback: str = "q8_0",
            overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Write the model folder `src` (compressed or plain) as one GGUF file `dst` for llama.cpp
    (`llmpress.export.gguf`): quantized layers on a GGUF grid as their own codes; returns the writer's report."""
    from llmpress.export.gguf import export_gguf

    src, dst = Path(src), Path(dst)
    if dst.suffix != ".gguf":
        raise LlmpressError(f"{dst}: a GGUF file's name ends in .gguf")
    if dst.exists() and (dst.is_dir() or not overwrite):
        raise LlmpressError(f"{dst} already exists" + ("" if dst.is_dir() else "; pass --overwrite to replace it"))
    if not dst.parent.is_dir():
        raise LlmpressError(f"{dst.parent} is not a folder")
    return export_gguf(load_model(src), src, dst, float_type, fallback).to_dict()


def _check_finite(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise LlmpressError(f"compression produced NaN/Inf in {name}; the model was not saved")
