"""Removing query heads and MLP channels from a decoder block, for the structured methods (`structured`,
`llm_pruner`): they differ in how they score the structures, not in how the structures come out.

In one block, with h = act(gate x) * (up x):

    MLP channel c   is row c of gate_proj and up_proj plus column c of down_proj;
    query head i    is rows [i*d, (i+1)*d) of q_proj plus the same columns of o_proj (d = head_dim).

The same number is removed in every block (stock transformers configs have one intermediate_size and one
num_attention_heads for all layers). Grouped-query attention is respected: query heads i*g .. i*g+g-1 share KV head
i, so round(heads * g) query heads are removed from EVERY group and the key/value projections stay whole;
num_key_value_groups stays an integer (SmolLM2: 9 heads / 3 KV heads, heads 0.34 removes 1 of 3 per group: 6 heads,
3 KV heads). The module config shared by every layer is updated (intermediate_size, num_attention_heads, and head_dim
written out explicitly), so `save_pretrained` writes a config whose shapes load with stock transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmpress.compress.anatomy import BlockAnatomy, anatomy, require_separate_projections
from llmpress.compress.storage import set_submodule
from llmpress.compress.targets import find_decoder_blocks
from llmpress.errors import LlmpressError


def heads_per_group(stage: Any, n_heads: int, n_kv: int) -> int:
    """Query heads removed from each KV group for `stage.heads`: at least one, and at least one left."""
    group = n_heads // n_kv
    k = round(stage.heads * group)
    if not 0 < k < group:
        raise LlmpressError(
            f"{stage.method} heads={stage.heads}: removes round({stage.heads} x {group}) = {k} of the {group} query "
            f"heads in each KV group ({n_heads} heads / {n_kv} KV heads); it must be between 1 and {group - 1}"
        )
    return k


def channels(stage: Any, inter: int) -> int:
    """MLP channels removed for `stage.mlp`: at least one, and at least one left."""
    k = round(stage.mlp * inter)
    if not 0 < k < inter:
        raise LlmpressError(f"{stage.method} mlp={stage.mlp}: removes round({stage.mlp} x {inter}) = {k} of "
                            f"{inter} channels; it must be between 1 and {inter - 1}")  # fmt: skip
    return k


def check(model: nn.Module, stage: Any) -> None:
    """The heads and channels asked for, against the model's first block (every block has the same shapes)."""
    a = anatomy(find_decoder_blocks(model)[1][0])
    require_separate_projections(a, stage.method)
    if stage.heads > 0:
        heads_per_group(stage, a.n_heads, a.n_kv_heads)
    if stage.mlp > 0:
        channels(stage, a.gate.out_features)


def lowest_heads(scores: torch.Tensor, n_kv: int, k: int) -> list[int]:
    """The k lowest-scoring query heads inside each KV group (heads i*group .. i*group+group-1 read KV head i)."""
    group = scores.numel() // n_kv
    order = scores.reshape(n_kv, group).argsort(dim=1, stable=True)[:, :k]
    return sorted((order + torch.arange(n_kv, device=order.device)[:, None] * group).flatten().tolist())


def highest_channels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the channels kept when the k lowest-scoring go, in order."""
    return scores.argsort(descending=True, stable=True)[: scores.numel() - k].sort().values


def head_columns(heads: list[int], d: int) -> torch.Tensor:
    """The q_proj rows (o_proj columns) of `heads`."""
    return torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])


def remove_heads(block: nn.Module, a: BlockAnatomy, prefix: str, removed: list[int],
                 o_weight: torch.Tensor | None = None, **details: Any) -> list[dict[str, Any]]:  # fmt: skip
    """Take query heads `removed` out of q_proj and o_proj (o_proj's kept columns replaced by `o_weight` when
    given); one report row per rebuilt linear, with `details`."""
    kept = [h for h in range(a.n_heads) if h not in removed]
    keep = head_columns(kept, a.head_dim).to(a.o.weight.device)
    new_q, new_o = rebuilt(a.q, rows=keep), rebuilt(a.o, cols=keep, weight=o_weight)
    q_name, o_name = path(block, a.q), path(block, a.o)
    set_submodule(block, q_name, new_q)
    set_submodule(block, o_name, new_o)
    # What transformers' attention reads at run time: num_key_value_groups (repeat_kv / GQA in SDPA), num_heads in
    # older versions; the config for save_pretrained. head_dim is written out because hidden / heads no longer
    # equals it. The config object is shared by all blocks; setting the same values again in each is harmless.
    a.attn.num_key_value_groups = len(kept) // a.n_kv_heads
    if hasattr(a.attn, "num_heads"):
        a.attn.num_heads = len(kept)
    if (config := getattr(a.attn, "config", None)) is not None:
        config.num_attention_heads = len(kept)
        config.head_dim = a.head_dim
    common = {"removed_heads": removed, "heads_left": len(kept), **details}
    return [
        {"name": f"{prefix}.{q_name}", "layer": new_q, **common, "params_removed": numel(a.q) - numel(new_q)},
        {"name": f"{prefix}.{o_name}", "layer": new_o, **common, "params_removed": numel(a.o) - numel(new_o)},
    ]


def remove_channels(block: nn.Module, a: BlockAnatomy, prefix: str, keep: torch.Tensor,
                    down_weight: torch.Tensor | None = None, **details: Any) -> list[dict[str, Any]]:  # fmt: skip
    """Keep only MLP channels `keep` in gate/up (rows) and down (columns; replaced by `down_weight` when given);
    one report row per rebuilt linear, with `details`."""
    inter = a.gate.out_features
    new_layers = [rebuilt(a.gate, rows=keep), rebuilt(a.up, rows=keep), rebuilt(a.down, cols=keep, weight=down_weight)]
    rows = []
    for old, new in zip((a.gate, a.up, a.down), new_layers, strict=True):
        name = path(block, old)
        set_submodule(block, name, new)
        rows.append({"name": f"{prefix}.{name}", "layer": new, "removed_channels": inter - len(keep),
                     "params_removed": numel(old) - numel(new), **details})  # fmt: skip
    if hasattr(a.mlp, "intermediate_size"):
        a.mlp.intermediate_size = len(keep)
    if (config := getattr(a.mlp, "config", None)) is not None:
        config.intermediate_size = len(keep)
    return rows


def rebuilt(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
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


def path(block: nn.Module, module: nn.Module) -> str:
    """The name of `module` inside `block` (e.g. 'mlp.down_proj')."""
    return next(name for name, m in block.named_modules() if m is module)


def numel(layer: nn.Linear) -> int:
    return sum(p.numel() for p in layer.parameters())
