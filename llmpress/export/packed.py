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
- offset "min" (w = s * q + m, llama.cpp's Q4_1 layout, `quant.fit_min_grid`): MatMulNBits holds s and q with
  zero points 0, and the minimums are added after the product as x m^T = sum over blocks of m times the block's
  sum of x (Reshape, ReduceSum, a [blocks, N] MatMul, Add) - what llama.cpp's Q4_1 dot product computes. Needs
  whole blocks (in_features a multiple of the block size); otherwise the layer stays float32, with a warning.
- groups: `block_size` must be a power of two >= 16. A group size that is a multiple of 16 is cut into blocks of
  its largest power-of-two divisor (<= 256), each repeating its group's scale and zero point; per-output-channel
  quantization (group_size None) repeats the row's scale over blocks of 128. A ragged last group (576 inputs at
  group size 128) ends in a short last block, which the kernel pads. Group sizes that are not a multiple of 16
  cannot be held and are refused when the recipe is checked (`llmpress.config.QuantStage`).

`accuracy_level` is onnxruntime's: 0 computes in float32 on the de-quantized weights (what `check_parity` compares
with PyTorch: the weights are equal bit for bit, `tests/unit/test_export_packed.py`); 4 quantizes each activation
block to int8 at run time and uses integer dot products, several times faster on CPU at some extra rounding - the
edge bundle's setting, judged on its own in onnxruntime.

W8A8 (SmoothQuant: 8-bit symmetric weights per output channel, inputs quantized per token at run time,
`quant.install_act_quant`): the traced graph already computes each token's codes round(x / s) clamped to int8
and its scale s, as PyTorch does; the matmul becomes `MatMulInteger` of those codes (Cast to int8) with the weight
codes q - 128 (int8 [K, N]), exact in int32, then times s per token and the weight scale per channel. The
smoothing itself is folded into the RMSNorm weights before export. Where the input is anything else, the layer
falls back to an 8-bit MatMulNBits.

Usage: `llmpress.export.template.write_export` calls `pack_matmuls` on every export, so a quantized model's
graph is packed whichever way it was made (traced, stitched or from a template).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch import nn

from llmpress.compress.quant import QuantizedWeight, quantization_of

log = logging.getLogger(__name__)

DOMAIN = "com.microsoft"
PER_CHANNEL_BLOCK = 128
MIN_SUFFIX = ".minimum"  # an offset-"min" layer's minimums, [blocks, N] (fp16; "...minimum32" cast to float32)
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
    minimum: np.ndarray | None = None  # float32 [N, blocks]: offset "min" (zero points are then 0)

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
        weight = (codes.astype(np.float32) - zeros) * scales
        if self.minimum is not None:  # the graph adds the minimums through block sums, after the product
            weight = weight + np.repeat(self.minimum, self.block_size, axis=1)
        return weight[:, : self.k]


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
    minimum = None if qw.minimum is None else qw.minimum.float().numpy()[:, owner].astype(np.float32)
    return PackedWeight(b, scales.reshape(-1), zero_points, k, n, bits, block, minimum)


