"""GGUF for llama.cpp: the compressed model written in the block types that hold its codes.

llama.cpp (and what is built on it: phones, laptops, single-board computers) reads GGUF. Its Q4_1, Q4_0 and Q8_0
types are blocks of 32 inputs of one row, each with an fp16 scale:

    Q4_1   d, m (fp16), 32 x 4 bits     w = d q + m          llmpress: 4 bits, groups of 32, offset "min"
    Q4_0   d (fp16),    32 x 4 bits     w = d (q - 8)        llmpress: 4 bits, groups of 32, symmetric
    Q8_0   d (fp16),    32 x int8       w = d q              llmpress: 8 bits, groups of 32, symmetric

So a layer quantized by RTN, GPTQ, AWQ or QAT on one of these grids is written as its own codes and scales, bit
for bit the weights llmpress evaluated ("exact" in the report). 4 bits in groups of 32 with an integer zero point
z is written as Q4_1 with m = -d z rounded to fp16 ("exact up to m's rounding", the largest error reported). Any
other quantized layout, and float weights when `float_type` says so, are re-quantized from the weights llmpress
evaluated by the gguf package's reference rounding (llama.cpp's own) to `fallback` ("requantized", named in
the report). Norms stay F32.

Tensor names follow llama.cpp (`gguf.get_tensor_name_map` of the family's llama.cpp architecture, `FAMILIES`).
For Llama and Mistral, q_proj / k_proj rows are permuted from transformers' rotate-half layout to llama.cpp's
interleaved one, as llama.cpp's converter does (rows only: blocks run along inputs, so the permuted codes stay
exact); Qwen2 and Qwen3 use rotate-half ("NEOX") rotary embeddings in llama.cpp too, and keep their rows.
The tokenizer goes in too: byte-level BPE tokens,
types and merges from tokenizer.json (its pre-tokenizer by the name llama.cpp knows it by), special tokens and the
chat template from tokenizer_config.json.

Scope: the families in `FAMILIES` (Llama, Mistral, Qwen2 with its q/k/v biases, Qwen3 with its q/k norms, and the
mixtures of experts Mixtral, Qwen3-MoE and OLMoE, whose experts go in as one [experts, rows, cols] tensor per
projection of stacked blocks and whose router stays float32) with the same widths in every block and no rope
scaling, and where llama.cpp's graph computes what the config says (`check`); anything else is refused by name
before a file is written.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmpress.compress.quant import QuantizedWeight, quantization_of
from llmpress.errors import LlmpressError


@dataclass(frozen=True)
class GgufFamily:
    """How a transformers family is written for llama.cpp: its architecture name there (general.architecture, the
    tensor names and the hyperparameter prefix) and whether q/k rows are permuted to llama.cpp's interleaved
    rotary pairs (its "NORM" rope; families it runs with rotate-half "NEOX" rope keep transformers' rows)."""

    arch: str
    permute_qk: bool
    # mixture of experts: whether llama.cpp renormalises the chosen experts' weights to sum to 1 (None: dense)
    renormalises: bool | None = None
    # llama.cpp's graph sizes k's norm for as many KV heads as query heads (OLMoE): grouped-query attention refused
    kv_heads_equal: bool = False


FAMILIES = {
    "llama": GgufFamily("llama", permute_qk=True),
    "mistral": GgufFamily("llama", permute_qk=True),
    "qwen2": GgufFamily("qwen2", permute_qk=False),
    "qwen3": GgufFamily("qwen3", permute_qk=False),
    # experts as 3-D tensors (ffn_gate_exps, ...: every expert's codes stacked), the router as ffn_gate_inp
    "mixtral": GgufFamily("llama", permute_qk=True, renormalises=True),
    "qwen3_moe": GgufFamily("qwen3moe", permute_qk=False, renormalises=True),
    "olmoe": GgufFamily("olmoe", permute_qk=False, renormalises=False, kv_heads_equal=True),
}
EXPERT_WEIGHT = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
ARCHITECTURES = tuple(FAMILIES)
FLOAT_TYPES = ("f32", "f16", "q8_0", "q4_1")


@dataclass
class GgufReport:
    path: str
    bytes: int
    tensors: dict[str, str] = field(default_factory=dict)  # gguf name -> block type
    exact: list[str] = field(default_factory=list)  # the method's codes and scales, bit for bit
    near_exact: dict[str, float] = field(default_factory=dict)  # zero point folded into m: max |error|
    requantized: list[str] = field(default_factory=list)  # re-rounded from the evaluated weights
    tokenizer_pre: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "block_types": dict(Counter(self.tensors.values())),
                "exact": len(self.exact), "near_exact": len(self.near_exact), "requantized": self.requantized,
                "near_exact_max_abs_error": max(self.near_exact.values(), default=0.0),
                "tokenizer_pre": self.tokenizer_pre}  # fmt: skip


