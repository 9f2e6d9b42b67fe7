"""Mixtures of experts (llmpress/compress/experts.py) on tiny Mixtral, Qwen3-MoE and OLMoE models: the experts as
linears compute what transformers' fused experts compute, every expert is calibrated - also one the router never
picks - the tokens each expert was sent are counted against the recipe's floor and the gate's, the router is left
alone, and both weight layouts (transformers' fused 3-D parameters, per-expert checkpoints) load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_tokenizer_json
from test_architectures import MOE, tiny
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from llmpress.compress import experts
from llmpress.compress.engine import check_recipe, compress_
from llmpress.compress.quant import quantization_of, quantize_rtn
from llmpress.config import ConfigError, GateParams, Recipe, validate
from llmpress.errors import LlmpressError
from llmpress.gate import run_gate
from llmpress.sources import load_model, model_skeleton
from llmpress.steps import METADATA, dequantize, save_model
from llmpress.steps.evaluation import _expert_coverage

IDS = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
GPTQ = {"method": "gptq", "bits": 4, "group_size": 16, "symmetric": True}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    folder = tmp_path_factory.mktemp("tokenizer")
    byte_tokenizer_json(folder)
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="A")


def _never_routed(model: torch.nn.Module, expert: int = 3) -> torch.nn.Module:
    """The router of every block never picks `expert` (a hook re-routes its choices)."""
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            module.register_forward_hook(lambda _m, _a, out, e=expert: _drop(out, e))
    return model


def _drop(out: tuple, expert: int) -> tuple:
    """Re-route the router's top-k so that `expert` is never among them (the next best instead)."""
    logits, _, _ = out
    logits = logits.clone()
    logits[:, expert] = float("-inf")
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    k = out[2].shape[-1]
    weights, index = torch.topk(probs, k, dim=-1)
    return logits, weights.to(out[1].dtype), index


@pytest.mark.parametrize("family", sorted(MOE))
def test_linear_experts_compute_what_the_fused_experts_compute(family: str) -> None:
    fused = tiny(family, fused=True)
    originals = {n: p.detach().clone() for n, p in fused.named_parameters() if p.dim() == 3}
    assert originals  # transformers keeps them as 3-D parameters
    with torch.no_grad():
        reference = fused(IDS).logits
        names = experts.unfuse_experts_(fused)
        assert names and all(isinstance(fused.get_submodule(n), experts.LinearExperts) for n in names)
        routed = fused(IDS).logits
        with experts.all_experts(fused):  # every expert on every token, weighted by the real routing
            dense = fused(IDS).logits
        torch.testing.assert_close(routed, reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(dense, reference, rtol=0, atol=1e-5)
        with experts.stock_layout(fused):  # fused back: the very same tensors
            for name, value in originals.items():
                assert torch.equal(fused.get_parameter(name), value), name
        assert experts.unfuse_experts_(fused) == names  # idempotent


def test_every_expert_is_calibrated_even_one_the_router_never_picks() -> None:
    """Expert 3 gets no calibration token from the router. Calibrated on its routed tokens only, GPTQ would see an
    all-zero Hessian and zero its weights (dead inputs); llmpress runs every expert on every calibration token, so
    expert 3 is quantized with error compensation from real statistics, and the report counts its 0 tokens."""
    model = _never_routed(tiny("mixtral"))
    rtn = {n: quantize_rtn(m.weight.detach(), 4, 16, True).dequantize()
           for n, m in model.named_modules() if ".experts.3." in n and isinstance(m, torch.nn.Linear)}  # fmt: skip
    report = compress_(model, Recipe(name="r", stages=[GPTQ]), IDS, progress=lambda _: None)
    for block in ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts"):
        counts = report.expert_tokens[block]
        assert counts[3] == 0 and sum(counts) == IDS.numel() * 2  # top-2 routing over 64 tokens
    assert report.to_dict()["expert_min_tokens"] == 0 and report.to_dict()["experts"] == 8
    quantized = {rec.name for rec in report.layers}
    assert {f"model.layers.{b}.mlp.experts.{e}.{p}" for b in (0, 1) for e in range(4)
            for p in ("gate_proj", "up_proj", "down_proj")} <= quantized  # fmt: skip
    for name, rtn_weight in rtn.items():
        gptq_weight = quantization_of(model.get_submodule(name)).dequantize()
        assert gptq_weight.abs().sum() > 0.5 * rtn_weight.abs().sum(), name  # not zeroed as a dead input
        assert not torch.equal(gptq_weight, rtn_weight), name  # GPTQ's error compensation used real statistics


def test_the_router_is_left_alone() -> None:
    model = tiny("qwen3_moe")
    routers = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("mlp.gate")}
    report = compress_(model, Recipe(name="r", stages=[{"method": "wanda", "sparsity": 0.5}, GPTQ]), IDS,
                       progress=lambda _: None)  # fmt: skip
    assert routers and all(torch.equal(model.get_submodule(n).weight, w) for n, w in routers.items())
    assert not any(rec.name.endswith("mlp.gate") for rec in report.layers)


