from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from llmpress.config import EvalParams
from llmpress.errors import LlmpressError
from llmpress.evaluate.perplexity import Window, make_windows, perplexity, window_nll

BOS = 0


def _params(window: int, stride: int, add_bos: bool, max_tokens: int = 16384, batch_size: int = 4) -> EvalParams:
    return EvalParams(window=window, stride=stride, add_bos=add_bos, max_tokens=max_tokens, batch_size=batch_size)


def _window_begin(w: Window, ids: list[int], offset: int) -> int:
    """Position in `ids` of the window's first text token (ids are distinct in these tests)."""
    return ids.index(w.tokens[offset])


def _scored_positions(windows: list[Window], add_bos: bool, ids: list[int]) -> list[int]:
    """Map every scored window index back to its position in `ids`."""
    offset = 1 if add_bos else 0
    positions = []
    for w in windows:
        begin = _window_begin(w, ids, offset)
        positions += [begin + i - offset for i in range(w.first_scored, len(w.tokens))]
    return positions


COMBOS = [
    # (n_tokens, window, stride, add_bos, max_tokens)
    (100, 16, 16, True, 16384),
    (100, 16, 16, False, 16384),
    (100, 16, 5, True, 16384),
    (100, 16, 5, False, 16384),
    (100, 16, 1, False, 16384),
    (100, 16, 15, True, 16384),
    (97, 10, 10, True, 16384),
    (97, 10, 3, False, 16384),
    (200, 32, 8, True, 50),
    (200, 32, 32, False, 50),
    (9, 64, 64, True, 16384),
    (9, 64, 64, False, 16384),
]


@pytest.mark.parametrize(("n", "window", "stride", "add_bos", "max_tokens"), COMBOS)
def test_make_windows_scores_every_token_exactly_once(n, window, stride, add_bos, max_tokens) -> None:
    ids = list(range(1000, 1000 + n))  # distinct, so positions are recoverable
    params = _params(window, stride, add_bos, max_tokens)
    windows = make_windows(ids, params, BOS)
    used = ids[:max_tokens]
    positions = _scored_positions(windows, add_bos, ids)

    counts = Counter(positions)
    assert all(c == 1 for c in counts.values()), "a token was scored twice"
    assert set(positions) <= set(range(len(used)))

    for w in windows:
        assert len(w.tokens) <= window
        assert 1 <= w.first_scored < len(w.tokens)
        if add_bos:
            assert w.tokens[0] == BOS
            assert BOS not in w.tokens[1:]
        else:
            assert BOS not in w.tokens
        # windows start every `stride` text tokens, capped at the text tokens a window holds
        begin = _window_begin(w, ids, 1 if add_bos else 0)
        assert begin % min(stride, window - (1 if add_bos else 0)) == 0
        assert w.tokens[(1 if add_bos else 0) :] == used[begin : begin + len(w.tokens) - (1 if add_bos else 0)]

    if add_bos:
        assert sorted(positions) == list(range(len(used)))
    else:
        # without BOS a window's first token is context only: the unscored tokens are exactly the first token of
        # the text and the first tokens of windows that start where the previous one ended
        unscored = set(range(len(used))) - set(positions)
        assert 0 in unscored
        starts = {_window_begin(w, ids, 0) for w in windows}
        assert unscored <= starts


def test_make_windows_default_protocol_with_bos_scores_every_token() -> None:
    """params.yaml's protocol (window == stride, BOS on): windows of BOS + window-1 tokens must tile the text.

    Each window holds window - 1 text tokens, so consecutive windows must start window - 1 tokens apart; starting
    them `stride` = window tokens apart leaves one token per window unscored.
    """
    ids = list(range(1, 2049))
    windows = make_windows(ids, EvalParams(), BOS)  # window 512, stride 512, add_bos, max_tokens 16384
    scored = sum(len(w.tokens) - w.first_scored for w in windows)
    assert scored == len(ids)
    text_tokens = [t for w in windows for t in w.tokens[w.first_scored :]]
    assert text_tokens == ids


def test_make_windows_overlap_uses_context() -> None:
    ids = list(range(1, 21))
    windows = make_windows(ids, _params(window=8, stride=4, add_bos=True), BOS)
    # first window: BOS + 7 tokens, all scored; later windows re-read 3 tokens of context
    assert windows[0] == Window(tokens=[BOS, *range(1, 8)], first_scored=1)
    assert windows[1] == Window(tokens=[BOS, *range(5, 12)], first_scored=4)
    assert windows[-1].tokens[-1] == 20


def test_make_windows_without_bos_known_layout() -> None:
    ids = list(range(1, 13))
    windows = make_windows(ids, _params(window=8, stride=8, add_bos=False), BOS)
    assert windows == [Window(tokens=list(range(1, 9)), first_scored=1), Window(tokens=[9, 10, 11, 12], first_scored=1)]


def test_make_windows_bos_id_none_behaves_as_no_bos() -> None:
    ids = list(range(1, 30))
    a = make_windows(ids, _params(window=8, stride=8, add_bos=True), None)
    b = make_windows(ids, _params(window=8, stride=8, add_bos=False), BOS)
    assert a == b


