"""The block-by-block compression engine: `compress_(model, recipe, calibration_ids)`.

SparseGPT/Wanda-style sequential calibration. The decoder blocks stay on the host; one block at a time moves to
the compute device:

    1. run the embeddings on the calibration windows and capture what block 0 receives (hidden states plus the
       keyword arguments the model passes every block: rotary position embeddings, attention mask, ...);
    2. for block i: collect the statistics the recipe's methods need from its inputs (one batched forward pass
       with hooks on the targeted linear layers), compress its linear layers stage by stage, then run the
       compressed block to produce the inputs of block i + 1;
    3. move the block back to the host.

So peak accelerator memory is one block plus the calibration activations, whatever the model's depth, and each
block is calibrated on the inputs it will really see after the blocks before it were compressed.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmpress.compress import magnitude, wanda
from llmpress.config import Recipe, SparsityStage
from llmpress.errors import LlmpressError

log = logging.getLogger(__name__)

METHOD_MODULES = {"magnitude": magnitude, "wanda": wanda}


@dataclass
class LayerRecord:
    name: str
    method: str
    stage: int
    shape: tuple[int, int]
    target_sparsity: float
    sparsity: float


@dataclass
class CompressionReport:
    recipe: str
    layers: list[LayerRecord] = field(default_factory=list)
    stage_seconds: dict[int, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    calibration_tokens: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "total_seconds": round(self.total_seconds, 3),
            "calibration_tokens": self.calibration_tokens,
            "device": self.device,
            "stage_seconds": {str(k): round(v, 3) for k, v in self.stage_seconds.items()},
            "layers": [vars(rec) | {"shape": list(rec.shape)} for rec in self.layers],
        }


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded; the rest of the forward is not needed."""


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the longest ModuleList whose length is config.num_hidden_layers."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers)
    ]
    if not candidates:
        raise LlmpressError(f"could not find the decoder blocks of {type(model).__name__} (no ModuleList of blocks)")
    return max(candidates, key=lambda item: len(item[1]))


def targeted_linears(block: nn.Module, prefix: str, stage: SparsityStage) -> dict[str, nn.Linear]:
    """Linear layers of `block` whose full name matches a target regex and no ignore regex (re.fullmatch)."""
    found = {}
    for name, module in block.named_modules():
        full = f"{prefix}.{name}"
        if not isinstance(module, nn.Linear):
            continue
        if any(re.fullmatch(p, full) for p in stage.targets) and not any(re.fullmatch(p, full) for p in stage.ignore):
            found[full] = module
    return found


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Run everything before block 0 on `device` and record, per batch, block 0's hidden states and kwargs."""
    hidden: list[torch.Tensor] = []
    kwargs_per_batch: list[dict[str, Any]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        states = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(states)
        kwargs_per_batch.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    first = blocks[0]
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    # Only the modules outside the blocks go to the device (embeddings, rotary tables, norm, head), plus block 0
    # whose hook stops the forward before it computes anything.
    saved = list(blocks)
    for i in range(1, len(blocks)):
        blocks[i] = nn.Identity()
    try:
        model.to(device)
        for ids in batches:
            with contextlib.suppress(_StopForward):
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        handle.remove()
        model.to("cpu")
        for i, block in enumerate(saved):
            blocks[i] = block
    return hidden, kwargs_per_batch


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def compress_(
    model: nn.Module,
    recipe: Recipe,
    calibration_ids: torch.Tensor | None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
) -> CompressionReport:
    """Apply `recipe` to `model` in place, block by block, and report what was done to every layer.

    `calibration_ids` is a [samples, seq_len] LongTensor of token ids; it may be None only if no stage needs
    activations (magnitude pruning).
    """
    device = torch.device(device)
    modules = [METHOD_MODULES[stage.method] for stage in recipe.stages]
    needs_data = any(m.needs_input_norms for m in modules)
    if needs_data and (calibration_ids is None or calibration_ids.numel() == 0):
        raise LlmpressError(f"recipe {recipe.name!r} needs calibration data, none was given")
    say = progress or log.info
    report = CompressionReport(recipe=recipe.name, device=str(device))
    start = time.perf_counter()
    model.eval()

    blocks_name, blocks = find_decoder_blocks(model)
    # Fail before any work if a stage's targets match nothing.
    for i, stage in enumerate(recipe.stages):
        if not any(targeted_linears(b, f"{blocks_name}.{j}", stage) for j, b in enumerate(blocks)):
            raise LlmpressError(
                f"recipe {recipe.name!r} stage {i} ({stage.method}): targets {stage.targets} "
                f"(ignore {stage.ignore}) match no Linear layer in {blocks_name}.*; "
                f"example layer names: {', '.join(_example_names(blocks, blocks_name))}"
            )

    hidden: list[torch.Tensor] = []
    kwargs_per_batch: list[dict[str, Any]] = []
    if needs_data:
        assert calibration_ids is not None
        batches = list(calibration_ids.split(batch_size))
        report.calibration_tokens = calibration_ids.numel()
        hidden, kwargs_per_batch = capture_block_inputs(model, blocks, batches, device)
        kwargs_per_batch = [_to(kw, device) for kw in kwargs_per_batch]

    for index, block in enumerate(blocks):
        t_block = time.perf_counter()
        prefix = f"{blocks_name}.{index}"
        block.to(device)
        for stage_index, (stage, method) in enumerate(zip(recipe.stages, modules, strict=True)):
            t_stage = time.perf_counter()
            layers = targeted_linears(block, prefix, stage)
            if not layers:
                continue
            norms = _input_sq_norms(block, layers, hidden, kwargs_per_batch) if method.needs_input_norms else {}
            for name, layer in layers.items():
                mask = method.prune_(layer, stage, norms.get(name))
                report.layers.append(
                    LayerRecord(
                        name=name,
                        method=stage.method,
                        stage=stage_index,
                        shape=tuple(layer.weight.shape),
                        target_sparsity=stage.target_sparsity,
                        sparsity=1.0 - mask.float().mean().item(),
                    )
                )
            report.stage_seconds[stage_index] = report.stage_seconds.get(stage_index, 0.0) + (
                time.perf_counter() - t_stage
            )
        if needs_data and index + 1 < len(blocks):
            # The compressed block's outputs are the next block's inputs.
            hidden = [_block_output(block(h.to(device), **kw)) for h, kw in zip(hidden, kwargs_per_batch, strict=True)]
        block.to("cpu")
        say(f"block {index + 1}/{len(blocks)} compressed in {time.perf_counter() - t_block:.2f}s")

    report.total_seconds = time.perf_counter() - start
    return report


def _input_sq_norms(
    block: nn.Module, layers: dict[str, nn.Linear], hidden: list[torch.Tensor], kwargs_per_batch: list[dict]
) -> dict[str, torch.Tensor]:
    """sum over calibration tokens of x_j^2 for the input of every layer, from one forward pass of the block."""
    sums = {
        name: torch.zeros(layer.in_features, dtype=torch.float32, device=layer.weight.device)
        for name, layer in layers.items()
    }

    def make_hook(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name].add_((x * x).sum(dim=0))

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        for h, kw in zip(hidden, kwargs_per_batch, strict=True):
            block(h, **kw)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def _example_names(blocks: nn.ModuleList, blocks_name: str) -> list[str]:
    return [f"{blocks_name}.0.{n}" for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)][:4]
