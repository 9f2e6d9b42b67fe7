"""GGUF export on tiny Llamas: every tensor read back with the gguf package equals the weights llmpress evaluated
(bit for bit where the grid is a GGUF block type), q/k rows in llama.cpp's rotary order, the tokenizer inside,
and models the writer does not describe refused by name."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import VOCAB, build_tiny_llama, byte_tokenizer_json
from transformers import PreTrainedTokenizerFast

from llmpress.compress.engine import compress_
from llmpress.config import Recipe
from llmpress.errors import LlmpressError
from llmpress.export.gguf import _permute, export_gguf

GRIDS = {
    "q4_1": ({"method": "rtn", "bits": 4, "group_size": 32, "offset": "min"}, "Q4_1", "exact"),
    "q4_0": ({"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True}, "Q4_0", "exact"),
    "q4_0_signed": (
        {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True, "signed_scale": True},
        "Q4_0",
        "exact",
    ),
    "q4_0_awq": (
        {"method": "awq", "bits": 4, "group_size": 32, "symmetric": True, "signed_scale": True, "grid": 4},
        "Q4_0",
        "exact",
    ),
    "q4_zero": ({"method": "rtn", "bits": 4, "group_size": 32}, "Q4_1", "near"),
    "q8_0": ({"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True}, "Q8_0", "exact"),
    "g64": ({"method": "rtn", "bits": 4, "group_size": 64}, "Q8_0", "requantized"),
}


def _tokenizer(folder) -> None:
    """Byte-level BPE for the tiny vocabulary with one merge (llama.cpp loads no BPE vocabulary without merges):
    "th" takes the id of the last byte symbol, a non-ASCII byte the texts here never use."""
    folder.mkdir(exist_ok=True)
    data = json.loads(byte_tokenizer_json(folder).read_text())
    vocab = data["model"]["vocab"]
    last = max(vocab, key=vocab.get)
    vocab["th"] = vocab.pop(last)
    data["model"]["merges"] = [["t", "h"]]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="A", eos_token="B",
                            chat_template="{{ messages[0]['content'] }}").save_pretrained(folder)  # fmt: skip


def _read(path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray], dict[str, str]]:
    reader = gguf.GGUFReader(str(path))
    values = {}
    for t in reader.tensors:
        flat = gguf.quants.dequantize(t.data, t.tensor_type)
        values[t.name] = flat.reshape(t.data.shape[0], -1) if t.data.ndim > 1 else flat
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    return reader, values, kinds


@pytest.mark.parametrize("grid", list(GRIDS))
def test_every_tensor_reads_back_as_evaluated(grid, tmp_path) -> None:
    stage, kind, how = GRIDS[grid]
    model = build_tiny_llama()
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    embeddings = {"method": "embeddings", "bits": 8, "group_size": 32, "symmetric": True}
    compress_(model, Recipe(name="g", stages=[{**stage, "targets": [".*_proj"]}, embeddings]), ids)
    _tokenizer(tmp_path)
    report = export_gguf(model, tmp_path, tmp_path / "model.gguf", fallback="q8_0")
    _, values, kinds = _read(tmp_path / "model.gguf")
    config = model.config
    assert not config.tie_word_embeddings  # an untied head, quantized by the embeddings stage too
    assert kinds["token_embd.weight"] == kinds["output.weight"] == "Q8_0"
    assert np.array_equal(values["token_embd.weight"], model.model.embed_tokens.weight.detach().numpy())
    assert np.array_equal(values["output.weight"], model.lm_head.weight.detach().numpy())
    for i in range(config.num_hidden_layers):
        block = model.model.layers[i]
        attn, mlp = block.self_attn, block.mlp
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        pairs = {"attn_q": (attn.q_proj, heads), "attn_k": (attn.k_proj, kv_heads),
                 "attn_v": (attn.v_proj, None), "attn_output": (attn.o_proj, None), "ffn_gate": (mlp.gate_proj, None),
                 "ffn_up": (mlp.up_proj, None), "ffn_down": (mlp.down_proj, None)}  # fmt: skip
        for short, (layer, heads) in pairs.items():
            name = f"blk.{i}.{short}.weight"
            expected = _permute(layer.weight.detach().float(), heads).numpy()
            assert kinds[name] == kind
            if how == "exact":
                assert np.array_equal(values[name], expected), name
            elif how == "near":
                assert np.abs(values[name] - expected).max() <= 1e-3 * np.abs(expected).max(), name
            else:  # re-rounded to Q8_0 from the evaluated weights
                assert np.abs(values[name] - expected).max() <= np.abs(expected).max() / 100, name
        assert np.array_equal(values[f"blk.{i}.attn_norm.weight"], block.input_layernorm.weight.detach().numpy())
    summary = report.to_dict()
    assert summary["exact"] == (7 * 3 + 2 if how == "exact" else 2)  # + token_embd, output
    assert summary["near_exact"] == (21 if how == "near" else 0) and len(summary["requantized"]) == (
        21 if how == "requantized" else 0
    )
    assert summary["bytes"] == (tmp_path / "model.gguf").stat().st_size


def test_q_and_k_rows_follow_llama_cpps_rotary_pairs() -> None:
    """Row r of head h in llama.cpp's layout is transformers' row (r % 2) * half + r // 2 of that head."""
    rows = torch.arange(16).float()[:, None]
    permuted = _permute(rows, heads=2)[:, 0].long().tolist()
    assert permuted == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_metadata_and_tokenizer(tmp_path) -> None:
    model = build_tiny_llama()
    _tokenizer(tmp_path)
    export_gguf(model, tmp_path, tmp_path / "model.gguf", float_type="f32")
    reader, values, kinds = _read(tmp_path / "model.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    config = model.config
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == config.num_hidden_layers
    assert fields["llama.feed_forward_length"] == config.intermediate_size
    assert fields["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    tokens = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert all(fields["tokenizer.ggml.tokens"][i] == t for t, i in tokens.items())
    assert fields["tokenizer.ggml.eos_token_id"] == tokens["B"]
    assert fields["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"
    assert set(kinds.values()) == {"F32"}  # float_type f32: every weight as it was
    assert np.array_equal(values["blk.1.ffn_down.weight"], model.model.layers[1].mlp.down_proj.weight.detach().numpy())


def test_cli_writes_a_compressed_folder_as_gguf(project, tmp_path, capsys) -> None:
    from flows.cli import main
    from llmpress.steps import save_model

    model = build_tiny_llama()
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    compress_(model, Recipe(name="g", stages=[GRIDS["q4_1"][0]]), ids)
    _tokenizer(tmp_path / "tok")
    folder = tmp_path / "compressed"
    save_model(model, PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok"), folder, {})
    assert main(["--project", str(project), "gguf", str(folder), str(tmp_path / "m.gguf")]) == 0
    assert "21 tensors hold the method's codes exactly" in capsys.readouterr().out
    _, values, kinds = _read(tmp_path / "m.gguf")
    assert kinds["blk.2.ffn_up.weight"] == "Q4_1" and kinds["token_embd.weight"] == "F16"
    assert np.array_equal(values["blk.2.ffn_up.weight"], model.model.layers[2].mlp.up_proj.weight.detach().numpy())


def test_what_the_writer_does_not_describe_is_refused(tmp_path) -> None:
    _tokenizer(tmp_path)
    model = build_tiny_llama()
    model.config.model_type = "gemma"
    with pytest.raises(
        LlmpressError, match=r"llama, mistral, qwen2, qwen3, mixtral, qwen3_moe, olmoe models; this one is 'gemma'"
    ):
        export_gguf(model, tmp_path, tmp_path / "a.gguf")
    tied = build_tiny_llama()
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    export_gguf(tied, tmp_path, tmp_path / "tied.gguf")
    assert "output.weight" not in _read(tmp_path / "tied.gguf")[2]  # llama.cpp reads a tied head from token_embd
    (tmp_path / "tied.gguf").unlink()
    model = build_tiny_llama()
    with pytest.raises(LlmpressError, match="float_type must be one of"):
        export_gguf(model, tmp_path, tmp_path / "a.gguf", float_type="q3_k")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(LlmpressError, match="byte-level BPE"):
        export_gguf(model, tmp_path, tmp_path / "a.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_pipeline_step_scores_the_gguf_and_bundles_it_alone(tmp_path) -> None:
    """steps.gguf writes the file with every tensor exact on the Q4_1 / Q8_0 grids; with llama-cpp-python it is
    scored in llama.cpp (its perplexity within 2 % of PyTorch's on the same codes, the same top-1 token nearly
    everywhere); without it the result says unscored. A GGUF-only bundle then verifies, runs nothing else, and has
    llama.cpp as its runtime."""
    from llmpress.bundle import BundleError, verify_bundle
    from llmpress.bundle import run as bundle_run
    from llmpress.config import EvalParams, ExportParams, SpeedParams
    from llmpress.evaluate import llamacpp
    from llmpress.evaluate.perplexity import perplexity
    from llmpress.sources import load_model
    from llmpress.steps import GgufJob, edge_bundle, gguf
    from llmpress.steps.compression import save_model

    model = build_tiny_llama()
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    stages = [{"method": "rtn", "bits": 4, "group_size": 32, "offset": "min", "targets": [".*_proj"]},
              {"method": "embeddings", "bits": 8, "group_size": 32, "symmetric": True}]  # fmt: skip
    compress_(model, Recipe(name="q4_1", stages=stages), ids)
    _tokenizer(tmp_path / "tok")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    save_model(model, tokenizer, tmp_path / "hf", {})
    text = tmp_path / "eval.txt"
    text.write_text("Small models run on small devices, and the file they read is what counts. " * 12)
    speed = SpeedParams(prompt_tokens=16, decode_tokens=4, batch_size=1, warmup=0, repeats=1, threads=1)
    params = EvalParams(window=64, stride=64, max_tokens=512, speed=speed)
    job = GgufJob(model_path=str(tmp_path / "hf"), out_dir=str(tmp_path / "gguf"), eval_path=str(text),
                  export=ExportParams(formats=["gguf"], parity_tokens=48), params=params)  # fmt: skip
    out = gguf(job)
    assert out["gguf_bytes"] == (tmp_path / "gguf" / "model.gguf").stat().st_size
    assert out["gguf_requantized_tensors"] == 0 and out["gguf_exact_tensors"] == 3 * 7 + 2  # + embedding, head
    assert out["gguf_details"]["block_types"] == {"Q4_1": 21, "Q8_0": 2, "F32": 7}
    if llamacpp.available():
        reference = perplexity(load_model(tmp_path / "hf"), tokenizer, text.read_text(), params).perplexity
        assert out["gguf_scored"] == 1.0
        assert out["gguf_perplexity"] == pytest.approx(reference, rel=0.02)
        assert out["gguf_top1_agreement"] >= 0.9
        assert out["gguf_b1_decode_tokens_per_s"] > 0 and out["gguf_b1_prefill_ms"] > 0
    else:
        assert out["gguf_scored"] == 0.0 and "gguf_perplexity" not in out
    bundle = edge_bundle(None, str(tmp_path / "hf"), tmp_path / "bundle", out, {"passed": True}, {"version": "1"},
                         out["gguf_path"])  # fmt: skip
    manifest = verify_bundle(bundle)
    assert manifest["model"]["runtimes"] == ["llama.cpp"] and "graph" not in manifest["model"]
    entry = manifest["formats"]["gguf"]
    assert set(manifest["formats"]) == {"gguf"} and entry["files"] == ["model.gguf"]
    assert entry["bytes"] == out["gguf_bytes"] and entry["block_types"] == {"Q4_1": 21, "Q8_0": 2, "F32": 7}
    assert entry["scored"] is llamacpp.available() and entry["requantized"] == []
    assert entry["scores"].get("perplexity") == out.get("gguf_perplexity")
    with pytest.raises(BundleError, match=r"cannot run.*ships model\.gguf for llama\.cpp"):  # no graph, no runner
        bundle_run(bundle, "edge")


DIGITS = {"type": "Digits", "individual_digits": True}
BYTES = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
SPLIT = {"type": "Split", "pattern": {"Regex": "x"}}
# as Qwen2's and Llama 3's tokenizer.json spell them
QWEN2 = {
    "type": "Split",
    "pattern": {
        "Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"
        r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    },
}
LLAMA3 = {
    "type": "Split",
    "pattern": {
        "Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
        r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    },
}


@pytest.mark.parametrize(
    ("pre", "name"),
    [
        (BYTES, "gpt-2"),
        ({"type": "Sequence", "pretokenizers": [DIGITS, BYTES]}, "smollm"),
        ({"type": "Sequence", "pretokenizers": [SPLIT, BYTES]}, "default"),
        ({"type": "Sequence", "pretokenizers": [QWEN2, BYTES]}, "qwen2"),
        ({"type": "Sequence", "pretokenizers": [LLAMA3, BYTES]}, "llama-bpe"),
    ],
)
def test_pre_tokenizer_named_as_llama_cpp_knows_it(pre, name) -> None:
    from llmpress.export.gguf import _pre_tokenizer_name

    assert _pre_tokenizer_name(pre) == name


FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v with biases, rotate-half rotary in llama.cpp too (no row permutation)
    "qwen3": ("Qwen3Config", {"head_dim": 32}),  # q/k norms, a head size other than hidden / heads
    # mixtures of experts: every expert's codes stacked per projection, the router in float32
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                     "head_dim": 32, "norm_topk_prob": True}),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 4}),  # no GQA
}  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_llama_cpp_computes_what_pytorch_computes_for_every_family_written(family: str, tmp_path) -> None:
    """Each family's GGUF run in llama.cpp itself: float32 weights give PyTorch's logits (the architecture name,
    tensor names, row order, biases, q/k norms and hyperparameters are what llama.cpp expects), and the Q4_1 codes
    of a compressed model give PyTorch's greedy choices on them."""
    import transformers

    from llmpress.evaluate import llamacpp

    if not llamacpp.available():
        pytest.skip(llamacpp.INSTALL)  # `make setup` builds it; CI has it
    config_class, extra = FAMILY_CONFIGS[family]
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 128,
             "tie_word_embeddings": False}  # fmt: skip
    config = getattr(transformers, config_class)(**{**shape, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases away from their init (ones, zeros), so a misplaced one shows
                p.add_(torch.randn_like(p) * 0.2)
            if name.endswith("mlp.gate.weight"):  # routers (some init to zeros): varied, untied choices
                p.normal_(0, 0.5)
        model.lm_head.weight.mul_(4)  # confident logits: greedy choices are no ties
    _tokenizer(tmp_path / "tok")
    ids = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(1))
    export_gguf(model, tmp_path / "tok", tmp_path / "f32.gguf", float_type="f32")
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    got = llamacpp.LlamaCpp(tmp_path / "f32.gguf", context=64, threads=2).logits(ids[0].tolist())
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max(), np.abs(got - expected).max()

    stages = [{"method": "rtn", "bits": 4, "group_size": 32, "offset": "min", "targets": [".*_proj"]}]
    compress_(model, Recipe(name="q4_1", stages=stages), ids)
    report = export_gguf(model, tmp_path / "tok", tmp_path / "q4_1.gguf", float_type="f32")
    experts = "num_experts_per_tok" in extra
    assert report.requantized == [] and len(report.exact) == 2 * 7  # per block q, k, v, o and gate, up, down
    assert report.tensors["blk.0.ffn_down_exps.weight" if experts else "blk.0.ffn_down.weight"] == "Q4_1"
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    got = llamacpp.LlamaCpp(tmp_path / "q4_1.gguf", context=64, threads=2).logits(ids[0].tolist())
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9  # llama.cpp rounds activations to 8 bits here


def test_mixture_of_experts_llama_cpp_would_compute_differently_is_refused(tmp_path) -> None:
    """Where llama.cpp's graph for a family differs from the model's config, the file would load and compute
    something else: refused by name, nothing written."""
    import transformers

    _tokenizer(tmp_path)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": VOCAB, "num_experts": 4, "num_experts_per_tok": 2}  # fmt: skip
    cases = [
        (transformers.OlmoeConfig(**shape, num_key_value_heads=2), r"olmoe has as many KV heads as query heads"),
        (transformers.OlmoeConfig(**shape, norm_topk_prob=True), r"olmoe does not normalise the chosen experts'"),
        (transformers.Qwen3MoeConfig(**shape), r"qwen3moe renormalise.*norm_topk_prob is False"),
        (transformers.Qwen3MoeConfig(**shape, norm_topk_prob=True, mlp_only_layers=[1]), "dense MLP among"),
    ]
    for config, message in cases:
        with pytest.raises(LlmpressError, match=message):
            export_gguf(transformers.AutoModelForCausalLM.from_config(config), tmp_path, tmp_path / "a.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))
