"""Structured pruning: remove whole attention heads and MLP channels, so the matrices really get smaller.

Unstructured sparsity only saves memory with sparse kernels; removing a query head or an MLP intermediate channel
shrinks the dense matrices themselves (LLM-Pruner, Ma et al. 2023, "LLM-Pruner: On the Structural Pruning of Large
Language Models", prunes the same coupled structures of Llama blocks). In one block, with h = act(gate x) * (up x):

    MLP channel c   is row c of gate_proj and up_proj plus column c of down_proj;
    query head i    is rows [i*d, (i+1)*d) of q_proj plus the same columns of o_proj (d = head_dim).

Scores (`importance`):
    "activation"  the energy the structure contributes to the block output over the calibration tokens: for a
                  channel ||h_c||^2 * ||down[:, c]||^2, for a head sum_t ||o_proj[:, head] a_t,head||^2
                  (a = the attention output that enters o_proj), i.e. trace(W_head G_head W_head^T);
    "magnitude"   weights only: ||down[:, c]|| * (||gate[c]|| + ||up[c]||), ||o_proj[:, head]|| * ||q_proj[head]||.

The same number is removed in every block (stock transformers configs have one intermediate_size and one
num_attention_heads for all layers), the lowest-scoring in each block. Grouped-query attention is respected:
query heads i*g .. i*g+g-1 share KV head i, so round(heads * g) query heads are removed from EVERY group and the
key/value projections stay whole; num_key_value_groups stays an integer (SmolLM2: 9 heads / 3 KV heads, heads 0.34
removes 1 of 3 per group: 6 heads, 3 KV heads).

`update: least_squares` refits the output projection (down_proj / o_proj) on the kept inputs S to reproduce the
ORIGINAL output on the calibration data, the closed-form reconstruction step of channel pruning (He, Zhang, Sun
2017, "Channel Pruning for Accelerating Very Deep Neural Networks"; the same least-squares spirit as SliceGPT and
LLM-Surgeon):

    min_W' sum_t ||W x_t - W' x_t,S||^2   =>   W' = W G[:, S] (G[S, S] + damp I)^-1,   G = sum_t x_t x_t^T,

with damp = dampening * mean(diag G). Heads are pruned first; the MLP statistics are then gathered on the block
with its pruned attention, so the MLP is fitted to the inputs it will really see.

The module config shared by every layer is updated (intermediate_size, num_attention_heads, and head_dim written
out explicitly), so `save_pretrained` writes a config whose shapes load with stock transformers.

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

from llmpress.compress.anatomy import BlockAnatomy, anatomy
from llmpress.compress.calibration import BlockCalibration
from llmpress.compress.methods import Method, register
from llmpress.compress.storage import set_submodule
from llmpress.compress.targets import find_decoder_blocks
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
    if stage.mlp > 0:
        rows += _prune_mlp(block, anatomy(block), prefix, stage, calib)
    return rows


def _heads_per_group(stage: StructuredStage, n_heads: int, n_kv: int) -> int:
    """Query heads removed from each KV group: at least one, and at least one left."""
    group = n_heads // n_kv
    k = round(stage.heads * group)
    if not 0 < k < group:
        raise LlmpressError(
            f"structured heads={stage.heads}: removes round({stage.heads} x {group}) = {k} of the {group} query "
            f"heads in each KV group ({n_heads} heads / {n_kv} KV heads); it must be between 1 and {group - 1}"
        )
    return k


def _channels(stage: StructuredStage, inter: int) -> int:
    k = round(stage.mlp * inter)
    if not 0 < k < inter:
        raise LlmpressError(f"structured mlp={stage.mlp}: removes round({stage.mlp} x {inter}) = {k} of {inter} "
                            f"channels; it must be between 1 and {inter - 1}")  # fmt: skip
    return k


def check(model: nn.Module, stage: StructuredStage) -> None:
    """The heads and channels asked for, against the model's first block (every block has the same shapes)."""
    a = anatomy(find_decoder_blocks(model)[1][0])
    if stage.heads > 0:
        _heads_per_group(stage, a.n_heads, a.n_kv_heads)
    if stage.mlp > 0:
        _channels(stage, a.gate.out_features)


