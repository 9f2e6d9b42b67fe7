"""DSnoT: training-free refinement of a pruning mask by pruning-and-growing swaps.

Zhang, Zhao, Lin, et al. (2024), "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs"; the
procedure follows `prune_DSnoT` in the reference code (github.com/zyxxmu/DSnoT, lib/prune.py), with its defaults
(max_cycle_time 50, update_threshold 0.1, pow_of_var_regrowing 1, without_same_sign for unstructured masks).

DSnoT runs after a pruning stage (Wanda, SparseGPT, magnitude) and keeps every row's number of zeros. Pruning
row i changes its output on input x by sum_j dW_ij x_j; DSnoT drives the expected change to zero,

    e_i = sum_j (W_dense_ij - W_ij) * E[x_j],

with swaps, each reviving one pruned weight (at its dense value) and pruning one kept weight, chosen greedily:

  * grow: if e_i > 0 the pruned weight with the largest W_dense_ij E[x_j] / Var[x_j], if e_i < 0 the smallest
    (dividing by the variance prefers inputs whose contribution is steady, pow_of_var_regrowing = 1);
  * prune: the least important kept weight by Wanda's |W_ij| ||x_j|| among those whose W_ij E[x_j] has the sign
    that moves e_i towards zero (the reference's `return_reorder_indice` ordering);
  * a row stops after `max_cycles` swaps or once |e_i| <= `update_threshold`.

For an N:M mask (detected from the zeros: the same count in every group of M inputs), a grown weight is paid for by
pruning the lowest-Wanda kept weight of its own group, so the pattern survives, and a swap is only made while e_i
keeps its initial sign, as in the reference's N:M branch.

The reference computes its initial mask itself and applies it to the dense weights. Here the mask comes from the
previous stage, so DSnoT needs the weights before that stage: `stats.dense_weight`, the layer's weight when the
engine's pass reached the block. Kept weights keep their current values, so SparseGPT's compensation survives and
is counted in e_i; after Wanda or magnitude this is exactly the reference's algorithm.

One deliberate difference: e_i is the expected error per token (E over all calibration tokens), and
`update_threshold` (0.1, the reference's default) applies to that. The reference accumulates E[x] x 2048 (the sum
over one 2048-token calibration sample), so its threshold is 2048 times smaller and almost never stops a row. On
SmolLM2-135M (|E[x_j]| / std(x_j) ~ 0.15-0.5 in the attention inputs) those 50 swaps per row cut the mean error but
raised the layers' reconstruction error ||W X - W' X||^2 by ~25 % after Wanda and doubled it after SparseGPT;
perplexity went from 66.9 to 74.5 (Wanda 50 %) and from 53.4 to 63.4 (SparseGPT 50 %). Per token, only rows whose
expected error is material are swapped, the reconstruction error falls, and perplexity is about unchanged (67.3
after Wanda, 53.1 after SparseGPT): this small model has little mean error for DSnoT to remove. The variance is
over all calibration tokens (the reference averages per-sample variances).

The reference skips MLP layers by default (`--skip_layer mlp`); `recipes/sparsegpt-dsnot-50.yaml` does the same
through its targets.

Recipe example (`recipes/sparsegpt-dsnot-50.yaml`):

    name: sparsegpt-dsnot-50
    stages:
      - method: sparsegpt
        sparsity: 0.5
        targets: ['.*_proj']
      - method: dsnot
        max_cycles: 50
        update_threshold: 0.1
        targets: ['.*self_attn\\..*_proj']
"""

from __future__ import annotations

import torch
from torch import nn

from llmpress.compress.calibration import LayerStats
from llmpress.compress.methods import Method, register
from llmpress.config import DSnoTStage
from llmpress.errors import LlmpressError


