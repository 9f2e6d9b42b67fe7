"""The compressed model folder: stock HF files plus packed integer weights, and how to read it back.

`save_compressed` writes a Hugging Face folder (config.json, tokenizer, *.safetensors) in which

    - every quantized linear `name` has, instead of `name.weight`, `name.weight_packed` (the integer codes
      bit-packed, `bits` bits each), `name.weight_scale` (fp16, [out, groups]) and, when asymmetric,
      `name.weight_zero` (uint8, [out, groups]), or with offset "min" `name.weight_min` (fp16, [out, groups]);
    - every factorised linear (low-rank) is two linears `name.down` [rank, in] and `name.up` [out, rank];

and `llmpress_compression.json` says which layers are which. So the bytes on disk are the bytes of what was
really kept. Structured pruning needs none of this: its smaller shapes are in config.json and load with stock
transformers.

`load_compressed` rebuilds the model from config.json, restores factorised layers, dequantizes packed weights
(exactly the values the pipeline evaluated), re-installs W8A8 activation quantization, and returns a model that
`steps.save_model`/`to_plain_` can turn into a plain HF folder again (for export and for other tools).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmpress import layer_shapes
from llmpress.compress.quant import QuantizedWeight, install_act_quant, pack_bits, quantization_of, unpack_bits
from llmpress.errors import LlmpressError

MANIFEST = "llmpress_compression.json"
FORMAT = "llmpress-compressed/1"


class LowRankLinear(nn.Module):
    """y = up(down(x)): a [out, in] linear factorised through `rank` (two smaller matmuls, fewer parameters)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent [out, in] (for size accounting and to merge back into a plain nn.Linear)."""
        return self.up.weight @ self.down.weight


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def compression_manifest(model: nn.Module) -> dict[str, Any]:
    quantized, low_rank, act = {}, {}, {}
    for name, module in model.named_modules():
        if (qw := quantization_of(module)) is not None:
            quantized[name] = {"bits": qw.bits, "group_size": qw.group_size, "symmetric": qw.symmetric,
                               "offset": qw.offset, "shape": list(qw.codes.shape)}  # fmt: skip
        if isinstance(module, LowRankLinear):
            low_rank[name] = {"in_features": module.in_features, "out_features": module.out_features,
                              "rank": module.rank, "bias": module.up.bias is not None}  # fmt: skip
        if getattr(module, "llmpress_act_bits", None):
            act[name] = module.llmpress_act_bits
    return {"format": FORMAT, "quantized": quantized, "low_rank": low_rank, "activation_quant": act}


def is_compressed(model: nn.Module) -> bool:
    manifest = compression_manifest(model)
    return any(manifest[kind] for kind in ("quantized", "low_rank", "activation_quant"))


@torch.no_grad()
def save_compressed(model: nn.Module, folder: Path) -> None:
    """Rewrite the safetensors that `model.save_pretrained(folder)` wrote: packed codes replace quantized weights."""
    manifest = compression_manifest(model)
    if not is_compressed(model):
        return
    modules = dict(model.named_modules())
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        names = [name for name in manifest["quantized"] if f"{name}.weight" in tensors]
        if not names:
            continue
        for name in names:
            qw = quantization_of(modules[name])
            assert qw is not None
            del tensors[f"{name}.weight"]
            packed = {f"{name}.weight_packed": pack_bits(qw.codes, qw.bits), f"{name}.weight_scale": qw.scale}
            if qw.minimum is not None:
                packed[f"{name}.weight_min"] = qw.minimum
            elif not qw.symmetric:
                packed[f"{name}.weight_zero"] = qw.zero
            tensors.update(packed)
            if index is not None:
                del index["weight_map"][f"{name}.weight"]
                index["weight_map"].update(dict.fromkeys(packed, shard.name))
        tmp = shard.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        tmp.replace(shard)
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


@torch.no_grad()
def load_compressed(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model saved by `save_compressed` (stock transformers classes, no remote code)."""
    from transformers import AutoConfig

    folder = Path(folder)
    from llmpress.loading import read_json_object

    manifest = read_json_object(folder / MANIFEST, "compressed-model manifest")
    if manifest.get("format") != FORMAT:
        raise LlmpressError(f"{folder / MANIFEST}: unknown format {manifest.get('format')!r}; expected {FORMAT!r}")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    config.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
    model = layer_shapes.build(config, dtype)  # stock classes, per-block widths applied, weights loaded below
    for name, spec in manifest["low_rank"].items():
        set_submodule(model, name, LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"],
                                                 spec["bias"]).to(dtype))  # fmt: skip
    state = {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}
    modules = dict(model.named_modules())
    quantized: dict[str, QuantizedWeight] = {}
    for name, spec in manifest["quantized"].items():
        out, cols = spec["shape"]
        try:
            packed = state.pop(f"{name}.weight_packed")
            scale = state.pop(f"{name}.weight_scale")
        except KeyError as exc:
            raise LlmpressError(f"{folder}: packed weights of {name} are missing ({exc})") from None
        minimum = state.pop(f"{name}.weight_min", None) if spec.get("offset") == "min" else None
        if spec.get("offset") == "min" and minimum is None:
            raise LlmpressError(f"{folder}: the minimums of {name} (offset 'min') are missing")
        zero = state.pop(f"{name}.weight_zero", None)
        if zero is None:
            zero = torch.full_like(scale, 0 if minimum is not None else 2 ** (spec["bits"] - 1), dtype=torch.uint8)
        codes = unpack_bits(packed, spec["bits"], out * cols).view(out, cols)
        qw = QuantizedWeight(codes, scale, zero, spec["bits"], spec["group_size"], spec["symmetric"], minimum)
        state[f"{name}.weight"] = qw.dequantize(dtype)
        quantized[name] = qw
    try:
        layer_shapes.load_weights_(model, state, folder)
    except ValueError as exc:
        raise LlmpressError(str(exc)) from None
    for name, qw in quantized.items():
        modules[name].llmpress_quant = qw
    for name, bits in manifest["activation_quant"].items():
        install_act_quant(modules[name], bits)
    return model.eval()


@torch.no_grad()
def to_plain_(model: nn.Module) -> nn.Module:
    """Merge factorised layers back into nn.Linear and forget quantization codes: a stock HF model again.

    The float weights keep their dequantized values. W8A8 activation quantization has no stock equivalent
    and is dropped (the plain model computes with float activations).
    """
    from llmpress.compress.quant import remove_act_quant

    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.up.bias is not None)
            dense = dense.to(module.up.weight.dtype)
            dense.weight.copy_(module.weight)
            if module.up.bias is not None:
                dense.bias.copy_(module.up.bias)
            set_submodule(model, name, dense)
    for module in model.modules():
        if hasattr(module, "llmpress_quant"):
            del module.llmpress_quant
        remove_act_quant(module)
    return model
