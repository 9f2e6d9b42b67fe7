"""Turning importance scores into pruning masks.

A mask is a bool tensor shaped like the weight, True where the weight is kept. All three selectors prune exactly
the requested count (ties broken by position through a stable sort), so the achieved sparsity equals the target
up to rounding to whole weights.
"""

from __future__ import annotations

import torch


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the `sparsity` fraction of lowest scores in every row (per output unit), as Wanda does."""
    n_prune = round(scores.shape[1] * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_prune == 0:
        return mask
    order = torch.argsort(scores, dim=1, stable=True)
    mask.scatter_(1, order[:, :n_prune], False)
    return mask


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the `sparsity` fraction of lowest scores over the whole matrix, as classic magnitude pruning does."""
    n_prune = round(scores.numel() * sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune == 0:
        return mask.view_as(scores)
    order = torch.argsort(scores.flatten(), stable=True)
    mask[order[:n_prune]] = False
    return mask.view_as(scores)


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
