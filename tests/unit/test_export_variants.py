"""onnxruntime edge variants (int8 dynamic, int4 block-wise) of the KV-cache graph, and perplexity through
onnxruntime under the same protocol as PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

from llmpress.config import EvalParams
from llmpress.errors import LlmpressError
from llmpress.evaluate.perplexity import perplexity
from llmpress.export.generate import OrtGenerator, onnx_session
from llmpress.export.variants import describe, make_variant, ort_perplexity

TEXT = "the quick brown fox jumps over the lazy dog; " * 30
PARAMS = EvalParams(window=64, stride=64, max_tokens=1024, batch_size=4)


@pytest.fixture(scope="module")
def variants(tiny_onnx, tmp_path_factory) -> dict:
    _, onnx_dir = tiny_onnx
    root = tmp_path_factory.mktemp("variants")
    calibration = np.random.default_rng(0).integers(0, 256, (8, 48))
    return {kind: make_variant(onnx_dir / "model.onnx", root / kind, kind, calibration_ids=calibration)
            for kind in ("fp32", "int8-dynamic", "int8-static", "int4")}  # fmt: skip


def test_variants_quantize_every_block_matmul(variants) -> None:
    fp32, int8, int4 = (describe(variants[k]) for k in ("fp32", "int8-dynamic", "int4"))
    assert fp32["matmul_int8"] == fp32["matmul_4bit"] == 0
    assert int8["matmul_int8"] >= 14 and int4["matmul_4bit"] >= 14  # 7 projections x 2 blocks (+ lm_head)
    # (a tiny model: embeddings and graph overhead are a large share; the block weights shrink 4x and 8x)
    assert int8["bytes"] < 0.7 * fp32["bytes"] and int4["bytes"] < int8["bytes"]


def test_ort_perplexity_equals_pytorch_for_fp32(tiny_onnx, variants, char_tokenizer) -> None:
    model, _ = tiny_onnx
    reference = perplexity(model, char_tokenizer, TEXT, PARAMS)
    got = ort_perplexity(variants["fp32"], char_tokenizer, TEXT, PARAMS, threads=1)
    assert got.tokens == reference.tokens and got.windows == reference.windows
    assert got.perplexity == pytest.approx(reference.perplexity, rel=1e-5)


@pytest.mark.parametrize("kind", ["int8-dynamic", "int4"])
def test_quantized_variants_stay_close_and_keep_the_interface(variants, char_tokenizer, kind) -> None:
    fp32 = ort_perplexity(variants["fp32"], char_tokenizer, TEXT, PARAMS, threads=1).perplexity
    quantized = ort_perplexity(variants[kind], char_tokenizer, TEXT, PARAMS, threads=1).perplexity
    assert abs(quantized / fp32 - 1) < 0.1
    generator = OrtGenerator(onnx_session(variants[kind], threads=1))
    out = generator.generate(np.array([[5, 6, 7]]), 8)
    assert out.shape == (1, 11)


def test_bad_variant_settings_are_refused(tiny_onnx, tmp_path) -> None:
    _, onnx_dir = tiny_onnx
    with pytest.raises(LlmpressError, match="unknown ONNX variant 'int3'"):
        make_variant(onnx_dir / "model.onnx", tmp_path, "int3")
    with pytest.raises(LlmpressError, match="power of two"):
        make_variant(onnx_dir / "model.onnx", tmp_path, "int4", block_size=24)


def test_static_int8_is_qdq_on_weight_matmuls_and_tensorrt_ready(variants, char_tokenizer) -> None:
    import onnx

    from llmpress.export.tensorrt import check_ready

    graph = onnx.load(str(variants["int8-static"]))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "MatMulInteger" not in ops
    assert check_ready(variants["int8-static"]).ready  # QDQ is the int8 form TensorRT takes
    assert not check_ready(variants["int8-dynamic"]).ready
    ppl = ort_perplexity(variants["int8-static"], char_tokenizer, TEXT, PARAMS, threads=1).perplexity
    assert np.isfinite(ppl)


def test_static_int8_needs_calibration(tiny_onnx, tmp_path) -> None:
    with pytest.raises(LlmpressError, match="calibration"):
        make_variant(tiny_onnx[1] / "model.onnx", tmp_path, "int8-static")


def test_int4_full_quantizes_a_tied_head_and_the_embeddings(tmp_path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmpress.export.onnx import export_onnx

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
                         tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    graph = export_onnx(model, tmp_path / "fp32")
    assert describe(make_variant(graph, tmp_path / "plain", "int4"))["gather_4bit"] == 0  # the table stays fp32
    int4 = make_variant(graph, tmp_path / "int4", "int4-full")
    info = describe(int4)
    assert info["matmul_4bit"] == 8 and info["gather_4bit"] == 1  # 7 projections + the tied head; the table
    # 4 bits + a scale per 32 weights is ~1/6 of fp32, even with the head's own copy: most weight bytes are saved
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())  # the tied table counted once
    assert describe(graph)["bytes"] - info["bytes"] > 0.6 * weight_bytes
    generator = OrtGenerator(onnx_session(int4, threads=1))
    ids = np.array([[1, 2, 3, 4, 5]])
    logits, _ = generator.forward(ids, np.ones_like(ids), generator.empty_cache(1))
    reference = model(torch.tensor(ids)).logits.detach().numpy()
    assert np.abs(logits - reference).max() < 0.2 * np.abs(reference).max()
