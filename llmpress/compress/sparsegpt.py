"""SparseGPT: one-shot pruning with second-order weight updates.

Frantar & Alistarh (2023), "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"; the
algorithm follows `SparseGPT.fasterprune` of the reference code (github.com/IST-DASLab/sparsegpt).

For a linear layer with weight W [out, in] and calibration inputs X, SparseGPT minimises ||W X - W' X||^2 over
sparse W'. It walks the input columns left to right. When column j is pruned, the error it causes is spread over
the columns not yet visited with the Optimal Brain Surgeon update. With H = 2/n X X^T and U the upper Cholesky
factor of H^-1, row j of U is exactly the OBS update restricted to the unvisited columns:

    err = w_j / U_jj,      W[:, j:] -= err U_{j, j:}

so the whole layer costs one Cholesky decomposition. Columns are processed in blocks of `block_size` with lazy
updates of the columns to the right: that walk, the damped factor and dead inputs are the OBS core shared with
GPTQ (`obs.py`); this file holds SparseGPT's own rule, the mask. It is chosen adaptively, from the already updated
weights, by the OBS saliency w^2 / U_jj^2 (= w^2 / [H_F^-1]_jj, F the unvisited columns):

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

import itertools

import torch
from torch import nn

from llmpress.compress import cuda_graphs, obs
from llmpress.compress.calibration import LayerStats
from llmpress.compress.masks import nm_mask
from llmpress.compress.methods import Method, register
from llmpress.config import SparseGPTStage


def _saliency(w: torch.Tensor, hinv_diag: torch.Tensor, x_norm: torch.Tensor | None) -> torch.Tensor:
    """What a mask keeps: the OBS saliency w^2 / U_jj^2, or with `importance: wanda` |w| * ||x_j||."""
    if x_norm is not None:
        return w.abs() * x_norm.unsqueeze(0)
    return w**2 / hinv_diag.unsqueeze(0) ** 2


def _prune_count(sparsity: float, per_column: int, start: int, stop: int) -> int:
    """Weights to prune in columns [start, stop) so the running total stays round(sparsity * weights so far)."""
    return round(sparsity * per_column * stop) - round(sparsity * per_column * start)


def _unstructured_mask(scores: torch.Tensor, sparsity: float, start: int, per_row: bool,
                       segments: list[int]) -> torch.Tensor:  # fmt: skip
    """Prune mask (True = prune) for the column block `scores` [rows, cols] that starts at column `start`.

    `segments` are the row counts of the layers stacked in `scores`: the whole-block comparison is made within
    each layer, as if it were pruned alone.
    """
    cols = scores.shape[1]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if per_row:  # Wanda's comparison group: the same count in every row
        k = _prune_count(sparsity, 1, start, start + cols)
        if k > 0:
            mask.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], True)
        return mask
    for part, part_scores in zip(mask.split(segments), scores.split(segments), strict=True):
        k = _prune_count(sparsity, part.shape[0], start, start + cols)
        if k > 0:
            part.view(-1)[torch.argsort(part_scores.flatten(), stable=True)[:k]] = True
    return mask


@torch.no_grad()
def prune_(W: torch.Tensor, hessian: torch.Tensor, stage: SparseGPTStage, input_sq_norms: torch.Tensor | None = None,
           segments: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """SparseGPT on a weight matrix W [rows, cols] (not modified); returns (pruned fp32 weight, OBS loss per row).

    `segments` splits the rows into layers stacked together (default: one layer); see `apply_shared_`.
    """
    W = W.detach().float().clone()
    rows, cols = W.shape
    segments = segments or [rows]
    H, dead = obs.dead_inputs(hessian)
    U = obs.inverse_hessian_factor(H, stage.dampening)
    W[:, dead] = 0
    hinv_diag = torch.diag(U)
    n_m = stage.n_m
    if n_m is not None and cols % n_m[1]:
        raise ValueError(f"N:M pattern {stage.pattern} needs the input size ({cols}) to be a multiple of {n_m[1]}")
    x_norm = None
    if stage.importance == "wanda":
        # ||x_j|| from the statistics, or from the Hessian's diagonal (2/n sum x_j^2): only ratios matter.
        norms = input_sq_norms if input_sq_norms is not None else torch.diag(hessian)
        x_norm = norms.float().to(W.device).sqrt()
    mask_block = n_m[1] if n_m is not None else (stage.mask_block or stage.block_size)
    prune = torch.zeros_like(W, dtype=torch.bool)

    def choose_mask(W1: torch.Tensor, Err1: torch.Tensor, i1: int, i2: int, col: int) -> None:
        """The mask of the `mask_block` columns from `col`, from the weights as updated so far: columns inside
        this block are current in W1; columns past it still owe the lazy update from this block's errors."""
        stop = min(col + mask_block, cols)
        current = W1[:, col - i1 : min(stop, i2) - i1]
        if stop > i2:
            pending = Err1[:, : col - i1] @ U[i1:col, i2:stop]
            current = torch.cat([current, W[:, i2:stop] - pending], dim=1)
        scores = _saliency(current, hinv_diag[col:stop], None if x_norm is None else x_norm[col:stop])
        if n_m is not None:
            prune[:, col:stop] = ~nm_mask(scores, *n_m)
        else:
            prune[:, col:stop] = _unstructured_mask(scores, stage.target_sparsity, col, x_norm is not None, segments)

    def prune_block(i1: int, i2: int) -> torch.Tensor:
        width = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        xn1 = None if x_norm is None else x_norm[i1:i2]
        if n_m is not None and width % n_m[1] == 0 and i1 % n_m[1] == 0:
            # N:M groups inside the block: each group's mask is chosen in the column loop (one CUDA graph)
            args = [W1, U[i1:i2, i1:i2], prune[:, i1:i2], Q1, Err1, xn1]
            W1, _, P1, Q1, Err1, _ = cuda_graphs.run(_prune_columns, args, (0, width, n_m))
            prune[:, i1:i2] = P1
        else:
            bounds = sorted({0, width, *(c - i1 for c in range(i1, i2) if c % mask_block == 0)})  # mask starts
            for a, b in itertools.pairwise(bounds):
                if (i1 + a) % mask_block == 0:
                    choose_mask(W1, Err1, i1, i2, i1 + a)
                args = [W1, U[i1:i2, i1:i2], prune[:, i1:i2], Q1, Err1, xn1]
                if len(bounds) == 2:  # one mask block per block (the default): the column loop is one CUDA graph
                    W1, _, _, Q1, Err1, _ = cuda_graphs.run(_prune_columns, args, (a, b, None))
                else:
                    _prune_columns(*args, a, b, None)
        W[:, i1:i2] = Q1
        return Err1

    losses = obs.lazy_walk(W, U, stage.block_size, prune_block)  # the reference's Losses, per row
    return W, losses


