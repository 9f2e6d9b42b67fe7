"""AWQ: activation-aware weight quantization.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han (2024), "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration". Reference: mit-han-lab/llm-awq, `awq/quantize/auto_scale.py`, `auto_clip.py`
and `pre_quant.py` (`run_awq`), whose structure and defaults this file follows.

The weights that meet large activations matter most. Instead of keeping them in higher precision, AWQ scales each
input channel j of a linear layer up by s_j before quantization (W[:, j] * s_j, so its relative rounding error
shrinks) and folds 1 / s_j into the operation that produces the input (an RMSNorm's weight, or the rows of the
previous linear), which leaves the float model unchanged. Per block:

    1. scale groups, as in the reference for Llama:
         input_layernorm          -> q, k, v    output checked on self_attn
         v_proj                   -> o          only if v.out_features == o.in_features (skipped under GQA,
                                                 e.g. SmolLM2's 9 query / 3 KV heads, as in the reference)
         post_attention_layernorm -> gate, up   output checked on mlp
         up_proj                  -> down       output checked on down_proj
       A group is searched only if every linear it scales is targeted by the stage.
    2. for each group, x_max = mean |x| per input channel; for ratio in {0, 1/grid, ..., (grid-1)/grid}:
       s = x_max^ratio / sqrt(max * min), W <- Q(W * s) / s, and the squared error of the inspected module's
       output against its float output on the calibration inputs; keep the best ratio. Every group is searched
       on the unmodified block (the reference's auto_scale_block), then all scales are folded (apply_scale).
    3. auto_clip (stage.clip): for every targeted linear except q and k (the q-k product makes clipping hard to
       judge, as in the reference), per output row and quantization group, the clipping threshold
       max|w| * (1 - i/20), i < 10, that minimises the error of that group's partial output on 512 tokens.
    4. the result is round-to-nearest on the transformed weights: `quant.quantize_rtn` + `quant.attach_`.

Differences from the reference: the grid is llmpress's (`quant.fit_grid`: min-max with 0 in range, fp16 scales),
also for the search; ragged last groups are allowed (576 inputs at group size 128); and, following the engine,
block i is calibrated on the outputs of blocks < i *after* their quantization (the reference passes float outputs).
Memory: the search keeps the inputs and float outputs of the inspected modules for at most MAX_SEARCH_TOKENS
calibration tokens (whole batches, every k-th batch, deterministic; the default 32 x 256 uses all of them).
Time: `grid` forward passes of self_attn, mlp and down_proj per block (SmolLM2-135M: ~30 min on one CPU thread).

Recipe example (`recipes/awq-w4g128.yaml`):

    name: awq-w4g128
    stages:
      - method: awq
        bits: 4
        group_size: 128
        targets: ['.*_proj']
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmpress.compress import quant
from llmpress.compress.anatomy import anatomy, check_layout, check_unchanged, first_batch_output, fold_into_norm_
from llmpress.compress.calibration import BlockCalibration, block_output
from llmpress.compress.methods import Method, register
from llmpress.compress.targets import matches, targeted_linears
from llmpress.config import AWQStage

MAX_SEARCH_TOKENS = 8192
CLIP_GRID = 20  # auto_clip_layer defaults: n_grid, max_shrink, n_sample_token
CLIP_MAX_SHRINK = 0.5
CLIP_TOKENS = 512


@dataclass
class ScaleGroup:
    """Linears whose input channels share one scale vector, the op that folds 1/s, and the module whose output
    the search compares."""

    prev: nn.Module  # RMSNorm / LayerNorm, or the previous nn.Linear
    linears: dict[str, nn.Linear]  # full name -> layer
    inspect: nn.Module
    norm_offset: float = 0.0  # a norm's weight offset (anatomy.Architecture)
    # modules reading the same input that are not quantized but must have their columns scaled too, so their
    # output does not change: a mixture of experts' router
    readers: list[nn.Module] = field(default_factory=list)


def scale_groups(block: nn.Module, prefix: str) -> list[ScaleGroup]:
    """The reference's four scale groups, by the block's architecture (v -> o only without a GQA shape mismatch).
    A fused qkv (gate_up) linear appears once in its group; v -> o and up -> down scale its last rows. In a
    mixture of experts, the MLP norm scales every expert's gate and up (and the router's columns, unquantized),
    and each expert has its own up -> down group."""
    a = anatomy(block)
    n, offset = a.names(prefix), a.architecture.norm_offset
    groups = [ScaleGroup(a.attn_norm, {n["q"]: a.q, n["k"]: a.k, n["v"]: a.v}, a.attn, offset)]
    if a.v_rows == a.o.in_features:
        groups.append(ScaleGroup(a.v, {n["o"]: a.o}, a.o))
    if a.experts is not None:  # every expert's gate and up read the norm's output, and so does the router
        experts = a.expert_names(prefix)
        fcs = {name: fc for e in experts for name, fc in (e["gate"], e["up"])}
        groups.append(ScaleGroup(a.mlp_norm, fcs, a.mlp, offset, readers=[a.router]))
        groups += [ScaleGroup(e["up"][1], dict([e["down"]]), e["down"][1]) for e in experts]
    else:
        groups.append(ScaleGroup(a.mlp_norm, {n["gate"]: a.gate, n["up"]: a.up}, a.mlp, offset))
        groups.append(ScaleGroup(a.up, {n["down"]: a.down}, a.down))
    # norms without a weight (OLMo) cannot absorb a scale: only the linear -> linear groups remain
    return [g for g in groups if a.architecture.norm_weights or isinstance(g.prev, nn.Linear)]


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                  signed: bool = False) -> torch.Tensor:  # fmt: skip
    """Q(w) on llmpress's grid, in float32: the values the final round-to-nearest step stores."""
    return quant.quantize_rtn(w, bits, group_size, symmetric, signed=signed).dequantize()


