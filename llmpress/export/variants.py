"""Edge variants of the exported graph, made with onnxruntime's own quantizers, and judged like the PyTorch model.

    fp32           the exported KV-cache graph as is
    int8-dynamic   int8 weights per output channel, activations quantized at run time (MatMulInteger):
                   onnxruntime.quantization.quantize_dynamic
    int8-static    QDQ: int8 weights per output channel, and activation scales fixed from calibration windows
                   (onnxruntime.quantization.quantize_static, MinMax). Only the matmuls with a weight are quantized
                   (attention's activation-by-activation products stay fp32). Each calibration window is fed as
                   a decode of its second half on the cache of its first half, so the ranges cover the attention
                   over a past. QDQ is the int8 form TensorRT takes. Static per-tensor activation scales are what
                   LLM outlier channels punish (the SmoothQuant paper's point): measure before shipping it
    int4           block-wise 4-bit weights with one scale per `block_size` inputs, fp32 activations (MatMulNBits):
                   onnxruntime's MatMulNBitsQuantizer, on the matmuls with a weight initializer (a head tied to the
                   embeddings reaches its weight through a transpose, so it and the table stay fp32)
    int4-full      int4, plus the embedding table (GatherBlockQuantized) and a tied head, which gets its own 4-bit
                   copy: the smallest graph, at some perplexity (the head is quantized too)

Every variant keeps the graph's interface (inputs, outputs, KV cache), so `llmpress.export.generate` runs them all,
and `ort_perplexity` scores them on the held-out text with the pinned protocol of `llmpress.evaluate.perplexity`:
the gate judges what ships. `describe` counts what each variant converted.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmpress.config import EvalParams
from llmpress.errors import LlmpressError
from llmpress.evaluate.perplexity import PerplexityResult, make_windows, window_nll
from llmpress.export.generate import OrtGenerator, onnx_session

VARIANTS = ("fp32", "int8-dynamic", "int8-static", "int4", "int4-full")
BIG = 2**31 - 2**26  # protobuf's 2 GB limit, with margin: above it weights go to external data


def make_variant(graph: str | Path, out_dir: str | Path, kind: str, block_size: int = 32,
                 calibration_ids: np.ndarray | None = None) -> Path:  # fmt: skip
    """Write variant `kind` of `graph` (a model.onnx from `export_onnx`) as `out_dir/model.onnx`;
    int8-static needs `calibration_ids` [windows, tokens]."""
    import onnx

    graph, out_dir = Path(graph), Path(out_dir)
    if kind not in VARIANTS:
        raise LlmpressError(f"unknown ONNX variant {kind!r}; choose one of {', '.join(VARIANTS)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise LlmpressError(f"int4 block_size must be a power of two >= 16, got {block_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    external = sum(f.stat().st_size for f in graph.parent.iterdir() if f.is_file()) >= BIG
    if kind == "fp32":
        for item in graph.parent.iterdir():
            if item.is_file():
                shutil.copy2(item, out_dir / item.name)
    elif kind == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(graph), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], use_external_data_format=external)  # fmt: skip
    elif kind == "int8-static":
        from onnxruntime.quantization import QuantFormat, quantize_static

        if calibration_ids is None or len(calibration_ids) == 0 or np.asarray(calibration_ids).shape[1] < 4:
            raise LlmpressError("int8-static needs calibration windows of at least 4 tokens (calibration_ids)")
        model = onnx.load(str(graph), load_external_data=False)
        weights = {i.name for i in model.graph.initializer}
        matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
        quantize_static(str(graph), str(out), _CalibrationFeeds(graph, np.asarray(calibration_ids)),
                        quant_format=QuantFormat.QDQ, nodes_to_quantize=matmuls, per_channel=True,
                        use_external_data_format=external)  # fmt: skip
    else:
        import logging

        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load(str(graph))
        ops: tuple[str, ...] = ("MatMul",)
        if kind == "int4-full":
            model, ops = _fold_weight_transposes(model), ("MatMul", "Gather")
        quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # it logs every node at INFO, and warns that int4 Gather needs opset 21
        try:
            quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, accuracy_level=4,
                                             op_types_to_quantize=ops,
                                             quant_axes=(("MatMul", 0), ("Gather", 1)))  # fmt: skip
            quantizer.process()
        finally:
            quiet.setLevel(level)
        quantizer.model.save_model_to_file(str(out), external)
    return out


def describe(path: str | Path) -> dict[str, Any]:
    """Bytes on disk (graph and external data) and the matmul kinds in the graph."""
    import onnx

    path = Path(path)
    ops = Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    return {
        "bytes": sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file()),
        "matmul": ops.get("MatMul", 0),
        "matmul_int8": ops.get("MatMulInteger", 0),
        "matmul_4bit": ops.get("MatMulNBits", 0),
        "gather_4bit": ops.get("GatherBlockQuantized", 0),
    }


def ort_perplexity(onnx_path: str | Path, tokenizer, text: str, params: EvalParams,
                   threads: int | None = None) -> PerplexityResult:  # fmt: skip
    """Perplexity of an exported graph in onnxruntime, under the same protocol as the PyTorch model."""
    generator = OrtGenerator(onnx_session(onnx_path, threads))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = make_windows(ids, params, tokenizer.bos_token_id)

    def logits_fn(batch: torch.Tensor) -> torch.Tensor:
        tokens = batch.numpy()
        logits, _ = generator.forward(tokens, np.ones_like(tokens), generator.empty_cache(tokens.shape[0]))
        return torch.from_numpy(logits)

    nll, count = window_nll(logits_fn, windows, params.batch_size)
    if count == 0:
        raise LlmpressError("the evaluation text is too short: no token could be scored")
    return PerplexityResult(perplexity=math.exp(nll / count), nll=nll, tokens=count, windows=len(windows))


class _CalibrationFeeds:
    """onnxruntime's CalibrationDataReader protocol: one feed per window, its second half decoded on the cache of
    its first half (computed by the fp32 graph)."""

    def __init__(self, graph: Path, windows: np.ndarray) -> None:
        self.generator = OrtGenerator(onnx_session(graph))
        self.windows = iter(windows.astype(np.int64))

    def get_next(self) -> dict[str, np.ndarray] | None:
        window = next(self.windows, None)
        if window is None:
            return None
        half = len(window) // 2
        ids = window[None]
        _, cache = self.generator.forward(ids[:, :half], np.ones((1, half), dtype=np.int64),
                                          self.generator.empty_cache(1))  # fmt: skip
        positions = np.arange(half, len(window), dtype=np.int64)[None]
        return {"input_ids": ids[:, half:], "attention_mask": np.ones_like(ids), "position_ids": positions, **cache}


def _fold_weight_transposes(model: Any) -> Any:
    """Replace every Transpose of a weight initializer by the transposed initializer.

    A tied lm_head reaches the embedding matrix through such a Transpose, which hides it from MatMulNBits; folded,
    the head gets its own 4-bit copy, and the embedding's Gather is quantized too (GatherBlockQuantized).
    """
    from onnx import numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in weights:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = numpy_helper.to_array(weights[node.input[0]])
            folded = array.transpose(perm) if perm else array.T
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(folded), node.output[0]))
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return model
