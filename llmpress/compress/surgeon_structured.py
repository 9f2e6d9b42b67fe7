"""The LLM Surgeon, structured: remove whole MLP channels and attention heads, chosen across the whole model.

van der Ouderaa et al. (ICLR 2024), "The LLM Surgeon", arXiv 2312.17244, sections 3.2-3.4 for rows and columns;
`surgeon` holds the curvature (K-FAC, F ~ G (x) A per layer, from the whole model's loss) and the paper's
references. This file is what changes when the unit removed is a row or a column instead of a weight.

Costs. Removing row r of a layer (its output r) costs, by OBS under F^-1 = G^-1 (x) A^-1,

    row r       w_r^T A w_r / (2 [G^-1]_rr)
    column c    w_c^T G w_c / (2 [A^-1]_cc)
    rows S      1/2 tr([G^-1]_SS^-1 W_S A W_S^T)        (a head: its head_dim rows of q_proj, jointly)
    columns S   1/2 tr([A^-1]_SS^-1 W_S^T G W_S)        (a head: its head_dim columns of o_proj)

The structures are `shrink`'s dependency groups: an MLP channel is a row of gate_proj and of up_proj and a column
of down_proj, a query head its rows of q_proj and columns of o_proj. Layers are independent under K-FAC, so a
group costs the sum of its parts. With grouped-query attention every KV group must keep the same number of query
heads, so heads go one per KV group at a time: a block's j-th "head slot" costs the sum, over its groups, of
each group's j-th cheapest head.

Allocation: one ranking over every block: the `mlp` share of all the model's channels and the `heads` share of
all its head slots go where they cost least, so blocks end with different widths (`llmpress.layer_shapes` saves
and loads them). A block keeps at least 1 - `max_layer_sparsity` of its channels and one query head per group.

Updates (the OBS optimum for removing a set Q of rows or columns, the other factor cancelling):

    columns Q   dW = -W[:, Q] [A^-1]_QQ^-1 [A^-1]_Q:       (down_proj, o_proj: the kept inputs take over)
    rows Q      dW = -[G^-1]_:Q [G^-1]_QQ^-1 W[Q, :]       (gate/up/q_proj; only with `correlate_rows`)

Column removal is the least-squares refit of `structured` with A (the input second moment) for its Gram matrix,
here from the model's own curvature. Multi-shot: shot t removes up to t/shots of the targets from the model that
the earlier shots left (already smaller), with the curvature recomputed.

Recipe example (`recipes/surgeon-mlp-20.yaml`):

    name: surgeon-mlp-20
    stages:
      - method: surgeon
        mlp: 0.2
        shots: 5
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from llmpress.compress import shrink
from llmpress.compress.anatomy import BlockAnatomy, anatomy, require_separate_projections
from llmpress.compress.methods import ModelContext
from llmpress.compress.surgeon import Kfac, damped, kfac_factors
from llmpress.compress.targets import find_decoder_blocks
from llmpress.config import SurgeonStage
from llmpress.errors import LlmpressError


@torch.no_grad()
def apply_model_(model: nn.Module, stage: SurgeonStage, ctx: ModelContext) -> list[dict[str, Any]]:
    """Remove `stage.mlp` of the model's MLP channels and `stage.heads` of its head slots in `stage.shots` shots;
    one report row per rebuilt linear."""
    check(model, stage)
    ids = ctx.data("surgeon")[: stage.samples]
    blocks_name, blocks = find_decoder_blocks(model)
    first = [anatomy(block) for block in blocks]
    floors = [_floor(a, stage) for a in first]
    channels_before, slots_before = sum(_channels(a) for a in first), sum(_slots(a) for a in first)
    channel_budget, slot_budget = round(stage.mlp * channels_before), round(stage.heads * slots_before)
    params_before = {name: shrink.numel(m) for name, m in _layers(blocks_name, blocks, first, stage).items()}
    for shot in range(1, stage.shots + 1):
        start = time.perf_counter()
        parts = [anatomy(block) for block in blocks]
        layers = _layers(blocks_name, blocks, parts, stage)
        factors = kfac_factors(model, layers, ids, ctx.device, stage.fisher, stage.seed + shot, ctx.batch_size,
                               ctx.progress)  # fmt: skip
        curv = {id(layers[name]): _Curvature(f, stage.dampening_g, stage.dampening_a) for name, f in factors.items()}
        del factors
        removed_channels = _cheapest(
            [channel_costs(a, curv) for a in parts] if stage.mlp > 0 else [],
            round(channel_budget * shot / stage.shots) - (channels_before - sum(_channels(a) for a in parts)),
            [_channels(a) - floor for a, floor in zip(parts, floors, strict=True)],
        )  # fmt: skip
        costs_of_heads = [head_costs(a, curv) for a in parts] if stage.heads > 0 else []
        removed_slots = _cheapest(
            [_slot_costs(c, a.n_kv_heads) for c, a in zip(costs_of_heads, parts, strict=False)],  # [] if no heads
            round(slot_budget * shot / stage.shots) - (slots_before - sum(_slots(a) for a in parts)),
            [_slots(a) - 1 for a in parts],
        )  # fmt: skip
        for i, (block, a) in enumerate(zip(blocks, parts, strict=True)):
            if removed_slots and (k := len(removed_slots[i])) > 0:
                heads = shrink.lowest_heads(costs_of_heads[i], a.n_kv_heads, k)
                _remove_heads(block, a, heads, curv, stage.correlate_rows)
                a = anatomy(block)
            if removed_channels and removed_channels[i]:
                _remove_channels(block, a, removed_channels[i], curv, stage.correlate_rows)
        del curv
        now = [anatomy(block) for block in blocks]
        widths, n_heads = [_channels(a) for a in now], [a.n_heads for a in now]
        ctx.progress(f"surgeon: shot {shot}/{stage.shots}: MLP widths {min(widths)}..{max(widths)} "
                     f"({sum(widths)} of {channels_before} channels), query heads {min(n_heads)}..{max(n_heads)} "
                     f"({sum(n_heads)}), {time.perf_counter() - start:.1f}s")  # fmt: skip
    rows = []
    for i, (block, a) in enumerate(zip(blocks, (anatomy(block) for block in blocks), strict=True)):
        for m in _scored(a, stage):
            name = f"{blocks_name}.{i}.{shrink.path(block, m)}"
            rows.append({"name": name, "layer": m, "params_removed": params_before[name] - shrink.numel(m),
                         "channels_left": _channels(a), "heads_left": a.n_heads, "importance": "surgeon"})  # fmt: skip
    return rows


def check(model: nn.Module, stage: SurgeonStage) -> None:
    """Refuse shares that remove nothing or more than the blocks can give (a head per KV group, the channel
    floor), before any work."""
    parts = [anatomy(block) for block in find_decoder_blocks(model)[1]]
    require_separate_projections(parts[0], "surgeon (structured)")
    for share, field, unit, total, most in (
        (stage.mlp, "mlp", "MLP channels", sum(_channels(a) for a in parts),
         sum(_channels(a) - _floor(a, stage) for a in parts)),
        (stage.heads, "heads", "head slots (one query head of every KV group)", sum(_slots(a) for a in parts),
         sum(_slots(a) - 1 for a in parts)),
    ):  # fmt: skip
        if share > 0 and not 0 < round(share * total) <= most:
            raise LlmpressError(f"surgeon {field}={share}: removes round({share} x {total}) = {round(share * total)} "
                                f"of the model's {total} {unit}; it must be between 1 and {most}")  # fmt: skip


def _channels(a: BlockAnatomy) -> int:
    return a.gate.out_features


def _floor(a: BlockAnatomy, stage: SurgeonStage) -> int:
    """The fewest MLP channels a block may keep: 1 - max_layer_sparsity of its first width, and at least one."""
    return max(1, math.ceil(_channels(a) * (1 - stage.max_layer_sparsity)))


def _slots(a: BlockAnatomy) -> int:
    return a.n_heads // a.n_kv_heads


class _Curvature:
    """One layer's damped factors and their inverses (fp32)."""

    def __init__(self, factors: Kfac, dampening_g: float, dampening_a: float) -> None:
        self.G, self.A = damped(factors.G, dampening_g), damped(factors.A, dampening_a)
        self.G_inv = torch.cholesky_inverse(torch.linalg.cholesky(self.G))
        self.A_inv = torch.cholesky_inverse(torch.linalg.cholesky(self.A))


