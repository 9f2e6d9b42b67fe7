"""surgeon (The LLM Surgeon): K-FAC factors against the exact Fisher, costs and correlated updates against the dense
Optimal Brain Surgeon formulas with F = G (x) A, the global allocation, and the method end to end on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmpress.compress.engine import compress_
from llmpress.compress.surgeon import Kfac, allocate, damped_inverses, kfac_factors, removal_costs, update_
from llmpress.config import Recipe
from llmpress.errors import ConfigError
from tests.unit.conftest import build_tiny_llama

CPU = torch.device("cpu")
LAYER = "model.layers.1.mlp.down_proj"


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    return x @ x.T / (3 * n) + 0.1 * torch.eye(n, dtype=torch.float64)


def test_kfac_factors_are_the_exact_fisher_for_one_token(tiny_llama) -> None:
    """With one labelled token the Fisher of W is vec(g a^T) vec(g a^T)^T = (g g^T) (x) (a a^T) exactly: the
    factors must give back the outer product of the weight's true gradient."""
    ids = torch.tensor([[5, 17]])  # position 0 predicts token 17: one term in the loss
    layer = tiny_llama.get_submodule(LAYER)
    factors = kfac_factors(tiny_llama, {LAYER: layer}, ids, CPU, "empirical", seed=0, progress=lambda _: None)
    layer.weight.requires_grad_(True)
    logits = tiny_llama(input_ids=ids, use_cache=False).logits[0, :-1]
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, ids[0, 1:], reduction="sum"), [layer.weight])
    layer.weight.requires_grad_(False)
    exact = torch.outer(grad.flatten(), grad.flatten())
    kron = torch.kron(factors[LAYER].G, factors[LAYER].A)
    assert torch.allclose(kron, exact, rtol=1e-4, atol=1e-6 * exact.abs().max().item())


def test_kfac_factors_average_tokens_and_windows(tiny_llama, calibration_ids) -> None:
    """A is the mean over labelled tokens of a a^T (the layer's inputs, captured separately here), the same whatever
    the batching; sampled labels are reproducible from the seed and differ from the data's."""
    layer = tiny_llama.get_submodule(LAYER)
    seen = []
    handle = layer.register_forward_hook(lambda m, args, out: seen.append(args[0][:, :-1].flatten(0, 1)))
    with torch.no_grad():
        tiny_llama(input_ids=calibration_ids)
    handle.remove()
    a = seen[0]
    quiet = {"progress": lambda _: None}
    one = kfac_factors(tiny_llama, {LAYER: layer}, calibration_ids, CPU, "sampled", seed=3, batch_size=1, **quiet)
    four = kfac_factors(tiny_llama, {LAYER: layer}, calibration_ids, CPU, "sampled", seed=3, batch_size=4, **quiet)
    empirical = kfac_factors(tiny_llama, {LAYER: layer}, calibration_ids, CPU, "empirical", seed=3, **quiet)
    assert torch.allclose(one[LAYER].A, a.T @ a / len(a), rtol=1e-4, atol=1e-6)
    assert torch.allclose(four[LAYER].A, one[LAYER].A, rtol=1e-4, atol=1e-6)
    assert torch.allclose(four[LAYER].G, one[LAYER].G, rtol=1e-3, atol=1e-9)  # one generator, same draws
    assert not torch.allclose(empirical[LAYER].G, one[LAYER].G, rtol=1e-2)


def test_kfac_restores_requires_grad_flags(tiny_llama, calibration_ids) -> None:
    flags = [p.requires_grad for p in tiny_llama.parameters()]
    layer = tiny_llama.get_submodule(LAYER)
    kfac_factors(tiny_llama, {LAYER: layer}, calibration_ids[:2], CPU, "sampled", seed=0, progress=lambda _: None)
    assert [p.requires_grad for p in tiny_llama.parameters()] == flags


