from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llmpress.compress import structured
from llmpress.compress.calibration import BlockCalibration, block_output
from llmpress.compress.drop_blocks import block_influence
from llmpress.compress.engine import compress_
from llmpress.compress.offload import iterate_blocks
from llmpress.config import Recipe, StructuredStage
from llmpress.errors import LlmpressError

HEAD_DIM = 16  # tiny_llama: hidden 64 / 4 heads


def _recipe(**stage) -> Recipe:
    return Recipe(name="unit-structured", stages=[{"method": "structured", **stage}])


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _six_head_llama() -> LlamaForCausalLM:
    """SmolLM2's layout in miniature: 3 query heads per KV group (6 heads / 2 KV heads)."""
    config = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


def _first_block(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.nn.Module, BlockCalibration]:
    _, _, block, calib = next(iterate_blocks(model, ids, torch.device("cpu"), 4))
    assert calib is not None
    return block, calib


def _row_indices(pruned: torch.Tensor, original: torch.Tensor) -> list[int]:
    """Which rows of `original` the rows of `pruned` are (exact copies)."""
    same = (pruned[:, None, :] == original[None, :, :]).all(dim=-1)
    assert (same.sum(dim=1) == 1).all()
    return same.float().argmax(dim=1).tolist()


def test_shapes_shrink_config_and_rows(tiny_llama, calibration_ids) -> None:
    before = sum(p.numel() for p in tiny_llama.parameters())
    report = compress_(tiny_llama, _recipe(heads=0.5, mlp=0.25), calibration_ids, batch_size=4)
    for block in tiny_llama.model.layers:
        attn, mlp = block.self_attn, block.mlp
        assert attn.q_proj.weight.shape == (2 * HEAD_DIM, 64)  # 1 of 2 query heads per KV group removed
        assert attn.o_proj.weight.shape == (64, 2 * HEAD_DIM)
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (2 * HEAD_DIM, 64)  # KV heads kept
        assert attn.num_key_value_groups == 1
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (96, 64)  # 32 of 128 channels removed
        assert mlp.down_proj.weight.shape == (64, 96)
    config = tiny_llama.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 2, HEAD_DIM)
    assert config.intermediate_size == 96
    removed = sum(rec.details["params_removed"] for rec in report.layers)
    assert removed == before - sum(p.numel() for p in tiny_llama.parameters())
    assert removed == 3 * (2 * 32 * 64 + 3 * 32 * 64)  # per block: q rows + o cols, gate/up rows + down cols
    mlp_rows = [r for r in report.layers if r.name.endswith("mlp.down_proj")]
    assert [r.details["removed_channels"] for r in mlp_rows] == [32, 32, 32]
    assert mlp_rows[0].shape == (64, 96)
    heads_rows = [r for r in report.layers if r.name.endswith("q_proj")]
    assert all(len(r.details["removed_heads"]) == 2 for r in heads_rows)
    assert all(len({h // 2 for h in r.details["removed_heads"]}) == 2 for r in heads_rows)  # one per KV group


@pytest.mark.parametrize("update", ["none", "least_squares"])
def test_saved_model_loads_with_stock_transformers(tmp_path, calibration_ids, update) -> None:
    model = _six_head_llama()
    compress_(model, _recipe(heads=0.34, mlp=0.2, update=update), calibration_ids, batch_size=4)
    assert model.model.layers[0].self_attn.q_proj.out_features == 4 * 16  # 6 heads -> 4, 3 per group -> 2
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_attention_heads == 4 and loaded.config.intermediate_size == 77
    ids = calibration_ids[:2]
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    out = loaded.generate(ids[:, :8], max_new_tokens=4, do_sample=False)  # KV cache with pruned heads
    assert out.shape == (2, 12)


def test_pruned_model_equals_masked_model(calibration_ids) -> None:
    """With no update, removing heads/channels is exactly zeroing them (o_proj columns, gate/up rows)."""
    model = _six_head_llama()
    masked = copy.deepcopy(model)
    report = compress_(model, _recipe(heads=0.34, mlp=0.2, update="none"), calibration_ids, batch_size=4)
    heads = {r.name: r.details["removed_heads"] for r in report.layers if r.name.endswith("o_proj")}
    assert len(heads) == 2
    with torch.no_grad():
        for i, (block, ref) in enumerate(zip(model.model.layers, masked.model.layers, strict=True)):
            for h in heads[f"model.layers.{i}.self_attn.o_proj"]:
                ref.self_attn.o_proj.weight[:, h * 16 : (h + 1) * 16] = 0
            kept = _row_indices(block.mlp.gate_proj.weight, ref.mlp.gate_proj.weight)
            assert kept == _row_indices(block.mlp.up_proj.weight, ref.mlp.up_proj.weight)
            dropped = sorted(set(range(96)) - set(kept))
            assert len(dropped) == 19  # round(0.2 * 96)
            ref.mlp.gate_proj.weight[dropped] = 0
            ref.mlp.up_proj.weight[dropped] = 0
    ids = calibration_ids[:4]
    assert (_logits(model, ids) - _logits(masked, ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize("part", [{"mlp": 0.25}, {"heads": 0.5}])
def test_least_squares_lowers_block_output_error(tiny_llama, calibration_ids, part) -> None:
    block, calib = _first_block(tiny_llama, calibration_ids)
    reference = torch.cat(calib.outputs(block))
    errors = {}
    for update in ("none", "least_squares"):
        pruned = copy.deepcopy(block)
        structured.apply_block_(pruned, "model.layers.0", StructuredStage(method="structured", update=update, **part),
                                calib)  # fmt: skip
        errors[update] = (torch.cat(calib.outputs(pruned)) - reference).pow(2).sum().item()
    assert errors["least_squares"] < 0.9 * errors["none"]


def test_activation_importance_keeps_the_high_energy_channels(tiny_llama, calibration_ids) -> None:
    """Amplifying channels' down_proj columns makes them the most important: none of them is removed."""
    block, calib = _first_block(tiny_llama, calibration_ids)
    strong = list(range(0, 128, 4))
    with torch.no_grad():
        block.mlp.down_proj.weight[:, strong] *= 20
    original_gate = block.mlp.gate_proj.weight.clone()
    stage = StructuredStage(method="structured", mlp=0.75, update="none")
    structured.apply_block_(block, "model.layers.0", stage, calib)
    assert sorted(_row_indices(block.mlp.gate_proj.weight, original_gate)) == strong


def test_magnitude_without_data_and_refusals(tiny_llama) -> None:
    block = tiny_llama.model.layers[0]
    rows = structured.apply_block_(block, "model.layers.0", StructuredStage(method="structured", mlp=0.5,
                                   importance="magnitude", update="none"), None)  # fmt: skip
    assert block.mlp.down_proj.in_features == 64 and len(rows) == 3
    with pytest.raises(LlmpressError, match="needs data"):
        structured.apply_block_(block, "model.layers.0", StructuredStage(method="structured", mlp=0.2), None)
    with pytest.raises(LlmpressError, match="query heads in each KV group"):  # 0.2 x 2 rounds to 0 heads
        structured.apply_block_(block, "model.layers.0", StructuredStage(method="structured", heads=0.2,
                                importance="magnitude", update="none"), None)  # fmt: skip


def test_hidden_states_of_unpruned_path_unchanged(tiny_llama, calibration_ids) -> None:
    """Embeddings, norms and the head are untouched; a pruned block's output is still [batch, seq, hidden]."""
    original = copy.deepcopy(tiny_llama)
    compress_(tiny_llama, _recipe(mlp=0.5), calibration_ids, batch_size=4)
    assert torch.equal(tiny_llama.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert torch.equal(tiny_llama.lm_head.weight, original.lm_head.weight)
    block, calib = _first_block(tiny_llama, calibration_ids)
    out = block_output(block(calib.hidden[0], **calib.kwargs[0]))
    assert out.shape == calib.hidden[0].shape


# ---- drop_blocks (ShortGPT block influence) ----


def _drop_recipe(blocks: int) -> Recipe:
    return Recipe(name="unit-drop", stages=[{"method": "drop_blocks", "blocks": blocks}])


def _plant_identity_block(model: torch.nn.Module, index: int) -> None:
    """Zero the block's two residual writers: its output equals its input (block influence 0)."""
    with torch.no_grad():
        model.model.layers[index].self_attn.o_proj.weight.zero_()
        model.model.layers[index].mlp.down_proj.weight.zero_()


def test_identity_block_has_zero_influence(tiny_llama, calibration_ids) -> None:
    _plant_identity_block(tiny_llama, 1)
    influence = block_influence(tiny_llama, calibration_ids, torch.device("cpu"), 4)
    assert len(influence) == 3
    assert abs(influence[1]) < 1e-6
    assert min(influence[0], influence[2]) > 1e-4


@pytest.mark.parametrize("planted", [0, 1, 2])
def test_removes_the_least_influential_block(tiny_llama, calibration_ids, planted) -> None:
    _plant_identity_block(tiny_llama, planted)
    original = copy.deepcopy(tiny_llama)
    kept = [b for i, b in enumerate(tiny_llama.model.layers) if i != planted]
    report = compress_(tiny_llama, _drop_recipe(1), calibration_ids, batch_size=4)
    assert list(tiny_llama.model.layers) == kept  # the same block objects, in order, minus the planted one
    assert tiny_llama.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in tiny_llama.model.layers] == [0, 1]
    removed = [r.name for r in report.layers if r.details["removed"]]
    assert removed == [f"model.layers.{planted}"]
    assert len(report.layers) == 3 and all("block_influence" in r.details for r in report.layers)
    # the removed block was the identity: the model computes exactly what it did
    ids = calibration_ids[:2]
    assert (_logits(tiny_llama, ids) - _logits(original, ids)).abs().max().item() < 1e-5


def test_saved_model_loads_and_generates_with_kv_cache(tiny_llama, calibration_ids, tmp_path) -> None:
    compress_(tiny_llama, _drop_recipe(2), calibration_ids, batch_size=4)
    assert len(tiny_llama.model.layers) == 1
    tiny_llama.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 1
    ids = calibration_ids[:2]
    assert torch.equal(_logits(loaded, ids), _logits(tiny_llama, ids))
    prompt = ids[:, :6]
    cached = tiny_llama.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = tiny_llama.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, uncached)


def test_refuses_to_remove_every_block(tiny_llama, calibration_ids) -> None:
    with pytest.raises(LlmpressError, match="would remove all 3"):
        compress_(tiny_llama, _drop_recipe(3), calibration_ids)
