"""Block anatomy as data keyed by model type (llmpress/compress/anatomy.py), on tiny models of several families:
the right parts are found, and scales folded into a norm (SmoothQuant, AWQ) leave the float function unchanged -
including Gemma's norms, which multiply by 1 + weight."""

from __future__ import annotations

import inspect

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
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 8}),
    "olmo": ("OlmoConfig", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),  # norms without weights
    "phi3": ("Phi3Config", {"pad_token_id": 0}),  # fused qkv_proj and gate_up_proj
    # mixtures of experts: 4 experts, 2 per token; Qwen3-MoE's block 1 has a dense MLP (mlp_only_layers)
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "head_dim": 8, "mlp_only_layers": [1]}),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "pad_token_id": 0, "bos_token_id": 1,
                              "eos_token_id": 2}),
}  # fmt: skip
MOE = {family for family in FAMILIES if ARCHITECTURES[family].experts is not None}


def tiny(family: str, fused: bool = False) -> torch.nn.Module:
    """A randomly initialised model of the family; a mixture of experts with its experts as linears (as llmpress
    loads it) unless `fused` (as transformers builds it)."""
    config_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**SHAPE, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for name, module in model.named_modules():
        if "Norm" in type(module).__name__ and hasattr(module, "weight"):  # away from their init, so a wrong fold shows
            module.weight.data.uniform_(-0.5, 0.5)
        if name.endswith("mlp.gate") and hasattr(module, "weight"):  # routers: varied routing (some init to zeros)
            module.weight.data.normal_(0, 0.5)
    return model if fused else _unfused(model)


def _unfused(model: torch.nn.Module) -> torch.nn.Module:
    from llmpress.compress.experts import unfuse_experts_

    unfuse_experts_(model)
    return model


def _block_output(block: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    position_ids = torch.arange(x.shape[1]).unsqueeze(0)
    rotary = model.model.rotary_emb  # Gemma 3 keeps one rotary table per layer type (sliding, full)
    by_type = "layer_type" in inspect.signature(rotary.forward).parameters
    layer_type = model.config.layer_types[block.self_attn.layer_idx] if by_type else None
    embeddings = rotary(x, position_ids, layer_type) if by_type else rotary(x, position_ids)
    out = block(x, position_embeddings=embeddings, position_ids=position_ids)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_parts_are_found_by_model_type(family: str) -> None:
    model = tiny(family)
    block = find_decoder_blocks(model)[1][0]
    assert model_type(block) == family
    a = anatomy(block)
    assert a.architecture is ARCHITECTURES[family]
    expected_mlp_norm = (
        "pre_feedforward_layernorm" if family.startswith(("gemma2", "gemma3")) else "post_attention_layernorm"
    )
    assert a.mlp_norm is block.get_submodule(expected_mlp_norm)
    assert (a.n_heads, a.n_kv_heads) == (4, 2) and a.v_rows == 2 * a.head_dim
    if family in MOE:  # the experts' linears and the router instead of one MLP
        assert "gate" not in a.names("model.layers.0") and a.router is block.get_submodule("mlp.gate")
        experts = a.expert_names("model.layers.0")
        assert len(experts) == 4 and experts[3]["down"][0] == "model.layers.0.mlp.experts.3.down_proj"
        assert experts[3]["down"][1] is block.mlp.experts.get_submodule("3.down_proj")
        return
    gate = "mlp.gate_up_proj" if family == "phi3" else "mlp.gate_proj"
    assert a.names("model.layers.0")["gate"] == f"model.layers.0.{gate}"


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_and_awq_scales_leave_the_block_function_unchanged(family: str) -> None:
    model = tiny(family)
    block = find_decoder_blocks(model)[1][0]
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        before = _block_output(block, model, x)
        groups, offset = smoothquant.smooth_groups(block, "model.layers.0")
        for norm, fcs, readers in groups if ARCHITECTURES[family].norm_weights else []:
            smoothquant.smooth_ln_fcs_(norm, list(fcs.values()), torch.rand(32) * 4 + 0.1, 0.5, offset, readers)
        for group in awq.scale_groups(block, "model.layers.0"):
            n = next(iter(group.linears.values())).in_features
            awq.apply_scale_(group, torch.rand(n) + 0.5)
        after = _block_output(block, model, x)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4), (before - after).abs().max()


def test_a_block_without_the_parts_is_refused_by_name(monkeypatch) -> None:
    """A row naming a module the block does not have (here Llama's separate q_proj for Phi-3's fused layout)."""
    from llmpress.compress import anatomy as anatomy_module

    monkeypatch.setitem(anatomy_module.ARCHITECTURES, "phi3", anatomy_module.LLAMA)
    block = find_decoder_blocks(tiny("phi3"))[1][0]
    with pytest.raises(LlmpressError, match=r"model type 'phi3'\) has no 'self_attn.q_proj'.*ARCHITECTURES"):
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
    recipe = Recipe(name=method, stages=[STAGES[method]])
    if method == "structured" and ARCHITECTURES[family].fused:
        with pytest.raises(LlmpressError, match=r"structured removes heads.*'phi3' fuses them"):
            compress_(model, recipe, ids, progress=lambda _: None)
        return
    if method == "structured" and family in MOE:
        with pytest.raises(LlmpressError, match=rf"structured removes heads.*'{family}' is a mixture of experts"):
            compress_(model, recipe, ids, progress=lambda _: None)
        return
    if method == "smoothquant" and not ARCHITECTURES[family].norm_weights:
        with pytest.raises(LlmpressError, match="no weight to absorb"):
            compress_(model, recipe, ids, progress=lambda _: None)
        return
    report = compress_(model, recipe, ids, progress=lambda _: None)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == reference.shape and torch.isfinite(logits).all()
    assert report.layers and not torch.equal(logits, reference)  # it did something
    if method == "structured":
        assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 48


