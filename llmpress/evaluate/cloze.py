"""Zero-shot cloze accuracy built from the held-out text, in the manner of LAMBADA (Paperno et al., 2016).

Construction (deterministic for a seed):
1. The held-out text is split into documents (blank lines) and each document into sentences (after . ! or ?
   followed by whitespace).
2. A candidate is the end of a sentence whose final word is alphabetic, at least `min_word_chars` letters long,
   and preceded by at least `min_context_words` words of the same document. The passage is the document up to
   and including that word; the target is the word, the context everything before it.
3. Up to `per_document` candidates per document are drawn with the seed, then at most `max_examples` overall.
4. A model gets an example right when, reading the context (its last `max_context_tokens` tokens, BOS first if
   `add_bos`), its greedy prediction of every token of " word" is the target token: exact match of the whole
   word, scored in one forward pass with teacher forcing (the same as greedy decoding matching the word).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmpress.config import ClozeParams
from llmpress.errors import LlmpressError
from llmpress.evaluate.logits import head_logits, hidden_states

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class ClozeExample:
    context: str
    target: str


def build_examples(text: str, params: ClozeParams) -> list[ClozeExample]:
    rng = random.Random(params.seed)
    examples = []
    for doc in (d.strip() for d in text.split("\n\n")):
        if not doc:
            continue
        candidates = []
        words_before = 0
        consumed = ""
        for sentence in SENTENCE_END.split(doc):
            words = sentence.split()
            if not words:
                continue
            last = words[-1].rstrip(".!?\"')]")
            context_words = words_before + len(words) - 1
            if last.isalpha() and len(last) >= params.min_word_chars and context_words >= params.min_context_words:
                passage = (consumed + " " + sentence).strip()
                cut = passage.rfind(last)
                candidates.append(ClozeExample(context=passage[:cut].rstrip(), target=last))
            words_before += len(words)
            consumed = (consumed + " " + sentence).strip()
        examples += rng.sample(candidates, min(params.per_document, len(candidates)))
    if len(examples) > params.max_examples:
        examples = rng.sample(examples, params.max_examples)
    return examples


def encode(tokenizer, example: ClozeExample, params: ClozeParams, add_bos: bool) -> tuple[list[int], int]:
    """(token ids of context + target, number of target tokens at the end)."""
    context = tokenizer(example.context, add_special_tokens=False)["input_ids"]
    full = tokenizer(example.context + " " + example.target, add_special_tokens=False)["input_ids"]
    if full[: len(context)] != context or len(full) == len(context):
        # The tokenizer merged across the boundary: tokenize the target on its own, after a space.
        full = context + tokenizer(" " + example.target, add_special_tokens=False)["input_ids"]
    n_target = len(full) - len(context)
    keep = params.max_context_tokens + n_target
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    return bos + full[-keep:], n_target


@torch.no_grad()
def cloze_accuracy(
    model: torch.nn.Module | None,
    tokenizer,
    examples: list[ClozeExample],
    params: ClozeParams,
    add_bos: bool,
    progress: Callable[[int, int], None] | None = None,
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Share of examples whose target word the model predicts exactly. Examples run in batches of similar length
    (less padding), and the head runs only on the positions that predict target tokens. With `logits_fn` ([B, T]
    ids -> [B, T, V] logits, e.g. an onnxruntime session's) the model scored is that function (pass model=None)."""
    if not examples:
        raise LlmpressError("no cloze example could be built from the held-out text (see eval.cloze settings)")
    encoded = sorted((encode(tokenizer, ex, params, add_bos) for ex in examples), key=lambda e: len(e[0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct = 0
    for start in range(0, len(encoded), params.batch_size):
        batch = encoded[start : start + params.batch_size]
        width = max(len(ids) for ids, _ in batch)
        # Right padding: with causal attention, pads after a sequence cannot change its real positions.
        ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq, _ in batch], dtype=torch.long)
        # The state at position i predicts token i + 1: the last n_target states before each sequence's end.
        spans = [(len(seq) - n_target - 1, len(seq) - 1) for seq, n_target in batch]
        if logits_fn is None:
            hidden = hidden_states(model, ids)
            states = torch.cat([hidden[row, a:b] for row, (a, b) in enumerate(spans)])
            best = head_logits(model, states[None])[0].argmax(-1)
        else:
            logits = logits_fn(ids)
            best = torch.cat([logits[row, a:b].argmax(-1) for row, (a, b) in enumerate(spans)])
        predicted = best.cpu().split([b - a for a, b in spans])
        for row, (a, b) in enumerate(spans):
            correct += int(torch.equal(predicted[row], ids[row, a + 1 : b + 1]))
        if progress:
            progress(min(start + params.batch_size, len(encoded)), len(encoded))
    return correct / len(encoded)