def _prune_columns(W1: torch.Tensor, U1: torch.Tensor, P1: torch.Tensor, Q1: torch.Tensor, Err1: torch.Tensor,
                   x_norm1: torch.Tensor | None, start: int, stop: int,
                   n_m: tuple[int, int] | None) -> None:  # fmt: skip
    """SparseGPT's inner loop over columns [start, stop) of one block, in place (a CUDA graph on GPUs).

    W1 [rows, width]: the block's current weights; U1 [width, width]; P1: the prune mask (True = prune), chosen
    here for every group of M columns when `n_m` is given; Q1: the pruned weights; Err1: the scaled errors."""
    hinv_diag1 = torch.diag(U1)
    for i in range(start, stop):
        if n_m is not None and i % n_m[1] == 0:
            group = slice(i, i + n_m[1])
            scores = _saliency(W1[:, group], hinv_diag1[group], None if x_norm1 is None else x_norm1[group])
            P1[:, group] = ~nm_mask(scores, *n_m)
        q = W1[:, i].masked_fill(P1[:, i], 0)  # (boolean indexing would wait for the GPU at every column)
        Q1[:, i] = q
        obs.spread_error_(W1, U1, Err1, i, q, W1.shape[1])


@torch.no_grad()
def apply_(layer: nn.Linear, stage: SparseGPTStage, stats: LayerStats) -> dict:
    """Prune `layer` in place with SparseGPT and compensate the kept weights."""
    return apply_shared_({"layer": layer}, stage, stats)["layer"]


@torch.no_grad()
def apply_shared_(layers: dict[str, nn.Linear], stage: SparseGPTStage, stats: LayerStats) -> dict[str, dict]:
    """SparseGPT on layers that read the same input (q/k/v, gate/up), their rows stacked into one matrix.

    The OBS update works row by row given the shared Hessian, and masks are chosen per row (N:M, Wanda scores) or
    per layer (`_unstructured_mask`'s segments), so every layer ends exactly as if pruned alone, in one walk over
    the columns instead of one per layer.
    """
    if stats.hessian is None:
        raise ValueError("sparsegpt needs the layer Hessian from calibration activations")
    weights = [layer.weight for layer in layers.values()]
    segments = [w.shape[0] for w in weights]
    stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
    pruned, row_losses = prune_(stacked, stats.hessian, stage, stats.input_sq_norms, segments)
    out: dict[str, dict] = {}
    for (name, layer), w, loss in zip(layers.items(), pruned.split(segments), row_losses.split(segments), strict=True):
        layer.weight.data.copy_(w.to(layer.weight.dtype))
        out[name] = {"block_size": stage.block_size, "importance": stage.importance, "error": loss.sum().item()}
    return out


register(Method(SparseGPTStage, "layer", apply_, statistic="hessian", apply_shared=apply_shared_))