def _layers(blocks_name: str, blocks: nn.ModuleList, parts: list[BlockAnatomy],
            stage: SurgeonStage) -> dict[str, nn.Linear]:  # fmt: skip
    """The linears whose curvature the stage reads, by full name."""
    return {f"{blocks_name}.{i}.{shrink.path(block, m)}": m
            for i, (block, a) in enumerate(zip(blocks, parts, strict=True)) for m in _scored(a, stage)}  # fmt: skip


def _scored(a: BlockAnatomy, stage: SurgeonStage) -> list[nn.Linear]:
    return ([a.q, a.o] if stage.heads > 0 else []) + ([a.gate, a.up, a.down] if stage.mlp > 0 else [])


def _weight(layer: nn.Linear, c: _Curvature) -> torch.Tensor:
    return layer.weight.detach().to(c.G.device).float()


def row_costs(layer: nn.Linear, c: _Curvature) -> torch.Tensor:
    """w_r^T A w_r / (2 [G^-1]_rr) for every row r."""
    W = _weight(layer, c)
    return ((W @ c.A) * W).sum(dim=1) / (2 * c.G_inv.diagonal())


def column_costs(layer: nn.Linear, c: _Curvature) -> torch.Tensor:
    """w_c^T G w_c / (2 [A^-1]_cc) for every column c."""
    W = _weight(layer, c)
    return ((c.G @ W) * W).sum(dim=0) / (2 * c.A_inv.diagonal())


