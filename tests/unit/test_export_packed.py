"""Quantized linears reach the graph as MatMulNBits built from the method's own codes: the weights onnxruntime
de-quantizes are the weights PyTorch evaluated, bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from llmpress.compress import compress_
from llmpress.compress.quant import attach_, quantization_of, quantize_rtn
from llmpress.config import Recipe, RTNStage
from llmpress.export.onnx import check_parity, export_onnx
from llmpress.export.packed import block_size_for, pack, pack_matmuls, precision_counts, precision_label


def _ort_weight(node: onnx.NodeProto, initializers: dict[str, np.ndarray], k: int) -> np.ndarray:
    """The [N, K] weight onnxruntime computes with: the node alone, at accuracy level 0, fed the identity."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute} | {"accuracy_level": 0}
    inits = [numpy_helper.from_array(initializers[name], name) for name in node.input[1:]]
    single = helper.make_node("MatMulNBits", list(node.input), ["Y"], domain="com.microsoft", **attrs)
    inputs = [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, [k, k])]
    graph = helper.make_graph([single], "one", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              inits)  # fmt: skip
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # each output column holds one weight row times 1.0, the other products being exact zeros
    return session.run(None, {node.input[0]: np.eye(k, dtype=np.float32)})[0].T


def _linear_through_the_graph(layer: torch.nn.Linear) -> np.ndarray:
    """The weight onnxruntime computes with when `pack_matmuls` rewrites a graph holding `layer` as x @ W^T: the
    graph at accuracy level 0 fed the identity (one row of W, times 1.0, per output row)."""
    k, n = layer.in_features, layer.out_features
    weight = numpy_helper.from_array(layer.weight.detach().numpy().T.copy(), "w_t")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w_t"], ["y"], name="linear")], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k, n])], [weight])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    arrays = pack_matmuls(model, {"w_t": ("weight", True)}, layer)
    assert next(n.op_type for n in model.graph.node) == "MatMulNBits"
    for init in model.graph.initializer:
        if init.name in arrays:
            init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.eye(k, dtype=np.float32)[None]})[0][0].T


COMBINATIONS = [(bits, group, symmetric, offset) for bits in range(2, 9) for group in (None, 16, 32, 48, 64, 128, 256)
                for symmetric, offset in ((False, "zero-point"), (True, "zero-point"), (False, "min"),
                                          (True, "signed"))]  # fmt: skip


@pytest.mark.parametrize(("bits", "group_size", "symmetric", "offset"), COMBINATIONS)
def test_onnxruntime_dequantizes_the_codes_to_the_evaluated_weights(bits, group_size, symmetric, offset) -> None:
    torch.manual_seed(bits * 1000 + (group_size or 0) + symmetric)
    layer = torch.nn.Linear(256 if offset == "min" else 200, 24, bias=False)  # 200: ragged last groups
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape) * torch.rand(24, 1) * 0.1)
        layer.weight[3] = 0.0  # an all-zero row
        layer.weight[5, :40] = layer.weight[5, :40].abs()  # an all-positive stretch
    signed = offset == "signed"  # symmetric with llama.cpp's signed scales (negative ones among them)
    qw = quantize_rtn(layer.weight.detach(), bits, group_size, symmetric, "zero-point" if signed else offset, signed)
    assert not signed or (qw.scale < 0).any()
    attach_(layer, qw)
    evaluated = layer.weight.detach().numpy()
    assert np.array_equal(evaluated.view(np.uint32), qw.dequantize(torch.float32).numpy().view(np.uint32))
    evaluated = evaluated + np.float32(0.0)  # bit for bit, but -0.0 (a negative scale times 0) and 0.0 as one
    assert np.array_equal(
        (_linear_through_the_graph(layer) + np.float32(0.0)).view(np.uint32), evaluated.view(np.uint32)
    )
    packed = pack(qw)
    assert np.array_equal((packed.dequantize() + np.float32(0.0)).view(np.uint32), evaluated.view(np.uint32))
    # codes stored at their width: 4-bit containers for <= 4 bits, two codes a byte
    assert packed.bits == (4 if bits <= 4 else 8)
    k = layer.in_features
    assert packed.b.nbytes == 24 * -(-k // packed.block_size) * packed.block_size * packed.bits // 8


def test_min_grid_gives_back_a_q4_1_block_exactly() -> None:
    """A weight stored as Q4_1 (fp16 d and m per 32, codes 0..15 used at both ends) is re-quantized by the min
    grid to itself; the zero-point grid cannot hold it (its origin is a multiple of the scale)."""
    generator = torch.Generator().manual_seed(0)
    d = (torch.rand(16, 8, generator=generator) * 0.01 + 1e-3).half()
    m = (-torch.rand(16, 8, generator=generator) * 0.05).half()
    q = torch.randint(0, 16, (16, 256), generator=generator)
    q[:, ::32], q[:, 1::32] = 0, 15  # min-max quantization uses both ends of every block
    weight = d.float().repeat_interleave(32, 1) * q + m.float().repeat_interleave(32, 1)
    again = quantize_rtn(weight, 4, 32, False, "min")
    assert torch.equal(again.dequantize(), weight)
    zero_point = quantize_rtn(weight, 4, 32, False).dequantize()
    assert (zero_point - weight).abs().max() > 1e-4


@pytest.mark.parametrize("group_size", [8, 24, 40, 100])
def test_group_sizes_the_graph_cannot_hold_are_refused_by_the_recipe(group_size) -> None:
    with pytest.raises(ValidationError, match="group_size") as err:
        RTNStage(method="rtn", bits=4, group_size=group_size)
    assert "multiple of 16" in str(err.value)
    with pytest.raises(ValueError, match="multiple of 16"):
        block_size_for(group_size)


def test_block_sizes() -> None:
    assert [block_size_for(g) for g in (None, 16, 32, 48, 96, 128, 256, 512, 1024)] == [128, 16, 32, 16, 32, 128,
                                                                                         256, 256, 256]  # fmt: skip


CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)  # fmt: skip


