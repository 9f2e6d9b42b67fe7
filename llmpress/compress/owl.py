"""OWL: outlier-weighted layer-wise sparsity.

Yin, Wu, Jaiswal, et al. (2024), "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning
LLMs to High Sparsity"; the procedure follows `prune_wanda_outlier` in the reference code
(github.com/luuyin/OWL, lib/prune_all.py).

Decoder blocks whose Wanda scores |W_ij| * ||X_j|| hold more outliers matter more and are pruned less:

  1. one calibration pass over the model as the stage finds it (dense, for a first stage), which it leaves
     unchanged; for every block, pool the Wanda scores of all its targeted
     linear layers and take the outlier ratio D_b = share of scores above `threshold` ("M", default 5) times the
     block's mean score;
  2. map the ratios linearly onto [0, 2 * lambda]: a_b = (D_b - min D) / (max D - min D) * 2 * lambda;
  3. keep ratio k_b = a_b - mean(a) + (1 - target), so block sparsities s_b = 1 - k_b spread over 2 * lambda
     around the target and average to it; the block with the most outliers is pruned least.

Every targeted layer of block b is then pruned to s_b by the stage's own method: the engine calls
`layer_sparsities` once before the pass and hands each layer `stage.model_copy(update={"sparsity": s_b})`, so
Wanda and SparseGPT both get OWL from the `owl:` key.

Two changes make the result exact where the reference is only approximately so: the mean in step 3 is weighted by
each block's number of targeted weights (identical to the reference's plain mean when blocks are the same size,
as in every Llama), and sparsities are clipped to [0, 0.99] with one common shift found by bisection, so the
parameter-weighted mean sparsity equals the target (up to each layer rounding to whole weights) even after
clipping. All blocks having the same ratio gives the uniform target (the reference divides by zero there).

OWL's gains are reported at high sparsity (70 %). On SmolLM2-135M at 50 % it does not help: outlier ratios grow
with depth, so early blocks are pruned more, and perplexity was 69.3 with Wanda (uniform: 66.9; lambda 0.04:
67.0) and 54.5 with SparseGPT (uniform: 53.4).

Recipe example (`recipes/wanda-owl-50.yaml`):

    name: wanda-owl-50
    stages:
      - method: wanda
        sparsity: 0.5
        owl: {threshold: 5, lambda: 0.08}
        targets: ['.*_proj']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmpress.compress import wanda
from llmpress.compress.offload import iterate_blocks
from llmpress.compress.targets import targeted_linears

MAX_SPARSITY = 0.99


def outlier_ratio(scores: list[torch.Tensor], threshold: float) -> float:
    """Share of all entries of `scores` (pooled) above threshold x their mean: the reference's check_outlier_mean
    (which reports it in percent; the scale cancels in the normalisation)."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return (flat > flat.mean() * threshold).float().mean().item()


def block_sparsities(ratios: list[float], sizes: list[int], target: float, lambda_: float) -> list[float]:
    """Sparsity of every block from its outlier ratio, with the size-weighted mean exactly `target`."""
    r = torch.tensor(ratios, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    spread = r.max() - r.min()
    a = (r - r.min()) / spread * lambda_ * 2 if spread > 0 else torch.zeros_like(r)
    keep = a - (a * n).sum() / n.sum() + (1 - target)
    sparsity = 1 - keep

    if sparsity.min() >= 0 and sparsity.max() <= MAX_SPARSITY:
        return sparsity.tolist()

    def clipped_mean(shift: float) -> float:
        return float(((sparsity + shift).clamp(0.0, MAX_SPARSITY) * n).sum() / n.sum())

    # Clipping moves the mean; one common shift, found by bisection (the clipped mean grows with it), restores it.
    lo, hi = -1.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if clipped_mean(mid) < target else (lo, mid)
    return (sparsity + (lo + hi) / 2).clamp(0.0, MAX_SPARSITY).tolist()


@torch.no_grad()
def layer_sparsities(
    model: nn.Module, stage: Any, calibration_ids: torch.Tensor, device: torch.device, batch_size: int
) -> dict[str, float]:
    """{full layer name: sparsity} for every layer the stage targets, from one pass over the unmodified model."""

    if stage.owl is None or stage.sparsity is None:
        raise ValueError("OWL needs an unstructured 'sparsity' and an 'owl' section on the stage")
    names, ratios, sizes = [], [], []  # per block: targeted layer names, outlier ratio, weights
    for _, prefix, block, calib in iterate_blocks(model, calibration_ids, device, batch_size):
        layers = targeted_linears(block, prefix, stage)
        if not layers:
            continue
        assert calib is not None
        stats = calib.layer_stats(block, layers, "input_sq_norms")
        scores = [wanda.scores(layer, stats[name].input_sq_norms) for name, layer in layers.items()]
        names.append(list(layers))
        ratios.append(outlier_ratio(scores, stage.owl.threshold))
        sizes.append(sum(layer.weight.numel() for layer in layers.values()))
    per_block = block_sparsities(ratios, sizes, stage.sparsity, stage.owl.lambda_)
    return {name: s for block_names, s in zip(names, per_block, strict=True) for name in block_names}
