"""SparseGPT: one-shot pruning with second-order weight updates.

Frantar & Alistarh (2023), "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"; the
algorithm follows `SparseGPT.fasterprune` of the reference code (github.com/IST-DASLab/sparsegpt).

For a linear layer with weight W [out, in] and calibration inputs X, SparseGPT minimises ||W X - W' X||^2 over
sparse W'. It walks the input columns left to right. When column j is pruned, the error it causes is spread over
the columns not yet visited with the Optimal Brain Surgeon update. With H = 2/n X X^T and U the upper Cholesky
factor of H^-1, row j of U is exactly the OBS update restricted to the unvisited columns:

    err = w_j / U_jj,      W[:, j:] -= err U_{j, j:}

so the whole layer costs one Cholesky decomposition. Columns are processed in blocks of `block_size` with lazy
updates of the columns to the right (as in GPTQ). The mask is chosen adaptively, from the already updated weights,
by the OBS saliency w^2 / U_jj^2 (= w^2 / [H_F^-1]_jj, F the unvisited columns):

  * unstructured: at the start of every `mask_block` columns (default `block_size`), the weights of that column
    block with the lowest saliency are pruned, compared over the whole block (all rows together), as in the
    reference. The reference prunes int(numel * sparsity) + 1 weights per block; here each block prunes what
    makes the running total round(sparsity * weights seen so far), so the layer's sparsity is exact to one weight.
  * N:M: at every group of M columns, the M - N lowest saliencies of each row.

`importance: wanda` keeps the OBS update but picks each mask block by |w| * ||x_j|| compared within each output row
(Wanda's score and comparison group), still from the updated weights.

Weights that are already zero score lowest, so a second SparseGPT stage on a pruned layer keeps at least its
sparsity. Everything is computed in fp32 and written back in the layer's dtype. `details["error"]` is the
reference's `Losses`, sum of (w - q)^2 / U_jj^2 / 2, which adds up to 1/2 tr(dW (H + damp I) dW^T): the layer
error ||W X - W' X||^2 / n, but for the dampening.

Recipe example (`recipes/sparsegpt-50.yaml`):

    name: sparsegpt-50
    stages:
      - method: sparsegpt
        sparsity: 0.5
        block_size: 128
        dampening: 0.01
        targets: ['.*_proj']
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from llmpress.compress.masks import nm_mask
from llmpress.config import SparseGPTStage

if TYPE_CHECKING:
    from llmpress.compress.engine import LayerStats

KIND = "layer"
NEEDS = "hessian"


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp I)^-1 with damp = dampening * mean(diag H), and the dead-input mask.

    Inputs that never fire (diag 0) get H_jj = 1 so H stays invertible; their weights are zeroed by the caller,
    as in the reference.
    """
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = dampening * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ValueError(f"Hessian is not positive definite even with dampening {dampening}; raise 'dampening'")
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True), dead


def _prune_count(sparsity: float, per_column: int, start: int, stop: int) -> int:
    """Weights to prune in columns [start, stop) so the running total stays round(sparsity * weights so far)."""
    return round(sparsity * per_column * stop) - round(sparsity * per_column * start)


def _unstructured_mask(scores: torch.Tensor, sparsity: float, start: int, per_row: bool) -> torch.Tensor:
    """Prune mask (True = prune) for the column block `scores` [rows, cols] that starts at column `start`."""
    rows, cols = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if per_row:  # Wanda's comparison group: the same count in every row
        k = _prune_count(sparsity, 1, start, start + cols)
        if k > 0:
            mask.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], True)
        return mask
    k = _prune_count(sparsity, rows, start, start + cols)
    if k > 0:
        mask.view(-1)[torch.argsort(scores.flatten(), stable=True)[:k]] = True
    return mask


@torch.no_grad()
def prune_(
    W: torch.Tensor, hessian: torch.Tensor, stage: SparseGPTStage, input_sq_norms: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """SparseGPT on a weight matrix W [rows, cols] (not modified); returns (pruned fp32 weight, OBS loss)."""
    W = W.detach().float().clone()
    rows, cols = W.shape
    Hinv, dead = inverse_hessian_factor(hessian, stage.dampening)
    W[:, dead] = 0
    hinv_diag = torch.diag(Hinv)
    n_m = stage.n_m
    if n_m is not None and cols % n_m[1]:
        raise ValueError(f"N:M pattern {stage.pattern} needs the input size ({cols}) to be a multiple of {n_m[1]}")
    sparsity = stage.target_sparsity
    if stage.importance == "wanda":
        # ||x_j|| from the statistics, or from the Hessian's diagonal (2/n sum x_j^2): only ratios matter.
        norms = input_sq_norms if input_sq_norms is not None else torch.diag(hessian)
        x_norm = norms.float().to(W.device).sqrt()
    mask_block = n_m[1] if n_m is not None else (stage.mask_block or stage.block_size)
    block_size = stage.block_size
    prune = torch.zeros_like(W, dtype=torch.bool)
    losses = torch.zeros(rows, device=W.device)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(i2 - i1):
            col = i1 + i
            if col % mask_block == 0:
                # The mask of the next mask block, from its weights as updated so far: columns of this block are
                # current in W1; columns past the block still owe the lazy update from this block's errors.
                stop = min(col + mask_block, cols)
                current = W1[:, i : min(stop, i2) - i1]
                if stop > i2:
                    pending = Err1[:, :i] @ Hinv[i1:col, i2:stop]
                    current = torch.cat([current, W[:, i2:stop] - pending], dim=1)
                if stage.importance == "wanda":
                    scores = current.abs() * x_norm[col:stop].unsqueeze(0)
                else:
                    scores = current**2 / hinv_diag[col:stop].unsqueeze(0) ** 2
                if n_m is not None:
                    prune[:, col:stop] = ~nm_mask(scores, *n_m)
                else:
                    per_row = stage.importance == "wanda"
                    prune[:, col:stop] = _unstructured_mask(scores, sparsity, col, per_row)

            w = W1[:, i]
            d = Hinv1[i, i]
            q = w.clone()
            q[prune[:, col]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            # OBS: spread this column's error over the block's remaining columns.
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        losses += torch.sum(Losses1, 1) / 2
        # Lazy batch update of every column to the right of the block.
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    return W, float(losses.sum())


@torch.no_grad()
def apply_(layer: nn.Linear, stage: SparseGPTStage, stats: LayerStats) -> dict:
    """Prune `layer` in place with SparseGPT and compensate the kept weights."""
    if stats.hessian is None:
        raise ValueError("sparsegpt needs the layer Hessian from calibration activations (NEEDS = 'hessian')")
    pruned, error = prune_(layer.weight, stats.hessian, stage, stats.input_sq_norms)
    layer.weight.data.copy_(pruned.to(layer.weight.dtype))
    return {"block_size": stage.block_size, "importance": stage.importance, "error": error}