def channel_costs(a: BlockAnatomy, curv: dict[int, _Curvature]) -> torch.Tensor:
    """The cost of each MLP channel: its rows of gate and up, its column of down."""
    return (row_costs(a.gate, curv[id(a.gate)]) + row_costs(a.up, curv[id(a.up)])
            + column_costs(a.down, curv[id(a.down)]))  # fmt: skip


def head_costs(a: BlockAnatomy, curv: dict[int, _Curvature]) -> torch.Tensor:
    """The cost of each query head: its head_dim rows of q_proj and columns of o_proj, each set jointly."""
    d, n = a.head_dim, a.n_heads
    cq, co = curv[id(a.q)], curv[id(a.o)]
    Wq = _weight(a.q, cq).reshape(n, d, -1)  # [head, d, in]
    Wo = _weight(a.o, co).reshape(-1, n, d).transpose(0, 1)  # [head, out, d]
    blocks = torch.arange(n * d, device=cq.G.device).reshape(n, d)
    Gq_inv = cq.G_inv[blocks[:, :, None], blocks[:, None, :]]  # [head, d, d]
    Ao_inv = co.A_inv[blocks[:, :, None], blocks[:, None, :]]
    q = torch.linalg.solve(Gq_inv, Wq @ cq.A @ Wq.transpose(1, 2)).diagonal(dim1=1, dim2=2).sum(dim=1)
    o = torch.linalg.solve(Ao_inv, Wo.transpose(1, 2) @ co.G @ Wo).diagonal(dim1=1, dim2=2).sum(dim=1)
    return (q + o) / 2


def _slot_costs(costs: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Slot j costs the sum over KV groups of each group's j-th cheapest head; the last head of a group is no slot."""
    return costs.reshape(n_kv, -1).sort(dim=1).values.sum(dim=0)[:-1]


def _cheapest(costs: list[torch.Tensor], count: int, caps: list[int]) -> list[list[int]]:
    """The `count` cheapest units over all blocks (unit j of block i costs costs[i][j]), at most caps[i] from
    block i; the chosen indices per block."""
    chosen: list[list[int]] = [[] for _ in costs]
    if count <= 0 or not costs:
        return chosen
    flat = torch.cat([c.cpu() for c in costs])
    owner = torch.cat([torch.full((len(c),), i) for i, c in enumerate(costs)])
    index = torch.cat([torch.arange(len(c)) for c in costs])
    for unit in torch.argsort(flat, stable=True).tolist():
        i = int(owner[unit])
        if len(chosen[i]) < caps[i]:
            chosen[i].append(int(index[unit]))
            count -= 1
            if count == 0:
                break
    return chosen


def _remove_columns(W: torch.Tensor, removed: torch.Tensor, c: _Curvature) -> torch.Tensor:
    """W after the OBS update for removing columns `removed` (not yet taken out)."""
    A_inv_qq = c.A_inv[removed][:, removed]
    return W - W[:, removed] @ torch.linalg.solve(A_inv_qq, c.A_inv[removed])


def _remove_rows(W: torch.Tensor, removed: torch.Tensor, c: _Curvature) -> torch.Tensor:
    """W after the OBS update for removing rows `removed` (not yet taken out)."""
    G_inv_qq = c.G_inv[removed][:, removed]
    return W - c.G_inv[:, removed] @ torch.linalg.solve(G_inv_qq, W[removed])


def _update_rows_(layer: nn.Linear, removed: torch.Tensor, c: _Curvature) -> None:
    layer.weight.copy_(_remove_rows(_weight(layer, c), removed.to(c.G.device), c).to(layer.weight))


def _remove_channels(block: nn.Module, a: BlockAnatomy, removed: list[int], curv: dict[int, _Curvature],
                     correlate_rows: bool) -> None:  # fmt: skip
    gone = torch.tensor(sorted(removed))
    keep = torch.tensor(sorted(set(range(a.gate.out_features)) - set(removed)))
    if correlate_rows:
        _update_rows_(a.gate, gone, curv[id(a.gate)])
        _update_rows_(a.up, gone, curv[id(a.up)])
    c = curv[id(a.down)]
    down = _remove_columns(_weight(a.down, c), gone.to(c.G.device), c)[:, keep.to(c.G.device)]
    shrink.remove_channels(block, a, "", keep, down.to(a.down.weight))


def _remove_heads(block: nn.Module, a: BlockAnatomy, heads: list[int], curv: dict[int, _Curvature],
                  correlate_rows: bool) -> None:  # fmt: skip
    gone = shrink.head_columns(heads, a.head_dim)
    if correlate_rows:
        _update_rows_(a.q, gone, curv[id(a.q)])
    c = curv[id(a.o)]
    keep = shrink.head_columns([h for h in range(a.n_heads) if h not in heads], a.head_dim).to(c.G.device)
    o = _remove_columns(_weight(a.o, c), gone.to(c.G.device), c)[:, keep]
    shrink.remove_heads(block, a, "", heads, o.to(a.o.weight))
