from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llmpress.compress import lowrank, storage
from llmpress.compress.engine import compress_
from llmpress.compress.offload import iterate_blocks
from llmpress.config import LowRankStage, Recipe

MLP = r".*\.mlp\..*_proj"


def _recipe(**stage) -> Recipe:
    return Recipe(name="unit-lowrank", stages=[{"method": "lowrank", **stage}])


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _correlated_inputs(n: int, features: int, seed: int = 0) -> torch.Tensor:
    """Tokens with a strongly non-isotropic covariance (a few dominant directions), like real activations."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g) * torch.logspace(0, -2, features)[None, :]
    return torch.randn(n, features, generator=g) @ mixing.T


def _output_error(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, x: torch.Tensor) -> float:
    return (x @ (weight - up @ down).T).pow(2).sum().item()


@pytest.mark.parametrize("aware", [False, True])
def test_full_rank_reconstructs_exactly(aware) -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    x = _correlated_inputs(256, 32)
    down, up = lowrank.factorise(w, 32, x.T @ x if aware else None, dampening=0.01)
    assert down.shape == (32, 32) and up.shape == (48, 32)
    assert (up @ down - w).abs().max().item() < 1e-4


def test_activation_aware_beats_plain_svd_on_calibration_inputs() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 48)
    x = _correlated_inputs(512, 48)
    h = 2 / len(x) * x.T @ x  # the engine's scaling; irrelevant to the whitening
    for rank in (4, 12, 24):
        plain = _output_error(w, *lowrank.factorise(w, rank), x)
        aware = _output_error(w, *lowrank.factorise(w, rank, h, dampening=1e-6), x)
        assert aware <= plain
        assert aware < 0.5 * plain  # and by a wide margin on anisotropic inputs


def test_activation_aware_error_is_the_dropped_singular_values() -> None:
    """Truncation-aware whitening: the output error is exactly the sum of the dropped s_i^2 of W L."""
    torch.manual_seed(1)
    w = torch.randn(40, 24, dtype=torch.float64)
    x = _correlated_inputs(300, 24, seed=1).double()
    h = x.T @ x
    s = torch.linalg.svdvals(w @ torch.linalg.cholesky(h))
    down, up = lowrank.factorise(w, 10, h, dampening=1e-12)
    assert _output_error(w, down, up, x) == pytest.approx(s[10:].pow(2).sum().item(), rel=1e-6)


def test_engine_replaces_mlp_layers_and_counts_parameters(tiny_llama, calibration_ids) -> None:
    before = sum(p.numel() for p in tiny_llama.parameters())
    report = compress_(tiny_llama, _recipe(rank_ratio=0.25, targets=[MLP]), calibration_ids, batch_size=4)
    for block in tiny_llama.model.layers:
        for part in ("gate_proj", "up_proj", "down_proj"):
            layer = getattr(block.mlp, part)
            assert isinstance(layer, storage.LowRankLinear) and layer.rank == 16  # 0.25 x min(64, 128)
        assert isinstance(block.self_attn.q_proj, nn.Linear)
    assert len(report.layers) == 9
    for rec in report.layers:
        assert rec.details["rank"] == 16
        assert rec.details["params_before"] == 64 * 128 and rec.details["params_after"] == 16 * (64 + 128)
        assert rec.shape in ((128, 64), (64, 128))
    after = sum(p.numel() for p in tiny_llama.parameters())
    assert before - after == 9 * (64 * 128 - 16 * 192)


def test_activation_aware_model_closer_to_dense_than_plain(make_tiny_llama, calibration_ids) -> None:
    dense = make_tiny_llama()
    ids = calibration_ids[:4]
    errors = {}
    for aware in (False, True):
        model = make_tiny_llama()
        compress_(model, _recipe(rank_ratio=0.25, targets=[MLP], activation_aware=aware), calibration_ids)
        errors[aware] = (_logits(model, ids) - _logits(dense, ids)).pow(2).mean().item()
    assert errors[True] < errors[False]


def test_save_compressed_round_trip_gives_identical_logits(tiny_llama, calibration_ids, tmp_path) -> None:
    compress_(tiny_llama, _recipe(rank_ratio=0.25, targets=[MLP]), calibration_ids, batch_size=4)
    tiny_llama.save_pretrained(tmp_path)
    storage.save_compressed(tiny_llama, tmp_path)
    loaded = storage.load_compressed(tmp_path)
    assert isinstance(loaded.model.layers[2].mlp.down_proj, storage.LowRankLinear)
    ids = calibration_ids[:2]
    assert torch.equal(_logits(loaded, ids), _logits(tiny_llama, ids))


def test_skips_layers_without_saving_and_plain_svd_needs_no_data(tiny_llama) -> None:
    block = tiny_llama.model.layers[0]
    original = copy.deepcopy(block)
    # rank 58 of a 128 x 64 layer: 58 * 192 = 11136 >= 8192 parameters, so it stays dense
    stage = LowRankStage(method="lowrank", rank_ratio=0.9, activation_aware=False, targets=[MLP])
    rows = lowrank.apply_block_(block, "model.layers.0", stage, None)
    assert len(rows) == 3 and all("skipped" in r for r in rows)
    assert all(r["params_after"] == r["params_before"] for r in rows)
    assert torch.equal(block.mlp.gate_proj.weight, original.mlp.gate_proj.weight)
    stage = LowRankStage(method="lowrank", rank_ratio=0.5, activation_aware=False, targets=[r".*\.o_proj"])
    rows = lowrank.apply_block_(block, "model.layers.0", stage, None)
    assert [r["rank"] for r in rows] == [32] and "skipped" in rows[0]  # 32 * 128 = 64 * 64: no saving either
    stage = LowRankStage(method="lowrank", rank_ratio=0.25, activation_aware=False, targets=[r".*\.o_proj"])
    (row,) = lowrank.apply_block_(block, "model.layers.0", stage, None)
    assert isinstance(block.self_attn.o_proj, storage.LowRankLinear) and row["rank"] == 16


def test_layers_factorised_on_the_block_inputs_they_see(tiny_llama, calibration_ids) -> None:
    """Whitening uses each layer's own inputs: down_proj (fed by act(gate) * up) gets a smaller output error on the
    calibration data than with plain SVD."""
    _, _, block, calib = next(iterate_blocks(tiny_llama, calibration_ids, torch.device("cpu"), 4))
    assert calib is not None
    x = calib.inputs(block, {"down": block.mlp.down_proj})["down"]
    w = block.mlp.down_proj.weight.detach().clone()
    errors = {}
    for aware in (False, True):
        trial = copy.deepcopy(block)
        stage = LowRankStage(method="lowrank", rank_ratio=0.25, activation_aware=aware, targets=[r".*down_proj"])
        lowrank.apply_block_(trial, "model.layers.0", stage, calib)
        layer = trial.mlp.down_proj
        errors[aware] = _output_error(w, layer.down.weight, layer.up.weight, x)
    assert errors[True] < errors[False]
