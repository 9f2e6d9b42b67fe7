"""The TensorRT path's decisions, made without TensorRT: readiness of our graphs, precision and sparsity flags,
and a clear reason when no engine can be built here."""

from __future__ import annotations

import numpy as np
import pytest

from llmpress.errors import LlmpressError
from llmpress.export.tensorrt import build_engine, check_ready, is_2of4, plan_engine, tensorrt_status
from llmpress.export.variants import make_variant


def test_exported_graph_is_tensorrt_ready(tiny_onnx) -> None:
    readiness = check_ready(tiny_onnx[1] / "model.onnx")
    assert readiness.ready, readiness.problems
    assert readiness.opset == 18 and readiness.ops["MatMul"] >= 14


@pytest.mark.parametrize(("kind", "op"), [("int4", "com.microsoft::MatMulNBits"), ("int8-dynamic", "MatMulInteger")])
def test_onnxruntime_only_variants_are_not(tiny_onnx, tmp_path, kind, op) -> None:
    path = make_variant(tiny_onnx[1] / "model.onnx", tmp_path, kind)
    readiness = check_ready(path)
    assert not readiness.ready and op in readiness.problems[-1]
    plan = plan_engine(path, status=(True, "ready"))
    assert not plan.buildable and "not TensorRT-ready" in plan.reason and op in plan.reason


def test_without_tensorrt_the_plan_says_why(tiny_onnx) -> None:
    plan = plan_engine(tiny_onnx[1] / "model.onnx", status=(False, "the tensorrt package is not installed"))
    assert not plan.buildable and plan.reason == "the tensorrt package is not installed"
    with pytest.raises(LlmpressError, match="no TensorRT engine: the tensorrt package is not installed"):
        build_engine(tiny_onnx[1] / "model.onnx", plan, "engine.plan")
    available, why = tensorrt_status()  # on CI: no tensorrt (the reason is recorded, nothing is faked)
    assert available or why


def test_flags_follow_calibration_and_sparsity(tiny_onnx, tmp_path) -> None:
    graph = tiny_onnx[1] / "model.onnx"
    dense = plan_engine(graph, status=(True, "ready"))
    assert dense.buildable and dense.fp16 and not dense.int8 and not dense.sparse_weights
    cache = tmp_path / "calibration.cache"
    cache.write_bytes(b"TRT-calibration")
    assert plan_engine(graph, calibration_cache=cache, status=(True, "ready")).int8
    assert not plan_engine(graph, calibration_cache=tmp_path / "missing", status=(True, "ready")).int8
    assert dense.profile["past"][0] == 0 and dense.profile["batch"] == (1, 1, 4)


def test_2of4_detection_and_a_sparse_graph_gets_the_flag(tmp_path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    w24 = w.copy().reshape(8, 4, 4)
    w24[..., :2] = 0
    w24 = w24.reshape(8, 16)
    assert is_2of4(w24) and is_2of4(w24.T.copy().T) and not is_2of4(w)
    for weight, expected in ((w24, True), (w, False)):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
            [numpy_helper.from_array(weight.T.copy(), "w")],
        )  # fmt: skip
        path = tmp_path / f"g{expected}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
        assert plan_engine(path, status=(True, "ready")).sparse_weights is expected
