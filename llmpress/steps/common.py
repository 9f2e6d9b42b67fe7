"""What several steps share: data-version checks, sparsity and size on disk, peak memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from llmpress.errors import LlmpressError
from llmpress.evaluate.speed import peak_rss_mb


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process so far (VmHWM, MB) and peak CUDA memory allocated (MB)."""
    out = {"host_peak_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def check_data_version(path: str | Path, expected_md5: str | None) -> None:
    """Refuse a data file that is no longer the version DVC recorded (edited or replaced after `dvc repro`)."""
    if expected_md5 is None:
        return
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()
    if digest != expected_md5:
        raise LlmpressError(
            f"{path} changed after DVC versioned it (md5 {digest}, dvc.lock says {expected_md5}); "
            "run `llmpress data` (dvc repro) to rebuild it, or `dvc checkout` to restore it"
        )


def folder_bytes(folder: str | Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob(pattern) if p.is_file())


def measure_sparsity(model: nn.Module, layer_names: list[str]) -> dict[str, float]:
    modules = dict(model.named_modules())
    missing = [n for n in layer_names if n not in modules]
    if missing:
        raise LlmpressError(f"layers not found in the saved model: {missing[:3]}")
    return {n: (modules[n].weight == 0).float().mean().item() for n in layer_names}
