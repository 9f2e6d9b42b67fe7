"""AWQ and SmoothQuant (block methods): exactness of the float transforms, and quality against plain RTN / W8A8."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from llmpress.compress import awq, quant, smoothquant
from llmpress.compress.calibration import BlockCalibration, capture_block_inputs
from llmpress.compress.engine import compress_
from llmpress.compress.targets import find_decoder_blocks
from llmpress.config import AWQStage, Recipe, SmoothQuantStage

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUTLIERS = (3, 17, 40)  # input channels given large activations


def _mha_llama() -> LlamaForCausalLM:
    """Like conftest's tiny Llama but without GQA (4 query = 4 KV heads), so AWQ's v -> o group applies."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=256, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


def _plant_outliers(model: nn.Module, factor: float) -> None:
    """LLM-like channel outliers: a few channels of every norm's output (the input of q/k/v and gate/up) scaled
    up, and the up -> down path given a few large intermediate channels too."""
    with torch.no_grad():
        for block in find_decoder_blocks(model)[1]:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[list(OUTLIERS)] *= factor
            block.mlp.up_proj.weight[list(OUTLIERS)] *= factor


def _block0(model: nn.Module, ids: torch.Tensor) -> tuple[nn.Module, str, BlockCalibration]:
    name, blocks = find_decoder_blocks(model)
    hidden, kwargs = capture_block_inputs(model, blocks, list(ids.split(4)), torch.device("cpu"))
    return blocks[0], f"{name}.0", BlockCalibration(hidden, kwargs)


def _err(calib: BlockCalibration, block: nn.Module, reference: list[torch.Tensor]) -> float:
    outs = calib.outputs(block)
    return sum((o - r).pow(2).sum().item() for o, r in zip(outs, reference, strict=True))


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _outlier_ratio(block: nn.Module, calib: BlockCalibration) -> float:
    act = smoothquant.activation_scales(block, calib, {"q": block.self_attn.q_proj})["q"]
    return (act.max() / act.median()).item()


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")}


# --------------------------------------------------------------------------------------------------- SmoothQuant


def test_smoothing_preserves_float_output_and_flattens_outliers(tiny_llama, calibration_ids) -> None:
    _plant_outliers(tiny_llama, 30.0)
    block, prefix, calib = _block0(tiny_llama, calibration_ids)
    before = calib.outputs(block)
    ratio_before = _outlier_ratio(block, calib)
    smoothed = smoothquant.smooth_block_(block, prefix, SmoothQuantStage(method="smoothquant"), calib)
    assert sorted(n.rsplit(".", 1)[1] for n in smoothed) == ["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert _max_diff(calib.outputs(block), before) < 1e-5
    ratio_after = _outlier_ratio(block, calib)
    assert ratio_before > 20  # the planted outliers are there
    assert ratio_after < ratio_before / 4  # alpha 0.5: sqrt of the activation range moved to the weights


def test_w8a8_with_smoothing_beats_plain_w8a8(make_tiny_llama, calibration_ids) -> None:
    stage = SmoothQuantStage(method="smoothquant", alpha=0.5, weight_bits=8, activation_bits=8)
    errors = {}
    for smooth in (False, True):
        model = make_tiny_llama()
        _plant_outliers(model, 50.0)
        block, prefix, calib = _block0(model, calibration_ids)
        reference = calib.outputs(block)
        if smooth:
            smoothquant.apply_block_(block, prefix, stage, calib)
        else:  # plain W8A8: same weight and activation quantizers, no smoothing
            for layer in [m for m in block.modules() if isinstance(m, nn.Linear)]:
                quant.attach_(layer, quant.quantize_rtn(layer.weight.detach(), 8, None, True))
                quant.install_act_quant(layer, 8)
        errors[smooth] = _err(calib, block, reference)
    assert errors[True] < 0.5 * errors[False], errors


def test_smoothquant_rows_codes_and_hooks(tiny_llama, calibration_ids) -> None:
    stage = SmoothQuantStage(method="smoothquant", alpha=0.8, weight_bits=8, activation_bits=8,
                             targets=[".*_proj"], ignore=[".*o_proj"])  # fmt: skip
    block, prefix, calib = _block0(tiny_llama, calibration_ids)
    rows = smoothquant.apply_block_(block, prefix, stage, calib)
    by_name = {r["name"].rsplit(".", 1)[1]: r for r in rows}
    assert sorted(by_name) == sorted(p for p in PROJ if p != "o_proj")
    assert by_name["q_proj"]["smoothed"] and not by_name["down_proj"]["smoothed"]
    for row in rows:
        assert (row["bits"], row["activation_bits"], row["alpha"]) == (8, 8, 0.8)
        qw = quant.quantization_of(row["layer"])
        assert qw is not None and qw.group_size is None and qw.symmetric
        assert torch.equal(qw.dequantize(), row["layer"].weight)
        assert row["layer"].llmpress_act_bits == 8
    assert quant.quantization_of(block.self_attn.o_proj) is None
    assert getattr(block.self_attn.o_proj, "llmpress_act_bits", None) is None


def test_smoothquant_through_engine(tiny_llama, calibration_ids) -> None:
    recipe = Recipe(name="sq", stages=[{"method": "smoothquant", "targets": [".*_proj"]}])
    report = compress_(tiny_llama, recipe, calibration_ids, batch_size=4)
    assert len(report.layers) == 3 * len(PROJ)
    assert report.stages[0].summary["bits"] == [8]
    for name, layer in _linears(tiny_llama).items():
        assert torch.equal(quant.quantization_of(layer).dequantize(), layer.weight), name
    logits = tiny_llama(calibration_ids).logits
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------------- AWQ


@pytest.mark.parametrize("build", ["gqa", "mha"])
def test_awq_scaling_preserves_float_output(tiny_llama, calibration_ids, build) -> None:
    model = tiny_llama if build == "gqa" else _mha_llama()
    _plant_outliers(model, 10.0)
    block, prefix, calib = _block0(model, calibration_ids)
    before = calib.outputs(block)
    norm_before = block.input_layernorm.weight.clone()
    ratios = awq.scale_block_(block, prefix, AWQStage(method="awq", group_size=32), calib)
    # GQA (4 query / 2 KV heads): v.out_features != o.in_features, so o_proj gets no scale, as in the reference
    expected = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"} | (
        {"o_proj"} if build == "mha" else set()
    )
    assert {n.rsplit(".", 1)[1] for n in ratios} == expected
    assert all(0 <= r < 1 for r in ratios.values())
    assert any(r > 0 for r in ratios.values())  # salient channels were protected somewhere
    if ratios[f"{prefix}.self_attn.q_proj"] > 0:  # the scales were folded into the norm
        assert not torch.equal(block.input_layernorm.weight, norm_before)
    assert _max_diff(calib.outputs(block), before) < 1e-5


