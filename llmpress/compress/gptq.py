"""GPTQ: one-shot weight quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh (2023), "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023); reference implementation IST-DASLab/gptq, `GPTQ.fasterquant`.

For a linear layer with weight W [out, in] and calibration inputs X, GPTQ minimises ||W X - Q X||^2 row by row
with the Optimal Brain Surgeon update: columns are quantized one at a time, and the rounding error of column j,
divided by [H^-1]_jj, is spread over the columns not yet quantized through row j of H^-1, where H = 2/n X X^T
(the engine's `stats.hessian`). As in the reference:

    - dead inputs (H_jj = 0, never active) get H_jj = 1 and weight 0;
    - H is dampened by `dampening` x mean(diag H) and only the upper Cholesky factor of H^-1 is used, which
      holds exactly the rows of the successive inverses that the sequential updates need (paper §4, step 3);
    - columns go in blocks of `block_size`: inside a block updates are applied column by column, the rest of
      the matrix receives the block's accumulated errors in one matmul ("lazy batch updates", step 2);
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
from typing import TYPE_CHECKING

import torch
from torch import nn

from llmpress.compress.quant import QuantizedWeight, attach_, fit_grid, quantize_codes
from llmpress.config import GPTQStage

if TYPE_CHECKING:
    from llmpress.compress.engine import LayerStats

KIND = "layer"
NEEDS = "hessian"

# A layer counts as pruned (its zeros are kept) above this fraction of exact zeros; dense weights almost never
# contain exact zeros, so the threshold only guards against a few accidental ones.
PRUNED_FRACTION = 0.10


@torch.no_grad()
def apply_(layer: nn.Linear, stage: GPTQStage, stats: LayerStats) -> dict:
    """Quantize `layer`'s weight in place with GPTQ; keep the codes for saving."""
    if stats.hessian is None:
        raise ValueError("gptq needs calibration activations (the layer Hessian)")
    weight = layer.weight.detach().float()
    zeros = weight == 0
    mask = zeros if zeros.float().mean().item() > PRUNED_FRACTION else None
    qw, error = gptq_quantize(
        weight, stats.hessian, bits=stage.bits, group_size=stage.group_size, symmetric=stage.symmetric,
        block_size=stage.block_size, dampening=stage.dampening, act_order=stage.act_order, mask=mask,
    )  # fmt: skip
    attach_(layer, qw)
    return {"bits": stage.bits, "group_size": stage.group_size, "symmetric": stage.symmetric,
            "act_order": stage.act_order, "error": error}  # fmt: skip


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + dampening * mean(diag H) * I)^-1, H modified in place (the reference's steps).

    If H is still not positive definite (rank-deficient calibration in low precision), the dampening is raised
    tenfold until it is; the reference would stop with an error there.
    """
    damp = dampening * torch.mean(torch.diag(hessian))
    diag = torch.arange(hessian.shape[0], device=hessian.device)
    hessian[diag, diag] += damp
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(hessian)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0:
                return upper
        damp = damp * 10
        hessian[diag, diag] += damp
    raise ValueError("gptq: the layer Hessian is not positive definite even after dampening x 1e6")


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    block_size: int = 128,
    dampening: float = 0.01,
    act_order: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[QuantizedWeight, float]:
    """GPTQ codes for `weight` [out, in] given H = 2/n X X^T [in, in]; `mask` (True = pruned) stays exactly 0.

    Returns the quantized weight (codes in the original column order, one grid per row and per `group_size`
    consecutive inputs) and the reference's reconstruction loss sum_j (w_j - q_j)^2 / [H^-1]_jj^2 / 2.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    gs = group_size or cols
    n_groups = math.ceil(cols / gs)
    scale = torch.zeros(rows, n_groups, device=W.device)
    zero = torch.zeros(rows, n_groups, device=W.device)
    if mask is not None:
        mask = mask.to(W.device, torch.bool)

    if group_size is None:  # one grid per row, fitted once on the weights as given (the reference's order)
        scale[:, :1], zero[:, :1] = fit_grid(W, bits, symmetric)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = group_size is not None and act_order
    if static:
        for g in range(n_groups):
            scale[:, g : g + 1], zero[:, g : g + 1] = fit_grid(W[:, g * gs : (g + 1) * gs], bits, symmetric)

    # group of every (possibly permuted) column position
    perm = torch.arange(cols, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        mask = mask[:, perm] if mask is not None else None
    group_of = (perm // gs).tolist()

    Hinv = inverse_hessian_factor(H, dampening)
    codes = torch.zeros_like(W)
    losses = torch.zeros_like(W)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if group_size is not None and not static and j % gs == 0:
                # the group's current weights: in-block columns from W1, the rest from W (already updated by
                # every earlier block); pruned entries will be 0, so they do not stretch the range
                current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                if mask is not None:
                    current = current.masked_fill(mask[:, j : j + gs], 0)
                scale[:, j // gs : j // gs + 1], zero[:, j // gs : j // gs + 1] = fit_grid(current, bits, symmetric)
            g = group_of[j]
            s, z = scale[:, g], zero[:, g]
            w = W1[:, i]
            d = Hinv1[i, i]
            code = quantize_codes(w, s, z, bits)
            if mask is not None:
                code = torch.where(mask[:, j], z, code)
            q = s * (code - z)  # exactly QuantizedWeight.dequantize's arithmetic
            codes[:, j] = code
            losses[:, j] = (w - q) ** 2 / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if act_order:
        codes = codes[:, torch.argsort(perm)]
    qw = QuantizedWeight(codes.to(torch.uint8), scale.half(), zero.to(torch.uint8), bits, group_size, symmetric)
    return qw, losses.sum().item()