def nm_pattern(pruned: torch.Tensor) -> tuple[int, int] | None:
    """(N, M) if every group of M consecutive inputs of every row has the same number of zeros, else None."""
    rows, cols = pruned.shape
    for m in (2, 4, 8, 16, 32):
        if cols % m == 0 and cols > m:
            zeros = pruned.reshape(rows, cols // m, m).sum(dim=2)
            z = int(zeros.flatten()[0])
            if 0 < z < m and bool((zeros == z).all()):
                return m - z, m
    return None


def _pick(order: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, from_top: torch.Tensor) -> torch.Tensor:
    """Take, per row, the entry of `order` at `hi` (from_top) or `lo`, and move that pointer inwards (in place,
    for every row: the reference advances them whether or not the swap is made)."""
    pos = torch.where(from_top, hi, lo).clamp(0, order.shape[1] - 1)
    hi -= from_top.long()
    lo += (~from_top).long()
    return order.gather(1, pos.unsqueeze(1)).squeeze(1)


@torch.no_grad()
def refine(
    weight: torch.Tensor, dense: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, sq_norms: torch.Tensor,
    stage: DSnoTStage,
) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """DSnoT on `weight` [rows, cols] (zeros = pruned), `dense` its weight before pruning, and the per-input mean,
    variance and sum of squares of the calibration inputs. Returns (new weight, details); inputs not modified."""
    W, Wd = weight.float(), dense.float()
    rows, cols = W.shape
    pruned = W == 0
    grow_metric = Wd * mean  # e_i drops by this when the weight is grown back
    prune_metric = W * mean  # and rises by this when a kept weight is pruned
    err = ((Wd - W) * mean).sum(dim=1)
    err_before = err.abs().mean().item()
    n_pruned = pruned.sum(dim=1)

    # Grow candidates: pruned weights with a dense value, by W_dense E[x] / Var[x]; the rest sort after them and
    # the pointers never reach them.
    growable = pruned & (Wd != 0)
    grow_key = torch.where(growable, grow_metric / var.clamp_min(1e-12), torch.inf)
    grow_order = torch.argsort(grow_key, dim=1, stable=True)
    grow_lo, grow_hi = torch.zeros_like(n_pruned), growable.sum(dim=1) - 1
    wanda = torch.where(pruned, torch.inf, W.abs() * sq_norms.sqrt())
    pattern = nm_pattern(pruned)
    if pattern is None:
        # Prune candidates, kept weights from least Wanda-important on: those with W E[x] < 0 from the front of the
        # list, those with W E[x] >= 0 from its back (return_reorder_indice in the reference).
        rank = torch.argsort(torch.argsort(wanda, dim=1, stable=True), dim=1).float()
        prune_key = torch.where(prune_metric < 0, rank, 2.0 * cols - rank)
        prune_order = torch.argsort(torch.where(pruned, torch.inf, prune_key), dim=1, stable=True)
        prune_lo, prune_hi = torch.zeros_like(n_pruned), cols - n_pruned - 1
    initial_sign = torch.sign(err)

    active = (n_pruned > 0) & (n_pruned < cols)
    new_pruned = pruned.clone()
    swaps = torch.zeros(rows, dtype=torch.long, device=W.device)
    arange = torch.arange(rows, device=W.device)
    for _ in range(stage.max_cycles):
        active &= grow_lo <= grow_hi
        if pattern is None:
            active &= prune_lo <= prune_hi
        if not active.any():
            break
        grow = _pick(grow_order, grow_lo, grow_hi, err > 0)
        if pattern is None:
            prune = _pick(prune_order, prune_lo, prune_hi, err < 0)
        else:  # the lowest-Wanda kept weight of the grown weight's group of M
            m = pattern[1]
            start = grow - grow % m
            group = start.unsqueeze(1) + torch.arange(m, device=W.device)
            best, offset = wanda.gather(1, group).min(dim=1)
            prune = start + offset
            active &= torch.isfinite(best)
        delta = prune_metric[arange, prune] - grow_metric[arange, grow]
        active &= err.abs() > stage.update_threshold
        if pattern is not None:
            active &= torch.sign(err + delta) == initial_sign
        rows_now = arange[active]
        new_pruned[rows_now, prune[active]] = True
        new_pruned[rows_now, grow[active]] = False
        wanda[rows_now, prune[active]] = torch.inf
        err += torch.where(active, delta, torch.zeros_like(delta))
        swaps += active.long()

    grown = pruned & ~new_pruned
    out = torch.where(new_pruned, torch.zeros_like(W), torch.where(grown, Wd, W))
    details = {"swaps": int(swaps.sum()), "pattern": f"{pattern[0]}:{pattern[1]}" if pattern else None,
               "expected_error_before": err_before, "expected_error_after": err.abs().mean().item()}  # fmt: skip
    return out, details


@torch.no_grad()
def apply_(layer: nn.Linear, stage: DSnoTStage, stats: LayerStats) -> dict:
    """Refine the zeros of an already pruned `layer` in place; every row keeps its number of zeros."""
    input_sum = getattr(stats, "input_sum", None)
    if stats.input_sq_norms is None or input_sum is None or stats.tokens == 0:
        raise ValueError(
            "dsnot needs calibration statistics: input_sq_norms and input_sum (its registered statistic and input_sum)"
        )
    dense = getattr(stats, "dense_weight", None)
    if dense is None:
        raise LlmpressError(
            "dsnot needs the layer's weights from before pruning (LayerStats.dense_weight, filled by the engine "
            "for methods registered with dense_weight) to grow pruned weights back; this engine does not provide them"
        )
    weight = layer.weight.detach()
    pruned = weight == 0
    if not pruned.any():
        return {"swaps": 0, "pattern": None}
    if not (dense.to(weight.device)[pruned] != 0).any():
        raise LlmpressError(
            "dsnot found no pruned weight with a dense value to grow back: put it in the same pass as the pruning "
            "stage it refines (right after it, with no model-level stage such as distill in between)"
        )
    tokens = float(stats.tokens)
    mean = input_sum.float() / tokens
    var = (stats.input_sq_norms.float() / tokens - mean**2).clamp_min(0.0)
    out, details = refine(weight, dense.to(weight.device), mean, var, stats.input_sq_norms, stage)
    layer.weight.data.copy_(out.to(layer.weight.dtype))
    return details


register(Method(DSnoTStage, "layer", apply_, statistic="input_sq_norms", input_sum=True, dense_weight=True))