@pytest.mark.parametrize("clip", [False, True])
def test_awq_error_at_most_rtn_at_4_bits(make_tiny_llama, calibration_ids, clip) -> None:
    stage = AWQStage(method="awq", bits=4, group_size=32, clip=clip)
    errors = {}
    for method in ("rtn", "awq"):
        model = make_tiny_llama()
        _plant_outliers(model, 10.0)
        block, prefix, calib = _block0(model, calibration_ids)
        reference = calib.outputs(block)
        if method == "awq":
            awq.apply_block_(block, prefix, stage, calib)
        else:
            for layer in [m for m in block.modules() if isinstance(m, nn.Linear)]:
                quant.attach_(layer, quant.quantize_rtn(layer.weight.detach(), 4, 32, False))
        errors[method] = _err(calib, block, reference)
    assert errors["awq"] < 0.9 * errors["rtn"], errors


def test_awq_codes_reproduce_weights_and_rows(tiny_llama, calibration_ids) -> None:
    stage = AWQStage(method="awq", bits=4, group_size=48, targets=[".*_proj"])  # 64 inputs: a ragged last group
    block, prefix, calib = _block0(tiny_llama, calibration_ids)
    rows = awq.apply_block_(block, prefix, stage, calib)
    by_name = {r["name"].rsplit(".", 1)[1]: r for r in rows}
    assert sorted(by_name) == sorted(PROJ)
    for short, row in by_name.items():
        qw = quant.quantization_of(row["layer"])
        assert qw is not None and qw.bits == 4 and int(qw.codes.max()) <= 15
        assert qw.scale.shape[1] == -(-row["layer"].in_features // 48)
        assert torch.equal(qw.dequantize(), row["layer"].weight), short
        assert (row["bits"], row["group_size"], row["symmetric"]) == (4, 48, False)
        # q and k are never clipped (the q-k product), o_proj has no scale group under GQA
        assert (row["clip"] is None) == (short in ("q_proj", "k_proj"))
        assert row["clip"] is None or 0.5 < row["clip"] <= 1.0
        assert (row["scale_ratio"] is None) == (short == "o_proj")


def test_awq_group_needs_all_its_linears_targeted(tiny_llama, calibration_ids) -> None:
    stage = AWQStage(method="awq", bits=4, group_size=32, targets=[".*_proj"], ignore=[".*k_proj"])
    block, prefix, calib = _block0(tiny_llama, calibration_ids)
    norm_before = block.input_layernorm.weight.clone()
    rows = {r["name"].rsplit(".", 1)[1]: r for r in awq.apply_block_(block, prefix, stage, calib)}
    assert "k_proj" not in rows and quant.quantization_of(block.self_attn.k_proj) is None
    assert rows["q_proj"]["scale_ratio"] is None and rows["v_proj"]["scale_ratio"] is None
    assert torch.equal(block.input_layernorm.weight, norm_before)  # the q/k/v group was left alone
    assert rows["gate_proj"]["scale_ratio"] is not None


def test_awq_through_engine_is_deterministic(make_tiny_llama, calibration_ids) -> None:
    recipe = Recipe(name="awq", stages=[{"method": "awq", "bits": 4, "group_size": 32, "targets": [".*_proj"]}])
    models = [make_tiny_llama(), make_tiny_llama()]
    reports = [compress_(m, recipe, calibration_ids, batch_size=4) for m in models]
    assert len(reports[0].layers) == 3 * len(PROJ)
    assert reports[0].stages[0].summary["bits"] == [4]
    assert [r.details for r in reports[0].layers] == [r.details for r in reports[1].layers]
    for (name, a), b in zip(_linears(models[0]).items(), _linears(models[1]).values(), strict=True):
        assert torch.equal(a.weight, b.weight), name
        assert torch.equal(quant.quantization_of(a).codes, quant.quantization_of(b).codes), name
    # every norm the scales were folded into stays finite, and the model still runs
    assert torch.isfinite(models[0](calibration_ids).logits).all()
