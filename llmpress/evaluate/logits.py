"""A causal LM's logits from its decoder's final hidden states, a few positions at a time.

Evaluation needs full-vocabulary distributions at thousands of positions (perplexity, KL, agreement). A plain
forward materialises [batch, positions, vocab] logits - 400 MB for 4 windows of 512 tokens on a 49k vocabulary,
2 GB on a 256k one - and every full-vocabulary operation is then a pass over that memory. Instead the decoder runs
once (`hidden_states`) and the model's own head is applied to a chunk of positions at a time (`head_logits`), so
one chunk of logits is alive at once, and cloze scoring computes logits only where it reads them. A hidden state
kept from an earlier pass (the base model's, `llmpress.evaluate.baseline`) gives back the same logits without
running the decoder again.

`head_logits` calls the model's own forward with its decoder stood in for by the given hidden states, so whatever
the head does after the decoder (a tied or untied projection, Gemma's logit soft-capping, Cohere's logit scale)
is what the model itself does.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

# Logits held at once per chunk: positions x vocabulary fp32 values (2^22 values = 16 MB).
CHUNK_VALUES = 1 << 22


def decoder(model: nn.Module) -> nn.Module:
    """The model's decoder stack (embeddings, blocks, final norm): what its causal-LM forward calls first."""
    found = model.get_decoder() if hasattr(model, "get_decoder") else None
    if found is None or found is model:
        raise TypeError(f"{type(model).__name__} has no separate decoder module to take hidden states from")
    return found


@torch.no_grad()
def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:  # fmt: skip
    """Final hidden states [batch, positions, hidden] (after the final norm), as the head receives them."""
    device = next(model.parameters()).device
    mask = None if attention_mask is None else attention_mask.to(device)
    out = decoder(model)(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)
    return out.last_hidden_state


@torch.no_grad()
def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for final hidden states `hidden` [batch, positions, hidden], in fp32."""
    # the decoder output of a mixture of experts: a dense model's fields plus the router's (None), which a
    # mixture-of-experts head reads
    from transformers.modeling_outputs import MoeModelOutputWithPast

    def stand_in(*_args, **_kwargs) -> MoeModelOutputWithPast:
        return MoeModelOutputWithPast(last_hidden_state=hidden)

    stack = decoder(model)
    original = stack.forward
    stack.forward = stand_in  # the instance attribute shadows the class's forward
    try:
        # The stood-in decoder ignores its inputs; inputs_embeds only gives the forward the right shape.
        out = model(inputs_embeds=hidden, use_cache=False)
    finally:
        if stack.forward is not original:
            del stack.forward
    return out.logits.float()


def chunk_positions(vocab_size: int) -> int:
    """Positions per chunk so that one chunk of logits holds about CHUNK_VALUES values."""
    return max(1, CHUNK_VALUES // max(vocab_size, 1))


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