def check(model: nn.Module) -> None:
    """Refuse, by name, a model this writer does not describe."""
    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise LlmpressError(f"GGUF export supports {', '.join(ARCHITECTURES)} models; this one is "
                            f"{config.model_type!r}")  # fmt: skip
    if (rope := _rope(config).get("rope_type", "default")) != "default":
        raise LlmpressError(f"GGUF export: rope type {rope!r} (scaled rotary embeddings) is not written yet")
    from llmpress.layer_shapes import differences

    if differences(model):
        raise LlmpressError("GGUF export: the blocks have different widths (structured surgeon); llama.cpp's "
                            "per-layer sizes are not written yet - export ONNX instead")  # fmt: skip
    family = FAMILIES[config.model_type]
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if family.kv_heads_equal and kv_heads != config.num_attention_heads:
        raise LlmpressError(f"GGUF export: llama.cpp's {family.arch} has as many KV heads as query heads; this "
                            f"model has {kv_heads} KV heads for {config.num_attention_heads}: export ONNX "
                            "instead")  # fmt: skip
    if family.renormalises is not None:
        renormalised = bool(getattr(config, "norm_topk_prob", True))  # Mixtral has no field: it always does
        if renormalised != family.renormalises:
            raise LlmpressError(f"GGUF export: llama.cpp's {family.arch} {'re' if family.renormalises else 'does not '}"
                                f"normalise the chosen experts' weights, and this model's norm_topk_prob is "
                                f"{renormalised}: export ONNX instead")  # fmt: skip
        if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
            raise LlmpressError("GGUF export: blocks with a dense MLP among the mixture-of-experts blocks "
                                "(mlp_only_layers, decoder_sparse_step) are not written yet - export ONNX "
                                "instead")  # fmt: skip


def export_gguf(model: nn.Module, tokenizer_dir: str | Path, out_path: str | Path, float_type: str = "f16",
                fallback: str = "q8_0") -> GgufReport:  # fmt: skip
    """Write `model` (with its llmpress quantization codes, if any) and the tokenizer in `tokenizer_dir` as one
    GGUF file at `out_path` (written beside it and renamed into place)."""
    import gguf

    if float_type not in FLOAT_TYPES or fallback not in ("q8_0", "q4_1"):
        raise LlmpressError(f"GGUF export: float_type must be one of {FLOAT_TYPES} and fallback q8_0 or q4_1; got "
                            f"{float_type!r}, {fallback!r}")  # fmt: skip
    from llmpress.compress.experts import unfuse_experts_

    check(model)
    unfuse_experts_(model)  # per-expert linears (with their codes), stacked per projection below
    config = model.config
    family = FAMILIES[config.model_type]
    out_path = Path(out_path)
    n_blocks = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch.upper()], n_blocks)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    report = GgufReport(str(out_path), 0)
    try:
        writer = gguf.GGUFWriter(str(tmp), family.arch)
        _write_hparams(writer, config, family)
        report.tokenizer_pre = _write_tokenizer(writer, Path(tokenizer_dir), config)
        _write_tensors(writer, report, model, names, float_type, fallback, family)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)  # a refused or failed export leaves nothing
    report.bytes = out_path.stat().st_size
    return report


def _write_tensors(writer: Any, report: GgufReport, model: nn.Module, names: Any, float_type: str,
                   fallback: str, family: GgufFamily) -> None:  # fmt: skip
    config = model.config
    modules = dict(model.named_modules())
    tied = getattr(config, "tie_word_embeddings", False)
    experts: dict[str, list[tuple[int, str]]] = {}  # merged name (...experts.gate_proj.weight) -> (expert, name)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output head from token_embd when output.weight is absent
        if match := EXPERT_WEIGHT.fullmatch(hf_name):
            experts.setdefault(f"{match[1]}.{match[3]}.weight", []).append((int(match[2]), hf_name))
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LlmpressError(f"GGUF export: no llama.cpp name for {hf_name}")
        module = modules.get(hf_name.rpartition(".")[0])
        qw = quantization_of(module) if module is not None and hf_name.endswith(".weight") else None
        heads = _permuted_heads(hf_name, config) if family.permute_qk else None
        if tensor.dim() == 1 or name.endswith("ffn_gate_inp.weight"):  # norms, biases and routers stay float32
            _add(writer, report, name, tensor.float().numpy(), "F32")
        elif qw is not None:
            _add_quantized(writer, report, name, qw, heads, fallback)
        else:
            w = _permute(tensor.detach().float(), heads).numpy()
            kind = float_type.upper()  # F32, F16, Q8_0, Q4_1: gguf's type names
            _add(writer, report, name, w, kind, requantized=kind not in ("F32", "F16"))
    for merged, members in experts.items():
        name = names.get_name(merged, try_suffixes=(".weight",))
        if name is None:
            raise LlmpressError(f"GGUF export: no llama.cpp name for {merged}")
        layers = [modules[hf_name.rpartition(".")[0]] for _, hf_name in sorted(members)]
        _add_experts(writer, report, name, layers, float_type, fallback)


