"""Which layers of a decoder block feed which, as data keyed by the model type: what block-level methods (AWQ,
SmoothQuant, structured pruning, LLM-Pruner) rewire.

    x -> attn_norm -> q, k, v -> attention -> o -> + x
      -> mlp_norm  -> gate, up -> act(gate) * up -> down -> + x

`ARCHITECTURES` maps a transformers `model_type` to the module paths of these parts inside one block, how its
norms scale (Gemma's RMSNorm multiplies by 1 + weight, so a scale folded into it must keep that offset) and
whether they have a weight at all (OLMo's LayerNorm has none, so no scale can be folded into it). A model type
not listed is refused by name before any work (`check_layout`, run by `llmpress check --model`): a family that merely
shares Llama's module names may wire them differently (a parallel residual, a norm after the attention instead of
before the MLP), and folding scales by the wrong wiring corrupts the model without any error. Adding a family is
adding a row (llm-compressor keeps its AWQ mappings the same way) and a tiny model of it to
tests/unit/test_architectures.py, which checks that folded scales leave its blocks' float output unchanged.

At run time the scale-moving methods check the same invariant on the real block (`check_unchanged`): the block's
float output on a calibration batch, before and after folding, must agree to the dtype's rounding, or the method
stops with an error naming the block - the last guard against a layout the row does not describe.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from llmpress.compress.calibration import BlockCalibration, block_output
from llmpress.compress.experts import LinearExperts
from llmpress.compress.targets import find_decoder_blocks
from llmpress.errors import LlmpressError


@dataclass(frozen=True)
class Architecture:
    """Module paths of a block's parts, relative to the block, and the norms' weight offset."""

    attn_norm: str = "input_layernorm"
    attn: str = "self_attn"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    mlp_norm: str = "post_attention_layernorm"
    mlp: str = "mlp"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    norm_offset: float = 0.0  # the norm computes x_hat * (offset + weight)
    norm_weights: bool = True  # False: the norms have no weight, nothing can be folded into them
    # True: q, k, v are row blocks of one linear (in that order) and gate, up of another (Phi-3's qkv_proj and
    # gate_up_proj); q/k/v and gate/up then name the same module, whose last rows are v and up
    fused: bool = False
    # Mixture of experts: where a block keeps its experts (`experts.LinearExperts` once unfused) and its router,
    # which reads the MLP norm's output too. A block without them (Qwen3-MoE's mlp_only_layers) has gate/up/down.
    experts: str | None = None
    router: str = "mlp.gate"


LLAMA = Architecture()
GEMMA = Architecture(norm_offset=1.0)
ARCHITECTURES: dict[str, Architecture] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "granite", "smollm3"), LLAMA),
    "olmo": Architecture(norm_weights=False),
    "gemma": GEMMA,
    # Gemma 2/3 normalise the attention output again (post_attention_layernorm); the norm before the MLP is
    # pre_feedforward_layernorm.
    **dict.fromkeys(("gemma2", "gemma3_text"), Architecture(mlp_norm="pre_feedforward_layernorm", norm_offset=1.0)),
    "phi3": Architecture(q="self_attn.qkv_proj", k="self_attn.qkv_proj", v="self_attn.qkv_proj",
                         gate="mlp.gate_up_proj", up="mlp.gate_up_proj", fused=True),
    # Mixtral, Qwen3-MoE and OLMoE: Llama's attention and norms, a routed mixture of experts as the MLP
    **dict.fromkeys(("mixtral", "qwen3_moe", "olmoe"), Architecture(experts="mlp.experts")),
}  # fmt: skip
PARTS = tuple(f.name for f in fields(Architecture) if f.type == "str" and f.name != "router")
MLP_PARTS = ("gate", "up", "down")  # what a mixture-of-experts block has per expert instead
# Relative L2 change of a block's float output that folding may cause: the rounding of the rescaled weights.
FOLD_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class BlockAnatomy:
    attn_norm: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp_norm: nn.Module
    gate: nn.Linear | None  # None in a mixture-of-experts block: see `experts`
    up: nn.Linear | None
    down: nn.Linear | None
    attn: nn.Module
    mlp: nn.Module
    head_dim: int
    architecture: Architecture = LLAMA
    experts: LinearExperts | None = None
    router: nn.Module | None = None  # has .weight [experts, hidden]

    @property
    def n_heads(self) -> int:
        return self.o.in_features // self.head_dim

    @property
    def n_kv_heads(self) -> int:
        if self.architecture.fused:  # rows: q (n_heads * d), then k and v (n_kv_heads * d each)
            return (self.q.out_features - self.o.in_features) // (2 * self.head_dim)
        return self.k.out_features // self.head_dim

    @property
    def v_rows(self) -> int:
        """Rows of the v projection, the last ones of `v` when fused (what a v -> o scale divides)."""
        return self.n_kv_heads * self.head_dim

    def names(self, prefix: str) -> dict[str, str]:
        """Full module names of the linears, e.g. {'q': 'model.layers.0.self_attn.q_proj', ...} (no gate/up/down
        in a mixture-of-experts block: `expert_names`)."""
        parts = ("q", "k", "v", "o") + (() if self.experts is not None else MLP_PARTS)
        return {part: f"{prefix}.{getattr(self.architecture, part)}" for part in parts}

    def expert_names(self, prefix: str) -> list[dict[str, tuple[str, nn.Linear]]]:
        """Per expert, {'gate' | 'up' | 'down': (full name, linear)} of a mixture-of-experts block."""
        assert self.experts is not None
        base = f"{prefix}.{self.architecture.experts}"
        return [{part: (f"{base}.{e}.{part}_proj", getattr(expert, f"{part}_proj")) for part in MLP_PARTS}
                for e, expert in enumerate(self.experts.experts())]  # fmt: skip


@torch.no_grad()
def fold_into_norm_(norm: nn.Module, scales: torch.Tensor, offset: float = 0.0) -> None:
    """Divide a norm's output channels by `scales` (weight and bias), keeping its architecture's weight offset:
    x_hat * (offset + w) / s = x_hat * (offset + w') with w' = (offset + w) / s - offset."""
    s = scales.to(norm.weight.device, norm.weight.dtype)
    norm.weight.copy_((norm.weight + offset) / s - offset)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def model_type(block: nn.Module) -> str | None:
    """The transformers model type of a block, from the config its attention (or any submodule) keeps."""
    config = next((m.config for m in block.modules() if hasattr(m, "config")), None)
    return getattr(config, "model_type", None)


def architecture_for(kind: str | None) -> Architecture:
    """The row of ARCHITECTURES for a model type, or LlmpressError naming the type and the supported ones."""
    if kind not in ARCHITECTURES:
        raise LlmpressError(
            f"model type {kind!r} has no row in llmpress/compress/anatomy.py ARCHITECTURES, so block-level methods "
            f"(awq, smoothquant, structured, llm_pruner) do not know which norm feeds which layers; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. Layer methods (magnitude, wanda, sparsegpt, rtn, gptq, ...) work on "
            "any family"
        )
    return ARCHITECTURES[kind]


def anatomy(block: nn.Module) -> BlockAnatomy:
    """Name the parts of a block by its model type's row of ARCHITECTURES, or raise LlmpressError saying that the
    type is not described or which part is missing."""
    kind = model_type(block)
    architecture = architecture_for(kind)
    found: dict[str, nn.Module | None] = {}
    moe = architecture.experts is not None and _has(block, architecture.experts)
    if moe:
        found["experts"] = block.get_submodule(architecture.experts)
        if not isinstance(found["experts"], LinearExperts):
            raise LlmpressError(f"{type(block).__name__}: its experts are still fused; llmpress.compress.experts."
                                "unfuse_experts_(model) makes them linears first")  # fmt: skip
        found["router"] = block.get_submodule(architecture.router)
        found.update(dict.fromkeys(MLP_PARTS))
    for part in PARTS:
        if moe and part in MLP_PARTS:
            continue
        path = getattr(architecture, part)
        try:
            found[part] = block.get_submodule(path)
        except AttributeError:
            raise LlmpressError(
                f"{type(block).__name__} (model type {kind!r}) has no '{path}': block-level methods need its layers "
                f"named as {', '.join(getattr(architecture, p) for p in PARTS)}; add the family to "
                "llmpress/compress/anatomy.py ARCHITECTURES"
            ) from None
    head_dim = getattr(found["attn"], "head_dim", None)
    if head_dim is None:
        raise LlmpressError(f"{type(found['attn']).__name__} has no head_dim attribute")
    return BlockAnatomy(head_dim=int(head_dim), architecture=architecture, **found)


MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def check_family(model: nn.Module) -> None:
    """Refuse, before any work, a model of a family llmpress does not describe, in one line naming its type and the
    supported ones. Every method, not only block-level ones: a family whose layers some method does not see (the
    experts of a mixture-of-experts model are 3-D parameters, not linears) would be compressed only in part."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    experts = next((f"{key}={getattr(config, key)}" for key in MOE_KEYS if getattr(config, key, None)), None)
    if experts is not None and (kind not in ARCHITECTURES or ARCHITECTURES[kind].experts is None):
        moe = ", ".join(sorted(k for k, a in ARCHITECTURES.items() if a.experts is not None))
        raise LlmpressError(
            f"model type {kind!r} is a mixture of experts ({experts}) llmpress does not describe: its methods would "
            f"not know where its experts and router are, so it refuses the model; supported mixture-of-experts "
            f"families: {moe}; all supported families: {', '.join(sorted(ARCHITECTURES))}"
        )
    if kind not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise LlmpressError(f"model type {kind!r} is not supported; supported families: {supported} "
                            "(llmpress/compress/anatomy.py ARCHITECTURES)")  # fmt: skip


def check_layout(model: nn.Module, _stage: object = None) -> None:
    """Refuse, before any work, a model whose blocks a block-level method cannot name (`Method.check`)."""
    anatomy(find_decoder_blocks(model)[1][0])


def require_separate_projections(a: BlockAnatomy, method: str) -> None:
    """Methods that remove heads and channels slice q, k, v, gate and up one by one: refuse fused layouts and
    mixtures of experts."""
    if a.architecture.experts is not None:
        raise LlmpressError(
            f"{method} removes heads and MLP channels from one dense MLP per block; model type "
            f"{model_type(a.attn)!r} is a mixture of experts ({a.architecture.experts}), whose experts it does not "
            "slice. Unstructured and N:M pruning, quantization (RTN, GPTQ, AWQ, SmoothQuant), low-rank, drop_blocks "
            "and distill apply to this family"
        )
    if a.architecture.fused:
        raise LlmpressError(
            f"{method} removes heads and MLP channels from separate q/k/v and gate/up projections; model type "
            f"{model_type(a.attn)!r} fuses them ({a.architecture.q}, {a.architecture.gate}), which it does not slice. "
            "Unstructured and N:M pruning, quantization, low-rank, drop_blocks and distill apply to this family"
        )


@torch.no_grad()
def first_batch_output(block: nn.Module, calib: BlockCalibration) -> torch.Tensor:
    """The block's float output on its first calibration batch (what `check_unchanged` compares)."""
    return block_output(block(calib.hidden[0], **calib.kwargs[0])).float()


def check_unchanged(block: nn.Module, calib: BlockCalibration, before: torch.Tensor, method: str, prefix: str) -> None:
    """After folding scales into a block, its float output must be what it was (`before`, `first_batch_output`) up
    to the rounding of the rescaled weights; otherwise the block is not wired as its ARCHITECTURES row says and
    quantizing it would corrupt the model silently - refuse instead."""
    after = first_batch_output(block, calib)
    change = ((after - before).norm() / before.norm().clamp(min=1e-12)).item()
    allowed = FOLD_TOLERANCE.get(calib.hidden[0].dtype, 5e-2)
    if not change <= allowed:  # NaN fails too
        raise LlmpressError(
            f"{method}: folding its scales changed the float output of {prefix} by {change:.2%} (relative L2; "
            f"folding must leave it unchanged up to {allowed:.1%}): this block (model type "
            f"{model_type(block)!r}) is not wired as llmpress/compress/anatomy.py ARCHITECTURES describes it, and "
            "quantizing it would corrupt the model. Nothing was saved"
        )
