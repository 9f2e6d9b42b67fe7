"""KL, top-1 agreement and cloze accuracy on tiny models with known answers."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from llmpress.compress import compress_
from llmpress.config import ClozeParams, EvalParams, Recipe
from llmpress.evaluate.agreement import compare_to_base
from llmpress.evaluate.cloze import ClozeExample, build_examples, cloze_accuracy, encode
from llmpress.evaluate.perplexity import perplexity


class WordTokenizer:
    """One id per whitespace-separated word (ids below 256), BOS 1; a leading space is part of nothing."""

    bos_token_id = 1
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [3 + (sum(map(ord, w)) % 250) for w in text.split()]}


TEXT = " ".join(f"word{i % 37} alpha{i % 11} beta{i % 5}." for i in range(120))


def test_model_against_itself_has_zero_kl_and_full_agreement(tiny_llama) -> None:
    result = compare_to_base(
        tiny_llama, copy.deepcopy(tiny_llama), WordTokenizer(), TEXT, EvalParams(window=64, stride=64)
    )
    assert result.kl_to_base == pytest.approx(0.0, abs=1e-6)
    assert result.top1_agreement == 1.0
    assert result.perplexity == pytest.approx(result.base_perplexity, rel=1e-9)
    alone = perplexity(tiny_llama, WordTokenizer(), TEXT, EvalParams(window=64, stride=64))
    assert result.perplexity == pytest.approx(alone.perplexity, rel=1e-6) and result.tokens == alone.tokens


def test_pruned_model_diverges_from_base(tiny_llama, calibration_ids) -> None:
    base = copy.deepcopy(tiny_llama)
    compress_(tiny_llama, Recipe(name="m", stages=[{"method": "magnitude", "sparsity": 0.7}]), calibration_ids)
    result = compare_to_base(tiny_llama, base, WordTokenizer(), TEXT, EvalParams(window=64, stride=32))
    assert result.kl_to_base > 1e-4
    assert result.top1_agreement < 1.0
    assert math.isfinite(result.perplexity) and result.base_perplexity != result.perplexity


def test_kl_matches_a_direct_computation(tiny_llama) -> None:
    other = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)  # sharper distribution, same ranking of logits
    tok = WordTokenizer()
    params = EvalParams(window=400, stride=400, max_tokens=300)
    result = compare_to_base(other, tiny_llama, tok, TEXT, params)
    ids = torch.tensor([[tok.bos_token_id, *tok(TEXT)["input_ids"][:300]]])
    with torch.no_grad():
        p = torch.log_softmax(tiny_llama(input_ids=ids).logits[0, :-1], -1)
        q = torch.log_softmax(other(input_ids=ids).logits[0, :-1], -1)
    expected = (p.exp() * (p - q)).sum(-1).mean().item()
    assert result.kl_to_base == pytest.approx(expected, rel=1e-4)
    assert result.tokens == 300


DOC = (
    "The council met on Monday to discuss the new bridge across the river near the old market square. "
    "Residents asked many questions about traffic and noise during construction of the bridge. "
    "The mayor promised a public meeting before any final decision on the bridge."
)


def test_cloze_examples_are_last_words_with_enough_context() -> None:
    params = ClozeParams(min_context_words=10, per_document=5, max_examples=50)
    examples = build_examples(DOC + "\n\n" + DOC.replace("bridge", "tunnel"), params)
    assert examples == build_examples(DOC + "\n\n" + DOC.replace("bridge", "tunnel"), params)  # deterministic
    assert {ex.target for ex in examples} <= {"square", "construction", "bridge", "tunnel"}
    for ex in examples:
        assert len(ex.context.split()) >= 10
        assert (ex.context + " " + ex.target) in (DOC + " " + DOC.replace("bridge", "tunnel"))
    assert len(build_examples(DOC, ClozeParams(min_context_words=1000))) == 0


class Oracle(torch.nn.Module):
    """Predicts the next input token exactly (it peeks): accuracy 1.0. With `wrong`, never right: 0.0."""

    def __init__(self, vocab: int, wrong: bool = False) -> None:
        super().__init__()
        self.vocab, self.wrong = vocab, wrong
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        nxt = torch.roll(input_ids, -1, dims=1)
        if self.wrong:
            nxt = (nxt + 1) % self.vocab
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


def test_cloze_accuracy_known_answers() -> None:
    params = ClozeParams(min_context_words=5, per_document=10, max_examples=100, batch_size=3)
    examples = build_examples(DOC, params)
    assert len(examples) == 3
    tok = WordTokenizer()
    assert cloze_accuracy(Oracle(256), tok, examples, params, add_bos=True) == 1.0
    assert cloze_accuracy(Oracle(256, wrong=True), tok, examples, params, add_bos=True) == 0.0


def test_cloze_encoding_keeps_target_at_the_end() -> None:
    params = ClozeParams(max_context_tokens=8)
    tok = WordTokenizer()
    context = "a b c d e f g h i j k"
    ids, n_target = encode(tok, ClozeExample(context=context, target="bridge"), params, add_bos=True)
    assert n_target == 1 and ids[0] == tok.bos_token_id and len(ids) == 1 + 8 + 1
    assert ids[1:-1] == tok(context)["input_ids"][-8:]
    assert ids[-1] == tok("bridge")["input_ids"][0]
