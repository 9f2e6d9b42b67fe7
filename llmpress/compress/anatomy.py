"""The parts of a Llama-style decoder block that block-level methods (AWQ, SmoothQuant, structured) rewire.

    x -> input_layernorm -> q_proj, k_proj, v_proj -> attention -> o_proj -> + x
      -> post_attention_layernorm -> gate_proj, up_proj -> act(gate) * up -> down_proj -> + x

Llama, Mistral, Qwen2/3, SmolLM and most current decoder-only models in transformers share these names. A block
that does not gets a clear error naming what is missing instead of a silent no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llmpress.errors import LlmpressError


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

    @property
    def n_heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def n_kv_heads(self) -> int:
        return self.k.out_features // self.head_dim

    def names(self, prefix: str) -> dict[str, str]:
        """Full module names of the linears, e.g. {'q': 'model.layers.0.self_attn.q_proj', ...}."""
        return {
            "q": f"{prefix}.self_attn.q_proj", "k": f"{prefix}.self_attn.k_proj", "v": f"{prefix}.self_attn.v_proj",
            "o": f"{prefix}.self_attn.o_proj", "gate": f"{prefix}.mlp.gate_proj", "up": f"{prefix}.mlp.up_proj",
            "down": f"{prefix}.mlp.down_proj",
        }  # fmt: skip


def anatomy(block: nn.Module) -> BlockAnatomy:
    """Name the parts of a Llama-style block, or raise LlmpressError saying which part is missing."""
    paths = {
        "attn_norm": "input_layernorm", "attn": "self_attn", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
        "v": "self_attn.v_proj", "o": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm", "mlp": "mlp",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    }  # fmt: skip
    found = {}
    for key, path in paths.items():
        try:
            found[key] = block.get_submodule(path)
        except AttributeError:
            raise LlmpressError(
                f"{type(block).__name__} has no '{path}': this method supports Llama-style blocks "
                f"({', '.join(paths.values())})"
            ) from None
    head_dim = getattr(found["attn"], "head_dim", None)
    if head_dim is None:
        raise LlmpressError(f"{type(found['attn']).__name__} has no head_dim attribute")
    return BlockAnatomy(head_dim=int(head_dim), **found)