METHODS = [
    ("rtn", {"bits": 4, "group_size": 32}),
    ("rtn", {"bits": 4, "group_size": 32, "offset": "min"}),
    ("gptq", {"bits": 3, "group_size": 48, "act_order": True}),
    ("awq", {"bits": 4, "group_size": 32, "grid": 4}),
]  # 8 bits, per-channel and the other grids: every combination above, through the same rewrite


@pytest.mark.parametrize(("method", "extra"), METHODS)
def test_quantized_model_exports_its_codes(method, extra, tmp_path) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    recipe = Recipe(name=method, stages=[{"method": method, "targets": [".*_proj"], **extra}])
    compress_(model, recipe, ids, batch_size=4)
    graph_path = export_onnx(model, tmp_path / "onnx")
    graph = onnx.load(str(graph_path))
    counts = precision_counts(graph)
    bits = 4 if extra["bits"] <= 4 else 8
    assert counts[f"matmul_{bits}bit"] == 2 * 7  # every projection of every block
    assert counts["matmul_fp32"] == 1 and counts["gather_fp32"] == 1  # the head and the embedding table
    assert precision_label(counts) == ("int4" if bits == 4 else "int8")
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    assert not any(name.endswith("_proj.weight") for name in initializers)  # no float copy of a quantized weight
    modules = dict(model.named_modules())
    nodes = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    for node in nodes:
        layer = modules[node.input[1].rsplit(".q", 1)[0].removesuffix(".weight")]  # named after the parameter
        assert quantization_of(layer) is not None
        k = layer.in_features
        weight = _ort_weight(node, initializers, k)
        minimum = initializers.get(node.input[1].rsplit(".q", 1)[0] + ".minimum")
        if minimum is not None:  # offset "min": the graph adds the block minimums after the product
            block = next(a.i for a in node.attribute if a.name == "block_size")
            weight = weight + np.repeat(minimum.T.astype(np.float32), block, axis=1)
        assert np.array_equal(weight, layer.weight.detach().numpy()), node.name
    parity = check_parity(model, graph_path, ids[:2, :12], decode_steps=8)
    assert parity.max_abs_diff < 1e-4 and parity.greedy_identical


