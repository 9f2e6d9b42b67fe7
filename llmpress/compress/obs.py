"""The Optimal Brain Surgeon core that SparseGPT and GPTQ share: one column walk, two rules for a column.

Both minimise ||W X - W' X||^2 row by row given H = 2/n X X^T, walking the input columns left to right. When
column j takes its new value q (pruned to 0 for SparseGPT, rounded to the grid for GPTQ), its error, divided by
U_jj, is spread over the columns not yet visited through row j of U, the upper Cholesky factor of H^-1:

    err = (w_j - q_j) / U_jj,      W[:, j:] -= err U_{j, j:}

(Frantar & Alistarh 2023, §3; Frantar et al. 2023, §4; IST-DASLab's `fasterprune` and `fasterquant`.) This module
holds what does not depend on the rule: the damped inverse-Hessian factor with dead inputs, the column update, and
the lazy block walk - columns in blocks of `block_size`, the updates inside a block column by column, the rest of
the matrix receiving the block's accumulated errors in one matmul.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MAX_DAMPENING_RETRIES = 6  # x10 each: up to 1e6 times the asked-for dampening


def dead_inputs(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H as an fp32 copy with H_jj = 1 on dead inputs, the dead-input mask). An input that never fired (H_jj = 0)
    would make H singular; its weights are zeroed by the caller, as in the reference."""
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    return H, dead


def inverse_hessian_factor(H: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1, damp = dampening * mean(diag H); H is modified in place.

    U holds exactly the rows of the successive inverses that the sequential updates need. If H + damp I is not
    positive definite (calibration too short for the layer's width, or in low precision), the dampening is raised
    tenfold and tried again, up to 1e6 times; past that the layer cannot be compensated and this raises."""
    damp = dampening * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    for _ in range(MAX_DAMPENING_RETRIES + 1):
        chol, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info.item() == 0:
                return upper
        damp = damp * 10
        H.diagonal().add_(damp)
    raise ValueError(f"the layer Hessian is not positive definite even with dampening {dampening} x 1e6; the "
                     "calibration set is too small for this layer (raise data.calibration_samples)")  # fmt: skip


def spread_error_(W1: torch.Tensor, U1: torch.Tensor, Err1: torch.Tensor, i: int, q: torch.Tensor,
                  width: int) -> None:  # fmt: skip
    """Column i of a block takes value q: its scaled error goes to Err1[:, i] and over the block's columns i..width."""
    err = (W1[:, i] - q) / U1[i, i]
    W1[:, i:width].addr_(err, U1[i, i:width], alpha=-1)
    Err1[:, i] = err


def lazy_walk(W: torch.Tensor, U: torch.Tensor, block_size: int,
              block: Callable[[int, int], torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """Walk W's columns in blocks [i1, i2): `block(i1, i2)` applies the method's rule to the block's columns (the
    block of W is current, every update from earlier blocks applied) and returns their scaled errors Err1
    [rows, i2 - i1]; those are then spread over the columns past the block in one matmul. W is updated in place.
    Returns the reference's loss per row, sum_j (w_j - q_j)^2 / U_jj^2 / 2."""
    rows, cols = W.shape
    losses = torch.zeros(rows, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        err = block(i1, i2)
        losses += (err * err).sum(dim=1) / 2
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return losses
