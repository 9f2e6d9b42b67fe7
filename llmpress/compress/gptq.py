"""GPTQ: one-shot weight quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh (2023), "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023); reference implementation IST-DASLab/gptq, `GPTQ.fasterquant`.

For a linear layer with weight W [out, in] and calibration inputs X, GPTQ minimises ||W X - Q X||^2 row by row
with the Optimal Brain Surgeon update: columns are quantized one at a time, and the rounding error of column j,
divided by [H^-1]_jj, is spread over the columns not yet quantized through row j of H^-1, where H = 2/n X X^T
(the engine's `stats.hessian`). The walk is SparseGPT's (`obs.py`, shared): dead inputs (H_jj = 0) get weight 0,
H is dampened by `dampening` x mean(diag H) (raised tenfold where that is not enough), only the upper Cholesky
factor of H^-1 is used (paper §4, step 3), and columns go in blocks of `block_size` with lazy batch updates (step
2). What is GPTQ's own, as in the reference:

    - `act_order` quantizes columns in order of decreasing H_jj (the "desc_act" trick); the grids are then
      fitted per contiguous group on the original weights (the reference's `static_groups=True`), so the stored
      layout stays one scale per `group_size` consecutive inputs and needs no permutation index;
    - without `act_order`, the grid of a group is fitted when its first column is reached, on the weights as
      already updated by the errors of the columns before it. (The reference reads those weights from the matrix
      outside the current block; for a group that starts inside a block we include the in-block updates too.
      With the default group_size 128 = block_size the two are the same.)

The grid (min-max with 0 inside, fp16 scales) is the shared one in `llmpress.compress.quant`, so the weights the
model evaluates are bit for bit what `storage.save_compressed` packs.

Sparse models (a pruning stage before this one): when more than 10 % of a layer's weights are exactly zero, those
zeros are kept. A pruned weight gets the zero-point code (which dequantizes to exactly 0) when its column is
reached, and whatever the updates had moved it by is treated as that column's quantization error and compensated
by the later columns - the joint prune-and-quantize step of SparseGPT (Frantar & Alistarh 2023, §3.5).

Recipe example (`recipes/gptq-w4g128.yaml`):

    name: gptq-w4g128
    stages:
      - method: gptq
        bits: 4
        group_size: 128
        symmetric: false
        act_order: false
        targets: ['.*_proj']
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmpress.compress import cuda_graphs, obs
from llmpress.compress.calibration import LayerStats
from llmpress.compress.methods import Method, register
from llmpress.compress.quant import QuantizedWeight, attach_, fit_grid, quantize_codes
from llmpress.config import GPTQStage

# A layer counts as pruned (its zeros are kept) above this fraction of exact zeros; dense weights almost never
# contain exact zeros, so the threshold only guards against a few accidental ones.
PRUNED_FRACTION = 0.10


@torch.no_grad()
def apply_(layer: nn.Linear, stage: GPTQStage, stats: LayerStats) -> dict:
    """Quantize `layer`'s weight in place with GPTQ; keep the codes for saving."""
    return apply_shared_({"layer": layer}, stage, stats)["layer"]


@torch.no_grad()
def apply_shared_(layers: dict[str, nn.Linear], stage: GPTQStage, stats: LayerStats) -> dict[str, dict]:
    """GPTQ on layers that read the same input (q/k/v, gate/up), with their rows stacked into one matrix.

    GPTQ treats every output row on its own given the shared Hessian, so each layer gets exactly the codes that
    quantizing it alone would give, in one walk over the columns instead of one per layer.
    """
    if stats.hessian is None:
        raise ValueError("gptq needs calibration activations (the layer Hessian)")
    weights = [layer.weight.detach().float() for layer in layers.values()]
    masks = [_pruned(w) for w in weights]
    mask = torch.cat(masks) if any(m.any() for m in masks) else None
    qw, row_losses = gptq_quantize(
        torch.cat(weights), stats.hessian, bits=stage.bits, group_size=stage.group_size, symmetric=stage.symmetric,
        block_size=stage.block_size, dampening=stage.dampening, act_order=stage.act_order, mask=mask, per_row=True,
        signed_scale=stage.signed_scale,
    )  # fmt: skip
    sizes = [w.shape[0] for w in weights]
    parts = zip(layers.items(), qw.codes.split(sizes), qw.scale.split(sizes), qw.zero.split(sizes),
                row_losses.split(sizes), strict=True)  # fmt: skip
    out: dict[str, dict] = {}
    for (name, layer), codes, scale, zero, losses in parts:
        attach_(layer, QuantizedWeight(codes, scale, zero, qw.bits, qw.group_size, qw.symmetric))
        out[name] = {"bits": stage.bits, "group_size": stage.group_size, "symmetric": stage.symmetric,
                     "act_order": stage.act_order, "error": losses.sum().item()}  # fmt: skip
    return out


