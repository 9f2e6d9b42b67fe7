"""What a compression did, layer by layer and stage by stage: the report `compress_` returns (and
`llmpress.json` keeps), and the per-phase timer behind its `phase_seconds`."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class LayerRecord:
    """What one stage did to one layer. `sparsity` is measured on the weight afterwards (zeros / size)."""

    name: str
    method: str
    stage: int
    shape: tuple[int, ...]
    target_sparsity: float | None
    sparsity: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageRecord:
    index: int
    method: str
    settings: dict[str, Any]
    seconds: float = 0.0
    layers: int = 0
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompressionReport:
    recipe: str
    layers: list[LayerRecord] = field(default_factory=list)
    stages: list[StageRecord] = field(default_factory=list)
    total_seconds: float = 0.0
    calibration_tokens: int = 0
    device: str = "cpu"
    phase_seconds: dict[str, float] = field(default_factory=dict)  # see PhaseTimer
    # mixture of experts: {experts module: calibration tokens the router sent each expert}, and the floor
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    expert_floor: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def expert_summary(self) -> dict[str, Any]:
        """experts, the fewest routed tokens any expert got, and how many got fewer than the floor ({} if none)."""
        counts = [c for per_layer in self.expert_tokens.values() for c in per_layer]
        if not counts:
            return {}
        return {"experts": len(counts), "expert_min_tokens": min(counts), "expert_floor": self.expert_floor,
                "experts_below_floor": sum(c < self.expert_floor for c in counts)}  # fmt: skip

    @property
    def stage_seconds(self) -> dict[int, float]:
        return {s.index: s.seconds for s in self.stages}

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "total_seconds": round(self.total_seconds, 3),
            "calibration_tokens": self.calibration_tokens,
            "device": self.device,
            "stage_seconds": {str(k): round(v, 3) for k, v in self.stage_seconds.items()},
            "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()},
            "expert_tokens": self.expert_tokens,
            **self.expert_summary,
            "warnings": self.warnings,
            "stages": [vars(s) | {"seconds": round(s.seconds, 3)} for s in self.stages],
            "layers": [vars(rec) | {"shape": list(rec.shape)} for rec in self.layers],
        }


class PhaseTimer:
    """Seconds spent per phase of the block passes (capture, onload, statistics, compress, propagate, offload),
    summed over blocks. On CUDA each phase waits for the device at its end, so GPU work is counted in the phase
    that queued it (a few synchronisations per block, negligible against a block's work)."""

    def __init__(self, device: torch.device, seconds: dict[str, float]) -> None:
        self.sync = device.type == "cuda"
        self.seconds = seconds

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def add_layer_records(report: CompressionReport, model: nn.Module, index: int, stage: Any,
                       rows: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """Turn a method's rows ({"name", "layer" or "shape", details...}) into LayerRecords."""
    target = stage.target_sparsity if hasattr(stage, "target_sparsity") else None
    for row in rows:
        row = dict(row)
        name = row.pop("name")
        layer = row.pop("layer", None)
        shape = tuple(row.pop("shape", tuple(layer.weight.shape) if layer is not None else ()))
        if (sparsity := row.pop("sparsity", None)) is None:
            sparsity = (layer.weight == 0).float().mean().item() if layer is not None else 0.0
        row_target = row.pop("target_sparsity", target)
        report.layers.append(LayerRecord(name, stage.method, index, shape, row_target, sparsity, row))
    return summarise(report, index)


def summarise(report: CompressionReport, index: int) -> dict[str, Any]:
    recs = [r for r in report.layers if r.stage == index]
    if not recs:
        return {}
    sizes = [max(1, math.prod(r.shape)) for r in recs]
    summary: dict[str, Any] = {
        "layers": len(recs),
        "sparsity": sum(r.sparsity * n for r, n in zip(recs, sizes, strict=True)) / sum(sizes),
    }
    if bits := {r.details["bits"] for r in recs if r.details.get("bits") is not None}:
        summary["bits"] = sorted(bits)
    return summary