def test_the_floor_warns_or_fails_naming_the_experts(tokenizer, tmp_path) -> None:
    recipe = {"name": "r", "stages": [GPTQ], "experts": {"min_tokens": 1}}
    report = compress_(_never_routed(tiny("olmoe")), Recipe(**recipe), IDS, progress=lambda _: None)
    assert len(report.warnings) == 2 and all("(expert: tokens 3: 0)" in w for w in report.warnings)
    assert report.to_dict()["experts_below_floor"] == 2
    recipe["experts"]["below_floor"] = "fail"
    model = _never_routed(tiny("olmoe"))
    with pytest.raises(LlmpressError, match=r"model\.layers\.0\.mlp\.experts: the router sent 1 of 4 experts fewer "
                                            r"than experts\.min_tokens=1 .*Nothing was saved"):  # fmt: skip
        compress_(model, Recipe(**recipe), IDS, progress=lambda _: None)
    with pytest.raises(ConfigError, match=r"experts\.below_floor.*'warn'.*'fail'"):
        validate(Recipe, {**recipe, "experts": {"below_floor": "sometimes"}}, "recipe r")


def test_the_gate_refuses_a_model_whose_experts_saw_too_few_tokens(tokenizer, tmp_path) -> None:
    """The count travels with the folder (its compression report) into the evaluation's metrics and the gate."""
    model = _never_routed(tiny("mixtral"))
    report = compress_(model, Recipe(name="r", stages=[GPTQ]), IDS, progress=lambda _: None)
    save_model(model, tokenizer, tmp_path / "m", {METADATA: json.dumps({"report": report.to_dict()})})
    metrics = _expert_coverage(tmp_path / "m")
    counts = metrics.pop("expert_tokens")
    assert metrics == {"experts": 8, "expert_min_tokens": 0, "expert_floor": 0, "experts_below_floor": 0}
    assert counts == report.expert_tokens and all(c[3] == 0 for c in counts.values())
    # what the run page shows: the counts per block and expert, the ones below the floor outlined
    from llmpress.steps import plot_expert_tokens

    png = plot_expert_tokens(counts, 1, tmp_path / "experts.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    base = {"perplexity": 10.0}
    metrics |= {"perplexity": 10.0}
    gated = run_gate(metrics, base, GateParams(min_expert_tokens=4, max_repetition_increase=None))
    check = next(c for c in gated.checks if c.name == "expert_min_tokens")
    assert not gated.passed and not check.passed and check.value == 0
    assert run_gate(metrics, base, GateParams(min_expert_tokens=0, max_repetition_increase=None)).passed
    dense = run_gate({"perplexity": 10.0}, base, GateParams(min_expert_tokens=4, max_repetition_increase=None))
    assert not any(c.name == "expert_min_tokens" for c in dense.checks)  # nothing to check on a dense model


@pytest.mark.parametrize("family", sorted(MOE))
def test_per_expert_checkpoints_and_fused_folders_both_load(family: str, tmp_path) -> None:
    """transformers writes these families per expert (its legacy layout, `save_pretrained`'s default) and keeps
    them fused in memory; llmpress loads them, and writes a plain folder by fusing its experts back and letting
    transformers save them: the very checkpoint layout transformers writes, which stock transformers loads."""
    model = tiny(family, fused=True)
    model.save_pretrained(tmp_path / "per-expert")
    keys = json.dumps(list(_keys(tmp_path / "per-expert")))
    assert ".experts.0." in keys and "gate_up_proj" not in keys
    with torch.no_grad():
        reference = model(IDS).logits
        loaded = load_model(tmp_path / "per-expert")
        assert experts.linear_experts(loaded)
        torch.testing.assert_close(loaded(IDS).logits, reference, rtol=0, atol=1e-5)
        from llmpress.steps.compression import save_model as save

        save(loaded, _tokenizer(tmp_path), tmp_path / "plain", {})
        assert _keys(tmp_path / "plain") == _keys(tmp_path / "per-expert")  # what transformers writes for its own
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
        torch.testing.assert_close(stock(IDS).logits, reference, rtol=0, atol=1e-5)
    assert isinstance(loaded.get_submodule("model.layers.0.mlp.experts"), experts.LinearExperts)  # restored


def test_a_quantized_mixture_of_experts_dequantizes_to_a_folder_stock_loads(tokenizer, tmp_path) -> None:
    model = tiny("qwen3_moe")
    compress_(model, Recipe(name="r", stages=[GPTQ]), IDS, progress=lambda _: None)
    assert save_model(model, tokenizer, tmp_path / "q", {}) == "llmpress"  # compressed-tensors cannot hold experts
    manifest = json.loads((tmp_path / "q" / "llmpress_compression.json").read_text())
    assert "mixture-of-experts experts" in manifest["compressed_tensors"]
    assert "model.layers.0.mlp.experts.3.down_proj" in manifest["quantized"]
    dequantize(tmp_path / "q", tmp_path / "plain")
    with torch.no_grad():
        expected = model(IDS).logits
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
        torch.testing.assert_close(stock(IDS).logits, expected, rtol=0, atol=1e-5)


def test_recipes_are_checked_on_a_mixture_of_experts_skeleton(tmp_path) -> None:
    """`llmpress check --model` and the flow check recipes on the meta-device skeleton: experts unfused there too."""
    tiny("mixtral", fused=True).save_pretrained(tmp_path)
    skeleton = model_skeleton(tmp_path)
    assert skeleton is not None and experts.linear_experts(skeleton)
    check_recipe(skeleton, Recipe(name="r", stages=[{"method": "awq", "bits": 4, "group_size": 16}]))
    with pytest.raises(LlmpressError, match="'mixtral' is a mixture of experts"):
        check_recipe(skeleton, Recipe(name="r", stages=[{"method": "structured", "heads": 0.5}]))
    # the LLM Surgeon's curvature follows the routing: an expert sent no calibration token would look free to prune
    with pytest.raises(LlmpressError, match=r"surgeon takes its curvature.*use sparsegpt or wanda"):
        check_recipe(skeleton, Recipe(name="r", stages=[{"method": "surgeon", "sparsity": 0.5}]))


def _keys(folder) -> list[str]:
    from safetensors import safe_open

    found = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            found += list(f.keys())
    return found


def _tokenizer(tmp_path) -> PreTrainedTokenizerFast:
    byte_tokenizer_json(tmp_path)
    return PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="A")


