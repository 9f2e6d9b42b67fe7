"""The block-by-block compression engine: `compress_(model, recipe, calibration_ids)`.

SparseGPT/GPTQ-style sequential calibration. The decoder blocks stay on the host; one block at a time moves to
the compute device:

    1. run the embeddings on the calibration windows and capture what block 0 receives (hidden states plus the
       keyword arguments the model passes every block: rotary position embeddings, attention mask, ...);
    2. for block i: collect the statistics each stage needs from the block's inputs (one batched forward pass
       with hooks on the targeted linear layers: sum x^2 for Wanda, the Hessian 2/n X X^T for SparseGPT and
       GPTQ), compress, then run the compressed block to produce the inputs of block i + 1;
    3. move the block back to the host.

So peak accelerator memory is one block plus the calibration activations, whatever the model's depth, and each
block is calibrated on the inputs it will really see after the blocks before it were compressed.

On a GPU (see benchmarks/gpu_compress.py): layers that read the same input (q/k/v, gate/up) share one set of
statistics, computed once; the statistics pass stops as soon as every hooked layer has its input; Hessians use
tensor cores with fp32 accumulation (`calibration.gram`); SparseGPT's and GPTQ's column loops replay CUDA graphs
(`cuda_graphs`); and `offload.BlockMover` uploads the next block and downloads the previous one through pinned
memory in a background thread while the current block is worked on. `CompressionReport.phase_seconds` says where
time went.

The engine is a scheduler and knows no method: it looks each stage's method up in the registry
(`methods.py`, the contract: a method's kind, the statistics it reads, its functions) and leaves the rest to leaf
modules - `targets` (which layers), `calibration` (activations and statistics), `offload` (walking the blocks
on and off the device), `records` (the report). OWL (`owl.py`) is not a method but a per-layer allocation of a
sparsity stage's target, computed in one extra pass before the stage's own.

Consecutive layer and block stages share one pass over the blocks; a model stage ends the pass.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llmpress.compress import cuda_graphs, experts, owl
from llmpress.compress.calibration import LayerStats
from llmpress.compress.methods import Method, ModelContext, method_for
from llmpress.compress.offload import iterate_blocks
from llmpress.compress.records import CompressionReport, PhaseTimer, StageRecord, add_layer_records, summarise
from llmpress.compress.targets import check_targets, find_decoder_blocks, targeted_linears
from llmpress.config import ExpertCoverage, Recipe
from llmpress.errors import LlmpressError

log = logging.getLogger(__name__)


def check_recipe(model: nn.Module, recipe: Recipe) -> None:
    """Everything about `recipe` that can be checked against `model` before any layer changes: targets and N:M
    tiling (`targets.check_targets`), each method's own limits (`Method.check`), and no layer quantized by two
    stages (the second would silently replace the first's codes). First of all, the family (`anatomy.check_family`)."""
    from llmpress.compress.anatomy import check_family

    check_family(model)
    check_targets(model, recipe)
    for i, stage in enumerate(recipe.stages):
        if (check := method_for(stage).check) is not None:
            try:
                check(model, stage)
            except LlmpressError as exc:
                raise LlmpressError(f"recipe {recipe.name!r} stage {i} ({stage.method}): {exc}") from None
    quantizing = [(i, s) for i, s in enumerate(recipe.stages) if hasattr(s, "targets") and _quantizes_weights(s)]
    if len(quantizing) < 2:  # one quantizing stage cannot collide with itself: skip the name matching
        return
    blocks_name, blocks = find_decoder_blocks(model)
    for j, block in enumerate(blocks):
        owners: dict[str, int] = {}
        for i, stage in quantizing:
            for name in targeted_linears(block, f"{blocks_name}.{j}", stage):
                if name in owners:
                    raise LlmpressError(f"recipe {recipe.name!r}: {name} is quantized by stage {owners[name]} "
                                        f"({recipe.stages[owners[name]].method}) and again by stage {i} "
                                        f"({stage.method}); the second would replace the first's codes. Quantize "
                                        "each layer once")  # fmt: skip
                owners[name] = i


def _quantizes_weights(stage: Any) -> bool:
    return bool(getattr(stage, "bits", None) or getattr(stage, "weight_bits", None))


def _stage_groups(recipe: Recipe) -> list[list[int]]:
    """Stage indices split into passes: runs of layer/block stages, and every model stage on its own."""
    groups: list[list[int]] = []
    for i, stage in enumerate(recipe.stages):
        if method_for(stage).kind == "model" or not groups or method_for(recipe.stages[groups[-1][0]]).kind == "model":
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


@torch.no_grad()
def compress_(
    model: nn.Module,
    recipe: Recipe,
    calibration_ids: torch.Tensor | None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
    teacher: Callable[[], nn.Module] | None = None,
) -> CompressionReport:
    """Apply `recipe` to `model` in place, stage by stage, and report what was done to every layer.

    `calibration_ids` is a [samples, seq_len] LongTensor of token ids; it may be None only if no stage needs
    activations (magnitude, RTN, plain low-rank). `teacher` builds the model distillation learns from; by default
    a copy of `model` taken before the first stage.
    """
    device = torch.device(device)
    needs_data = any(method_for(stage).wants_data(stage) for stage in recipe.stages)
    if needs_data and (calibration_ids is None or calibration_ids.numel() == 0):
        raise LlmpressError(f"recipe {recipe.name!r} needs calibration data, none was given")
    say = progress or log.info
    report = CompressionReport(recipe=recipe.name, device=str(device))
    report.calibration_tokens = calibration_ids.numel() if needs_data and calibration_ids is not None else 0
    report.expert_floor = recipe.experts.min_tokens
    start = time.perf_counter()
    model.eval()
    experts.unfuse_experts_(model)  # a mixture of experts' 3-D weights become linears the methods reach
    check_recipe(model, recipe)

    snapshot: nn.Module | None = None
    if teacher is None and any(method_for(stage).needs_teacher for stage in recipe.stages):
        snapshot = copy.deepcopy(model).cpu()

    for group in _stage_groups(recipe):
        stages = [(i, recipe.stages[i]) for i in group]
        first = recipe.stages[group[0]]
        if method_for(first).kind == "model":
            record = StageRecord(group[0], first.method, first.model_dump(mode="json", by_alias=True))
            t0 = time.perf_counter()
            ctx = ModelContext(calibration_ids, device, batch_size, teacher or (lambda: snapshot), say)
            rows = method_for(first).apply(model, first, ctx)
            record.seconds = time.perf_counter() - t0
            record.summary = add_layer_records(report, model, group[0], first, rows)
            record.layers = len(rows)
            report.stages.append(record)
            say(f"stage {group[0]} ({first.method}) done in {record.seconds:.1f}s")
            continue
        wanted = any(method_for(s).wants_data(s) for _, s in stages)
        with experts.all_experts(model):  # every expert sees every calibration token; outputs use real routing
            _run_pass(model, stages, calibration_ids if wanted else None, device, batch_size, report, say,
                      recipe.experts)  # fmt: skip

    report.total_seconds = time.perf_counter() - start
    return report


def _run_pass(model: nn.Module, stages: list[tuple[int, Any]], calibration_ids: torch.Tensor | None,
              device: torch.device, batch_size: int, report: CompressionReport,
              say: Callable[[str], None], coverage: ExpertCoverage) -> None:  # fmt: skip
    """One pass over the blocks applying the layer and block stages in `stages` to each block in turn."""
    per_layer_sparsity: dict[int, dict[str, float]] = {}
    for index, stage in stages:
        if getattr(stage, "owl", None) is not None:
            say(f"stage {index} ({stage.method}): OWL outlier ratios (one extra pass)")
            per_layer_sparsity[index] = owl.layer_sparsities(model, stage, calibration_ids, device, batch_size)
    records = {index: StageRecord(index, stage.method, stage.model_dump(mode="json", by_alias=True))
               for index, stage in stages}  # fmt: skip
    n_blocks = len(find_decoder_blocks(model)[1])
    timer = PhaseTimer(device, report.phase_seconds)
    wants_dense = any(method_for(stage).dense_weight for _, stage in stages)
    for b, prefix, block, calib in iterate_blocks(model, calibration_ids, device, batch_size, timer):
        t_block = time.perf_counter()
        if calib is not None:
            _count_expert_tokens(block, prefix, calib, report, coverage, say)
        # DSnoT grows pruned weights back at their values from before pruning: keep the block's weights as they
        # were before any stage of this pass changed them (one block's worth of memory, only when asked for).
        dense = {f"{prefix}.{n}": m.weight.detach().clone() for n, m in block.named_modules()
                 if wants_dense and isinstance(m, nn.Linear)}  # fmt: skip
        for index, stage in stages:
            t0 = time.perf_counter()
            method = method_for(stage)
            if method.kind == "block":
                with timer("compress"):
                    rows = method.apply(block, prefix, stage, calib)
            else:
                layers = targeted_linears(block, prefix, stage)
                with timer("statistics"):
                    stats = {}
                    if calib is not None and layers:
                        stats = calib.layer_stats(block, layers, method.statistic, method.input_sum)
                with timer("compress"):
                    rows = _apply_layer_stage(method, stage, layers, stats, per_layer_sparsity.get(index), dense)
            records[index].seconds += time.perf_counter() - t0
            records[index].layers += len(rows)
            add_layer_records(report, model, index, stage, rows)
        say(f"block {b + 1}/{n_blocks} compressed in {time.perf_counter() - t_block:.2f}s")
    cuda_graphs.clear()
    for index, _ in stages:
        records[index].summary = summarise(report, index)
        report.stages.append(records[index])


def _count_expert_tokens(block: nn.Module, prefix: str, calib: Any, report: CompressionReport,
                         coverage: ExpertCoverage, say: Callable[[str], None]) -> None:  # fmt: skip
    """Count the calibration tokens the router sends each expert of the block (before its compression), and warn
    or fail (recipe `experts`) where an expert gets fewer than the floor."""
    for name, counts in experts.routed_tokens(block, prefix, calib).items():
        report.expert_tokens[name] = counts
        low = {e: c for e, c in enumerate(counts) if c < coverage.min_tokens}
        if not low:
            continue
        message = (f"{name}: the router sent {len(low)} of {len(counts)} experts fewer than "
                   f"experts.min_tokens={coverage.min_tokens} calibration tokens (expert: tokens "
                   f"{', '.join(f'{e}: {c}' for e, c in low.items())}); they are calibrated on all "
                   "tokens, but tuned to inputs they rarely see. More or more varied calibration data raises the "
                   "counts")  # fmt: skip
        if coverage.below_floor == "fail":
            raise LlmpressError(f"{message}. Nothing was saved (experts.below_floor: fail)")
        report.warnings.append(message)
        say(f"warning: {message}")


def _apply_layer_stage(method: Method, stage: Any, layers: dict[str, nn.Linear], stats: dict[str, LayerStats],
                       sparsities: dict[str, float] | None,
                       dense: dict[str, torch.Tensor]) -> list[dict[str, Any]]:  # fmt: skip
    """Apply a layer method to every targeted layer of a block; one row per layer."""
    rows: list[dict[str, Any]] = []
    for names in _shared_groups(layers, stats, method, sparsities):
        layer_stage = stage if sparsities is None else stage.model_copy(update={"sparsity": sparsities[names[0]]})
        group_stats = stats.get(names[0], LayerStats(tokens=0))
        if len(names) > 1:  # layers reading one input, processed as one matrix (same result, fewer steps)
            results = method.apply_shared({name: layers[name] for name in names}, layer_stage, group_stats)
        else:
            if method.dense_weight:
                group_stats = dataclasses.replace(group_stats, dense_weight=dense.get(names[0]))
            results = {names[0]: method.apply(layers[names[0]], layer_stage, group_stats) or {}}
        rows += [{"name": name, "layer": layers[name], **details} for name, details in results.items()]
    return rows


def _shared_groups(layers: dict[str, nn.Linear], stats: dict[str, LayerStats], method: Method,
                   sparsities: dict[str, float] | None) -> list[list[str]]:  # fmt: skip
    """Layer names in order, grouped where the method can process layers sharing one input in one go.

    Layers group when they share one LayerStats (the same input tensor), the method has `apply_shared`, and
    (under OWL) their sparsities are equal; otherwise every layer is its own group.
    """
    groups: list[list[str]] = []
    by_stats: dict[int, list[str]] = {}
    for name in layers:
        s = stats.get(name)
        key = id(s) if s is not None and method.apply_shared is not None else None
        if key in by_stats and (sparsities is None or sparsities[name] == sparsities[by_stats[key][0]]):
            by_stats[key].append(name)
            continue
        groups.append([name])
        if key is not None:
            by_stats.setdefault(key, groups[-1])
    return groups
