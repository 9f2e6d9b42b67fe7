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
from llmpress.compress.quant import quantization_of, quantize_rtn
from llmpress.config import Recipe, RTNStage
from llmpress.export.onnx import check_parity, export_onnx
from llmpress.export.packed import block_size_for, pack, precision_counts, precision_label


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


COMBINATIONS = [(bits, group, symmetric) for bits in range(2, 9) for group in (None, 16, 32, 48, 64, 128, 256)
                for symmetric in (False, True)]  # fmt: skip


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), COMBINATIONS)
def test_onnxruntime_dequantizes_the_codes_to_the_evaluated_weights(bits, group_size, symmetric) -> None:
    torch.manual_seed(bits * 1000 + (group_size or 0) + symmetric)
    weight = torch.randn(24, 200) * torch.rand(24, 1) * 0.1  # 200 inputs: ragged last groups at most sizes
    weight[3] = 0.0  # an all-zero row
    weight[5, :40] = weight[5, :40].abs()  # an all-positive stretch
    qw = quantize_rtn(weight, bits, group_size, symmetric)
    packed = pack(qw)
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=packed.k,
                            N=packed.n, bits=packed.bits, block_size=packed.block_size)  # fmt: skip
    inits = {"B": packed.b, "S": packed.scales, "Z": packed.zero_points}
    evaluated = qw.dequantize(torch.float32).numpy()
    assert np.array_equal(_ort_weight(node, inits, 200).view(np.uint32), evaluated.view(np.uint32))
    assert np.array_equal(packed.dequantize().view(np.uint32), evaluated.view(np.uint32))
    # codes stored at their width: 4-bit containers for <= 4 bits, two codes a byte
    assert packed.bits == (4 if bits <= 4 else 8)
    assert packed.b.nbytes == 24 * -(-200 // packed.block_size) * packed.block_size * packed.bits // 8


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


METHODS = [("rtn", {"bits": 4, "group_size": 32}), ("gptq", {"bits": 3, "group_size": 48, "act_order": True}),
           ("awq", {"bits": 4, "group_size": 32, "grid": 4}),
           ("rtn", {"bits": 8, "group_size": None, "symmetric": True})]  # fmt: skip


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
        assert np.array_equal(_ort_weight(node, initializers, k), layer.weight.detach().numpy()), node.name
    parity = check_parity(model, graph_path, ids[:2, :12], decode_steps=8)
    assert parity.max_abs_diff < 1e-4 and parity.greedy_identical
