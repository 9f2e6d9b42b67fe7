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
from llmpress.compress.experts import unfuse_experts_
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


def writes_plain(model: nn.Module, sparse: str = "bitmask") -> bool:
    """True when `save_compressed` leaves the folder `save_pretrained` wrote plain (nothing to pack)."""
    return not is_compressed(model) and (sparse == "dense" or not sparse_layers(model))


def is_compressed(model: nn.Module) -> bool:
    manifest = compression_manifest(model)
    return any(manifest[kind] for kind in ("quantized", "low_rank", "activation_quant"))


LAYOUTS = ("compressed-tensors", "llmpress")
SPARSE_STORAGE = ("bitmask", "dense")


def sparse_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Plain (not quantized, not factorised) linears whose zeros make a bitmask plus the kept values smaller than
    the dense weight: 1 bit per weight against the element size of every zero (about 3 % zeros in fp32)."""
    found = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or quantization_of(module) is not None:
            continue
        weight = module.weight
        kept = int(torch.count_nonzero(weight))
        if kept * weight.element_size() + (weight.numel() + 7) // 8 < weight.numel() * weight.element_size():
            found[name] = module
    return found


@torch.no_grad()
def save_compressed(model: nn.Module, folder: Path, layout: str = "compressed-tensors",
                    sparse: str = "bitmask") -> str | None:  # fmt: skip
    """Rewrite the safetensors that `model.save_pretrained(folder)` wrote so that the bytes are those of what was
    kept. Returns the layout written, None for a plain folder (nothing quantized, factorised or sparse-stored).

    layout "compressed-tensors" (`ct_format.py`): quantized layers in compressed-tensors' pack-quantized format,
    which stock transformers (with the `compressed-tensors` package) and vLLM load; when the model holds what that
    format cannot (`ct_format.unsupported`), the llmpress layout, and the manifest says why. Sparse plain linears
    stay dense there, since current compressed-tensors has no sparse format to load them with.
    layout "llmpress": the module docstring's layout; with `sparse="bitmask"` sparse plain linears are stored as
    their nonzero values plus a bitmask (`name.weight_values`, `name.weight_bitmask`). llmpress loads it, and
    `llmpress dequantize` turns it into a plain folder for other tools.

    A model that is only sparse is written in the llmpress layout with bitmasks (`sparse="bitmask"`), else as a
    plain folder that any tool loads (`sparse="dense"`).
    """
    from llmpress.compress import ct_format

    if layout not in LAYOUTS or sparse not in SPARSE_STORAGE:
        raise LlmpressError(f"save layout must be one of {LAYOUTS} and sparse storage one of {SPARSE_STORAGE}, "
                            f"got {layout!r} and {sparse!r}")  # fmt: skip
    manifest = compression_manifest(model)
    reasons = ct_format.unsupported(model) if layout == "compressed-tensors" else []
    use_ct = layout == "compressed-tensors" and not reasons and bool(manifest["quantized"])
    sparse_stored = {} if use_ct or sparse == "dense" else sparse_layers(model)
    if not is_compressed(model) and not sparse_stored:
        return None
    if use_ct:
        manifest["format"] = ct_format.FORMAT
    elif reasons:
        manifest["compressed_tensors"] = f"not written as compressed-tensors: {'; '.join(reasons)}"
    manifest["sparse"] = {
        name: {"shape": list(m.weight.shape), "kept": int(torch.count_nonzero(m.weight))}
        for name, m in sparse_stored.items()
    }
    modules = dict(model.named_modules())
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    written: dict[str, QuantizedWeight] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        names = [name for name in [*manifest["quantized"], *sparse_stored] if f"{name}.weight" in tensors]
        if not names:
            continue
        for name in names:
            del tensors[f"{name}.weight"]
            if name in sparse_stored:
                packed = _bitmask(sparse_stored[name].weight, name)
            elif use_ct:
                qw = written[name] = quantization_of(modules[name])
                packed = {f"{name}.{key}": value for key, value in ct_format.pack(qw).items()}
            else:
                packed = _llmpress_packed(quantization_of(modules[name]), name)
            tensors.update(packed)
            if index is not None:
                del index["weight_map"][f"{name}.weight"]
                index["weight_map"].update(dict.fromkeys(packed, shard.name))
        tmp = shard.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        tmp.replace(shard)
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2))
    if use_ct:  # stock transformers reads this key and loads the packed layers through compressed-tensors
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        config["quantization_config"] = ct_format.quantization_config(written)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return "compressed-tensors" if use_ct else "llmpress"


def _llmpress_packed(qw: QuantizedWeight | None, name: str) -> dict[str, torch.Tensor]:
    assert qw is not None
    packed = {f"{name}.weight_packed": pack_bits(qw.codes, qw.bits), f"{name}.weight_scale": qw.scale}
    if qw.minimum is not None:
        packed[f"{name}.weight_min"] = qw.minimum
    elif not qw.symmetric:
        packed[f"{name}.weight_zero"] = qw.zero
    return packed


def _bitmask(weight: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """The nonzero values in row-major order and one bit per weight (1: kept), packed like 1-bit codes."""
    mask = weight != 0
    return {f"{name}.weight_values": weight[mask].contiguous(),
            f"{name}.weight_bitmask": pack_bits(mask.flatten().to(torch.uint8), 1)}  # fmt: skip


def _from_bitmask(values: torch.Tensor, bitmask: torch.Tensor, spec: dict[str, Any], where: str) -> torch.Tensor:
    shape = spec["shape"]
    mask = unpack_bits(bitmask, 1, shape[0] * shape[1]).bool()
    kept = int(mask.sum())
    if kept != values.numel() or kept != spec["kept"]:
        raise LlmpressError(f"{where}: the bitmask keeps {kept} weights but {values.numel()} values are stored "
                            f"(manifest: {spec['kept']})")  # fmt: skip
    dense = torch.zeros(shape[0] * shape[1], dtype=values.dtype)
    dense[mask] = values
    return dense.view(shape)


@torch.no_grad()
def load_compressed(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model saved by `save_compressed`, in either layout (stock transformers classes, no remote code)."""
    from transformers import AutoConfig

    from llmpress.compress import ct_format
    from llmpress.loading import read_json_object

    folder = Path(folder)
    manifest = read_json_object(folder / MANIFEST, "compressed-model manifest")
    layout = manifest.get("format")
    if layout not in (FORMAT, ct_format.FORMAT):
        raise LlmpressError(f"{folder / MANIFEST}: unknown format {layout!r}; expected {FORMAT!r} or "
                            f"{ct_format.FORMAT!r}")  # fmt: skip
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if hasattr(config, "quantization_config"):  # the weights are rebuilt here; a re-saved plain folder is plain
        del config.quantization_config
    config.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
    model = layer_shapes.build(config, dtype)  # stock classes, per-block widths applied, weights loaded below
    unfuse_experts_(model)  # a mixture of experts is stored per expert (`experts.py`)
    for name, spec in manifest["low_rank"].items():
        set_submodule(model, name, LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"],
                                                 spec["bias"]).to(dtype))  # fmt: skip
    state = {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}
    modules = dict(model.named_modules())
    quantized: dict[str, QuantizedWeight] = {}
    for name, spec in manifest["quantized"].items():
        if layout == ct_format.FORMAT:
            keys = ["weight_packed", "weight_scale", "weight_shape"] + (
                [] if spec["symmetric"] else ["weight_zero_point"]
            )
            missing = [f"{name}.{key}" for key in keys if f"{name}.{key}" not in state]
            if missing:
                raise LlmpressError(f"{folder}: packed weights of {name} are missing ({', '.join(missing)})")
            qw = ct_format.unpack({key: state.pop(f"{name}.{key}") for key in keys}, spec, f"{folder}: {name}")
        else:
            qw = _llmpress_unpacked(state, name, spec, folder)
        state[f"{name}.weight"] = qw.dequantize(dtype)
        quantized[name] = qw
    for name, spec in manifest.get("sparse", {}).items():
        try:
            values, bitmask = state.pop(f"{name}.weight_values"), state.pop(f"{name}.weight_bitmask")
        except KeyError as exc:
            raise LlmpressError(f"{folder}: the sparse weights of {name} are missing ({exc})") from None
        state[f"{name}.weight"] = _from_bitmask(values, bitmask, spec, f"{folder}: {name}").to(dtype)
    try:
        layer_shapes.load_weights_(model, state, folder)
    except ValueError as exc:
        raise LlmpressError(str(exc)) from None
    for name, qw in quantized.items():
        modules[name].llmpress_quant = qw
    for name, bits in manifest["activation_quant"].items():
        install_act_quant(modules[name], bits)
    return model.eval()


def _llmpress_unpacked(
    state: dict[str, torch.Tensor], name: str, spec: dict[str, Any], folder: Path
) -> QuantizedWeight:
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
    return QuantizedWeight(codes, scale, zero, spec["bits"], spec["group_size"], spec["symmetric"], minimum)


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
