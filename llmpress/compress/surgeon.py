"""The LLM Surgeon: prune by the curvature of the model's own loss, chosen across the whole model, in several shots.

van der Ouderaa, Nagel, van Baalen, Asano, Blankevoort (ICLR 2024), "The LLM Surgeon", arXiv 2312.17244; reference
code Qualcomm-AI-research/llm-surgeon (`--curvature kfac --krank 1 --use_iad`).

Curvature (section 3.1). For a linear layer y = W a, the Fisher of the loss L is approximated by K-FAC:

    F  ~  G (x) A,     G = E[g g^T]  (g = dL/dy, the output gradient of one token),   A = E[a a^T]

both expectations over the calibration tokens, independently (the paper's "IAD"). L is the whole model's next-token
loss, with labels sampled from the model's own prediction (`fisher: sampled`, the true Fisher) or the data's next
tokens (`fisher: empirical`). So unlike SparseGPT (H = X X^T, one layer's output error) a weight is judged by what
it costs the model's prediction, and costs compare across layers.

Costs (section 3.2, Optimal Brain Surgeon with F^-1 = G^-1 (x) A^-1, damped):

    element   L_ij = w_ij^2 / (2 [G^-1]_ii [A^-1]_jj)
    N:M       a group of M inputs of one row costs the sum of its M - N cheapest elements

Allocation (section 3.3): one threshold over every targeted layer of the model removes the target share in total,
so each layer loses a different share (a layer can lose at most `max_layer_sparsity`).

Update (section 3.4, correlated weights): removing the set Q of weights, the loss-optimal change of the rest is

    dW = -G^-1 Lambda A^-1,    Lambda zero outside Q,   (E_Q^T F^-1 E_Q) lambda = w_Q

with (E_Q^T F^-1 E_Q)_pq = [G^-1]_{r_p r_q} [A^-1]_{c_p c_q}. The system is not solved whole (the reference bounds
it too, `--max_correlate`): each row's own part, -[G^-1]_rr lambda_r^T A^-1, is solved exactly (the row's removed
weights correlated through A^-1, or equivalently its kept weights through A, whichever set is smaller). With
`correlate_rows: true` the rows then share it through G^-1, the correlation between rows that SparseGPT's
H = X X^T lacks; by default they do not: with the system split by rows, the shared part measured worse on the
shipped model (README). Removed weights end at exactly 0.

Multi-shot (section 3.5): shot t of `shots` prunes to t/shots of the target, each shot on curvature computed
afresh from the model as the previous shots left it; removed weights stay removed.

Structured removal (whole MLP channels and query heads, `mlp` / `heads`) is `surgeon_structured`'s: the same
curvature, costs and updates over rows and columns, and blocks left with different widths.

Where this differs from the reference, and why: the first-order term and the interleaved LoRA updates are not
here (a `distill` stage after this one recovers instead); the Fisher uses one sampled label per token.

Memory: G, A and their damped inverses for every targeted layer (fp32), plus one batch of windows' activations
with gradients; 10,739 MiB peak on the shipped 135M model (benchmarks/results/surgeon), far more at 7B sizes. Every
window runs forward and backward once per shot.

Recipe example (`recipes/surgeon-50.yaml`):

    name: surgeon-50
    stages:
      - method: surgeon
        sparsity: 0.5
        shots: 5
        targets: ['.*_proj']
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmpress.compress.methods import Method, ModelContext, register
from llmpress.compress.targets import find_decoder_blocks, targeted_linears
from llmpress.config import SurgeonStage
from llmpress.errors import LlmpressError

SOLVE_ELEMENTS = 2**24  # rows whose systems are solved at once: at most this many matrix entries (64 MiB fp32)


@dataclass
class Kfac:
    """The Kronecker factors of one layer's Fisher: G over outputs, A over inputs, each a mean over tokens."""

    G: torch.Tensor
    A: torch.Tensor


