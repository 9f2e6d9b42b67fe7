"""Perplexity on held-out text, with a pinned protocol (README, "Evaluation protocol").

1. The whole held-out text is tokenized once, without special tokens, and cut to `max_tokens`.
2. Windows hold up to `window` tokens, BOS included when `add_bos` is set (so `window - 1` text tokens), and
   start every `stride` text tokens, capped at the text tokens a window holds so that no token is skipped.
   A token is scored once, in the first window whose context reaches it; with stride < window the earlier
   tokens of a window are context only (the sliding-window protocol of the HF docs).
3. Without BOS the first token of each window has nothing to be predicted from: it is context only, never scored.
4. Perplexity = exp(total negative log-likelihood / scored tokens), accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmpress.config import EvalParams
from llmpress.errors import LlmpressError


@dataclass(frozen=True)
class Window:
    tokens: list[int]  # model input
    first_scored: int  # index in `tokens` of the first position whose token is scored


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int


def make_windows(ids: list[int], params: EvalParams, bos_id: int | None) -> list[Window]:
    """Cut token ids into scored windows following the protocol above."""
    ids = ids[: params.max_tokens]
    bos = [bos_id] if params.add_bos and bos_id is not None else []
    context = params.window - len(bos)
    if context < 1:
        raise ValueError("eval.window is too small to hold a token after BOS")
    windows = []
    scored_until = 0 if bos else 1  # tokens before this index are already scored (or unscorable)
    begin = 0
    while scored_until < len(ids):
        end = min(begin + context, len(ids))
        if end > scored_until:
            # position p of ids sits at index len(bos) + p - begin of the window
            # a window's first token has no context without BOS: it is context only
            first = max(len(bos) + scored_until - begin, 1)
            windows.append(Window(tokens=bos + ids[begin:end], first_scored=first))
            scored_until = end
        begin += min(params.stride, context)
    return windows


def window_batches(windows: list[Window], batch_size: int) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """[B, T] id tensors of equal-length windows (no padding, so no mask subtleties) and each row's first
    scored index; all windows but the last usually share one length."""
    by_length: dict[int, list[Window]] = {}
    for w in windows:
        by_length.setdefault(len(w.tokens), []).append(w)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            yield torch.tensor([w.tokens for w in batch], dtype=torch.long), [w.first_scored for w in batch]


def scored_logprobs(logits: torch.Tensor, ids: torch.Tensor, first_scored: list[int]) -> list[torch.Tensor]:
    """Per row, log p(token) of the scored tokens: logits at index i predict token i + 1."""
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = logprobs.gather(-1, ids[:, 1:, None].to(logprobs.device)).squeeze(-1)
    return [target[row, first - 1 :] for row, first in enumerate(first_scored)]


@torch.no_grad()
def window_nll(logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: list[Window], batch_size: int,
               progress: Callable[[int, int], None] | None = None) -> tuple[float, int]:  # fmt: skip
    """Sum of NLL over scored tokens and their count; `logits_fn` maps [B, T] ids to [B, T, V] logits."""
    total, count, done = 0.0, 0, 0
    for ids, first_scored in window_batches(windows, batch_size):
        for scored in scored_logprobs(logits_fn(ids), ids, first_scored):
            total -= scored.double().sum().item()
            count += scored.numel()
        done += len(first_scored)
        if progress:
            progress(done, len(windows))
    return total, count


def perplexity(model: torch.nn.Module, tokenizer, text: str, params: EvalParams,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:  # fmt: skip
    """Perplexity of a PyTorch causal LM on `text` under the pinned protocol."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = make_windows(ids, params, tokenizer.bos_token_id)
    device = next(model.parameters()).device

    def logits_fn(batch: torch.Tensor) -> torch.Tensor:
        return model(input_ids=batch.to(device), use_cache=False).logits

    nll, count = window_nll(logits_fn, windows, params.batch_size, progress)
    if count == 0:
        raise LlmpressError("the evaluation text is too short: no token could be scored")
    return PerplexityResult(perplexity=math.exp(nll / count), nll=nll, tokens=count, windows=len(windows))
