"""Greedy generations for a fixed prompt set: what a reviewer reads to see what compression did to the text."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_generations(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Continuation of each prompt (without the prompt), greedy, KV cache on, stopping at EOS.

    All prompts decode together as one left-padded batch (BOS first, the attention mask hiding the pads): one
    step per new token for the whole set instead of one per prompt and token, a few times faster on a CPU where a
    decode step costs about the same for 1 or 5 sequences.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = pad if pad is not None else 0
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=pad)  # fmt: skip
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in generated]
