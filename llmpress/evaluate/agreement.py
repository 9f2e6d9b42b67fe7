"""Agreement of a compressed model with its base model on the held-out text, in one lockstep pass.

Both models read the same windows of the pinned perplexity protocol (`perplexity.make_windows`). On every scored
position we compare the next-token distributions:

- KL divergence KL(base || compressed) = sum_v p_base(v) (log p_base(v) - log p_compressed(v)), in nats, averaged
  over scored tokens: how much of the base model's belief the compressed one lost (0 for an identical model);
- top-1 agreement: the share of positions where both models' most likely next token is the same (1.0 for an
  identical model);
- the perplexity of each model, so base and compressed are measured on exactly the same tokens.

Cost. Each model's decoder runs once per batch; the heads run on chunks of scored positions
(`llmpress.evaluate.logits`), so memory holds one chunk of logits whatever the vocabulary. Per position, with z
the logits and lse = logsumexp(z): NLL = lse - z[target], and since the probabilities sum to one,
KL = sum_v p_base(v) (z_base(v) - z_comp(v)) - lse_base + lse_comp with p_base = softmax(z_base): two
logsumexps, one softmax, one difference and one dot product; no log-softmax is materialised. The base model's
hidden states can come from an earlier pass (`base_pass`, kept by `llmpress.evaluate.baseline`) instead of its
decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from llmpress.config import EvalParams
from llmpress.errors import LlmpressError
from llmpress.evaluate.logits import chunk_positions, chunks, head_logits, hidden_states
from llmpress.evaluate.perplexity import make_windows, window_batches


@dataclass(frozen=True)
class AgreementResult:
    perplexity: float
    base_perplexity: float
    kl_to_base: float
    top1_agreement: float
    tokens: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class BasePass:
    """The base model over the protocol's windows: its perplexity, and its final hidden states per batch."""

    perplexity: float
    tokens: int
    hidden: list[torch.Tensor]  # one [batch, positions, hidden] tensor per `window_batches` batch


def _scored(batch: torch.Tensor, hidden: torch.Tensor, first_scored: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of the positions that predict a scored token [N, hidden] and those tokens [N]: the state at
    index i predicts token i + 1."""
    states = torch.cat([hidden[row, first - 1 : -1] for row, first in enumerate(first_scored)])
    targets = torch.cat([batch[row, first:] for row, first in enumerate(first_scored)])
    return states, targets.to(states.device)


def _nll(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> float:
    return (lse - logits.gather(-1, targets[:, None]).squeeze(-1)).double().sum().item()


@torch.no_grad()
def base_pass(base: torch.nn.Module, tokenizer, text: str, params: EvalParams,
              progress: Callable[[int, int], None] | None = None) -> BasePass:  # fmt: skip
    """Run the base model's decoder over the protocol's windows once: its perplexity and hidden states."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = make_windows(ids, params, tokenizer.bos_token_id)
    size = chunk_positions(base.config.vocab_size)
    nll, count, done, kept = 0.0, 0, 0, []
    for batch, first_scored in window_batches(windows, params.batch_size):
        hidden = hidden_states(base, batch)
        kept.append(hidden.cpu())
        states, targets = _scored(batch, hidden, first_scored)
        for part in chunks(len(targets), size):
            logits = head_logits(base, states[None, part])[0]
            nll += _nll(logits, torch.logsumexp(logits, -1), targets[part])
        count += len(targets)
        done += len(first_scored)
        if progress:
            progress(done, len(windows))
    if count == 0:
        raise LlmpressError("the evaluation text is too short: no token could be scored")
    return BasePass(perplexity=math.exp(nll / count), tokens=count, hidden=kept)


@torch.no_grad()
def compare_to_base(
    model: torch.nn.Module | None,
    base: torch.nn.Module,
    tokenizer,
    text: str,
    params: EvalParams,
    progress: Callable[[int, int], None] | None = None,
    base_hidden: list[torch.Tensor] | None = None,
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> AgreementResult:
    """Perplexity of both models, KL(base || model) and top-1 agreement on the protocol's windows. With
    `base_hidden` (a `BasePass`'s), the base model's decoder does not run again. With `logits_fn` ([B, T] ids ->
    [B, T, V] logits, e.g. an onnxruntime session's), the compared model is that function and `model` is unused
    (pass None)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = make_windows(ids, params, tokenizer.bos_token_id)
    batches = list(window_batches(windows, params.batch_size))
    if base_hidden is not None and [h.shape[:2] for h in base_hidden] != [b.shape for b, _ in batches]:
        raise LlmpressError("the cached base-model pass does not match these evaluation windows; recompute it")
    size = chunk_positions(max(model.config.vocab_size if model is not None else 0, base.config.vocab_size))
    nll, base_nll, kl, agree, count, done = 0.0, 0.0, 0.0, 0, 0, 0
    for index, (batch, first_scored) in enumerate(batches):
        if logits_fn is None:
            states, targets = _scored(batch, hidden_states(model, batch), first_scored)
        else:  # logits of the scored positions, selected like hidden states
            scored_logits, targets = _scored(batch, logits_fn(batch), first_scored)
        cached = base_hidden[index] if base_hidden is not None else None
        base_states, _ = _scored(batch, cached if cached is not None else hidden_states(base, batch), first_scored)
        base_states = base_states.to(next(base.parameters()).device)
        for part in chunks(len(targets), size):
            z = head_logits(model, states[None, part])[0] if logits_fn is None else scored_logits[part].float()
            zb = head_logits(base, base_states[None, part])[0]
            lse, lse_b = torch.logsumexp(z, -1), torch.logsumexp(zb, -1)
            t = targets[part]
            nll += _nll(z, lse, t)
            base_nll += _nll(zb, lse_b, t)
            # Where the base logit is -inf (a masked token) p_base is 0 and so is the term, whatever z is there.
            diff = torch.nan_to_num_(zb - z, nan=0.0, posinf=math.inf, neginf=0.0)
            cross = torch.bmm(torch.softmax(zb, -1)[:, None, :], diff[:, :, None]).view(-1)  # one fused dot per row
            kl += (cross - lse_b + lse).double().sum().item()
            agree += (z.argmax(-1) == zb.argmax(-1)).sum().item()
        count += len(targets)
        done += len(first_scored)
        if progress:
            progress(done, len(windows))
    if count == 0:
        raise LlmpressError("the evaluation text is too short: no token could be scored")
    return AgreementResult(
        perplexity=math.exp(nll / count),
        base_perplexity=math.exp(base_nll / count),
        kl_to_base=max(kl / count, 0.0),  # rounding can make an identical model's KL -1e-9
        top1_agreement=agree / count,
        tokens=count,
    )
