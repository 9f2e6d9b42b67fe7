"""Quantized linears exported as onnxruntime `MatMulNBits` nodes built from the method's own integer codes.

RTN, GPTQ and AWQ leave every quantized linear with integer codes q, fp16 scales s and integer zero points z per
output row and group of inputs (`llmpress.compress.quant.QuantizedWeight`): the weight PyTorch evaluates is
w = s * (q - z), computed in float32. onnxruntime's `MatMulNBits` (com.microsoft) holds the same three things per
output row and block of `block_size` inputs and de-quantizes them the same way, so the graph carries the codes
as they are - no re-rounding, no second quantizer:

    B            uint8 [N, blocks, block_size * bits / 8]: codes, two 4-bit codes a byte (low nibble first)
    scales       float32 [N * blocks]: the fp16 scales, exactly representable in float32
    zero_points  uint8 [N * ceil(blocks * bits / 8)]: packed like B

How llmpress's grids map onto it, exactly:

- bits: 2, 3 and 4 go in 4-bit containers, 5 to 8 in 8-bit ones (a 3-bit code 0..7 with its zero point is the
  same number in a 4-bit field); onnxruntime's CPU kernels take 4 and 8 bits with uint8 zero points.
- groups: `block_size` must be a power of two >= 16. A group size that is a multiple of 16 is cut into blocks of
  its largest power-of-two divisor (<= 256), each repeating its group's scale and zero point; per-output-channel
  quantization (group_size None) repeats the row's scale over blocks of 128. A ragged last group (576 inputs at
  group size 128) ends in a short last block, which the kernel pads. Group sizes that are not a multiple of 16
  cannot be held and are refused when the recipe is checked (`llmpress.config.QuantStage`).

`accuracy_level` is onnxruntime's: 0 computes in float32 on the de-quantized weights (what `check_parity` compares
with PyTorch: the weights are equal bit for bit, `tests/unit/test_export_packed.py`); 4 quantizes each activation
block to int8 at run time and uses integer dot products, several times faster on CPU at some extra rounding - the
edge bundle's setting, judged on its own in onnxruntime.

Usage: `llmpress.export.template.write_export` calls `pack_matmuls` on every export, so a quantized model's
graph is packed whichever way it was made (traced, stitched or from a template).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from torch import nn

from llmpress.compress.quant import QuantizedWeight, quantization_of

DOMAIN = "com.microsoft"
PER_CHANNEL_BLOCK = 128
MAX_BLOCK = 256


def container_bits(bits: int) -> int:
    """The MatMulNBits field width that holds `bits`-bit codes exactly."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    return 4 if bits <= 4 else 8


def block_size_for(group_size: int | None) -> int:
    """The MatMulNBits block size for a quantization group size (see the module docstring)."""
    if group_size is None:
        return PER_CHANNEL_BLOCK
    if group_size < 16 or group_size % 16:
        raise ValueError(f"group_size {group_size} is not a multiple of 16: MatMulNBits cannot hold it")
    block = 16
    while block * 2 <= MAX_BLOCK and group_size % (block * 2) == 0:
        block *= 2
    return block


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 values < 16, last axis of even length -> half as many bytes, element 2i in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


@dataclass
class PackedWeight:
    """One linear as MatMulNBits inputs and attributes."""

    b: np.ndarray  # uint8 [N, blocks, blob]
    scales: np.ndarray  # float32 [N * blocks]
    zero_points: np.ndarray  # uint8
    k: int
    n: int
    bits: int
    block_size: int

    def dequantize(self) -> np.ndarray:
        """[N, K] float32 as the kernel computes it at accuracy level 0: (q - z) * s."""
        n, blocks, _ = self.b.shape
        if self.bits == 4:
            flat = self.b.reshape(n, -1)
            codes = np.empty((n, flat.shape[1] * 2), np.uint8)
            codes[:, 0::2], codes[:, 1::2] = flat & 15, flat >> 4
            zp = self.zero_points.reshape(n, -1)
            zeros = np.empty((n, zp.shape[1] * 2), np.uint8)
            zeros[:, 0::2], zeros[:, 1::2] = zp & 15, zp >> 4
        else:
            codes, zeros = self.b.reshape(n, -1), self.zero_points.reshape(n, -1)
        zeros = np.repeat(zeros[:, :blocks], self.block_size, axis=1).astype(np.float32)
        scales = np.repeat(self.scales.reshape(n, blocks), self.block_size, axis=1)
        return ((codes.astype(np.float32) - zeros) * scales)[:, : self.k]


