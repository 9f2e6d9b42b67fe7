"""compressed-tensors folders: quantized weights as transformers (with `compressed-tensors`) and vLLM read them.

A compressed HF folder in this layout loads in stock transformers, no llmpress needed:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)   # with `pip install compressed-tensors`

What `storage.save_compressed` puts in the folder through `pack` (compressed-tensors' "pack-quantized" format, as
llm-compressor writes it), for every quantized linear `name`:

    name.weight_packed       int32 [out, ceil(in * bits / 32)]  codes - 2^(bits-1), as signed ints, packed densely
    name.weight_scale        float32 [out, groups]              (one group per row: [out, 1], strategy "channel")
    name.weight_shape        int64 [2]                          [out, in]
    name.weight_zero_point   int32 [ceil(out * bits / 32), groups]  asymmetric grids only: zero - 2^(bits-1),
                                                                packed along the output dimension

and config.json gets `quantization_config` (quant_method "compressed-tensors", status "compressed"): one config
group per distinct grid (bits, group size, symmetric), whose targets are the exact module names.

Why float32 scales: compressed-tensors dequantizes in the scale's dtype, (q - zero_point) * scale. llmpress's
scales hold fp16 values, but with fp16 arithmetic each product would be rounded to fp16 again; in float32 the
loaded weights are bit for bit those llmpress evaluated. (Half a byte per group more than fp16 scales.)

What no compressed-tensors format holds, so the folder keeps llmpress's own layout (`storage.py`) and
`unsupported` says why: llama.cpp-style offset "min" grids (w = s*q + m: compressed-tensors' zero points are
integers), groups that do not divide the row (compressed-tensors refuses ragged groups), quantized embedding
tables (transformers 5.23 fails on a compressed-tensors Embedding: "'Embedding' object has no attribute
'weight'"), factorised (low-rank) layers and W8A8 activation quantization (llmpress's per-token rounding is not
compressed-tensors' dynamic one).

Loading in stock transformers 5.23 with compressed-tensors 0.20 (tests/unit/test_ct_format.py): symmetric grids
load with plain `from_pretrained(folder)`. Asymmetric ones need `quantization_config=CompressedTensorsConfig(
dequantize=True)`: the default route allocates unpacked zero points and then refuses the packed ones the format
stores (llm-compressor issue #1618); the dequantize route takes one grid for every layer, so it needs one grid.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmpress.compress.quant import QuantizedWeight, quantization_of

FORMAT = "compressed-tensors/pack-quantized"
CT_FORMAT = "pack-quantized"


def unsupported(model: nn.Module) -> list[str]:
    """Why compressed-tensors cannot hold `model`'s compression exactly, one reason per kind; [] when it can."""
    from llmpress.compress.experts import LinearExperts
    from llmpress.compress.storage import LowRankLinear

    reasons: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearExperts):
            reasons.setdefault("mixture-of-experts experts (transformers fuses them into 3-D parameters, which "
                               "compressed-tensors' quantized Linear layers cannot hold)", []).append(name)  # fmt: skip
        if isinstance(module, LowRankLinear):
            reasons.setdefault("factorised (low-rank) layers", []).append(name)
        if getattr(module, "llmpress_act_bits", None):
            reasons.setdefault("W8A8 activation quantization", []).append(name)
        if (qw := quantization_of(module)) is None:
            continue
        if not isinstance(module, nn.Linear):
            reasons.setdefault("quantized embedding tables (transformers cannot load a compressed-tensors "
                               "Embedding)", []).append(name)  # fmt: skip
        elif qw.minimum is not None:
            reasons.setdefault("offset 'min' grids (w = s*q + m; compressed-tensors zero points are integers)",
                               []).append(name)  # fmt: skip
        elif qw.symmetric and bool((qw.zero != 2 ** (qw.bits - 1)).any()):
            reasons.setdefault("symmetric grids off the middle code", []).append(name)
        elif qw.group_size is not None and qw.group_size < qw.codes.shape[1] and qw.codes.shape[1] % qw.group_size:
            reasons.setdefault("groups that do not divide the row (compressed-tensors refuses ragged groups)",
                               []).append(name)  # fmt: skip
        elif not 1 <= qw.bits <= 8:
            reasons.setdefault("more than 8 bits", []).append(name)
    return [f"{why}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)})"
            for why, names in reasons.items()]  # fmt: skip


