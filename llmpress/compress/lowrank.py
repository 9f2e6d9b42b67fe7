"""Low-rank factorisation: replace a linear layer W [out, in] by two thinner ones, W ~ up @ down.

With rank r the layer keeps r * (in + out) parameters instead of in * out, and computes x -> up(down(x)) with two
smaller matmuls (`storage.LowRankLinear`; saved as `name.down` [r, in] and `name.up` [out, r]).

    plain SVD             W = U S V^T, keep the r largest singular values: the best rank-r W' in Frobenius norm,
                          blind to the inputs the layer sees.
    activation-aware      SVD-LLM (Wang, Zheng, Wan, Zhang 2024, "SVD-LLM: Truncation-aware Singular Value
                          Decomposition for Large Language Model Compression"): what matters is the output error
                          sum_t ||(W - W') x_t||^2 = ||(W - W') L||_F^2, with L the Cholesky factor of the input
                          Gram matrix H = sum_t x_t x_t^T = L L^T ("truncation-aware data whitening"). So take
                          the SVD of W L = U S V^T, truncate it, and undo the whitening:

                              up = U_r S_r^(1/2),   down = S_r^(1/2) V_r^T L^-1

                          Each dropped singular value s_i costs exactly s_i^2 of output error, and the result is
                          the best rank-r layer on the calibration inputs.

As in the reference implementation the singular values are split evenly (sqrt) between the two factors, and the
computation runs in float64. One difference: H gets `dampening * mean(diag H)` on its diagonal before the Cholesky
factorisation (SVD-LLM shifts by the smallest eigenvalue only when the factorisation fails), which keeps L well
conditioned when some input features are (nearly) dead. The engine's H is scaled by 2/n; the scale cancels.

rank = max(1, round(rank_ratio * min(in, out))). A layer whose factors would not be smaller than W
(rank * (in + out) >= in * out) is left dense and recorded as skipped. For SmolLM2's MLP (576 x 1536) rank_ratio
0.36 gives rank 207, 49.4 % of the parameters.

This is a block method (not a layer one) because replacing the layer needs its parent module: `apply_block_`
gathers H for every targeted linear in one forward pass of the block, then swaps the layers inside the block.

Recipe example (`recipes/lowrank-mlp-50.yaml`):

    name: lowrank-mlp-50
    stages:
      - method: lowrank
        rank_ratio: 0.36
        activation_aware: true
        targets: ['.*\\.mlp\\..*_proj']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmpress.compress.calibration import BlockCalibration
from llmpress.compress.methods import Method, register
from llmpress.compress.storage import LowRankLinear, set_submodule
from llmpress.compress.targets import targeted_linears
from llmpress.config import LowRankStage
from llmpress.errors import LlmpressError


def needs_data(stage: LowRankStage) -> bool:
    """Only the activation-aware variant reads calibration data; plain SVD works from the weights alone."""
    return stage.activation_aware


def rank_for(stage: LowRankStage, in_features: int, out_features: int) -> int:
    return max(1, round(stage.rank_ratio * min(in_features, out_features)))


@torch.no_grad()
def factorise(weight: torch.Tensor, rank: int, hessian: torch.Tensor | None = None,
              dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(down [rank, in], up [out, rank]) with up @ down ~ weight; whitened by hessian's Cholesky factor if given."""
    w = weight.double()
    # H + damp I = L L^T, L lower triangular
    chol = None if hessian is None else _cholesky(hessian.double().to(w.device), dampening)
    u, s, vh = torch.linalg.svd(w if chol is None else w @ chol, full_matrices=False)
    root = s[:rank].sqrt()
    down = root[:, None] * vh[:rank]
    if chol is not None:
        # down = S_r^(1/2) V_r^T L^-1, computed as the solution X of X L = V_r^T (triangular, no explicit inverse).
        down = torch.linalg.solve_triangular(chol, down, upper=False, left=False)
    return down.to(weight.dtype), (u[:, :rank] * root).to(weight.dtype)


def _cholesky(h: torch.Tensor, dampening: float) -> torch.Tensor:
    h = h + dampening * h.diagonal().mean().clamp_min(1e-8) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    chol, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        # SVD-LLM's fallback: shift the spectrum so the smallest eigenvalue is positive.
        shift = -torch.linalg.eigvalsh(h)[0] + 1e-6
        chol = torch.linalg.cholesky(h + shift * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
    return chol


@torch.no_grad()
def apply_block_(
    block: nn.Module, prefix: str, stage: LowRankStage, calib: BlockCalibration | None
) -> list[dict[str, Any]]:
    """Replace every targeted nn.Linear of `block` by a LowRankLinear; one row per targeted layer."""

    layers = targeted_linears(block, prefix, stage)
    hessians: dict[str, torch.Tensor | None] = {}
    if stage.activation_aware and layers:
        if calib is None:
            raise LlmpressError("lowrank with activation_aware: true needs calibration data (or set it to false)")
        # One forward pass for all targeted layers, on the block as it is before any of them is factorised.
        hessians = {name: s.hessian for name, s in calib.layer_stats(block, layers, "hessian").items()}

    rows: list[dict[str, Any]] = []
    for name, layer in layers.items():
        out_f, in_f = layer.weight.shape
        rank = rank_for(stage, in_f, out_f)
        bias = 0 if layer.bias is None else layer.bias.numel()
        before, after = in_f * out_f + bias, rank * (in_f + out_f) + bias
        if after >= before:
            why = f"rank {rank} factors ({after} parameters) are not smaller than the layer"
            rows.append({"name": name, "layer": layer, "rank": rank, "params_before": before, "params_after": before,
                         "skipped": why})  # fmt: skip
            continue
        down, up = factorise(layer.weight, rank, hessians.get(name), stage.dampening)
        new = LowRankLinear(in_f, out_f, rank, bias=layer.bias is not None).to(layer.weight.device, layer.weight.dtype)
        new.down.weight.copy_(down)
        new.up.weight.copy_(up)
        if layer.bias is not None:
            new.up.bias.copy_(layer.bias)
        set_submodule(block, name.removeprefix(f"{prefix}."), new)
        rows.append({"name": name, "layer": new, "shape": (out_f, in_f), "rank": rank, "params_before": before,
                     "params_after": after, "activation_aware": stage.activation_aware})  # fmt: skip
    return rows


register(Method(LowRankStage, "block", apply_block_, needs_data=needs_data))