@pytest.mark.parametrize(("tied", "bits"), [(True, 8), (False, 4)])
def test_quantized_embeddings_and_head_export_their_codes(tied, bits, tmp_path) -> None:
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, tie_word_embeddings=tied)).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    stages = [{"method": "rtn", "bits": 4, "group_size": 32}, {"method": "embeddings", "bits": bits, "group_size": 32}]
    compress_(model, Recipe(name="emb", stages=stages), ids, batch_size=4)
    table = model.get_input_embeddings()
    assert quantization_of(table) is not None
    assert (model.lm_head.weight is table.weight) == tied
    graph_path = export_onnx(model, tmp_path / "onnx")
    graph = onnx.load(str(graph_path))
    counts = precision_counts(graph)
    assert counts[f"gather_{bits}bit"] == 1 and "gather_fp32" not in counts
    assert precision_label(counts) == f"int4-emb{bits}"
    assert "matmul_fp32" not in counts  # the head reads codes too: the table's (tied) or its own (untied)
    assert counts["matmul_4bit"] + counts.get("matmul_8bit", 0) == 2 * 7 + 1
    floats = [i for i in graph.graph.initializer if sorted(i.dims) == [64, 256] and i.data_type == TensorProto.FLOAT]
    assert not floats  # no float copy of the table or the head
    # codes of vocabulary-sized weights: one copy when tied (the head reads the table's through a reshape)
    stored = [i for i in graph.graph.initializer if i.dims[:1] == [256] and i.name.endswith((".q4", ".q8"))]
    assert len(stored) == (1 if tied else 2)
    parity = check_parity(model, graph_path, ids[:2, :12], decode_steps=8)
    assert parity.max_abs_diff < 1e-4 and parity.greedy_identical
    # the lookup returns the table PyTorch evaluated, bit for bit: the graph cut after GatherBlockQuantized
    gather = next(n for n in graph.graph.node if n.op_type == "GatherBlockQuantized")
    initializers = {i.name: numpy_helper.to_array(i, base_dir=str(graph_path.parent)) for i in graph.graph.initializer}
    inputs = [helper.make_tensor_value_info(gather.input[1], TensorProto.INT64, [256])]
    outputs = [helper.make_tensor_value_info(gather.output[0], TensorProto.FLOAT, None)]
    weights = [numpy_helper.from_array(initializers[n], n) for n in gather.input if n in initializers]
    lookup = helper.make_graph([gather], "lookup", inputs, outputs, weights)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    session = ort.InferenceSession(helper.make_model(lookup, opset_imports=opsets).SerializeToString(),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    rows = session.run(None, {gather.input[1]: np.arange(256, dtype=np.int64)})[0]
    assert np.array_equal(rows.view(np.uint32), table.weight.detach().numpy().view(np.uint32))


def test_smoothquant_w8a8_runs_its_matmuls_in_int8(tmp_path) -> None:
    """SmoothQuant W8A8: every projection becomes MatMulInteger on the per-token int8 codes the graph computes at run
    time and the int8 weight codes - no float weight left - and computes what PyTorch's W8A8 emulation does."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    stage = {"method": "smoothquant", "alpha": 0.5, "weight_bits": 8, "activation_bits": 8, "targets": [".*_proj"]}
    compress_(model, Recipe(name="sq", stages=[stage]), ids, batch_size=4)
    graph_path = export_onnx(model, tmp_path / "onnx")
    graph = onnx.load(str(graph_path))
    counts = precision_counts(graph)
    assert counts == {"gather_fp32": 1, "matmul_fp32": 1, "matmul_int8": 2 * 7} and precision_label(counts) == "int8"
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    assert not any(name.endswith("_proj.weight") for name in initializers)
    modules = dict(model.named_modules())
    for node in (n for n in graph.graph.node if n.op_type == "MatMulInteger"):
        weight = initializers[node.input[1]]
        layer = modules[node.input[1].removesuffix(".weight.w_int8")]
        qw = quantization_of(layer)
        assert weight.dtype == np.int8 and np.array_equal(weight.T.astype(np.int32), qw.codes.int().numpy() - 128)
        scale = initializers[node.input[1].replace(".w_int8", ".w_scale")]
        # codes times the channel scale: the weight PyTorch evaluates, bit for bit
        assert np.array_equal(weight.T.astype(np.float32) * scale[:, None], layer.weight.detach().numpy())
    parity = check_parity(model, graph_path, ids[:2, :12], decode_steps=8)
    assert parity.max_abs_diff < 1e-4 and parity.greedy_identical
