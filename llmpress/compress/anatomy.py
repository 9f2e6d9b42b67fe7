"""Which layers of a decoder block feed which, as data keyed by the model type: what block-level methods (AWQ,
SmoothQuant, structured pruning) rewire.

    x -> attn_norm -> q, k, v -> attention -> o -> + x
      -> mlp_norm  -> gate, up -> act(gate) * up -> down -> + x

`ARCHITECTURES` maps a transformers `model_type` to the module paths of these parts inside one block, and how its
norms scale (Gemma's RMSNorm multiplies by 1 + weight, so a scale folded into it must keep that offset). A model
type not listed is read with Llama's names, which most decoder-only families share; a block that does not have
them gets a clear error naming what is missing (fused projections such as Phi-3's qkv_proj are not supported).
Adding a family is adding a row (llm-compressor keeps its AWQ mappings the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

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


LLAMA = Architecture()
GEMMA = Architecture(norm_offset=1.0)
ARCHITECTURES: dict[str, Architecture] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "granite", "smollm3", "olmo"), LLAMA),
    "gemma": GEMMA,
    # Gemma 2/3 normalise the attention output again (post_attention_layernorm); the norm before the MLP is
    # pre_feedforward_layernorm.
    **dict.fromkeys(("gemma2", "gemma3_text"), Architecture(mlp_norm="pre_feedforward_layernorm", norm_offset=1.0)),
}
PARTS = tuple(f.name for f in fields(Architecture) if f.name != "norm_offset")


@dataclass
class BlockAnatomy:
    attn_norm: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp_norm: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    attn: nn.Module
    mlp: nn.Module
    head_dim: int
    architecture: Architecture = LLAMA

    @property
    def n_heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def n_kv_heads(self) -> int:
        return self.k.out_features // self.head_dim

    def names(self, prefix: str) -> dict[str, str]:
        """Full module names of the linears, e.g. {'q': 'model.layers.0.self_attn.q_proj', ...}."""
        return {part: f"{prefix}.{getattr(self.architecture, part)}" for part in ("q", "k", "v", "o", "gate", "up",
                                                                                   "down")}  # fmt: skip


@torch.no_grad()
def fold_into_norm_(norm: nn.Module, scales: torch.Tensor, offset: float = 0.0) -> None:
    """Divide a norm's output channels by `scales` (weight and bias), keeping its architecture's weight offset:
    x_hat * (offset + w) / s = x_hat * (offset + w') with w' = (offset + w) / s - offset."""
    s = scales.to(norm.weight.device, norm.weight.dtype)
    norm.weight.copy_((norm.weight + offset) / s - offset)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s)


def model_type(block: nn.Module) -> str | None:
    """The transformers model type of a block, from the config its attention (or any submodule) keeps."""
    config = next((m.config for m in block.modules() if hasattr(m, "config")), None)
    return getattr(config, "model_type", None)


def anatomy(block: nn.Module) -> BlockAnatomy:
    """Name the parts of a block by its model type's row of ARCHITECTURES (Llama's names for types not listed), or
    raise LlmpressError saying which part is missing."""
    kind = model_type(block)
    architecture = ARCHITECTURES.get(kind or "", LLAMA)
    found = {}
    for part in PARTS:
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
