"""The TensorRT path: decide how to build an engine from the exported graph, build it where TensorRT is installed,
and otherwise say why not while keeping the graph TensorRT-ready.

`plan_engine` makes every decision without TensorRT, so the decisions are unit-tested anywhere:

- the graph must be TensorRT-ready (`check_ready`): it passes the ONNX checker and shape inference, its opset is
  one TensorRT 10 parses (9-20), and every node is a standard-domain op TensorRT's ONNX parser supports. Custom
  onnxruntime ops (MatMulNBits, DynamicQuantizeLinear/MatMulInteger from the int8-dynamic variant) are not: TensorRT
  takes int8 as Q/DQ nodes (a static QDQ graph), not as onnxruntime's dynamic ops;
- fp16 always (the weights are fp32; TensorRT picks fp16 kernels where faster, fp32 where needed);
- int8 only with a calibration cache (TensorRT computes no activation ranges of its own);
- the sparse-weights flag when every MatMul weight of the decoder follows the 2:4 pattern, so TensorRT may pick
  its structured-sparsity kernels (Ampere and later);
- optimisation profiles for the dynamic axes: batch 1..max_batch, new tokens 1..max_tokens, past 0..max_tokens.

`build_engine` needs the `tensorrt` package and a GPU; `tensorrt_status` tells whether this worker has them, and the
pipeline records that reason in the run instead of pretending to build.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmpress.errors import LlmpressError

MIN_OPSET, MAX_OPSET = 9, 20  # TensorRT 10's ONNX parser
# Standard ONNX ops TensorRT's parser supports (onnx-tensorrt operators.md), restricted to what LLM graphs use.
SUPPORTED_OPS = frozenset({
    "Abs", "Add", "And", "ArgMax", "Cast", "Ceil", "Clip", "Concat", "Constant", "ConstantOfShape", "Cos", "CumSum",
    "DequantizeLinear", "Div", "Einsum", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather",
    "GatherElements", "GatherND", "Gelu", "Gemm", "Greater", "GreaterOrEqual", "Identity", "If", "IsInf", "IsNaN",
    "LayerNormalization", "Less", "LessOrEqual", "Log", "MatMul", "Max", "Mean", "Min", "Mod", "Mul", "Neg", "Not",
    "Or", "Pad", "Pow", "QuantizeLinear", "Range", "Reciprocal", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "Relu", "Reshape", "Resize", "ScatterElements", "ScatterND", "Shape", "Sigmoid", "Sign",
    "Sin", "Size", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Tile", "TopK", "Transpose",
    "Trilu", "Unsqueeze", "Where", "Xor",
})  # fmt: skip


@dataclass
class Readiness:
    ready: bool
    opset: int
    problems: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)


@dataclass
class EnginePlan:
    """What `build_engine` would do, and whether it can."""

    buildable: bool
    reason: str  # why not, or "ready"
    fp16: bool = True
    int8: bool = False
    sparse_weights: bool = False
    profile: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # axis: (min, opt, max)
    readiness: Readiness | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tensorrt_status() -> tuple[bool, str]:
    """(available, why not): the `tensorrt` package and a CUDA GPU on this worker."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed on this worker"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "tensorrt is installed but no CUDA GPU is visible"
    except ImportError:
        pass
    return True, "ready"


def check_ready(onnx_path: str | Path) -> Readiness:
    """The ONNX checker, shape inference, opset range and op support of a graph, for TensorRT's ONNX parser."""
    import onnx

    path = Path(onnx_path)
    problems: list[str] = []
    try:
        onnx.checker.check_model(str(path))  # by path: works for graphs with external data over 2 GB
    except onnx.checker.ValidationError as exc:
        problems.append(f"ONNX checker: {str(exc).splitlines()[0]}")
    model = onnx.load(str(path), load_external_data=False)
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:  # onnx raises several types here; any of them means TensorRT would stumble too
        problems.append(f"shape inference: {str(exc).splitlines()[0]}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        problems.append(f"opset {opset} is outside what TensorRT parses ({MIN_OPSET}-{MAX_OPSET})")
    ops = Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node
    )
    unsupported = sorted(op for op in ops if op not in SUPPORTED_OPS)
    if unsupported:
        problems.append(f"ops TensorRT's parser does not take: {', '.join(unsupported)}")
    return Readiness(ready=not problems, opset=opset, problems=problems, ops=dict(ops))


def is_2of4(weight: np.ndarray) -> bool:
    """True if every group of 4 consecutive inputs of every output has at least 2 zeros ([out, in] or [in, out])."""
    for w in (weight, weight.T):
        if w.ndim == 2 and w.shape[1] % 4 == 0 and ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all():
            return True
    return False


def matmul_weights_2of4(onnx_path: str | Path) -> bool:
    """True if every 2-D MatMul weight initializer of the graph is 2:4 sparse (and there is at least one)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {i.name: i for i in model.graph.initializer}
    weights = [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    weights = [w for w in weights if len(w.dims) == 2]
    return bool(weights) and all(is_2of4(numpy_helper.to_array(w)) for w in weights)


def plan_engine(onnx_path: str | Path, *, calibration_cache: str | Path | None = None, max_batch: int = 4,
                max_tokens: int = 2048, status: tuple[bool, str] | None = None) -> EnginePlan:  # fmt: skip
    """Every decision for building a TensorRT engine from `onnx_path`, and whether this worker can build it."""
    readiness = check_ready(onnx_path)
    available, why = status if status is not None else tensorrt_status()
    profile = {"batch": (1, 1, max_batch), "new_tokens": (1, 1, max_tokens), "past": (0, max_tokens // 2, max_tokens)}
    plan = EnginePlan(buildable=False, reason="ready", profile=profile, readiness=readiness)
    plan.int8 = calibration_cache is not None and Path(calibration_cache).is_file()
    plan.sparse_weights = matmul_weights_2of4(onnx_path)
    if not readiness.ready:
        plan.reason = "the graph is not TensorRT-ready: " + "; ".join(readiness.problems)
    elif not available:
        plan.reason = why
    else:
        plan.buildable = True
    return plan


def build_engine(onnx_path: str | Path, plan: EnginePlan, out_path: str | Path) -> Path:  # pragma: no cover - GPU
    """Build and serialise the engine `plan` describes (needs tensorrt and a GPU; see `plan.reason` otherwise)."""
    if not plan.buildable:
        raise LlmpressError(f"no TensorRT engine: {plan.reason}")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LlmpressError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if plan.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.int8:
        config.set_flag(trt.BuilderFlag.INT8)
    if plan.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    batch, new, past = plan.profile["batch"], plan.profile["new_tokens"], plan.profile["past"]
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        dims = [[d] * 3 for d in shape]
        dims[0] = list(batch)
        if tensor.name in ("input_ids", "position_ids"):
            dims[1] = list(new)
        elif tensor.name == "attention_mask":
            dims[1] = [new[0] + past[0], new[1] + past[1], new[2] + past[2]]
        elif tensor.name.startswith("past_key_values."):
            dims[2] = list(past)
        profile.set_shape(tensor.name, *(tuple(d[k] for d in dims) for k in range(3)))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise LlmpressError("TensorRT failed to build the engine (see its log above)")
    out = Path(out_path)
    out.write_bytes(bytes(engine))
    return out