def _dense_obs(W: torch.Tensor, G_inv: torch.Tensor, A_inv: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """W + dW with dW = -F^-1 E (E^T F^-1 E)^-1 E^T theta, F^-1 = G^-1 (x) A^-1 built explicitly (row-major vec)."""
    F_inv = torch.kron(G_inv.contiguous(), A_inv.contiguous())  # linalg.inv may return column-major
    q = removed.flatten().nonzero()[:, 0]
    theta = W.flatten()
    lam = torch.linalg.solve(F_inv[q][:, q], theta[q])
    return (theta - F_inv[:, q] @ lam).view_as(W)


def test_removal_cost_is_the_obs_loss_of_one_weight() -> None:
    G_inv, A_inv = torch.linalg.inv(_spd(4, 0)), torch.linalg.inv(_spd(6, 1))
    W = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kept = torch.ones_like(W, dtype=torch.bool)
    kept[1, 2] = False
    cost = removal_costs(W, kept, G_inv.float(), A_inv.float()).double()
    F_inv_diag = torch.kron(G_inv, A_inv).diagonal().view_as(W)
    expected = (W**2 / (2 * F_inv_diag)).masked_fill(~kept, 0.0)  # a weight already removed costs nothing
    assert torch.allclose(cost, expected, rtol=1e-5)


def _update(W: torch.Tensor, removed: torch.Tensor, G_inv: torch.Tensor, A: torch.Tensor,
            correlate_rows: bool = True) -> torch.Tensor:  # fmt: skip
    weight = torch.nn.Parameter(W.clone().float(), requires_grad=False)
    update_(weight, removed, ~removed, G_inv.float(), torch.linalg.inv(A).float(), A.float(), correlate_rows)
    return weight.double()


def test_update_is_the_exact_obs_solution_within_a_row_and_with_uncorrelated_rows() -> None:
    """Weights removed from one row: the row-wise solve is the full OBS solution, every row moving through G^-1.
    Several rows with a diagonal G: exact again, both for rows losing few inputs (solved over the removed ones with
    A^-1) and most (over the kept ones with A). Removed weights end at exactly 0."""
    G_inv, A = torch.linalg.inv(_spd(4, 3)), _spd(8, 4)
    A_inv = torch.linalg.inv(A)
    W = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    removed = torch.zeros(4, 8, dtype=torch.bool)
    removed[2, [0, 3, 6]] = True
    new = _update(W, removed, G_inv, A)
    assert torch.allclose(new, _dense_obs(W, G_inv, A_inv, removed), atol=1e-5)
    assert bool((new[removed] == 0).all())
    assert not torch.allclose(new[0], W[0])  # the other rows moved: correlated through G^-1

    diagonal = torch.diag(G_inv.diagonal().clone()).contiguous()
    removed[0, [1, 2]] = True
    removed[3, [0, 1, 2, 4, 5, 7]] = True  # 6 of 8: solved over the 2 kept inputs
    removed[1, [0, 1, 2, 3, 4]] = True  # 5 of 8
    new = _update(W, removed, diagonal, A)
    assert torch.allclose(new, _dense_obs(W, diagonal, A_inv, removed), atol=1e-5)
    assert bool((new[removed] == 0).all())
    # without correlate_rows G counts as diagonal whatever it is: each row alone, exactly
    assert torch.allclose(_update(W, removed, G_inv, A, correlate_rows=False), new, atol=1e-5)


def test_update_lowers_the_quadratic_loss_against_zeroing() -> None:
    """Under F = G (x) A the compensated removal costs less than zeroing the same weights."""
    G, A = _spd(16, 6), _spd(24, 7)
    G_inv, A_inv = torch.linalg.inv(G), torch.linalg.inv(A)
    W = torch.randn(16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    removed = torch.rand(16, 24, generator=torch.Generator().manual_seed(9)) < 0.5
    weight = torch.nn.Parameter(W.clone().float(), requires_grad=False)
    update_(weight, removed, ~removed, G_inv.float(), A_inv.float(), A.float(), correlate_rows=True)

    def loss(new: torch.Tensor) -> float:
        d = (new - W).flatten()
        return float(d @ torch.kron(G, A) @ d / 2)

    assert loss(weight.double()) < 0.8 * loss(W * ~removed)


def test_allocation_is_global_capped_and_keeps_what_was_removed() -> None:
    g = torch.Generator().manual_seed(0)
    costs = {"cheap": torch.rand(8, 16, generator=g) * 0.1, "dear": torch.rand(8, 16, generator=g) + 1.0}
    kept = {name: torch.ones(8, 16, dtype=torch.bool) for name in costs}
    masks = allocate(costs, kept, 0.5, None, max_layer_sparsity=1.0)
    assert int((~masks["cheap"]).sum()) == 128 and bool(masks["dear"].all())  # one threshold, all from the cheap one
    masks = allocate(costs, kept, 0.5, None, max_layer_sparsity=0.75)
    assert int((~masks["cheap"]).sum()) == 96 and int((~masks["dear"]).sum()) == 32  # the cap moves the rest
    assert bool((~masks["dear"])[costs["dear"] > costs["dear"][~masks["dear"]].max()].logical_not().all())
    later = allocate({n: c.masked_fill(~masks[n], 0) for n, c in costs.items()}, masks, 0.6, None, 0.75)
    for name in costs:
        assert bool((later[name] <= masks[name]).all())  # removed stays removed
    assert sum(int((~m).sum()) for m in later.values()) == round(0.6 * 256)


def test_nm_allocation_ends_with_every_group_exactly_n_of_m() -> None:
    g = torch.Generator().manual_seed(1)
    costs = {"a": torch.rand(4, 16, generator=g), "b": torch.rand(4, 16, generator=g) * 10}
    kept = {name: torch.ones(4, 16, dtype=torch.bool) for name in costs}
    half = allocate(costs, kept, 0.25, (2, 4), 1.0)  # half of the groups
    groups = {n: (~m).view(4, 4, 4).sum(-1) for n, m in half.items()}
    assert sorted(int(c) for g_ in groups.values() for c in g_.flatten().unique()) == [0, 2]
    assert sum(int((c == 2).sum()) for c in groups.values()) == 16
    assert int((groups["a"] == 2).sum()) > int((groups["b"] == 2).sum())  # the cheap layer goes first
    full = allocate({n: c.masked_fill(~half[n], 0) for n, c in costs.items()}, half, 0.5, (2, 4), 1.0)
    for name, mask in full.items():
        assert bool((mask.view(4, 4, 4).sum(-1) == 2).all()) and bool((mask <= half[name]).all())
        # inside each group the two cheapest weights went
        removed_costs = costs[name].view(4, 4, 4)[~mask.view(4, 4, 4) & half[name].view(4, 4, 4)]
        assert removed_costs.numel() % 2 == 0


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_surgeon_prunes_the_model_globally_in_shots(tiny_llama, calibration_ids, pattern) -> None:
    stage = {"method": "surgeon", "shots": 3, "targets": [r".*_proj"]}
    stage |= {"pattern": pattern} if pattern else {"sparsity": 0.5}
    messages: list[str] = []
    report = compress_(tiny_llama, Recipe(name="unit-surgeon", stages=[stage]), calibration_ids, batch_size=4,
                       progress=messages.append)  # fmt: skip
    layers = {n: m for n, m in tiny_llama.named_modules() if n.endswith("_proj")}
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    total = sum(m.weight.numel() for m in layers.values())
    assert abs(zeros / total - 0.5) < 0.005
    assert sum("surgeon: shot" in m for m in messages) == 3
    shares = [r.sparsity for r in report.layers]
    assert len(shares) == len(layers)
    if pattern:
        for name, m in layers.items():
            assert bool(((m.weight != 0).view(m.out_features, -1, 4).sum(-1) <= 2).all()), name
    else:
        assert max(shares) - min(shares) > 0.05  # a global threshold: layers lose different shares
        assert max(shares) <= 0.95 + 1e-6


def test_silent_layer_is_refused_by_name(tiny_llama, calibration_ids) -> None:
    from llmpress.errors import LlmpressError

    layer = torch.nn.Linear(4, 4)  # not in the model: never runs
    with pytest.raises(LlmpressError, match=r"extra .*received no input"):
        kfac_factors(tiny_llama, {"extra": layer}, calibration_ids[:1], CPU, "sampled", 0, progress=lambda _: None)


def test_damped_inverses_are_finite_for_dead_inputs() -> None:
    A = _spd(6, 0).float()
    A[2, :] = A[:, 2] = 0  # an input that never fires
    G_inv, A_inv, A_damped = damped_inverses(Kfac(_spd(3, 1).float(), A), 0.1, 0.01)
    assert torch.isfinite(G_inv).all() and torch.isfinite(A_inv).all()
    assert torch.allclose(A_inv @ A_damped, torch.eye(6), atol=1e-4)


def test_cap_below_target_is_refused() -> None:
    from llmpress.config import validate

    with pytest.raises(ConfigError, match="max_layer_sparsity"):
        validate(Recipe, {"name": "x", "stages": [{"method": "surgeon", "sparsity": 0.6, "max_layer_sparsity": 0.5}]},
                 "recipe")  # fmt: skip


def test_surgeon_needs_calibration_data() -> None:
    from llmpress.errors import LlmpressError

    with pytest.raises(LlmpressError, match="calibration"):
        compress_(build_tiny_llama(), Recipe(name="s", stages=[{"method": "surgeon", "sparsity": 0.5}]), None)