def _add_experts(writer: Any, report: GgufReport, name: str, layers: list[nn.Linear], float_type: str,
                 fallback: str) -> None:  # fmt: skip
    """One projection of every expert of a block as one [experts, rows, cols] tensor: the experts' own blocks when
    each holds its codes in the same block type, else re-rounded (quantized) or written as `float_type`."""
    import gguf

    codes = [quantization_of(layer) for layer in layers]
    if all(qw is not None for qw in codes):
        exact = [_exact_blocks(qw, None) for qw in codes]
        kinds = {found[1] for found in exact if found is not None}
        if all(found is not None for found in exact) and len(kinds) == 1:
            kind = kinds.pop()
            writer.add_tensor(name, np.ascontiguousarray(np.stack([found[0] for found in exact])),
                              raw_dtype=gguf.GGMLQuantizationType[kind])  # fmt: skip
            report.tensors[name] = kind
            errors = [found[2] for found in exact if found[2] is not None]
            if errors:
                report.near_exact[name] = max(errors)
            else:
                report.exact.append(name)
            return
        weights = np.stack([qw.dequantize(torch.float32).numpy() for qw in codes])
        _add(writer, report, name, weights, fallback.upper(), True)
        return
    weights = np.stack([layer.weight.detach().float().numpy() for layer in layers])
    kind = float_type.upper()
    _add(writer, report, name, weights, kind, requantized=kind not in ("F32", "F16") or any(codes))


def _write_hparams(writer: Any, config: Any, family: GgufFamily) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(str(getattr(config, "_name_or_path", "") or "llmpress model"))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:  # heads removed: say the head size outright
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if family.renormalises is not None:
        from llmpress.compress.anatomy import MOE_KEYS

        experts = next(getattr(config, key) for key in MOE_KEYS if getattr(config, key, None))
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if (inter := getattr(config, "moe_intermediate_size", None)) is not None:
            writer.add_expert_feed_forward_length(inter)


def _rope(config: Any) -> dict[str, Any]:
    """The rotary settings: transformers 5's rope_parameters, or the older rope_theta / rope_scaling fields."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = getattr(config, "rope_theta", None)
    return {**({"rope_theta": theta} if theta is not None else {}), **params}


def _write_tokenizer(writer: Any, folder: Path, config: Any) -> str:
    """Byte-level BPE from tokenizer.json; returns the pre-tokenizer name written."""
    import gguf

    from llmpress.loading import read_json_object

    data = read_json_object(folder / "tokenizer.json", "tokenizer")
    model = data.get("model", {})
    pre_tokenizer = json.dumps(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre_tokenizer:
        raise LlmpressError(f"GGUF export writes byte-level BPE tokenizers (GPT-2 style); {folder / 'tokenizer.json'}"
                            f" is {model.get('type')!r} with pre-tokenizer {pre_tokenizer[:80]}")  # fmt: skip
    size = max(config.vocab_size, *(i + 1 for i in model["vocab"].values()))
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, i in model["vocab"].items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # llama.cpp refuses a BPE vocabulary without merges when it loads the file
        raise LlmpressError(f"GGUF export: {folder / 'tokenizer.json'} has no BPE merges; llama.cpp cannot load a "
                            "byte-level BPE tokenizer without them")  # fmt: skip
    name = _pre_tokenizer_name(data.get("pre_tokenizer") or {})
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    gguf.SpecialVocab(folder, load_merges=False, n_vocab=size).add_to_gguf(writer, quiet=True)
    return name


# The split regexes of tokenizers whose llama.cpp pre-tokenizer has a name: Qwen2/Qwen3 split digits one by one,
# Llama 3 in runs of up to three.
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_REGEXES = {_WORDS + r"\p{N}" + _REST: "qwen2", _WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe"}


def _pre_tokenizer_name(pre: dict[str, Any]) -> str:
    """llama.cpp picks its pre-tokenizer regex by name: a plain ByteLevel one is GPT-2's ("gpt-2"); digits split
    one by one before it is SmolLM's ("smollm"); Qwen2's or Llama 3's split regex before a ByteLevel is "qwen2" or
    "llama-bpe"; anything else gets llama.cpp's default."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [(p.get("type"), p.get("individual_digits")) for p in steps]
    if kinds == [("ByteLevel", None)]:
        return "gpt-2"
    if kinds == [("Digits", True), ("ByteLevel", None)]:
        return "smollm"
    if kinds == [("Split", None), ("ByteLevel", None)]:
        return SPLIT_REGEXES.get(steps[0].get("pattern", {}).get("Regex"), "default")
    return "default"


