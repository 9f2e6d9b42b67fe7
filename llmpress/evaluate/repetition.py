"""Does the model still talk, or does it loop? The repeated n-gram rate of greedy continuations.

A model pruned or quantized too far can keep a tolerable perplexity (it is scored on text it is fed) while its own
greedy output collapses into loops: "of the town of the town of the town ...". Perplexity, KL and cloze read one
next token at a time and never see that; the continuation does. The measure:

- prompts: `prompts` evenly spaced slices of the held-out text, `prompt_tokens` tokens each (BOS first), so every
  prompt has the same length and the whole set decodes as one batch without padding;
- continuation: up to `new_tokens` greedy tokens of each, stopping at EOS;
- rate: over all continuations, the share of token n-grams that already occurred earlier in the same continuation
  (0 for text that never repeats a phrase, near 1 for a loop).

The base model's rate on the same prompts is the reference (natural text repeats some n-grams too, and a small
model's greedy text more than that); the gate bounds how much compression may raise it
(`gate.max_repetition_increase`, README "Why the gate checks repetition").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from llmpress.config import EvalParams, RepetitionParams


def held_out_prompts(ids: Sequence[int], params: RepetitionParams, bos_token_id: int | None) -> torch.Tensor:
    """[prompts, prompt_tokens] token ids: evenly spaced slices of the held-out text, BOS first when there is one.
    Fewer rows when the text is too short for `params.prompts` distinct slices."""
    bos = [bos_token_id] if bos_token_id is not None else []
    width = params.prompt_tokens - len(bos)
    if len(ids) < width:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than one repetition prompt "
                         f"(eval.repetition.prompt_tokens = {params.prompt_tokens})")  # fmt: skip
    count = min(params.prompts, len(ids) // width)
    step = (len(ids) - width) // (count - 1) if count > 1 else 0
    return torch.tensor([bos + list(ids[i * step : i * step + width]) for i in range(count)], dtype=torch.long)


def text_prompts(tokenizer, text: str, params: EvalParams) -> torch.Tensor:
    """`held_out_prompts` of the protocol's part of the held-out text (its first `max_tokens` tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: params.max_tokens]
    return held_out_prompts(ids, params.repetition, tokenizer.bos_token_id)


def repeated_ngram_rate(continuations: Sequence[Sequence[int]], n: int) -> float:
    """Share of the continuations' n-grams that repeat an earlier n-gram of the same continuation (0 when no
    continuation is long enough to hold one)."""
    repeated = total = 0
    for tokens in continuations:
        seen: set[tuple[int, ...]] = set()
        for i in range(len(tokens) - n + 1):
            gram = tuple(tokens[i : i + n])
            repeated += gram in seen
            total += 1
            seen.add(gram)
    return repeated / total if total else 0.0


def until_eos(tokens: Sequence[int], eos_token_id: int | None) -> list[int]:
    """The tokens before the first EOS."""
    tokens = [int(t) for t in tokens]
    return tokens[: tokens.index(eos_token_id)] if eos_token_id in tokens else tokens


@torch.no_grad()
def torch_continuations(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int,
                        eos_token_id: int | None) -> list[list[int]]:  # fmt: skip
    """Greedy continuations of `prompts` (one batch, no padding) by a transformers model, without the prompt."""
    device = next(model.parameters()).device
    ids = prompts.to(device)
    pad = eos_token_id if eos_token_id is not None else 0
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad)  # fmt: skip
    return [until_eos(row[ids.shape[1] :].tolist(), eos_token_id) for row in out.cpu()]


Continuations = Callable[[torch.Tensor, int, int | None], list[list[int]]]


def repetition_rate(continuations: Continuations, tokenizer, text: str, params: EvalParams) -> float:
    """The repeated n-gram rate of a model's greedy continuations of the held-out prompts. `continuations`:
    (prompts [P, T], new tokens, EOS id) -> each prompt's continuation, cut at EOS (`torch_continuations` with its
    model bound, or an onnxruntime generator's)."""
    rep = params.repetition
    made = continuations(text_prompts(tokenizer, text, params), rep.new_tokens, tokenizer.eos_token_id)
    return repeated_ngram_rate(made, rep.ngram)
