"""LLM-Pruner: remove coupled structures, scored by the Taylor expansion of the calibration loss.

Ma, Fang, Wang (NeurIPS 2023), "LLM-Pruner: On the Structural Pruning of Large Language Models", arXiv 2305.11627;
reference code horseee/LLM-Pruner (`--pruner_type taylor`, `hf_llama_pruner.TaylorImportance`).

The structures are the dependency groups of a Llama block (`shrink`): a query head (its rows of q_proj and its
columns of o_proj) and an MLP channel (its row of gate_proj and up_proj, its column of down_proj). A group is as
important as the loss L (next-token cross-entropy on the calibration windows) rises when it is removed, which the
Taylor expansion around the trained weights W estimates from gradients (paper, section 3.2):

    L(W with W_k = 0) - L(W)  ~  -dL/dW_k W_k + 1/2 W_k H_kk W_k

    vector    I(G) = sum over the group's layers  | sum_k dL/dW_k W_k |       (each layer's slice as one vector)
    element1  I(G) = sum over the group's weights | dL/dW_k W_k |             (the reference's `param_first`)
    element2  I(G) = sum over the group's weights | dL/dW_k W_k - 1/2 F_kk W_k^2 |

with F_kk = mean over windows of (dL_n/dW_k)^2, the Fisher diagonal standing in for the Hessian's. The layers of a
group are summed (the paper's "summation" aggregation). The lowest-scoring query heads inside each KV group and
the lowest-scoring MLP channels are removed, the same count in every block.

Where this differs from the paper, and why:
- every block loses the same share: the paper spares LLaMA-7B's first 4 and last 2 blocks and prunes the others
  harder, which needs per-layer widths that a stock transformers config cannot describe;
- grouped-query attention: query heads go inside their KV group and keys/values stay (the paper's LLaMA had one KV
  head per query head and removed all four projections of a head);
- recovery: the paper tunes LoRA adapters on 50k Alpaca samples; here a `distill` stage after this one recovers
  on the calibration windows from the unpruned model's logits (recipes/llm-pruner-mlp-20-distill.yaml).

Unlike the block-by-block methods, the loss needs every block: gradients are taken over the whole model on
`device`, one window at a time (peak memory: the model, its gradients for the scored layers, one window's
activations).

Recipe example (`recipes/llm-pruner-mlp-20.yaml`):

    name: llm-pruner-mlp-20
    stages:
      - method: llm_pruner
        mlp: 0.2
        importance: element1
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmpress.compress import shrink
from llmpress.compress.anatomy import BlockAnatomy, anatomy
from llmpress.compress.methods import Method, ModelContext, register
from llmpress.compress.targets import find_decoder_blocks
from llmpress.config import LlmPrunerStage

ByWeight = dict[int, torch.Tensor]  # keyed by id(weight)


@torch.no_grad()
def apply_model_(model: nn.Module, stage: LlmPrunerStage, ctx: ModelContext) -> list[dict[str, Any]]:
    """Score every head and channel of every block from the loss gradients, then remove the lowest in each block;
    one row per rebuilt linear."""
    shrink.check(model, stage)
    ids = ctx.data("llm_pruner")[: stage.samples]
    blocks_name, blocks = find_decoder_blocks(model)
    parts = [anatomy(block) for block in blocks]
    scored = [layer for a in parts for layer in _scored_layers(a, stage)]
    grads, fisher = loss_gradients(model, [layer.weight for layer in scored], ids, ctx.device,
                                   stage.importance == "element2", ctx.progress)  # fmt: skip

    def member(layer: nn.Linear, along: int, size: int) -> torch.Tensor:
        w = layer.weight
        return structure_scores(w, grads[id(w)], fisher.get(id(w)), stage.importance, along, size)

    rows: list[dict[str, Any]] = []
    for i, (block, a) in enumerate(zip(blocks, parts, strict=True)):
        prefix = f"{blocks_name}.{i}"
        if stage.heads > 0:
            scores = member(a.q, 0, a.head_dim) + member(a.o, 1, a.head_dim)
            removed = shrink.lowest_heads(scores, a.n_kv_heads, shrink.heads_per_group(stage, a.n_heads, a.n_kv_heads))
            rows += shrink.remove_heads(block, a, prefix, removed, importance=stage.importance)
        if stage.mlp > 0:
            scores = member(a.gate, 0, 1) + member(a.up, 0, 1) + member(a.down, 1, 1)
            keep = shrink.highest_channels(scores, shrink.channels(stage, a.gate.out_features))
            rows += shrink.remove_channels(block, a, prefix, keep, importance=stage.importance)
    ctx.progress(f"llm_pruner: {len(rows)} linears rebuilt in {len(blocks)} blocks ({stage.importance} scores)")
    return rows


def _scored_layers(a: BlockAnatomy, stage: LlmPrunerStage) -> list[nn.Linear]:
    return ([a.q, a.o] if stage.heads > 0 else []) + ([a.gate, a.up, a.down] if stage.mlp > 0 else [])


def structure_scores(weight: torch.Tensor, grad: torch.Tensor, fisher: torch.Tensor | None, importance: str,
                     along: int, size: int) -> torch.Tensor:  # fmt: skip
    """One Taylor score per structure of `size` consecutive rows (`along` 0) or columns (`along` 1) of `weight`,
    given dL/dW (`grad`) and, for element2, the Fisher diagonal."""
    w = weight.to(grad.dtype)
    first = grad * w  # -(first-order change of L when these weights are zeroed)
    if importance == "element2":
        assert fisher is not None
        first = first - 0.5 * fisher * w * w
    per = first if along == 0 else first.T
    per = per.reshape(-1, size * per.shape[1])  # one row per structure
    return per.sum(dim=1).abs() if importance == "vector" else per.abs().sum(dim=1)


def loss_gradients(
    model: nn.Module,
    weights: list[torch.Tensor],
    ids: torch.Tensor,
    device: torch.device,
    with_fisher: bool,
    progress: Callable[[str], None] = print,
) -> tuple[ByWeight, ByWeight]:
    """dL/dW for `weights` (fp32 or wider, on the host, keyed by id), L the mean over windows of each window's mean
    next-token cross-entropy; with `with_fisher`, also the mean over windows of (dL_n/dW)^2."""
    flags = {p: p.requires_grad for p in model.parameters()}
    n, start = ids.shape[0], time.perf_counter()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        model.to(device).eval()  # parameters move in place: `weights` are still the model's
        dtype = torch.promote_types(weights[0].dtype, torch.float32)
        grads = {id(w): torch.zeros(w.shape, dtype=dtype, device=w.device) for w in weights}
        fisher = {k: torch.zeros_like(g) for k, g in grads.items()} if with_fisher else {}
        with torch.enable_grad():  # the engine runs every stage under no_grad
            for index, window in enumerate(ids):
                batch = window[None].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                logits = logits[0, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
                loss = F.cross_entropy(logits, batch[0, 1:])
                for w, g in zip(weights, torch.autograd.grad(loss, weights), strict=True):
                    grads[id(w)].add_(g, alpha=1 / n)
                    if with_fisher:
                        fisher[id(w)].addcmul_(g, g, value=1 / n)
                if index + 1 == n or (index + 1) % 8 == 0:
                    progress(f"llm_pruner: gradients of {index + 1}/{n} windows, {time.perf_counter() - start:.1f}s")
    finally:
        model.to("cpu")
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {k: g.cpu() for k, g in grads.items()}, {k: f.cpu() for k, f in fisher.items()}


register(Method(LlmPrunerStage, "model", apply_model_, check=shrink.check))
