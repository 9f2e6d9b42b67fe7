"""Layers that read the same input (q/k/v, gate/up) share one set of statistics and are processed as one stacked
matrix by SparseGPT and GPTQ: the result must be exactly what processing each layer alone gives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmpress.compress import engine, gptq, sparsegpt
from llmpress.compress.calibration import BlockCalibration, LayerStats, capture_block_inputs
from llmpress.compress.engine import compress_
from llmpress.compress.targets import targeted_linears
from llmpress.config import GPTQStage, Recipe, SparseGPTStage

COLS, TOKENS = 64, 400


def _stats(seed: int = 0) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(TOKENS, COLS, generator=g) @ (torch.eye(COLS) + torch.randn(COLS, COLS, generator=g) / 8)
    return LayerStats(tokens=TOKENS, input_sq_norms=(X * X).sum(0), hessian=2.0 / TOKENS * X.T @ X)


def _layers(rows: list[int], seed: int = 1) -> dict[str, nn.Linear]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, n in enumerate(rows):
        layer = nn.Linear(COLS, n, bias=False)
        layer.weight.data.copy_(torch.randn(n, COLS, generator=g))
        out[f"layer{i}"] = layer
    return out


@pytest.mark.parametrize(
    "stage",
    [
        SparseGPTStage(method="sparsegpt", sparsity=0.5, block_size=16),
        SparseGPTStage(method="sparsegpt", sparsity=0.37, block_size=32, mask_block=8),
        SparseGPTStage(method="sparsegpt", pattern="2:4", block_size=16),
        SparseGPTStage(method="sparsegpt", sparsity=0.5, block_size=16, importance="wanda"),
    ],
    ids=["unstructured", "mask-block", "2of4", "wanda-importance"],
)
def test_sparsegpt_stacked_layers_equal_layers_pruned_alone(stage) -> None:
    stats = _stats()
    together, alone = _layers([24, 8, 8]), _layers([24, 8, 8])
    details = sparsegpt.apply_shared_(together, stage, stats)
    for name, layer in alone.items():
        single = sparsegpt.apply_(layer, stage, stats)
        assert torch.equal(layer.weight == 0, together[name].weight == 0), name
        torch.testing.assert_close(together[name].weight, layer.weight, atol=1e-5, rtol=1e-5)
        assert details[name]["error"] == pytest.approx(single["error"], rel=1e-4)
    # each layer reaches its own target (the whole-block comparison stays inside each layer)
    if stage.sparsity is not None:
        for layer in together.values():
            assert (layer.weight == 0).float().mean().item() == pytest.approx(
                stage.sparsity, abs=1 / layer.weight.numel()
            )


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_stacked_layers_equal_layers_quantized_alone(act_order) -> None:
    stats = _stats(seed=2)
    stage = GPTQStage(method="gptq", bits=4, group_size=16, act_order=act_order, block_size=32)
    together, alone = _layers([24, 8, 8], seed=3), _layers([24, 8, 8], seed=3)
    # one layer pruned beforehand: its zeros are kept, the others are not masked
    for layers in (together, alone):
        layers["layer1"].weight.data[:, ::2] = 0
    gptq.apply_shared_(together, stage, stats)
    for name, layer in alone.items():
        gptq.apply_(layer, stage, stats)
        assert torch.equal(layer.llmpress_quant.codes, together[name].llmpress_quant.codes), name
        assert torch.equal(layer.llmpress_quant.scale, together[name].llmpress_quant.scale), name
        assert torch.equal(layer.weight, together[name].weight), name
    assert (together["layer1"].weight[:, ::2] == 0).all()


def test_layer_stats_computed_once_for_layers_reading_one_tensor(tiny_llama) -> None:
    model = tiny_llama
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    blocks = model.model.layers
    hidden, kwargs = capture_block_inputs(model, blocks, list(ids.split(2)), torch.device("cpu"))
    calib = BlockCalibration(hidden, kwargs)
    stage = SparseGPTStage(method="sparsegpt", sparsity=0.5)
    layers = targeted_linears(blocks[0], "model.layers.0", stage)
    stats = calib.layer_stats(blocks[0], layers, "hessian")
    p = "model.layers.0."
    assert stats[p + "self_attn.q_proj"] is stats[p + "self_attn.k_proj"] is stats[p + "self_attn.v_proj"]
    assert stats[p + "mlp.gate_proj"] is stats[p + "mlp.up_proj"]
    assert stats[p + "self_attn.o_proj"] is not stats[p + "self_attn.q_proj"]
    assert stats[p + "mlp.down_proj"].hessian.shape == (128, 128)
    # the shared Hessian is the one computed from that layer's own inputs
    x = calib.inputs(blocks[0], {"k": layers[p + "self_attn.k_proj"]})["k"].float()
    torch.testing.assert_close(stats[p + "self_attn.k_proj"].hessian, 2.0 / x.shape[0] * x.T @ x)
    assert stats[p + "self_attn.k_proj"].tokens == ids.numel()


def test_engine_result_independent_of_stacking(make_tiny_llama, calibration_ids, monkeypatch) -> None:
    """The whole engine with SparseGPT then GPTQ gives the same model whether layers are stacked or not."""
    recipe = Recipe(name="t", stages=[
        {"method": "sparsegpt", "sparsity": 0.5, "block_size": 16},
        {"method": "gptq", "bits": 4, "group_size": 16, "block_size": 16},
    ])  # fmt: skip
    stacked = make_tiny_llama()
    compress_(stacked, recipe, calibration_ids, batch_size=4)
    alone = make_tiny_llama()
    monkeypatch.setattr(engine, "_shared_groups", lambda layers, *_: [[name] for name in layers])
    compress_(alone, recipe, calibration_ids, batch_size=4)
    for (name, a), b in zip(stacked.named_parameters(), alone.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_statistics_pass_skips_the_block_after_the_last_needed_input(tiny_llama) -> None:
    """After the first batch, the forward stops once every hooked layer has its input (down_proj's matmul and
    the rest of the block are not run), and the statistics are those of the full forward."""
    model = tiny_llama
    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    blocks = model.model.layers
    hidden, kwargs = capture_block_inputs(model, blocks, list(ids.split(2)), torch.device("cpu"))
    calib = BlockCalibration(hidden, kwargs)
    layers = targeted_linears(blocks[0], "model.layers.0", SparseGPTStage(method="sparsegpt", sparsity=0.5))
    runs = []
    handle = blocks[0].mlp.down_proj.register_forward_hook(lambda *_: runs.append(1))
    stats = calib.layer_stats(blocks[0], layers, "input_sq_norms")
    handle.remove()
    assert len(runs) == 1  # 3 batches, down_proj computed in the first only
    x = torch.cat([block_input.reshape(-1, 64) for block_input in hidden])
    normed = blocks[0].input_layernorm(x)
    torch.testing.assert_close(stats["model.layers.0.self_attn.q_proj"].input_sq_norms, (normed * normed).sum(0))
    down_in = calib.inputs(blocks[0], {"d": blocks[0].mlp.down_proj})["d"]
    torch.testing.assert_close(stats["model.layers.0.mlp.down_proj"].input_sq_norms, (down_in * down_in).sum(0))
    assert stats["model.layers.0.mlp.down_proj"].tokens == ids.numel()