@torch.no_grad()
def apply_model_(model: nn.Module, stage: SurgeonStage, ctx: ModelContext) -> list[dict[str, Any]]:
    """Prune every targeted linear of the decoder blocks to the stage's target in `stage.shots` shots; one report
    row per layer. Structured stages (`heads`, `mlp`) are `surgeon_structured`'s."""
    if stage.structured:
        from llmpress.compress import surgeon_structured

        return surgeon_structured.apply_model_(model, stage, ctx)
    ids = ctx.data("surgeon")[: stage.samples]
    blocks_name, blocks = find_decoder_blocks(model)
    layers = {name: layer for i, block in enumerate(blocks)
              for name, layer in targeted_linears(block, f"{blocks_name}.{i}", stage).items()}  # fmt: skip
    kept = {name: torch.ones_like(layer.weight, dtype=torch.bool) for name, layer in layers.items()}
    for shot in range(1, stage.shots + 1):
        start = time.perf_counter()
        factors = kfac_factors(model, layers, ids, ctx.device, stage.fisher, stage.seed + shot, ctx.batch_size,
                               ctx.progress)  # fmt: skip
        t_curvature = time.perf_counter() - start
        inverses = {name: damped_inverses(f, stage.dampening_g, stage.dampening_a) for name, f in factors.items()}
        del factors
        costs = {name: removal_costs(layers[name].weight, kept[name], *inverses[name][:2]) for name in layers}
        share = stage.target_sparsity * shot / stage.shots
        new_kept = allocate(costs, kept, share, stage.n_m, stage.max_layer_sparsity)
        t_update = time.perf_counter()
        for name, layer in layers.items():
            update_(layer.weight, kept[name] & ~new_kept[name], new_kept[name], *inverses[name], stage.correlate_rows)
        kept = new_kept
        del costs, inverses
        pruned = sum(int((~k).sum()) for k in kept.values()) / sum(k.numel() for k in kept.values())
        now = time.perf_counter()
        ctx.progress(f"surgeon: shot {shot}/{stage.shots} to {pruned:.1%} of {len(layers)} layers in "
                     f"{now - start:.1f}s (curvature {t_curvature:.1f}s, updates {now - t_update:.1f}s)")  # fmt: skip
    return [{"name": name, "layer": layer} for name, layer in layers.items()]


