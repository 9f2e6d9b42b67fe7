"""An export is a traced graph template plus weights: the template is traced once per architecture and reused,
and a reused template gives a graph that matches its own model as a traced one does."""

from __future__ import annotations

import copy
import logging

import numpy as np
import onnx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llmpress.export.onnx as export
from llmpress.compress.quant import install_act_quant
from llmpress.export.generate import OrtGenerator, onnx_session
from llmpress.export.onnx import check_parity, export_onnx
from llmpress.export.template import ALIGN, BINDINGS

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)  # fmt: skip


def tiny(seed: int, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**(CONFIG | overrides))).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # confident logits: greedy choices are no ties
    return model


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("cache")
    model = tiny(0)
    graph = export_onnx(model, tmp_path_factory.mktemp("a"), cache_dir=cache)
    return {"cache": cache, "model": model, "graph": graph}


def test_template_is_reused_for_another_model_of_the_architecture(first, tmp_path, monkeypatch) -> None:
    assert len(list(first["cache"].glob(f"*/{BINDINGS}"))) == 1
    other = copy.deepcopy(first["model"])
    with torch.no_grad():  # other weights, same architecture: what pruning or weight quantization gives
        for p in other.parameters():
            p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(2)) > 0.5)

    def no_tracing(*_args, **_kwargs):
        raise AssertionError("traced although a template of this architecture was kept")

    monkeypatch.setattr(export, "trace_template", no_tracing)
    graph = export_onnx(other, tmp_path / "b", cache_dir=first["cache"])
    parity = check_parity(other, graph, IDS, decode_steps=8)
    assert parity.max_abs_diff < 1e-4 and parity.greedy_identical
    # Same graph, other weights.
    a, b = onnx.load(str(first["graph"]), load_external_data=False), onnx.load(str(graph), load_external_data=False)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert (first["graph"].parent / "model.onnx.data").read_bytes() != (graph.parent / "model.onnx.data").read_bytes()
    assert check_parity(first["model"], first["graph"], IDS, decode_steps=8).max_abs_diff < 1e-4


def test_weights_are_external_aligned_and_matmuls_read_them_directly(first) -> None:
    model = onnx.load(str(first["graph"]), load_external_data=False)
    weights = {i.name: i for i in model.graph.initializer}
    matmul_weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert len(matmul_weights) == 2 * 7 + 1  # every projection of both blocks and the (untied) head
    assert all(name.endswith(".weight.T") for name in matmul_weights)
    for init in weights.values():
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            assert info["location"] == "model.onnx.data"
            assert int(info["length"]) < ALIGN or int(info["offset"]) % ALIGN == 0


def test_tied_embedding_is_stored_once(tmp_path) -> None:
    model = tiny(3, tie_word_embeddings=True)
    graph = export_onnx(model, tmp_path / "tied", cache_dir=tmp_path / "cache")
    proto = onnx.load(str(graph), load_external_data=False)
    shapes = [sorted(i.dims) for i in proto.graph.initializer]
    assert shapes.count([64, 256]) == 1  # read by the Gather and, through a Transpose, by the head
    assert check_parity(model, graph, IDS, decode_steps=4).max_abs_diff < 1e-4


def test_models_the_key_cannot_describe_are_traced_every_time(tmp_path) -> None:
    model = tiny(4)
    install_act_quant(model.model.layers[0].mlp.down_proj, bits=8)  # activation rounding by a forward hook
    graph = export_onnx(model, tmp_path / "hooked", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob(f"*/{BINDINGS}"))
    assert check_parity(model, graph, IDS, decode_steps=4).greedy_identical


def test_another_architecture_or_a_damaged_template_is_traced_again(first, tmp_path) -> None:
    deeper = tiny(5, num_hidden_layers=3)
    graph = export_onnx(deeper, tmp_path / "deeper", cache_dir=first["cache"])
    assert check_parity(deeper, graph, IDS, decode_steps=4).max_abs_diff < 1e-4
    assert len(list(first["cache"].glob(f"*/{BINDINGS}"))) == 2
    for template in first["cache"].glob("*/template.onnx"):
        template.write_bytes(b"damaged")
    again = export_onnx(tiny(6), tmp_path / "again", cache_dir=first["cache"])
    assert check_parity(tiny(6), again, IDS, decode_steps=4).max_abs_diff < 1e-4


def test_deep_graph_stitched_from_two_traced_blocks_equals_the_traced_one(tmp_path, monkeypatch, caplog) -> None:
    model = tiny(7, num_hidden_layers=3)
    with caplog.at_level(logging.INFO, logger="llmpress.export.onnx"):
        stitched = export_onnx(model, tmp_path / "stitched")
    assert "stitched from 2 traced blocks to 3" in caplog.text
    monkeypatch.setattr(export, "uniform", lambda _model: False)  # trace every block
    traced = export_onnx(model, tmp_path / "traced")
    a, b = (OrtGenerator(onnx_session(path, threads=1)) for path in (stitched, traced))
    ids = IDS.numpy()
    mask = np.ones_like(ids)
    (logits_a, cache_a), (logits_b, cache_b) = (g.forward(ids, mask, g.empty_cache(2)) for g in (a, b))
    assert np.array_equal(logits_a, logits_b)  # the same computation, op for op
    assert all(np.array_equal(cache_a[k], cache_b[k]) for k in cache_b)
    parity = check_parity(model, stitched, IDS, decode_steps=8)
    assert parity.max_abs_diff < 1e-4 and parity.greedy_identical
    graph = onnx.load(str(stitched), load_external_data=False).graph
    caches = [f"{i}.{kind}" for i in range(3) for kind in ("key", "value")]
    assert [i.name for i in graph.input][3:] == [f"past_key_values.{c}" for c in caches]
    assert [o.name for o in graph.output] == ["logits"] + [f"present.{c}" for c in caches]


def test_blocks_that_differ_are_traced_whole(tmp_path, caplog) -> None:
    """Blocks of different widths (structured pruning) are not stitched; a block whose behaviour differs in a way
    its structure does not show (here a hook on block 2, not traced; not the last, whose scale the final norm
    would hide) fails the stitched graph's check and is traced whole."""
    model = tiny(8, num_hidden_layers=4)
    model.model.layers[2].register_forward_hook(lambda _m, _args, out: (out[0] * 0.5, *out[1:]) if isinstance(
        out, tuple) else out * 0.5)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="llmpress.export.onnx"):
        graph = export_onnx(model, tmp_path / "hooked")
    assert "does not match the model: tracing every block" in caplog.text and "graph traced" in caplog.text
    assert check_parity(model, graph, IDS, decode_steps=4).max_abs_diff < 1e-4
    narrow = tiny(9, num_hidden_layers=3)
    narrow.model.layers[1].mlp = type(narrow.model.layers[1].mlp)(LlamaConfig(**(CONFIG | {"intermediate_size": 64})))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llmpress.export.onnx"):
        graph = export_onnx(narrow, tmp_path / "narrow")
    assert "graph traced" in caplog.text and "stitched" not in caplog.text
    assert check_parity(narrow, graph, IDS, decode_steps=4).max_abs_diff < 1e-4
