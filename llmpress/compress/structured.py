"""Structured pruning: remove whole attention heads and MLP channels, so the matrices really get smaller.

Unstructured sparsity only saves memory with sparse kernels; removing a query head or an MLP intermediate channel
shrinks the dense matrices themselves. The structures, and how they come out of a block (the same count in every
block, grouped-query attention respected, a config that loads with stock transformers), are `shrink`'s; this
method scores them without gradients and refits what is left (`llm_pruner` scores them by Taylor importance).

Scores (`importance`):
    "activation"  the energy the structure contributes to the block output over the calibration tokens: for a
                  channel ||h_c||^2 * ||down[:, c]||^2, for a head sum_t ||o_proj[:, head] a_t,head||^2
                  (a = the attention output that enters o_proj), i.e. trace(W_head G_head W_head^T);
    "magnitude"   weights only: ||down[:, c]|| * (||gate[c]|| + ||up[c]||), ||o_proj[:, head]|| * ||q_proj[head]||.

The lowest-scoring structures of each block are removed.

`update: least_squares` refits the output projection (down_proj / o_proj) on the kept inputs S to reproduce the
ORIGINAL output on the calibration data, the closed-form reconstruction step of channel pruning (He, Zhang, Sun
2017, "Channel Pruning for Accelerating Very Deep Neural Networks"; the same least-squares spirit as SliceGPT and
LLM-Surgeon):

    min_W' sum_t ||W x_t - W' x_t,S||^2   =>   W' = W G[:, S] (G[S, S] + damp I)^-1,   G = sum_t x_t x_t^T,

with damp = dampening * mean(diag G). Heads are pruned first; the MLP statistics are then gathered on the block
with its pruned attention, so the MLP is fitted to the inputs it will really see.

Recipe example (`recipes/structured-heads-mlp.yaml`):

    name: structured-heads-mlp
    stages:
      - method: structured
        heads: 0.34
        mlp: 0.2
        importance: activation
        update: least_squares
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmpress.compress import shrink
from llmpress.compress.anatomy import BlockAnatomy, anatomy
from llmpress.compress.calibration import BlockCalibration
from llmpress.compress.methods import Method, register
from llmpress.config import StructuredStage
from llmpress.errors import LlmpressError


@torch.no_grad()
def apply_block_(
    block: nn.Module, prefix: str, stage: StructuredStage, calib: BlockCalibration | None
) -> list[dict[str, Any]]:
    """Remove the lowest-scoring query heads and MLP channels of `block` in place; one row per rebuilt linear."""
    if needs_data(stage) and calib is None:
        raise LlmpressError("structured pruning with importance 'activation' or update 'least_squares' needs data")
    rows: list[dict[str, Any]] = []
    if stage.heads > 0:
        rows += _prune_heads(block, anatomy(block), prefix, stage, calib)
        rows[-1]["update"] = stage.update  # on the refitted projection's row
    if stage.mlp > 0:
        rows += _prune_mlp(block, anatomy(block), prefix, stage, calib)
        rows[-1]["update"] = stage.update
    return rows


def _prune_heads(block: nn.Module, a: BlockAnatomy, prefix: str, stage: StructuredStage,
                 calib: BlockCalibration | None) -> list[dict[str, Any]]:  # fmt: skip
    d, n_heads, n_kv = a.head_dim, a.n_heads, a.n_kv_heads
    k = shrink.heads_per_group(stage, n_heads, n_kv)
    w_o = a.o.weight.float()  # [hidden, n_heads * d]
    gram = _input_gram(block, a.o, calib) if calib is not None and needs_data(stage) else None
    if stage.importance == "activation":
        assert gram is not None
        heads = [slice(h * d, (h + 1) * d) for h in range(n_heads)]
        scores = torch.stack([((w_o[:, s] @ gram[s, s]) * w_o[:, s]).sum() for s in heads])
    else:
        q_norms = a.q.weight.float().reshape(n_heads, -1).norm(dim=1)
        o_norms = w_o.reshape(w_o.shape[0], n_heads, d).transpose(0, 1).reshape(n_heads, -1).norm(dim=1)
        scores = q_norms * o_norms
    removed = shrink.lowest_heads(scores, n_kv, k)
    keep = shrink.head_columns([h for h in range(n_heads) if h not in removed], d).to(w_o.device)
    new_o_weight = _refit(a.o.weight, gram, keep, stage.dampening) if stage.update == "least_squares" else None
    return shrink.remove_heads(block, a, prefix, removed, new_o_weight, importance=stage.importance)


def _prune_mlp(block: nn.Module, a: BlockAnatomy, prefix: str, stage: StructuredStage,
               calib: BlockCalibration | None) -> list[dict[str, Any]]:  # fmt: skip
    k = shrink.channels(stage, a.gate.out_features)
    w_down = a.down.weight.float()  # [hidden, inter]
    # The full Gram matrix only for the refit; the score needs its diagonal, sum_t h_c^2.
    full = stage.update == "least_squares"
    gram = _input_gram(block, a.down, calib, full) if calib is not None and needs_data(stage) else None
    if stage.importance == "activation":
        assert gram is not None
        energy = gram.diagonal() if gram.dim() == 2 else gram
        scores = energy * w_down.pow(2).sum(dim=0)
    else:
        scores = w_down.norm(dim=0) * (a.gate.weight.float().norm(dim=1) + a.up.weight.float().norm(dim=1))
    keep = shrink.highest_channels(scores, k)
    new_down_weight = _refit(a.down.weight, gram, keep, stage.dampening) if stage.update == "least_squares" else None
    return shrink.remove_channels(block, a, prefix, keep, new_down_weight, importance=stage.importance)


def needs_data(stage: StructuredStage) -> bool:
    """Activation scores and the least-squares refit read calibration data; magnitude without update does not."""
    return stage.importance == "activation" or stage.update == "least_squares"


def _input_gram(block: nn.Module, module: nn.Linear, calib: BlockCalibration, full: bool = True) -> torch.Tensor:
    """sum_t x_t x_t^T of `module`'s input over the calibration tokens ([in, in], fp32), or only its diagonal."""
    n = module.in_features
    acc = torch.zeros((n, n) if full else (n,), dtype=torch.float32, device=module.weight.device)

    def add(_name: str, x: torch.Tensor) -> None:
        x = x.float()
        if full:
            acc.addmm_(x.T, x)
        else:
            acc.add_((x * x).sum(dim=0))

    calib.observe(block, {"input": module}, add)
    return acc


def _refit(weight: torch.Tensor, gram: torch.Tensor | None, keep: torch.Tensor, dampening: float) -> torch.Tensor:
    """W' = W G[:, S] (G[S, S] + damp I)^-1: the kept columns that best reproduce W x on the calibration data."""
    assert gram is not None
    g = gram.double()
    damp = dampening * g.diagonal().mean().clamp_min(1e-8)
    g_ss = g[keep][:, keep] + damp * torch.eye(len(keep), dtype=g.dtype, device=g.device)
    rhs = weight.double() @ g[:, keep]  # [out, |S|]
    return torch.linalg.solve(g_ss, rhs.T).T.to(weight.dtype)  # G[S, S] is symmetric


register(Method(StructuredStage, "block", apply_block_, needs_data=needs_data, check=shrink.check))