def _prune_heads(block: nn.Module, a: BlockAnatomy, prefix: str, stage: StructuredStage,
                 calib: BlockCalibration | None) -> list[dict[str, Any]]:  # fmt: skip
    d, n_heads, n_kv = a.head_dim, a.n_heads, a.n_kv_heads
    group = n_heads // n_kv
    k = _heads_per_group(stage, n_heads, n_kv)
    w_o = a.o.weight.float()  # [hidden, n_heads * d]
    gram = _input_gram(block, a.o, calib) if calib is not None and needs_data(stage) else None
    if stage.importance == "activation":
        assert gram is not None
        scores = torch.stack([((w_o[:, s] @ gram[s, s]) * w_o[:, s]).sum() for s in _head_slices(n_heads, d)])
    else:
        q_norms = a.q.weight.float().reshape(n_heads, -1).norm(dim=1)
        o_norms = w_o.reshape(w_o.shape[0], n_heads, d).transpose(0, 1).reshape(n_heads, -1).norm(dim=1)
        scores = q_norms * o_norms
    # The k lowest query heads inside each KV group (heads i*group .. i*group+group-1 read KV head i).
    order = scores.reshape(n_kv, group).argsort(dim=1, stable=True)[:, :k]
    removed = sorted((order + torch.arange(n_kv, device=order.device)[:, None] * group).flatten().tolist())
    kept_heads = [h for h in range(n_heads) if h not in removed]
    keep = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kept_heads]).to(w_o.device)

    new_o_weight = _refit(a.o.weight, gram, keep, stage.dampening) if stage.update == "least_squares" else None
    new_q = _rebuilt(a.q, rows=keep)
    new_o = _rebuilt(a.o, cols=keep, weight=new_o_weight)
    q_name, o_name = _path(block, a.q), _path(block, a.o)
    set_submodule(block, q_name, new_q)
    set_submodule(block, o_name, new_o)

    # What transformers' attention reads at run time: num_key_value_groups (repeat_kv / GQA in SDPA), num_heads in
    # older versions; the config for save_pretrained. head_dim is written out because hidden / heads no longer
    # equals it. The config object is shared by all blocks; setting the same values again in each is harmless.
    heads_left = n_heads - k * n_kv
    a.attn.num_key_value_groups = heads_left // n_kv
    if hasattr(a.attn, "num_heads"):
        a.attn.num_heads = heads_left
    config = getattr(a.attn, "config", None)
    if config is not None:
        config.num_attention_heads = heads_left
        config.head_dim = d
    common = {"removed_heads": removed, "heads_left": heads_left, "importance": stage.importance}
    return [
        {"name": f"{prefix}.{q_name}", "layer": new_q, **common, "params_removed": _numel(a.q) - _numel(new_q)},
        {"name": f"{prefix}.{o_name}", "layer": new_o, **common, "params_removed": _numel(a.o) - _numel(new_o),
         "update": stage.update},
    ]  # fmt: skip


def _prune_mlp(block: nn.Module, a: BlockAnatomy, prefix: str, stage: StructuredStage,
               calib: BlockCalibration | None) -> list[dict[str, Any]]:  # fmt: skip
    inter = a.gate.out_features
    k = _channels(stage, inter)
    w_down = a.down.weight.float()  # [hidden, inter]
    gram = None
    if calib is not None and needs_data(stage):
        # The full Gram matrix only for the refit; the score needs its diagonal, sum_t h_c^2.
        gram = _input_gram(block, a.down, calib, full=stage.update == "least_squares")
    if stage.importance == "activation":
        assert gram is not None
        energy = gram.diagonal() if gram.dim() == 2 else gram
        scores = energy * w_down.pow(2).sum(dim=0)
    else:
        scores = w_down.norm(dim=0) * (a.gate.weight.float().norm(dim=1) + a.up.weight.float().norm(dim=1))
    keep = scores.argsort(descending=True, stable=True)[: inter - k].sort().values

    new_down_weight = _refit(a.down.weight, gram, keep, stage.dampening) if stage.update == "least_squares" else None
    rebuilt = {
        "gate": _rebuilt(a.gate, rows=keep),
        "up": _rebuilt(a.up, rows=keep),
        "down": _rebuilt(a.down, cols=keep, weight=new_down_weight),
    }
    rows = []
    for part, new in rebuilt.items():
        old = getattr(a, part)
        name = _path(block, old)
        set_submodule(block, name, new)
        rows.append({"name": f"{prefix}.{name}", "layer": new, "removed_channels": k,
                     "params_removed": _numel(old) - _numel(new), "importance": stage.importance})  # fmt: skip
    rows[-1]["update"] = stage.update
    if hasattr(a.mlp, "intermediate_size"):
        a.mlp.intermediate_size = inter - k
    config = getattr(a.mlp, "config", None)
    if config is not None:
        config.intermediate_size = inter - k
    return rows


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


def _rebuilt(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
             weight: torch.Tensor | None = None) -> nn.Linear:  # fmt: skip
    """A smaller nn.Linear with the kept rows (outputs) or columns (inputs) of `old`, or the given weight."""
    w = old.weight.detach()
    if rows is not None:
        w = w[rows.to(w.device)]
    if cols is not None:
        w = w[:, cols.to(w.device)]
    if weight is not None:
        w = weight
    # Built on the meta device: no random initialisation for weights that are overwritten anyway.
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device="meta")
    new.weight = nn.Parameter(w.to(old.weight.dtype).contiguous().clone(), requires_grad=old.weight.requires_grad)
    if old.bias is not None:
        b = old.bias.detach()[rows.to(old.bias.device)] if rows is not None else old.bias.detach()
        new.bias = nn.Parameter(b.contiguous().clone(), requires_grad=old.bias.requires_grad)
    return new


def _head_slices(n_heads: int, d: int) -> list[slice]:
    return [slice(h * d, (h + 1) * d) for h in range(n_heads)]


def _path(block: nn.Module, module: nn.Module) -> str:
    """The name of `module` inside `block` (e.g. 'mlp.down_proj')."""
    return next(name for name, m in block.named_modules() if m is module)


def _numel(layer: nn.Linear) -> int:
    return sum(p.numel() for p in layer.parameters())


register(Method(StructuredStage, "block", apply_block_, needs_data=needs_data, check=check))
