"""Block anatomy as data keyed by model type (llmpress/compress/anatomy.py), on tiny models of several families:
the right parts are found, and scales folded into a norm (SmoothQuant, AWQ) leave the float function unchanged -
including Gemma's norms, which multiply by 1 + weight."""

from __future__ import annotations

import pytest
import torch
import transformers

from llmpress.compress import awq, smoothquant
from llmpress.compress.anatomy import ARCHITECTURES, anatomy, model_type
from llmpress.compress.targets import find_decoder_blocks
from llmpress.errors import LlmpressError

SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64}  # fmt: skip
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": 8}),
}


def tiny(family: str) -> torch.nn.Module:
    config_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**SHAPE, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for module in model.modules():  # norms away from their init (all ones / zeros), so a wrong fold shows
        if "Norm" in type(module).__name__ and hasattr(module, "weight"):
            module.weight.data.uniform_(-0.5, 0.5)
    return model


def _block_output(block: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    position_ids = torch.arange(x.shape[1]).unsqueeze(0)
    embeddings = model.model.rotary_emb(x, position_ids)
    out = block(x, position_embeddings=embeddings, position_ids=position_ids)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_parts_are_found_by_model_type(family: str) -> None:
    model = tiny(family)
    block = find_decoder_blocks(model)[1][0]
    assert model_type(block) == family
    a = anatomy(block)
    assert a.architecture is ARCHITECTURES[family]
    expected_mlp_norm = "pre_feedforward_layernorm" if family == "gemma2" else "post_attention_layernorm"
    assert a.mlp_norm is block.get_submodule(expected_mlp_norm)
    assert (a.n_heads, a.n_kv_heads) == (4, 2)
    assert a.names("model.layers.0")["gate"] == "model.layers.0.mlp.gate_proj"


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_and_awq_scales_leave_the_block_function_unchanged(family: str) -> None:
    model = tiny(family)
    block = find_decoder_blocks(model)[1][0]
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        before = _block_output(block, model, x)
        pairs, offset = smoothquant.smooth_groups(block, "model.layers.0")
        for norm, fcs in pairs:
            smoothquant.smooth_ln_fcs_(norm, list(fcs.values()), torch.rand(32) * 4 + 0.1, 0.5, offset)
        for group in awq.scale_groups(block, "model.layers.0"):
            n = next(iter(group.linears.values())).in_features
            awq.apply_scale_(group, torch.rand(n) + 0.5)
        after = _block_output(block, model, x)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4), (before - after).abs().max()


def test_a_block_without_the_parts_is_refused_by_name() -> None:
    config = transformers.Phi3Config(**SHAPE, pad_token_id=0)  # fused qkv_proj and gate_up_proj
    block = find_decoder_blocks(transformers.AutoModelForCausalLM.from_config(config))[1][0]
    with pytest.raises(LlmpressError, match=r"model type 'phi3'.*ARCHITECTURES"):
        anatomy(block)


STAGES = {
    "structured": {"method": "structured", "heads": 0.5, "mlp": 0.25},
    "awq": {"method": "awq", "bits": 4, "group_size": 16},
    "smoothquant": {"method": "smoothquant", "alpha": 0.5, "weight_bits": 8, "activation_bits": 8},
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", STAGES)
def test_every_block_method_runs_on_every_family(family: str, method: str) -> None:
    from llmpress.compress.engine import compress_
    from llmpress.config import Recipe

    model = tiny(family)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    report = compress_(model, Recipe(name=method, stages=[STAGES[method]]), ids, progress=lambda _: None)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == reference.shape and torch.isfinite(logits).all()
    assert report.layers and not torch.equal(logits, reference)  # it did something
    if method == "structured":
        assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 48
