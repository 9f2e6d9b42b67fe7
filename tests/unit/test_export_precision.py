"""A recipe that only prunes can ship quantized: `export.precision` appends llmpress's own quantizer (RTN, or GPTQ on
the calibration data) after the recipe, pruned zeros stay exactly zero, and the graph holds the codes."""

from __future__ import annotations

import onnx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmpress.compress import compress_
from llmpress.config import ConfigError, Recipe, export_recipe, load_params
from llmpress.export.onnx import check_parity, export_onnx
from llmpress.export.packed import precision_counts, precision_label

WANDA = Recipe(name="wanda-50", stages=[{"method": "wanda", "sparsity": 0.5, "targets": [".*_proj"]}])


def test_the_precision_appends_a_quantizer_after_the_recipe() -> None:
    assert export_recipe(WANDA, "recipe") is WANDA and export_recipe(WANDA, "fp32") is WANDA
    int8 = export_recipe(WANDA, "int8").stages[-1]
    assert (int8.method, int8.bits, int8.group_size, int8.symmetric, int8.offset) == ("rtn", 8, None, False,
                                                                                       "zero-point")  # fmt: skip
    int4 = export_recipe(WANDA, "int4", "gptq")
    assert [s.method for s in int4.stages] == ["wanda", "gptq"] and int4.stages[1].group_size == 32
    full = export_recipe(WANDA, "int4-full")
    assert [s.method for s in full.stages] == ["wanda", "rtn", "embeddings"] and full.stages[2].bits == 4
    assert full.stages[0] == WANDA.stages[0] and full.name == WANDA.name


def test_a_recipe_that_quantizes_keeps_its_own_precision() -> None:
    gptq = Recipe(name="gptq", stages=[{"method": "gptq", "bits": 4, "group_size": None}])
    assert export_recipe(gptq, "recipe") is gptq
    for precision in ("fp32", "int8", "int4", "int4-full"):
        with pytest.raises(ConfigError, match=r"export\.precision: .* recipe 'gptq' quantizes \(stage 0 \(gptq\)\)"):
            export_recipe(gptq, precision)
    # a null group (per channel) survives the round trip through the recipe's data
    assert export_recipe(WANDA.model_copy(update={"stages": gptq.stages}), "recipe").stages[0].group_size is None


def test_bad_precision_values_name_the_field_and_the_choices(tmp_path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("export:\n  precision: int3\n")
    with pytest.raises(ConfigError, match=r"export\.precision: .*'recipe', 'fp32', 'int8', 'int4' or 'int4-full'"):
        load_params(params)
    params.write_text("export:\n  quantizer: awq\n")
    with pytest.raises(ConfigError, match=r"export\.quantizer: .*'rtn' or 'gptq'"):
        load_params(params)


@pytest.mark.parametrize(("precision", "quantizer", "bits", "label"),
                         [("int4", "gptq", 4, "int4"), ("int8", "rtn", 8, "int8"),
                          ("int4-full", "rtn", 4, "int4-emb4")])  # fmt: skip
def test_a_pruned_model_ships_quantized_with_its_zeros(precision, quantizer, bits, label, tmp_path) -> None:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    compress_(model, export_recipe(WANDA, precision, quantizer), ids, batch_size=4)
    for name, layer in model.named_modules():
        if name.endswith("_proj"):
            # Half the weights pruned, and after quantization still exactly zero: an asymmetric grid holds 0 exactly
            # (a quantizer that moved them would leave almost no exact zeros); the rest on at most 2^bits levels.
            weight = layer.weight.detach()
            assert 0.5 <= (weight == 0).float().mean().item() < 0.5 + 2**-bits + 0.02, name
            groups = weight.reshape(weight.shape[0], -1, 32 if bits == 4 else weight.shape[1])
            assert max(len(torch.unique(g)) for g in groups.reshape(-1, groups.shape[-1])) <= 2**bits
    graph_path = export_onnx(model, tmp_path / "onnx")
    counts = precision_counts(onnx.load(str(graph_path), load_external_data=False))
    head = precision == "int4-full"  # the embeddings stage quantizes the head too
    assert counts[f"matmul_{bits}bit"] == 2 * 7 + head and precision_label(counts) == label
    parity = check_parity(model, graph_path, ids[:2, :12], decode_steps=8)
    assert parity.max_abs_diff < 1e-4 and parity.greedy_identical