def pack(qw: QuantizedWeight) -> PackedWeight:
    """The MatMulNBits form of a quantized [N, K] weight, holding exactly its codes, scales and zero points."""
    n, k = qw.codes.shape
    bits = container_bits(qw.bits)
    block = block_size_for(qw.group_size)
    blocks = -(-k // block)
    group = qw.group_size or k
    # group index of every block (blocks never straddle groups: the block size divides the group size)
    owner = np.minimum(np.arange(blocks) * block // group, qw.scale.shape[1] - 1)
    scales = qw.scale.float().numpy()[:, owner].astype(np.float32)
    zeros = qw.zero.numpy().astype(np.uint8)[:, owner]
    codes = np.zeros((n, blocks * block), np.uint8)
    codes[:, :k] = qw.codes.numpy()
    if bits == 4:
        b = _pack_nibbles(codes).reshape(n, blocks, block // 2)
        padded = np.zeros((n, blocks + blocks % 2), np.uint8)
        padded[:, :blocks] = zeros
        zero_points = _pack_nibbles(padded).reshape(-1)
    else:
        b, zero_points = codes.reshape(n, blocks, block), zeros.reshape(-1)
    return PackedWeight(b, scales.reshape(-1), zero_points, k, n, bits, block)


def pack_matmuls(graph: onnx.ModelProto, sources: dict[str, str], model: nn.Module,
                 accuracy_level: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    """Rewrite, in place, every MatMul whose weight initializer holds a quantized linear's transposed weight into
    a MatMulNBits node; `sources` maps initializer names to the parameter names they hold transposed. Returns the
    new initializers' data by name (their protos are in the graph, without data, for the caller to write)."""
    modules = dict(model.named_modules())
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    arrays: dict[str, np.ndarray] = {}
    packed_inits: set[str] = set()
    for init_name, source in sources.items():
        module = modules.get(source.removesuffix(".weight")) if source.endswith(".weight") else None
        qw = quantization_of(module) if module is not None else None
        users = consumers.get(init_name, [])
        if qw is None or not users or any(u.op_type != "MatMul" or list(u.input)[1:] != [init_name] for u in users):
            continue
        p = pack(qw)
        names = {"b": f"{source}.q{p.bits}", "scales": f"{source}.scales", "zp": f"{source}.zero_points"}
        arrays |= {names["b"]: p.b, names["scales"]: p.scales, names["zp"]: p.zero_points}
        for user in users:
            replacement = onnx.helper.make_node(
                "MatMulNBits", [user.input[0], names["b"], names["scales"], names["zp"]], list(user.output),
                name=user.name, domain=DOMAIN, K=p.k, N=p.n, bits=p.bits, block_size=p.block_size,
                accuracy_level=accuracy_level,
            )  # fmt: skip
            user.CopyFrom(replacement)
        packed_inits.add(init_name)
    if not packed_inits:
        return {}
    kept = [i for i in graph.graph.initializer if i.name not in packed_inits]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    for name, array in arrays.items():
        proto = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        proto.dims.extend(array.shape)
        graph.graph.initializer.append(proto)
    if not any(o.domain == DOMAIN for o in graph.opset_import):
        graph.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return arrays


def set_accuracy_level(graph: onnx.ModelProto, level: int) -> int:
    """Set every MatMulNBits node's accuracy_level; returns how many there are."""
    count = 0
    for node in graph.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
            count += 1
    return count


def precision_counts(graph: onnx.ModelProto) -> dict[str, int]:
    """What the graph's weight matmuls and gathers really hold, by kind: `matmul_fp32` (a float weight, also one
    reached through a Transpose, as a tied head is), `matmul_4bit` / `matmul_8bit` (MatMulNBits), `matmul_int8`
    (MatMulInteger), `gather_fp32` / `gather_4bit` / `gather_8bit` (embedding tables)."""
    weights = {i.name: i.data_type for i in graph.graph.initializer}
    transposed = {n.output[0] for n in graph.graph.node if n.op_type == "Transpose" and n.input[0] in weights}
    counts: Counter[str] = Counter()
    for node in graph.graph.node:
        bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
        if node.op_type == "MatMulNBits":
            counts[f"matmul_{bits}bit"] += 1
        elif node.op_type == "MatMulInteger":
            counts["matmul_int8"] += 1
        elif node.op_type == "MatMul" and any(name in weights or name in transposed for name in node.input):
            counts["matmul_fp32"] += 1
        elif node.op_type == "GatherBlockQuantized":
            counts[f"gather_{bits}bit"] += 1
        elif node.op_type == "Gather" and weights.get(node.input[0]) == onnx.TensorProto.FLOAT:
            counts["gather_fp32"] += 1
    return dict(sorted(counts.items()))


def precision_label(counts: dict[str, int]) -> str:
    """One word for what the weight matmuls hold: fp32, int8, int4 or mixed (4- and 8-bit); `-full` when the
    embedding table is quantized too. Float matmuls left beside quantized ones (a tied head) are in the counts."""
    kinds = {k for k in counts if k in ("matmul_4bit", "matmul_8bit", "matmul_int8")}
    if not kinds:
        return "fp32"
    label = "int4" if kinds == {"matmul_4bit"} else "int8" if "matmul_4bit" not in kinds else "mixed"
    return f"{label}-full" if counts.get("gather_4bit") or counts.get("gather_8bit") else label
