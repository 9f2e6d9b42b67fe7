"""KL, top-1 agreement and cloze accuracy on tiny models with known answers."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from llmpress.compress import compress_
from llmpress.config import ClozeParams, EvalParams, Recipe
from llmpress.evaluate import logits as logits_module
from llmpress.evaluate.agreement import base_pass, compare_to_base
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


class OracleDecoder(torch.nn.Module):
    """A 'decoder' whose hidden state at each position is the one-hot of the next input token (it peeks)."""

    def __init__(self, vocab: int, wrong: bool) -> None:
        super().__init__()
        self.vocab, self.wrong = vocab, wrong

    def forward(self, input_ids: torch.Tensor, **_kwargs) -> SimpleNamespace:
        nxt = torch.roll(input_ids, -1, dims=1)
        if self.wrong:
            nxt = (nxt + 1) % self.vocab
        return SimpleNamespace(last_hidden_state=torch.nn.functional.one_hot(nxt, self.vocab).float())


class Oracle(torch.nn.Module):
    """Predicts the next input token exactly (its head is the identity): accuracy 1.0. With `wrong`, never: 0.0."""

    def __init__(self, vocab: int, wrong: bool = False) -> None:
        super().__init__()
        self.model = OracleDecoder(vocab, wrong)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def get_decoder(self) -> torch.nn.Module:
        return self.model

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool = False) -> SimpleNamespace:  # fmt: skip
        return SimpleNamespace(logits=self.model(input_ids=input_ids).last_hidden_state)


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


def test_cloze_scores_like_a_full_forward(tiny_llama) -> None:
    """The head runs only where cloze reads it; the verdicts are those of the full logits' argmax."""
    tok = WordTokenizer()
    params = ClozeParams(min_context_words=5, per_document=10, max_examples=100, batch_size=2)
    examples = build_examples(DOC + "\n\n" + DOC.replace("bridge", "tunnel"), params)
    with torch.no_grad():
        hits = []
        for ex in examples:
            ids, n = encode(tok, ex, params, add_bos=True)
            predicted = tiny_llama(input_ids=torch.tensor([ids])).logits[0].argmax(-1)
            hits.append(torch.equal(predicted[len(ids) - n - 1 : len(ids) - 1], torch.tensor(ids[len(ids) - n :])))
    assert cloze_accuracy(tiny_llama, tok, examples, params, add_bos=True) == sum(hits) / len(hits)


def test_cached_base_pass_gives_identical_results(tiny_llama, make_tiny_llama, calibration_ids) -> None:
    base = make_tiny_llama()
    compress_(tiny_llama, Recipe(name="m", stages=[{"method": "magnitude", "sparsity": 0.5}]), calibration_ids)
    tok, params = WordTokenizer(), EvalParams(window=64, stride=48, batch_size=3)
    direct = compare_to_base(tiny_llama, base, tok, TEXT, params)
    passed = base_pass(base, tok, TEXT, params)
    cached = compare_to_base(tiny_llama, base, tok, TEXT, params, base_hidden=passed.hidden)
    assert cached == direct  # bit for bit: the head on stored hidden states is the forward's own head
    assert passed.perplexity == direct.base_perplexity and passed.tokens == direct.tokens


def test_chunk_size_does_not_change_results(tiny_llama, make_tiny_llama, monkeypatch) -> None:
    base = make_tiny_llama()
    with torch.no_grad():
        base.lm_head.weight.mul_(0.7)
    tok, params = WordTokenizer(), EvalParams(window=64, stride=64)
    whole = compare_to_base(tiny_llama, base, tok, TEXT, params)
    monkeypatch.setattr(logits_module, "CHUNK_VALUES", 3 * 256)  # 3 positions per chunk
    assert logits_module.chunk_positions(256) == 3
    chunked = compare_to_base(tiny_llama, base, tok, TEXT, params)
    assert chunked.kl_to_base == pytest.approx(whole.kl_to_base, rel=1e-5)
    assert chunked.perplexity == pytest.approx(whole.perplexity, rel=1e-6)
    assert chunked.top1_agreement == whole.top1_agreement


class Masked(torch.nn.Module):
    """A causal LM whose head sets some tokens' logits to -inf (as models with a reserved vocabulary do)."""

    def __init__(self, inner: torch.nn.Module, masked: list[int]) -> None:
        super().__init__()
        self.inner, self.masked, self.config = inner, masked, inner.config

    def get_decoder(self) -> torch.nn.Module:
        return self.inner.get_decoder()

    def forward(self, **kwargs) -> SimpleNamespace:
        logits = self.inner(**kwargs).logits.clone()
        logits[..., self.masked] = -math.inf
        return SimpleNamespace(logits=logits)


def test_kl_ignores_tokens_the_base_model_masks(tiny_llama, make_tiny_llama) -> None:
    base, other = Masked(make_tiny_llama(), [5, 9]), Masked(tiny_llama, [5, 9])
    with torch.no_grad():
        tiny_llama.lm_head.weight.mul_(1.3)
    tok = WordTokenizer()
    params = EvalParams(window=400, stride=400, max_tokens=300)
    result = compare_to_base(other, base, tok, TEXT, params)
    ids = torch.tensor([[tok.bos_token_id, *tok(TEXT)["input_ids"][:300]]])
    with torch.no_grad():
        p = torch.log_softmax(base(input_ids=ids).logits[0, :-1].double(), -1)
        q = torch.log_softmax(other(input_ids=ids).logits[0, :-1].double(), -1)
    keep = torch.ones(p.shape[-1], dtype=torch.bool)
    keep[[5, 9]] = False
    expected = (p.exp() * (p - q))[:, keep].sum(-1).mean().item()
    assert math.isfinite(result.kl_to_base) and result.kl_to_base == pytest.approx(expected, rel=1e-4)