def kfac_factors(model: nn.Module, layers: dict[str, nn.Linear], ids: torch.Tensor, device: torch.device,
                 fisher: str, seed: int, batch_size: int = 1,
                 progress: Callable[[str], None] = print) -> dict[str, Kfac]:  # fmt: skip
    """G = mean over tokens of g g^T and A = mean of a a^T for every layer in `layers`, g the gradient of the summed
    next-token loss with respect to the layer's output at that token, a its input; `batch_size` windows at a time.
    The model is left on the host, in eval mode, with its parameters' requires_grad as they were. A layer that
    never ran is refused by name."""
    generator = torch.Generator(device=device).manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    sums = {name: Kfac(torch.zeros(m.out_features, m.out_features, device=device),
                       torch.zeros(m.in_features, m.in_features, device=device))
            for name, m in layers.items()}  # fmt: skip

    def capture(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            inputs[name], outputs[name] = args[0].detach(), output

        return hook  # fmt: skip

    def track(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)  # the graph starts here: no parameter needs a gradient

    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [model.get_input_embeddings().register_forward_hook(track)]
    handles += [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]
    tokens, start = 0, time.perf_counter()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.to(device).eval()
        with torch.enable_grad():  # the engine runs every stage under no_grad
            for first in range(0, len(ids), batch_size):
                batch = ids[first : first + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                labels = batch[:, 1:]
                if fisher == "sampled":
                    probs = logits.detach().softmax(-1).flatten(0, 1)
                    labels = torch.multinomial(probs, 1, generator=generator).view_as(labels)
                loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")  # per-token gradients
                names = list(outputs)
                grads = torch.autograd.grad(loss, [outputs[n] for n in names]) if names else ()
                products: dict[int, torch.Tensor] = {}  # layers reading one input (q/k/v, gate/up) share a a^T
                for name, g in zip(names, grads, strict=True):
                    if (key := id(inputs[name])) not in products:
                        a = inputs[name][:, :-1].flatten(0, 1).float()  # the last position has no label
                        products[key] = a.T @ a
                    g = g[:, :-1].flatten(0, 1).float()
                    sums[name].G.addmm_(g.T, g)
                    sums[name].A.add_(products[key])
                tokens += labels.numel()
                inputs.clear(), outputs.clear()
                done = min(first + batch_size, len(ids))
                progress(f"surgeon: curvature of {done}/{len(ids)} windows, {time.perf_counter() - start:.1f}s")
    finally:
        for handle in handles:
            handle.remove()
        model.to("cpu")
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if silent := [name for name, f in sums.items() if not f.A.diagonal().any()]:
        raise LlmpressError(f"surgeon: {silent[0]} received no input on the calibration windows (all zero or never "
                            f"called; {len(silent)} such layer(s)); leave it out of the stage's targets")  # fmt: skip
    return {name: Kfac(f.G.div_(tokens), f.A.div_(tokens)) for name, f in sums.items()}


def damped_inverses(factors: Kfac, dampening_g: float, dampening_a: float) -> tuple[torch.Tensor, ...]:
    """(G_d^-1, A_d^-1, A_d), G_d = G + d_g mean(diag G) I and A_d likewise, in fp32. The damping keeps outputs
    that never receive a gradient and inputs that never fire invertible (the reference damps G by 0.1, A by 0.01)."""
    G, A = damped(factors.G, dampening_g), damped(factors.A, dampening_a)
    return torch.cholesky_inverse(torch.linalg.cholesky(G)), torch.cholesky_inverse(torch.linalg.cholesky(A)), A


def damped(M: torch.Tensor, dampening: float) -> torch.Tensor:
    damp = dampening * M.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny)
    return M + damp * torch.eye(len(M), device=M.device)


def removal_costs(weight: torch.Tensor, kept: torch.Tensor, G_inv: torch.Tensor, A_inv: torch.Tensor) -> torch.Tensor:
    """The OBS loss increase of removing each weight alone, w^2 / (2 [G^-1]_ii [A^-1]_jj), shaped like the weight;
    weights already removed cost nothing."""
    w = weight.detach().to(G_inv.device).float()
    cost = w * w / (2 * G_inv.diagonal()[:, None] * A_inv.diagonal()[None, :])
    return cost.masked_fill(~kept.to(cost.device), 0.0)


def allocate(costs: dict[str, torch.Tensor], kept: dict[str, torch.Tensor], share: float,
             n_m: tuple[int, int] | None, max_layer_sparsity: float) -> dict[str, torch.Tensor]:  # fmt: skip
    """The masks after a shot: the cheapest units across all layers until `share` of all weights is removed,
    everything removed before staying removed. A unit is a weight (at most `max_layer_sparsity` of a layer), or
    for N:M a group of M inputs of a row, costing its M - N cheapest weights."""
    units = {name: _unit_costs(c, n_m) for name, c in costs.items()}
    before = {name: _removed_units(kept[name], n_m) for name in costs}
    weights_per_unit = 1 if n_m is None else n_m[1] - n_m[0]
    budget = round(share * sum(k.numel() for k in kept.values()) / weights_per_unit)
    caps = {name: int(u.numel() * (max_layer_sparsity if n_m is None else 1.0)) for name, u in units.items()}
    # One threshold: the budget-th cheapest unit. A layer it would take past its cap gets its cap, and the threshold
    # is found again over the other layers for what is left (costs are >= 0 and units removed before cost 0, so
    # they are always under it).
    thresholds: dict[str, float] = {}
    free = list(units)
    while free:
        flat = torch.cat([units[name] for name in free])
        threshold = float(flat.kthvalue(min(budget, flat.numel())).values) if budget > 0 else -1.0
        over = [name for name in free if int((units[name] <= threshold).sum()) > caps[name]]
        if not over:
            thresholds |= dict.fromkeys(free, threshold)
            break
        for name in over:
            thresholds[name] = float("inf")  # the `cap` cheapest
            budget -= caps[name]
            free.remove(name)
    return {name: _mask(costs[name], units[name], kept[name], before[name], thresholds[name], caps[name], n_m)
            for name in costs}  # fmt: skip


def _unit_costs(cost: torch.Tensor, n_m: tuple[int, int] | None) -> torch.Tensor:
    if n_m is None:
        return cost.flatten()
    n, m = n_m
    return cost.reshape(cost.shape[0], -1, m).sort(dim=2).values[:, :, : m - n].sum(dim=2).flatten()


def _removed_units(kept: torch.Tensor, n_m: tuple[int, int] | None) -> torch.Tensor:
    if n_m is None:
        return ~kept.flatten()
    return (~kept).reshape(kept.shape[0], -1, n_m[1]).any(dim=2).flatten()


def _mask(cost: torch.Tensor, units: torch.Tensor, kept: torch.Tensor, before: torch.Tensor, threshold: float,
          cap: int, n_m: tuple[int, int] | None) -> torch.Tensor:  # fmt: skip
    """One layer's kept weights after a shot: units at or under the threshold removed (the cheapest `cap` if more
    qualify), and everything removed before."""
    device = units.device
    before = before.to(device)
    chosen = (units <= threshold) | before
    if int(chosen.sum()) > cap:
        order = torch.argsort(units.masked_fill(before, -1.0), stable=True)
        chosen = torch.zeros_like(chosen)
        chosen[order[: max(cap, int(before.sum()))]] = True
    if n_m is None:
        return kept & ~chosen.view_as(kept).to(kept.device)
    n, m = n_m
    rows, cols = cost.shape
    # in a group removed by this shot, its M - N cheapest weights go; groups removed before stay as they are
    cheapest = cost.reshape(rows, cols // m, m).argsort(dim=2, stable=True)[:, :, : m - n]
    drop = torch.zeros(rows, cols // m, m, dtype=torch.bool, device=device).scatter_(2, cheapest, True)
    drop &= (chosen & ~before).view(rows, cols // m, 1)
    return kept & ~drop.view(rows, cols).to(kept.device)


def update_(weight: torch.Tensor, removed: torch.Tensor, kept: torch.Tensor, G_inv: torch.Tensor,
            A_inv: torch.Tensor, A: torch.Tensor, correlate_rows: bool = False) -> None:  # fmt: skip
    """Remove the weights in `removed` and compensate the rest, in place: dW = -G^-1 Lambda A^-1 with each row's
    lambda solving [G^-1]_rr A^-1[Q_r, Q_r] lambda_r = w_r[Q_r] (Q_r the row's removed inputs). `A` is the damped
    factor whose inverse is `A_inv`. Every weight outside `kept` ends at exactly 0.

    A row's own part D_r = -[G^-1]_rr lambda_r^T A^-1 is the OBS update of the row under A; it is found by a solve
    of the smaller side: over the k removed inputs with A^-1 when k <= in/2, else over the kept ones with A
    (d_K = A_KK^-1 A_KQ w_Q, d_Q = -w_Q: the same optimum), so no row costs more than (in/2)^3. With
    `correlate_rows` the rows then share it through G^-1, dW = G^-1 diag(G^-1)^-1 D; without, dW = D (G taken as
    diagonal, as SparseGPT's update is)."""
    device = G_inv.device
    W = weight.detach().to(device).float()
    removed = removed.to(device)
    rows_total, cols = W.shape
    counts = removed.sum(dim=1)
    D = torch.zeros_like(W)
    by_count = torch.argsort(counts, descending=True)  # rows solved together have similar counts: little padding
    first = 0
    while first < rows_total and int(counts[by_count[first]]) > 0:
        k = int(counts[by_count[first]])
        complement = k > cols // 2
        size = cols - k if complement else k
        rows = by_count[first : first + max(1, SOLVE_ELEMENTS // max(1, size * size))]
        rows = rows[(counts[rows] > 0) & ((counts[rows] > cols // 2) == complement)]
        first += len(rows)
        side = ~removed[rows] if complement else removed[rows]  # the inputs solved over, first in column order
        n = side.sum(dim=1)
        size = int(n.max())
        order = torch.argsort((~side).to(torch.int8), dim=1, stable=True)[:, :size]
        valid = torch.arange(size, device=device)[None, :] < n[:, None]
        M = A if complement else A_inv
        system = torch.where(valid[:, :, None] & valid[:, None, :], M[order[:, :, None], order[:, None, :]],
                             torch.diag_embed((~valid).float()))  # fmt: skip
        w_removed = W[rows] * removed[rows]
        rhs = ((w_removed @ A).gather(1, order) if complement else w_removed.gather(1, order)) * valid
        x = torch.cholesky_solve(rhs[:, :, None], torch.linalg.cholesky(system))[:, :, 0] * valid
        if complement:  # x = d_K
            D[rows] = torch.zeros_like(w_removed).scatter(1, order, x) - w_removed
        else:  # x = lambda_r [G^-1]_rr
            D[rows] = -torch.zeros_like(w_removed).scatter(1, order, x) @ A_inv
    W += G_inv @ (D / G_inv.diagonal()[:, None]) if correlate_rows else D
    W.mul_(kept.to(device))
    weight.data.copy_(W.to(weight.device, weight.dtype))


def check(model: nn.Module, stage: SurgeonStage) -> None:
    from llmpress.compress.experts import has_experts

    if has_experts(model):
        raise LlmpressError(
            "surgeon takes its curvature from the loss's gradients through the model as it routes, so an expert the "
            "router sends few or no calibration tokens looks free to prune, and its K-FAC factors assume one input "
            "row per position; on a mixture of experts use sparsegpt or wanda, which calibrate every expert on every "
            "calibration token (llmpress/compress/experts.py)"
        )
    if stage.structured:
        from llmpress.compress import surgeon_structured

        surgeon_structured.check(model, stage)


register(Method(SurgeonStage, "model", apply_model_, check=check))