def test_make_windows_max_tokens_cuts() -> None:
    ids = list(range(1, 101))
    windows = make_windows(ids, _params(window=8, stride=7, add_bos=True, max_tokens=20), BOS)
    assert max(t for w in windows for t in w.tokens) == 20
    assert sum(len(w.tokens) - w.first_scored for w in windows) == 20


def _uniform_logits_fn(vocab: int):
    def fn(ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, vocab)

    return fn


@pytest.mark.parametrize("vocab", [7, 256, 50_000])
@pytest.mark.parametrize(("window", "stride", "add_bos"), [(16, 15, True), (16, 4, False), (10, 10, False)])
def test_window_nll_uniform_logits_gives_perplexity_vocab(vocab, window, stride, add_bos) -> None:
    ids = [(i * 7919) % vocab + (1 if vocab > 1 else 0) for i in range(123)]
    ids = [min(t, vocab - 1) for t in ids]
    windows = make_windows(ids, _params(window, stride, add_bos), BOS)
    nll, count = window_nll(_uniform_logits_fn(vocab), windows, batch_size=3)
    assert count == sum(len(w.tokens) - w.first_scored for w in windows)
    if add_bos:
        assert count == 123
    assert math.exp(nll / count) == pytest.approx(vocab, rel=1e-6)
    assert nll == pytest.approx(count * math.log(vocab), rel=1e-6)


def test_window_nll_perfect_predictor_gives_perplexity_one() -> None:
    vocab = 64
    ids = [(i * 13 + 5) % vocab for i in range(200)]
    windows = make_windows(ids, _params(window=16, stride=8, add_bos=True), BOS)

    # a table of what follows each window prefix is position-dependent; build logits from the ids themselves
    def perfect(batch: torch.Tensor) -> torch.Tensor:
        logits = torch.full((*batch.shape, vocab), -1e4)
        logits[:, :-1].scatter_(2, batch[:, 1:, None], 1e4)
        return logits

    nll, count = window_nll(perfect, windows, batch_size=4)
    assert count == 200
    assert nll == pytest.approx(0.0, abs=1e-6)
    assert math.exp(nll / count) == pytest.approx(1.0, abs=1e-6)


def test_window_nll_progress_and_batching_invariance() -> None:
    vocab = 32
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (150,), generator=gen).tolist()
    table = torch.randn(vocab, vocab, generator=gen)

    def logits_fn(batch: torch.Tensor) -> torch.Tensor:
        return table[batch]  # logits depend on the current token only

    windows = make_windows(ids, _params(window=16, stride=15, add_bos=True), BOS)
    calls = []
    nll1, count1 = window_nll(logits_fn, windows, batch_size=1, progress=lambda d, t: calls.append((d, t)))
    nll4, count4 = window_nll(logits_fn, windows, batch_size=4)
    assert count1 == count4 == 150
    assert nll1 == pytest.approx(nll4, rel=1e-6)
    assert calls[-1] == (len(windows), len(windows))
    # direct computation
    expected = 0.0
    for w in windows:
        logprobs = F.log_softmax(table[torch.tensor(w.tokens[:-1])], dim=-1)
        for i in range(w.first_scored, len(w.tokens)):
            expected -= logprobs[i - 1, w.tokens[i]].item()
    assert nll1 == pytest.approx(expected, rel=1e-5)


def test_perplexity_on_tiny_llama_matches_full_forward(tiny_llama, char_tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs."
    ids = char_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 85
    params = _params(window=len(ids) + 1, stride=len(ids) + 1, add_bos=True, batch_size=2)
    result = perplexity(tiny_llama, char_tokenizer, text, params)

    assert result.windows == 1
    assert result.tokens == len(ids)
    full = torch.tensor([[char_tokenizer.bos_token_id, *ids]])
    with torch.no_grad():
        logits = tiny_llama(input_ids=full, use_cache=False).logits
    mean_nll = F.cross_entropy(logits[0, :-1].double(), full[0, 1:], reduction="mean").item()
    assert math.isfinite(result.perplexity)
    assert result.perplexity == pytest.approx(math.exp(mean_nll), rel=1e-5)
    assert result.nll == pytest.approx(mean_nll * len(ids), rel=1e-5)
    # a random model on a 256-token vocabulary is close to uniform
    assert 100 < result.perplexity < 700


def test_perplexity_windowed_on_tiny_llama(tiny_llama, char_tokenizer) -> None:
    text = "abcdefghijklmnopqrstuvwxyz" * 4
    params = _params(window=16, stride=8, add_bos=True, batch_size=3)
    result = perplexity(tiny_llama, char_tokenizer, text, params)
    assert result.tokens == len(text)
    assert result.windows == len(make_windows(char_tokenizer(text)["input_ids"], params, 0))
    assert result.perplexity == pytest.approx(math.exp(result.nll / result.tokens))
    assert math.isfinite(result.perplexity) and result.perplexity > 1


@pytest.mark.parametrize(("text", "add_bos"), [("", True), ("x", False)])
def test_perplexity_with_no_scored_token_is_a_clear_error(tiny_llama, char_tokenizer, text, add_bos) -> None:
    # Nothing to score (empty held-out text, or one token without BOS) is a user-fixable input problem:
    # it should raise LlmpressError, not ZeroDivisionError.
    with pytest.raises(LlmpressError):
        perplexity(tiny_llama, char_tokenizer, text, _params(window=16, stride=16, add_bos=add_bos))
