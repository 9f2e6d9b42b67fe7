"""The OBS core SparseGPT and GPTQ share (llmpress/compress/obs.py): one failure rule, one walk."""

from __future__ import annotations

import pytest
import torch

from llmpress.compress import gptq, obs, sparsegpt
from llmpress.config import SparseGPTStage


def test_the_factor_is_the_upper_cholesky_factor_of_the_damped_inverse() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    H = 2 / 256 * x.T @ x
    U = obs.inverse_hessian_factor(H.clone(), 0.01)
    damped = H + 0.01 * H.diagonal().mean() * torch.eye(32)
    assert torch.allclose(U.T @ U, torch.linalg.inv(damped), rtol=1e-3, atol=1e-5)
    assert torch.equal(U, torch.triu(U))


def test_an_indefinite_hessian_gets_more_dampening_not_an_error() -> None:
    """Both methods follow one rule: 10x the dampening until the factor exists (SparseGPT used to stop here)."""
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues -1 and 3: 1 % dampening is far from enough
    U = obs.inverse_hessian_factor(H.clone(), 0.01)
    assert torch.isfinite(U).all() and (U.diagonal() > 0).all()
    W = torch.randn(4, 2)
    pruned, _ = sparsegpt.prune_(W, H, SparseGPTStage(method="sparsegpt", sparsity=0.5))
    assert (pruned == 0).sum() == 4
    qw, _ = gptq.gptq_quantize(W, H, bits=4, group_size=None, symmetric=False)
    assert qw.codes.shape == W.shape


def test_a_hessian_no_dampening_can_save_is_refused() -> None:
    with pytest.raises(ValueError, match="not positive definite"):
        obs.inverse_hessian_factor(torch.full((3, 3), float("nan")), 0.01)


def test_dead_inputs_become_identity_entries() -> None:
    H = torch.diag(torch.tensor([2.0, 0.0, 3.0]))
    fixed, dead = obs.dead_inputs(H)
    assert dead.tolist() == [False, True, False] and fixed[1, 1] == 1 and H[1, 1] == 0  # the input is not modified


def test_the_lazy_walk_equals_updating_every_column_at_once() -> None:
    """Rounding every column to a grid through the lazy block walk gives what the plain column-by-column OBS
    procedure gives (updates to all later columns immediately)."""
    torch.manual_seed(1)
    x = torch.randn(128, 24)
    H = 2 / 128 * x.T @ x
    W0 = torch.randn(5, 24)
    U = obs.inverse_hessian_factor(H.clone(), 0.01)

    def rounded(W: torch.Tensor) -> torch.Tensor:
        return (W * 4).round() / 4

    plain, plain_err = W0.clone(), torch.zeros_like(W0)
    for j in range(24):
        q = rounded(plain[:, j])
        obs.spread_error_(plain, U, plain_err, j, q, 24)
        plain[:, j] = q

    lazy = W0.clone()

    def block(i1: int, i2: int) -> torch.Tensor:
        W1, err = lazy[:, i1:i2].clone(), torch.zeros(5, i2 - i1)
        for i in range(i2 - i1):
            q = rounded(W1[:, i])
            obs.spread_error_(W1, U[i1:i2, i1:i2], err, i, q, i2 - i1)
            W1[:, i] = q
        lazy[:, i1:i2] = W1
        return err

    losses = obs.lazy_walk(lazy, U, 8, block)
    assert torch.allclose(lazy, plain, atol=1e-5)
    assert torch.allclose(losses, (plain_err**2).sum(dim=1) / 2, rtol=1e-4)