def _weight_args(qw: QuantizedWeight) -> dict[str, Any]:
    grouped = qw.group_size is not None and qw.group_size < qw.codes.shape[1]
    return {"num_bits": qw.bits, "type": "int", "symmetric": qw.symmetric, "dynamic": False,
            "strategy": "group" if grouped else "channel", "group_size": qw.group_size if grouped else None,
            "scale_dtype": "torch.float32", "zp_dtype": None if qw.symmetric else "torch.int8"}  # fmt: skip


def quantization_config(layers: dict[str, QuantizedWeight]) -> dict[str, Any]:
    """config.json's `quantization_config` for these layers, validated by compressed-tensors itself."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    groups: dict[str, dict[str, Any]] = {}
    for name, qw in layers.items():
        args = _weight_args(qw)
        key = repr(sorted(args.items()))
        groups.setdefault(key, {"targets": [], "weights": args, "format": CT_FORMAT})["targets"].append(name)
    config = QuantizationConfig.model_validate({
        "config_groups": {f"group_{i}": group for i, group in enumerate(groups.values())},
        "quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
    })  # fmt: skip
    return {**config.model_dump(exclude=["quant_method"]), "quant_method": "compressed-tensors",
            "version": compressed_tensors.__version__}  # fmt: skip


def pack(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The tensors of one quantized layer, named relative to the layer (weight_packed, weight_scale, ...)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 2 ** (qw.bits - 1)  # compressed-tensors keeps codes signed: [-2^(b-1), 2^(b-1) - 1]
    codes = (qw.codes.to(torch.int16) - offset).to(torch.int8)
    tensors = {"weight_packed": pack_to_int32(codes, qw.bits), "weight_scale": qw.scale.float(),
               "weight_shape": torch.tensor(list(qw.codes.shape), dtype=torch.int64)}  # fmt: skip
    if not qw.symmetric:
        zero = (qw.zero.to(torch.int16) - offset).to(torch.int8)
        tensors["weight_zero_point"] = pack_to_int32(zero, qw.bits, packed_dim=0)
    return tensors


def unpack(tensors: dict[str, torch.Tensor], spec: dict[str, Any], where: str) -> QuantizedWeight:
    """A `QuantizedWeight` from one layer's tensors (`pack`'s names) and its llmpress manifest entry."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from llmpress.errors import LlmpressError

    bits, (out, cols) = spec["bits"], spec["shape"]
    offset = 2 ** (bits - 1)
    if [int(v) for v in tensors["weight_shape"].tolist()] != [out, cols]:
        raise LlmpressError(f"{where}: weight_shape {tensors['weight_shape'].tolist()} is not {[out, cols]}")
    codes = unpack_from_int32(tensors["weight_packed"], bits, torch.Size([out, cols]))
    scale = tensors["weight_scale"]
    if not torch.equal(scale.half().float(), scale.float()):  # llmpress grids hold fp16 scales
        raise LlmpressError(f"{where}: weight_scale holds values that are not fp16; not written by llmpress")
    groups = scale.shape[1]
    if "weight_zero_point" in tensors:
        zero = unpack_from_int32(tensors["weight_zero_point"], bits, torch.Size([out, groups]), packed_dim=0)
        zero = (zero.to(torch.int16) + offset).to(torch.uint8)
    else:
        zero = torch.full((out, groups), offset, dtype=torch.uint8)
    return QuantizedWeight((codes.to(torch.int16) + offset).to(torch.uint8), scale.half(), zero, bits,
                           spec["group_size"], spec["symmetric"])  # fmt: skip
