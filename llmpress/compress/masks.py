"""Turning importance scores into pruning masks.

A mask is a bool tensor shaped like the weight, True where the weight is kept. All three selectors prune exactly
the requested count (ties broken by position, as a stable sort would), so the achieved sparsity equals the target
up to rounding to whole weights.
"""

from __future__ import annotations

import torch


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the `sparsity` fraction of lowest scores in every row (per output unit), as Wanda does."""
    n_prune = round(scores.shape[1] * sparsity)
    if n_prune == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    return ~_lowest(scores, n_prune)


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the `sparsity` fraction of lowest scores over the whole matrix, as classic magnitude pruning does."""
    return row_mask(scores.reshape(1, -1), sparsity).view_as(scores)


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k lowest scores of every row, ties taken in column order: what the first k entries of a stable
    argsort select, found by selection (kthvalue, O(n)) instead of a full sort (8 of 10 s of magnitude pruning on
    SmolLM2)."""
    threshold = scores.kthvalue(k, dim=1, keepdim=True).values
    below = scores < threshold
    ties = scores == threshold
    missing = k - below.sum(dim=1, keepdim=True)  # how many of the tied entries the first k take, per row
    return below | (ties & (ties.cumsum(dim=1) <= missing))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive input columns (N:M semi-structured sparsity)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input size ({cols}) to be a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=2, stable=True)
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, order[:, :, : m - n], False)
    return mask.reshape(rows, cols)


def select_mask(
    scores: torch.Tensor, sparsity: float | None, n_m: tuple[int, int] | None, per_row: bool
) -> torch.Tensor:
    """One entry point for methods: N:M if a pattern is given, else per-row or whole-layer unstructured."""
    if n_m is not None:
        return nm_mask(scores, *n_m)
    assert sparsity is not None
    return row_mask(scores, sparsity) if per_row else layer_mask(scores, sparsity)