def _consumers(graph: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _matmul_nbits(user: onnx.NodeProto, inputs: list[str], p: PackedWeight, accuracy_level: int) -> onnx.NodeProto:
    return onnx.helper.make_node("MatMulNBits", [user.input[0], *inputs], list(user.output), name=user.name,
                                 domain=DOMAIN, K=p.k, N=p.n, bits=p.bits, block_size=p.block_size,
                                 accuracy_level=accuracy_level)  # fmt: skip


def _w8a8_weight(qw: QuantizedWeight) -> bool:
    """8-bit, symmetric (zero point 128, so code - 128 is an int8), one scale per output channel: what an int8
    matmul followed by a per-channel rescale computes exactly."""
    return qw.bits == 8 and qw.symmetric and qw.group_size is None and qw.minimum is None


def _per_token_codes(matmul: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> tuple[str, str] | None:
    """(integer-valued codes, per-token scale) when the MatMul's input is the traced per-token fake quantization
    `clamp(round(x / s), -128, 127) * s` (`quant.fake_quantize_per_token`): Mul(clamped, s) over Min/Max or Clip over
    Round over Div(x, s) with the same s. None when it is anything else."""
    mul = producers.get(matmul.input[0])
    if mul is None or mul.op_type != "Mul":
        return None
    for codes, scale in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        node = producers.get(codes)
        while node is not None and node.op_type in ("Min", "Max", "Clip"):
            node = producers.get(node.input[0])
        if node is None or node.op_type != "Round":
            continue
        div = producers.get(node.input[0])
        if div is not None and div.op_type == "Div" and div.input[1] == scale:
            return codes, scale
    return None


def pack_matmuls(graph: onnx.ModelProto, bindings: dict[str, tuple[str, bool]], model: nn.Module,
                 accuracy_level: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    """Rewrite `graph` in place so that every quantized weight of `model` is held as its codes:

    - a MatMul reading a quantized linear's transposed weight becomes MatMulNBits; for a W8A8 linear (8-bit
      symmetric per-channel weights, inputs quantized per token, SmoothQuant's) it becomes MatMulInteger on the
      activation codes the graph computes at run time and the weight codes, rescaled per token and per channel;
    - a Gather reading a quantized embedding table becomes GatherBlockQuantized, and a head tied to that table
      (a MatMul reading the table through a Transpose) becomes MatMulNBits on the same codes, reshaped (one
      copy on disk; onnxruntime folds the reshape when it loads the graph).

    `bindings` maps initializer names to (parameter name, held transposed). Returns the new initializers' data by
    name; their protos are in the graph without data, for the caller to write."""
    modules = dict(model.named_modules())
    consumers = _consumers(graph)
    arrays: dict[str, np.ndarray] = {}
    replaced: set[str] = set()
    new_nodes: list[onnx.NodeProto] = []
    shape_inits: list[onnx.TensorProto] = []  # small, kept in the graph: shape inference reads them
    dropped: set[str] = set()
    follow: dict[str, list[onnx.NodeProto]] = {}  # nodes to place right after the node making this output
    producers = {o: n for n in graph.graph.node for o in n.output}

    # by tensor, not by name: a tied head's weight is the table's, and the graph may bind it under either name
    parameters = dict(model.named_parameters(remove_duplicate=False))
    codes = {id(m.weight): quantization_of(m) for m in modules.values() if quantization_of(m) is not None}

    def quantized(source: str) -> QuantizedWeight | None:
        return codes.get(id(parameters[source])) if source in parameters else None

    for init_name, (source, transposed) in bindings.items():
        qw = quantized(source)
        users = consumers.get(init_name, [])
        if qw is None or not users:
            continue
        if transposed:  # a linear's weight, [in, out] as MatMul reads it
            if any(u.op_type != "MatMul" or list(u.input)[1:] != [init_name] for u in users):
                continue
            layer = modules.get(source.removesuffix(".weight"))
            if getattr(layer, "llmpress_act_bits", None) == 8 and _w8a8_weight(qw):
                chains = [_per_token_codes(user, producers) for user in users]
                if all(chains):  # W8A8: int8 activations times int8 weights, in integers
                    weight, scale = f"{source}.w_int8", f"{source}.w_scale"
                    arrays[weight] = (qw.codes.to(torch.int16) - qw.zero.to(torch.int16)).T.numpy().astype(np.int8)
                    arrays[scale] = qw.scale.float()[:, 0].numpy()
                    for user, (act_codes, token_scale) in zip(users, chains, strict=True):
                        stem, output = user.name or user.output[0], user.output[0]
                        to_float = onnx.TensorProto.FLOAT
                        follow[f"{stem}.int32"] = [
                            onnx.helper.make_node("Cast", [f"{stem}.int32"], [f"{stem}.float"], to=to_float),
                            onnx.helper.make_node("Mul", [f"{stem}.float", token_scale], [f"{stem}.per_token"]),
                            onnx.helper.make_node("Mul", [f"{stem}.per_token", scale], [output]),
                        ]  # fmt: skip
                        name = user.name or f"{stem}.matmul"
                        user.CopyFrom(onnx.helper.make_node("MatMulInteger", [f"{stem}.codes", weight],
                                                            [f"{stem}.int32"], name=name))  # fmt: skip
                        follow.setdefault(act_codes, []).append(
                            onnx.helper.make_node("Cast", [act_codes], [f"{stem}.codes"], to=onnx.TensorProto.INT8)
                        )
                    replaced.add(init_name)
                    continue
            p = pack(qw)
            if p.minimum is not None and p.k % p.block_size:
                log.warning("%s: offset 'min' with a ragged last group is exported in float32", source)
                continue
            names = [f"{source}.q{p.bits}", f"{source}.scales", f"{source}.zero_points"]
            arrays |= dict(zip(names, (p.b, p.scales, p.zero_points), strict=True))
            for user in users:
                output = user.output[0]
                if p.minimum is None:
                    user.CopyFrom(_matmul_nbits(user, names, p, accuracy_level))
                    continue
                # w = s q + m: MatMulNBits computes x (s q)^T, and x m^T is the sum over blocks of m times the sum
                # of x over the block (llama.cpp's Q4_1 dot product does the same): a small extra matmul.
                blocks = p.k // p.block_size
                minimum, sums_shape, axes = f"{source}{MIN_SUFFIX}", f"{source}.block_shape", f"{source}.block_axes"
                # fp16 on disk (the minimums are fp16 values), float32 in the session: onnxruntime folds the Cast
                arrays[minimum] = np.ascontiguousarray(p.minimum.T).astype(np.float16)  # [blocks, N]
                shape_inits.append(onnx.numpy_helper.from_array(np.array([0, 0, blocks, p.block_size], np.int64),
                                                                sums_shape))  # fmt: skip
                shape_inits.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), axes))
                stem = f"{user.name or output}.offset"
                product = f"{stem}.product"
                follow[product] = [
                    onnx.helper.make_node("Reshape", [user.input[0], sums_shape], [f"{stem}.blocks"]),
                    onnx.helper.make_node("ReduceSum", [f"{stem}.blocks", axes], [f"{stem}.sums"], keepdims=0),
                    onnx.helper.make_node("Cast", [minimum], [f"{stem}{MIN_SUFFIX}32"], to=onnx.TensorProto.FLOAT),
                    onnx.helper.make_node("MatMul", [f"{stem}.sums", f"{stem}{MIN_SUFFIX}32"], [f"{stem}.offset"]),
                    onnx.helper.make_node("Add", [product, f"{stem}.offset"], [output]),
                ]  # fmt: skip
                user.CopyFrom(_matmul_nbits(user, names, p, accuracy_level))
                del user.output[:]
                user.output.append(product)
            replaced.add(init_name)
            continue
        # an embedding table [vocab, hidden]: looked up by Gather, maybe read by a tied head through a Transpose
        if qw.minimum is not None:
            continue  # GatherBlockQuantized has integer zero points only (the embeddings stage uses those)
        gathers = [u for u in users if u.op_type == "Gather" and u.input[0] == init_name]
        transposes = [u for u in users if u.op_type == "Transpose" and u.input[0] == init_name]
        if len(gathers) + len(transposes) != len(users) or not gathers:
            continue
        heads = [c for t in transposes for c in consumers.get(t.output[0], [])]
        if any(h.op_type != "MatMul" or list(h.input)[1:] != [t.output[0]] for t in transposes
               for h in consumers.get(t.output[0], [])):  # fmt: skip
            continue
        if any(a.name == "axis" and a.i != 0 for g in gathers for a in g.attribute):
            continue
        p = pack(qw)
        if p.k % p.block_size or (p.k * p.bits) % 8:
            continue  # the lookup's rows and the head's blocks would not share one layout
        vocab, blocks = p.n, p.k // p.block_size
        names = {"data": f"{source}.q{p.bits}", "scales": f"{source}.scales", "zp": f"{source}.zero_points"}
        arrays[names["data"]] = p.b.reshape(vocab, p.k * p.bits // 8)
        arrays[names["scales"]] = p.scales.reshape(vocab, blocks)
        arrays[names["zp"]] = p.zero_points.reshape(vocab, -1)
        for gather in gathers:
            gather.CopyFrom(onnx.helper.make_node(
                "GatherBlockQuantized", [names["data"], gather.input[1], names["scales"], names["zp"]],
                list(gather.output), name=gather.name, domain=DOMAIN, gather_axis=0, quantize_axis=1,
                block_size=p.block_size, bits=p.bits))  # fmt: skip
        reshapes = []
        if heads:
            shapes = {"b": [vocab, blocks, p.block_size * p.bits // 8], "scales": [-1], "zp": [-1]}
            head_inputs = []
            for key, stored in (("b", names["data"]), ("scales", names["scales"]), ("zp", names["zp"])):
                shape_name, out = f"{source}.head_{key}_shape", f"{source}.head_{key}"
                shape_inits.append(onnx.numpy_helper.from_array(np.array(shapes[key], np.int64), shape_name))
                reshapes.append(onnx.helper.make_node("Reshape", [stored, shape_name], [out]))
                head_inputs.append(out)
            for head in heads:
                head.CopyFrom(_matmul_nbits(head, head_inputs, p, accuracy_level))
        new_nodes += reshapes
        dropped |= {t.output[0] for t in transposes}
        replaced.add(init_name)
    if not replaced:
        return {}
    # (rebuilt once, at the end: the nodes edited above are the graph's own messages until then)
    ordered = list(new_nodes)  # the reshapes of initializers first: the graph stays in topological order
    for node in graph.graph.node:
        if node.op_type == "Transpose" and node.output[0] in dropped:
            continue
        ordered.append(node)
        ordered += follow.get(node.output[0], [])
    del graph.graph.node[:]
    graph.graph.node.extend(ordered)
    kept_inits = [i for i in graph.graph.initializer if i.name not in replaced]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept_inits)
    graph.graph.initializer.extend(shape_inits)
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
        elif node.op_type == "MatMul" and any(name.endswith(MIN_SUFFIX + "32") for name in node.input):
            continue  # the minimums of an offset-"min" MatMulNBits: part of that quantized matmul
        elif node.op_type == "MatMul" and any(name in weights or name in transposed for name in node.input):
            counts["matmul_fp32"] += 1
        elif node.op_type == "GatherBlockQuantized":
            counts[f"gather_{bits}bit"] += 1
        elif node.op_type == "Gather" and weights.get(node.input[0]) == onnx.TensorProto.FLOAT:
            counts["gather_fp32"] += 1
    return dict(sorted(counts.items()))


def precision_label(counts: dict[str, int]) -> str:
    """A short name for what the weight matmuls hold: fp32, int8, int4 or mixed (as many 4- as 8-bit ones),
    by the majority of quantized matmuls (a head may differ from the blocks), and `-emb8` / `-emb4` when the
    embedding table is quantized. The counts themselves go in the manifest."""
    four, eight = counts.get("matmul_4bit", 0), counts.get("matmul_8bit", 0) + counts.get("matmul_int8", 0)
    if not four and not eight:
        return "fp32"
    label = "int4" if four > eight else "int8" if eight > four else "mixed"
    table = "-emb4" if counts.get("gather_4bit") else "-emb8" if counts.get("gather_8bit") else ""
    return label + table