def test_a_family_without_a_row_is_refused_before_any_work() -> None:
    """StableLM shares Llama's module names, but may run attention and MLP in parallel on one norm's output:
    names alone do not say how a block is wired, so a type not described is refused, by name, at check time -
    for every method, in one line naming the supported families."""
    from llmpress.compress.engine import check_recipe
    from llmpress.config import Recipe

    config = transformers.StableLmConfig(**SHAPE)
    model = transformers.AutoModelForCausalLM.from_config(config)
    for stage in [*STAGES.values(), {"method": "rtn", "bits": 4, "group_size": 16}]:
        recipe = Recipe(name="r", stages=[stage])
        with pytest.raises(LlmpressError, match=r"^model type 'stablelm' is not supported; supported families: "
                                                r".*llama.*phi3"):  # fmt: skip
            check_recipe(model, recipe)


def test_a_mixture_of_experts_family_without_a_row_is_refused_instead_of_compressed_in_part() -> None:
    """A mixture of experts llmpress does not describe (here Qwen2-MoE, with its shared expert) would have experts
    and routers no method knows: refused before any work, naming the mixture-of-experts families it does know."""
    from llmpress.compress.engine import check_recipe
    from llmpress.config import Recipe

    config = transformers.Qwen2MoeConfig(**SHAPE, num_experts=4, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    recipe = Recipe(name="r", stages=[{"method": "gptq", "bits": 4, "group_size": 16}])
    with pytest.raises(LlmpressError, match=r"'qwen2_moe' is a mixture of experts \(num_experts=4\) llmpress does "
                                            r"not describe.*families: mixtral, olmoe, qwen3_moe;"):  # fmt: skip
        check_recipe(model, recipe)


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_a_wrong_row_is_caught_by_the_block_output_before_quantizing(method: str, monkeypatch) -> None:
    """The run-time guard: a row that names real modules but the wrong wiring (here the two norms swapped, as a
    family with another norm order would be read) changes the block's float output when scales are folded, and
    the method stops with an error naming the block instead of writing a corrupted model."""
    from llmpress.compress import anatomy as anatomy_module
    from llmpress.compress.anatomy import Architecture
    from llmpress.compress.engine import compress_
    from llmpress.config import Recipe

    swapped = Architecture(attn_norm="post_attention_layernorm", mlp_norm="input_layernorm")
    monkeypatch.setitem(anatomy_module.ARCHITECTURES, "llama", swapped)
    model = tiny("llama")
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(LlmpressError, match=rf"{method}: folding its scales changed the float output of "
                                            r"model\.layers\.0 by .*not wired as"):  # fmt: skip
        compress_(model, Recipe(name=method, stages=[STAGES[method]]), ids, progress=lambda _: None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_guard_lets_correct_folds_through_in_half_precision(dtype: torch.dtype) -> None:
    """Folding rounds the rescaled weights in 16 bits: the guard's tolerance must not refuse a correct fold. (In
    fp16 this also checks that W8A8's per-token activation steps stay finite on all-zero tokens.)"""
    from llmpress.compress.engine import compress_
    from llmpress.config import Recipe

    for family in ("llama", "gemma2"):
        for method in ("awq", "smoothquant"):
            model = tiny(family).to(dtype)
            ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
            report = compress_(model, Recipe(name=method, stages=[STAGES[method]]), ids, progress=lambda _: None)
            assert len(report.layers) == 2 * 7
            with torch.no_grad():
                assert torch.isfinite(model(ids).logits).all()


def test_olmo_awq_scales_only_what_can_absorb_them() -> None:
    """OLMo's LayerNorm has no weight: AWQ folds only into the previous linear (up -> down; v -> o without GQA),
    and the rows say which layers were scaled."""
    from llmpress.compress.engine import compress_
    from llmpress.config import Recipe

    model = tiny("olmo")
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    report = compress_(model, Recipe(name="awq", stages=[STAGES["awq"]]), ids, progress=lambda _: None)
    scaled = {r.name.split(".")[-1] for r in report.layers if r.details["scale_ratio"] is not None}
    assert scaled == {"down_proj"}  # 4 heads over 2 KV heads: v -> o is skipped as in the reference


def test_phi3_fused_projections_take_every_awq_scale() -> None:
    """Without GQA, AWQ's four groups exist on Phi-3 too: the fused qkv_proj and gate_up_proj are scaled once from
    their norms, and their last rows (v, up) absorb the v -> o and up -> down scales."""
    from llmpress.compress.engine import compress_
    from llmpress.config import Recipe

    FAMILIES["phi3-mha"] = ("Phi3Config", {"pad_token_id": 0, "num_key_value_heads": 4})
    try:
        model = tiny("phi3-mha")
    finally:
        del FAMILIES["phi3-mha"]
    groups = awq.scale_groups(find_decoder_blocks(model)[1][0], "model.layers.0")
    assert [sorted(n.split(".")[-1] for n in g.linears) for g in groups] == [
        ["qkv_proj"], ["o_proj"], ["gate_up_proj"], ["down_proj"]]  # fmt: skip
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    report = compress_(model, Recipe(name="awq", stages=[STAGES["awq"]]), ids, progress=lambda _: None)
    scaled = {r.name.split(".")[-1] for r in report.layers if r.details["scale_ratio"] is not None}
    assert scaled == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