def test_a_quantized_mixture_of_experts_ships_every_expert_packed_with_parity(tokenizer, tmp_path) -> None:
    """The edge path: 4-bit blocks (Q4_1-style) on every expert, exported with the KV cache as MatMulNBits per
    expert linear, matching PyTorch, and the bundle's runner generating what PyTorch generates."""
    import onnx

    from llmpress import steps
    from llmpress.bundle import run as bundle_run
    from llmpress.config import ExportParams

    model = tiny("olmoe")
    stages = [{"method": "rtn", "bits": 4, "group_size": 16, "offset": "min"}]
    compress_(model, Recipe(name="edge", stages=stages), IDS)
    save_model(model, tokenizer, tmp_path / "q", {})
    tokenizer.save_pretrained(tmp_path / "q")
    text = tmp_path / "eval.txt"
    # byte-level ids below the tiny vocabulary (64): '!' .. '`', so capitals and digits, no spaces
    text.write_text(",".join(f"THE-MARKET-NEAR-THE-BRIDGE-WAS-QUIET-ON-DAY-{i}." for i in range(40)))
    exported = steps.export(steps.ExportJob(model_path=str(tmp_path / "q"), out_dir=str(tmp_path / "onnx"),
                                            eval_path=str(text),
                                            params=ExportParams(parity_tokens=16, parity_decode_steps=4)))  # fmt: skip
    assert exported["onnx_max_abs_diff"] < 1e-4 and exported["onnx_greedy_identical"] == 1.0
    graph = onnx.load(exported["onnx_path"], load_external_data=False)
    packed = sum(n.op_type == "MatMulNBits" for n in graph.graph.node)
    assert packed == 2 * (4 + 4 * 3)  # per block: q, k, v, o and 4 experts x (gate, up, down)
    built = steps.edge_bundle(exported["onnx_path"], str(tmp_path / "q"), tmp_path / "bundle", {}, {"passed": True},
                              {})  # fmt: skip
    loaded = load_model(tmp_path / "q")
    prompt = tokenizer("THE-MARKET")["input_ids"]
    expected = loaded.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    new = expected[0, len(prompt) :].tolist()
    assert max(prompt + new) < 64 and bundle_run(built, "THE-MARKET", max_new_tokens=6) == tokenizer.decode(new)


def test_evaluation_reads_a_mixture_of_experts_head_from_kept_hidden_states() -> None:
    """Evaluation applies the model's own head to hidden states it kept (`evaluate.logits.head_logits`); a mixture
    of experts' head also reads the router logits of its decoder's output: the same logits as its forward."""
    from llmpress.evaluate.logits import head_logits, hidden_states

    for family in sorted(MOE):
        model = tiny(family)
        with torch.no_grad():
            expected = model(IDS).logits
        torch.testing.assert_close(head_logits(model, hidden_states(model, IDS)), expected, rtol=0, atol=1e-5)