def _pruned(weight: torch.Tensor) -> torch.Tensor:
    """The zeros of a pruned layer (kept by GPTQ); all False when under PRUNED_FRACTION of the weights are zero."""
    zeros = weight == 0
    return zeros if zeros.float().mean().item() > PRUNED_FRACTION else torch.zeros_like(zeros)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int | None, symmetric: bool,
                  block_size: int = 128, dampening: float = 0.01, act_order: bool = False,
                  mask: torch.Tensor | None = None, per_row: bool = False,
                  signed_scale: bool = False) -> tuple[QuantizedWeight, float | torch.Tensor]:  # fmt: skip
    """GPTQ codes for `weight` [out, in] given H = 2/n X X^T [in, in]; `mask` (True = pruned) stays exactly 0.

    Returns the quantized weight (codes in the original column order, one grid per row and per `group_size`
    consecutive inputs) and the reference's reconstruction loss sum_j (w_j - q_j)^2 / [H^-1]_jj^2 / 2: a float, or
    with `per_row` a tensor of the loss of every output row.
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    gs = group_size or cols
    n_groups = math.ceil(cols / gs)
    scale = torch.zeros(rows, n_groups, device=W.device)
    zero = torch.zeros(rows, n_groups, device=W.device)
    if mask is not None:
        mask = mask.to(W.device, torch.bool)

    if group_size is None:  # one grid per row, fitted once on the weights as given (the reference's order)
        scale[:, :1], zero[:, :1] = fit_grid(W, bits, symmetric, signed_scale)

    H, dead = obs.dead_inputs(hessian)
    W[:, dead] = 0

    static = group_size is not None and act_order
    if static:
        for g in range(n_groups):
            scale[:, g : g + 1], zero[:, g : g + 1] = fit_grid(W[:, g * gs : (g + 1) * gs], bits, symmetric,
                                                               signed_scale)  # fmt: skip

    # group of every (possibly permuted) column position
    perm = torch.arange(cols, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        mask = mask[:, perm] if mask is not None else None
    group_index = perm // gs

    U = obs.inverse_hessian_factor(H, dampening)
    codes = torch.zeros_like(W)

    def quantize_block(i1: int, i2: int) -> torch.Tensor:
        width = i2 - i1
        # Grids fitted inside this block: at each group start, on the group's current weights (in-block columns as
        # updated so far, the rest as left by earlier blocks: the `lookahead` columns past the block).
        fit_starts = () if group_size is None or static else tuple(i for i in range(width) if (i1 + i) % gs == 0)
        lookahead = max([0] + [min(i + gs, cols - i1) - width for i in fit_starts])
        # grid of every column: those already known (per row, static groups, a group begun in an earlier block);
        # columns from the first fit start on are overwritten by their fit
        S1, Z1 = scale[:, group_index[i1:i2]], zero[:, group_index[i1:i2]]
        _, _, S1, Z1, codes1, Err1, _ = cuda_graphs.run(
            _quantize_columns,
            [W[:, i1 : i2 + lookahead].clone(), U[i1:i2, i1:i2], S1, Z1, torch.zeros(rows, width, device=W.device),
             torch.zeros(rows, width, device=W.device), None if mask is None else mask[:, i1 : i2 + lookahead]],
            (fit_starts, gs, bits, symmetric, signed_scale),
        )  # fmt: skip
        for i in fit_starts:
            g = (i1 + i) // gs
            scale[:, g], zero[:, g] = S1[:, i], Z1[:, i]
        codes[:, i1:i2] = codes1
        return Err1

    row_losses = obs.lazy_walk(W, U, block_size, quantize_block)  # the reference's Losses, per row
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    qw = QuantizedWeight(codes.to(torch.uint8), scale.half(), zero.to(torch.uint8), bits, group_size, symmetric)
    return qw, row_losses if per_row else row_losses.sum().item()


def _quantize_columns(W1: torch.Tensor, U1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor, codes1: torch.Tensor,
                      Err1: torch.Tensor, mask1: torch.Tensor | None, fit_starts: tuple[int, ...], gs: int, bits: int,
                      symmetric: bool, signed: bool = False) -> None:  # fmt: skip
    """GPTQ's inner loop over the columns of one block, in place (replayed from a CUDA graph on GPUs).

    W1 [rows, width + lookahead]: the block's current weights, then columns past it that a group begun here
    spans; U1 [width, width]; S1, Z1 [rows, width]: each column's grid, written here at `fit_starts`;
    codes1, Err1 [rows, width]: the codes and the scaled errors (w - q) / [H^-1]_jj; mask1: pruned weights.
    """
    width = U1.shape[0]
    for i in range(width):
        if i in fit_starts:
            current = W1[:, i : i + gs]  # pruned entries will be 0, so they do not stretch the range
            if mask1 is not None:
                current = current.masked_fill(mask1[:, i : i + gs], 0)
            s, z = fit_grid(current, bits, symmetric, signed)
            S1[:, i : i + gs] = s
            Z1[:, i : i + gs] = z
        w, s, z = W1[:, i], S1[:, i], Z1[:, i]
        code = quantize_codes(w, s, z, bits)
        if mask1 is not None:
            code = torch.where(mask1[:, i], z, code)
        codes1[:, i] = code
        # q = s * (code - z) is exactly QuantizedWeight.dequantize's arithmetic
        obs.spread_error_(W1, U1, Err1, i, s * (code - z), width)


register(Method(GPTQStage, "layer", apply_, statistic="hessian", apply_shared=apply_shared_))
