"""Greedy generations for a fixed prompt set: what a reviewer reads to see what compression did to the text."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_generations(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Continuation of each prompt (without the prompt), greedy, KV cache on, stopping at EOS."""
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        if tokenizer.bos_token_id is not None:
            ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]], device=device), ids], dim=1)
        generated = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        outputs.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True))
    return outputs