def _permuted_heads(hf_name: str, config: Any) -> int | None:
    """q_proj rows are permuted per query head, k_proj rows per KV head (llama.cpp's rotary layout)."""
    if hf_name.endswith("q_proj.weight"):
        return config.num_attention_heads
    if hf_name.endswith("k_proj.weight"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _permute(rows: torch.Tensor, heads: int | None) -> torch.Tensor:
    """transformers' [head, 2, half, ...] rotate-half rows to llama.cpp's [head, half, 2, ...] pairs."""
    if heads is None:
        return rows
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _add(writer: Any, report: GgufReport, name: str, values: np.ndarray, kind: str, requantized: bool = False) -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    data = gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)
    writer.add_tensor(name, data, raw_dtype=qtype if kind not in ("F32", "F16") else None)
    report.tensors[name] = kind
    if requantized:
        report.requantized.append(name)


def _add_quantized(writer: Any, report: GgufReport, name: str, qw: QuantizedWeight, heads: int | None,
                   fallback: str) -> None:  # fmt: skip
    import gguf

    found = _exact_blocks(qw, heads)
    if found is None:
        _add(writer, report, name, _permute(qw.dequantize(torch.float32), heads).numpy(), fallback.upper(), True)
        return
    blocks, kind, error = found
    writer.add_tensor(name, np.ascontiguousarray(blocks), raw_dtype=gguf.GGMLQuantizationType[kind])
    report.tensors[name] = kind
    if error is None:
        report.exact.append(name)
    else:
        report.near_exact[name] = error


def _exact_blocks(qw: QuantizedWeight, heads: int | None) -> tuple[np.ndarray, str, float | None] | None:
    """The layer's codes as GGUF blocks [rows, bytes], their type, and None when bit for bit what llmpress evaluated
    (else the largest error of folding an integer zero point into Q4_1's m); None when no block type holds them."""
    codes, scale = _permute(qw.codes, heads), _permute(qw.scale, heads)
    zero = _permute(qw.zero, heads)
    minimum = None if qw.minimum is None else _permute(qw.minimum, heads)
    rows, cols = codes.shape
    if qw.group_size != 32 or cols % 32 or qw.bits not in (4, 8):
        return None
    q = codes.numpy().reshape(rows, cols // 32, 32)
    d = _half_bytes(scale)
    error = None
    if qw.bits == 4 and minimum is not None:
        blocks, kind = np.concatenate([d, _half_bytes(minimum), _nibbles(q)], axis=2), "Q4_1"
    elif qw.bits == 4 and bool((zero == 8).all()):
        blocks, kind = np.concatenate([d, _nibbles(q)], axis=2), "Q4_0"
    elif qw.bits == 4:
        m = (-scale.float() * zero.float()).half()
        blocks, kind = np.concatenate([d, _half_bytes(m), _nibbles(q)], axis=2), "Q4_1"
        exact = qw.dequantize(torch.float32)
        folded = scale.float().repeat_interleave(32, 1) * codes.float() + m.float().repeat_interleave(32, 1)
        error = float((folded - _permute(exact, heads)).abs().max())
    elif bool((zero == 128).all()):
        signed = (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        blocks, kind = np.concatenate([d, signed], axis=2), "Q8_0"
    else:
        return None
    return blocks.reshape(rows, -1), kind, error


def _half_bytes(values: torch.Tensor) -> np.ndarray:
    """[rows, groups] fp16 -> [rows, groups, 2] little-endian bytes."""
    return values.to(torch.float16).numpy().astype("<f2").view(np.uint8).reshape(*values.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """32 codes of a block -> 16 bytes: byte j holds code j (low nibble) and code j + 16 (high), as ggml does."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)
