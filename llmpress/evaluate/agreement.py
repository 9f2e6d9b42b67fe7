"""Agreement of a compressed model with its base model on the held-out text, in one lockstep pass.

Both models read the same windows of the pinned perplexity protocol (`perplexity.make_windows`). On every scored
position we compare the next-token distributions:

- KL divergence KL(base || compressed) = sum_v p_base(v) (log p_base(v) - log p_compressed(v)), in nats, averaged
  over scored tokens: how much of the base model's belief the compressed one lost (0 for an identical model);
- top-1 agreement: the share of positions where both models' most likely next token is the same (1.0 for an
  identical model);
- the perplexity of each model, so base and compressed are measured on exactly the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from llmpress.config import EvalParams
from llmpress.errors import LlmpressError
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


@torch.no_grad()
def compare_to_base(
    model: torch.nn.Module,
    base: torch.nn.Module,
    tokenizer,
    text: str,
    params: EvalParams,
    progress: Callable[[int, int], None] | None = None,
) -> AgreementResult:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = make_windows(ids, params, tokenizer.bos_token_id)
    device = next(model.parameters()).device
    nll, base_nll, kl, agree, count, done = 0.0, 0.0, 0.0, 0, 0, 0
    for batch, first_scored in window_batches(windows, params.batch_size):
        # One log-softmax per model and batch serves NLL, KL and agreement; logits at i predict token i + 1.
        logp = F.log_softmax(model(input_ids=batch.to(device), use_cache=False).logits[:, :-1].float(), dim=-1)
        base_logp = F.log_softmax(base(input_ids=batch.to(device), use_cache=False).logits[:, :-1].float(), dim=-1)
        targets = batch[:, 1:, None].to(logp.device)
        token_logp, base_token_logp = logp.gather(-1, targets).squeeze(-1), base_logp.gather(-1, targets).squeeze(-1)
        for row, first in enumerate(first_scored):
            q, p = logp[row, first - 1 :], base_logp[row, first - 1 :]
            nll -= token_logp[row, first - 1 :].double().sum().item()
            base_nll -= base_token_logp[row, first - 1 :].double().sum().item()
            kl += (p.exp() * (p - q)).sum(dim=-1).double().sum().item()
            agree += (q.argmax(-1) == p.argmax(-1)).sum().item()
            count += q.shape[0]
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