def search_calibration(calib: BlockCalibration, max_tokens: int = MAX_SEARCH_TOKENS) -> BlockCalibration:
    """Every k-th calibration batch, k the smallest keeping <= max_tokens tokens (at least one batch)."""
    if calib.tokens <= max_tokens:
        return calib
    per_batch = calib.tokens / len(calib.hidden)
    step = math.ceil(len(calib.hidden) / max(1, int(max_tokens // per_batch)))
    return type(calib)(calib.hidden[::step], calib.kwargs[::step])


def _capture_calls(block: nn.Module, calib: BlockCalibration, modules: list[nn.Module]) -> list[list[tuple]]:
    """(args, kwargs) of every call of each module while the block runs on the calibration batches."""
    calls: list[list[tuple]] = [[] for _ in modules]

    def make_hook(i: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[i].append((args, dict(kwargs)))

        return hook

    handles = [m.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        calib.outputs(block)
    finally:
        for handle in handles:
            handle.remove()
    return calls


@torch.no_grad()
def search_scale(group: ScaleGroup, calls: list[tuple], stage: AWQStage) -> tuple[float, torch.Tensor]:
    """The reference's _search_module_scale: the best ratio and its scales [in_features] (float32)."""
    xs = [a[0] if a else k["hidden_states"] for a, k in calls]  # self_attn gets hidden_states=..., the rest args
    features = xs[0].shape[-1]
    x_abs_sum = sum(x.reshape(-1, features).float().abs().sum(dim=0) for x in xs)
    x_max = x_abs_sum / sum(x.numel() // features for x in xs)  # mean |x| per channel (get_act_scale)
    targets = [block_output(group.inspect(*a, **k)) for a, k in calls]
    originals = {name: fc.weight.detach().clone() for name, fc in group.linears.items()}

    best = (math.inf, -1.0, torch.ones_like(x_max))
    for i in range(stage.grid):
        ratio = i / stage.grid
        scales = x_max.pow(ratio).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        for name, fc in group.linears.items():
            w = originals[name].float() * scales
            q_w = fake_quantize(w, stage.bits, stage.group_size, stage.symmetric, stage.signed_scale)
            fc.weight.copy_(q_w / scales)
        sq_err, count = 0.0, 0
        for (args, kwargs), target in zip(calls, targets, strict=True):
            out = block_output(group.inspect(*args, **kwargs))
            sq_err += (target.float() - out.float()).pow(2).sum().item()  # float prevents overflow
            count += target.numel()
        loss = sq_err / count
        if loss < best[0]:  # strict: ties keep the smaller ratio, as in the reference
            best = (loss, ratio, scales)
    for name, fc in group.linears.items():
        fc.weight.copy_(originals[name])
    if best[1] < 0:
        raise FloatingPointError(f"AWQ scale search found no finite loss for {list(group.linears)}")
    return best[1], best[2]


@torch.no_grad()
def apply_scale_(group: ScaleGroup, scales: torch.Tensor) -> None:
    """Fold: the previous op's output channels / s, the linears' input columns * s (scale_ln_fcs, scale_fc_fc)."""
    prev = group.prev
    if isinstance(prev, nn.Linear):
        s = scales.to(prev.weight.device, prev.weight.dtype)
        prev.weight[-s.numel() :].div_(s.view(-1, 1))
        if prev.bias is not None:
            prev.bias[-s.numel() :].div_(s)
    else:
        fold_into_norm_(prev, scales, group.norm_offset)
    for fc in [*group.linears.values(), *group.readers]:
        fc.weight.mul_(scales.to(fc.weight.device, fc.weight.dtype).view(1, -1))


@torch.no_grad()
def auto_clip_(layer: nn.Linear, x: torch.Tensor, stage: AWQStage) -> float:
    """auto_clip_layer + apply_clip: clamp each (row, group) of the weight to the threshold with the least error
    of the group's partial output on a token subsample. Returns the mean threshold / max|w| (1.0: no clipping)."""
    x = x[:: max(1, x.shape[0] // CLIP_TOKENS)].float()
    w = layer.weight
    gs = stage.group_size or w.shape[1]
    ratios = []
    for start in range(0, w.shape[1], gs):
        wg, xg = w[:, start : start + gs].float(), x[:, start : start + gs]
        org_out = xg @ wg.T  # [tokens, rows]: this group's share of the output
        org_max = wg.abs().amax(dim=1, keepdim=True)
        best_max, min_err = org_max.clone(), torch.full_like(org_max, math.inf)
        for i_s in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
            max_val = org_max * (1 - i_s / CLIP_GRID)
            q_w = fake_quantize(wg.clamp(-max_val, max_val), stage.bits, None, stage.symmetric, stage.signed_scale)
            err = (xg @ q_w.T - org_out).pow(2).mean(dim=0).view(-1, 1)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, max_val, best_max)
        clamp = best_max.to(w.dtype)
        w[:, start : start + gs] = torch.clamp(w[:, start : start + gs], -clamp, clamp)
        ratios.append((best_max / org_max.clamp(min=1e-12)).mean().item())
    return sum(ratios) / len(ratios)


@torch.no_grad()
def scale_block_(block: nn.Module, prefix: str, stage: AWQStage, calib: BlockCalibration) -> dict[str, float]:
    """Search and fold the activation-aware scales of every fully targeted group (float output unchanged).
    Returns {linear name: best ratio of its group}."""

    groups = [g for g in scale_groups(block, prefix) if all(matches(name, stage) for name in g.linears)]
    if not groups:
        return {}
    search = search_calibration(calib)
    calls = _capture_calls(block, search, [g.inspect for g in groups])
    found = [search_scale(g, c, stage) for g, c in zip(groups, calls, strict=True)]
    before = first_batch_output(block, calib)
    ratios: dict[str, float] = {}
    for group, (ratio, scales) in zip(groups, found, strict=True):
        apply_scale_(group, scales)
        ratios.update(dict.fromkeys(group.linears, ratio))
    check_unchanged(block, calib, before, "awq", prefix)
    return ratios


@torch.no_grad()
def apply_block_(block: nn.Module, prefix: str, stage: AWQStage, calib: BlockCalibration) -> list[dict[str, Any]]:
    """Scale, clip and quantize the block's targeted linears in place; one row per quantized linear."""

    if calib is None:
        raise ValueError("awq needs calibration activations")
    layers = targeted_linears(block, prefix, stage)
    ratios = scale_block_(block, prefix, stage, calib)
    clips: dict[str, float] = {}
    if stage.clip:
        to_clip = {n: m for n, m in layers.items() if not n.endswith(("q_proj", "k_proj"))}
        if to_clip:
            inputs = search_calibration(calib).inputs(block, to_clip)  # after scaling, as apply_scale does
            for name, layer in to_clip.items():
                clips[name] = auto_clip_(layer, inputs.pop(name), stage)
    rows = []
    for name, layer in layers.items():
        quant.attach_(layer, quant.quantize_rtn(layer.weight.detach(), stage.bits, stage.group_size, stage.symmetric,
                                                signed=stage.signed_scale))  # fmt: skip
        rows.append({"name": name, "layer": layer, "bits": stage.bits, "group_size": stage.group_size,
                     "symmetric": stage.symmetric, "scale_ratio": ratios.get(name),
                     "clip": clips.get(name)})  # fmt: skip
    return rows


register(Method(AWQStage, "block", apply_block_, check=check_layout))
