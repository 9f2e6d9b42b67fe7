"""The repeated n-gram rate of greedy continuations, and the gate check built on it."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB

from llmpress.config import GateParams, RepetitionParams
from llmpress.evaluate.repetition import held_out_prompts, repeated_ngram_rate, torch_continuations, until_eos
from llmpress.gate import run_gate


def test_a_loop_repeats_and_fresh_text_does_not() -> None:
    loop = [5, 6, 7] * 10  # "of the town of the town ..."
    fresh = list(range(30))
    # 27 4-grams in the loop, the first 3 new, every later one seen before
    assert repeated_ngram_rate([loop], 4) == pytest.approx(24 / 27)
    assert repeated_ngram_rate([fresh], 4) == 0.0
    # pooled over continuations, and a repeat counts only within its own continuation
    assert repeated_ngram_rate([loop, fresh], 4) == pytest.approx(24 / (27 + 27))
    assert repeated_ngram_rate([[1, 2, 3, 4], [1, 2, 3, 4]], 4) == 0.0
    # one phrase said twice: [1 2 3 4 9 1 2 3 4] holds 6 4-grams, the last one a repeat
    assert repeated_ngram_rate([[1, 2, 3, 4, 9, 1, 2, 3, 4]], 4) == pytest.approx(1 / 6)
    assert repeated_ngram_rate([[1, 2], []], 4) == 0.0  # too short to hold a 4-gram


def test_prompts_are_evenly_spaced_slices_of_the_text_with_bos() -> None:
    ids = list(range(1000, 1200))
    prompts = held_out_prompts(ids, RepetitionParams(prompts=4, prompt_tokens=11), bos_token_id=1)
    assert prompts.shape == (4, 11) and (prompts[:, 0] == 1).all()
    starts = prompts[:, 1].tolist()
    assert starts[0] == 1000 and starts[-1] == 1000 + 190 - 190 % 3 and len(set(starts)) == 4
    assert all((row[1:] == torch.arange(row[1], row[1] + 10)).all() for row in prompts)
    # a short text gives fewer prompts, never overlapping ones; too short for one is refused by name
    assert held_out_prompts(ids[:25], RepetitionParams(prompts=4, prompt_tokens=11), bos_token_id=None).shape == (2, 11)
    with pytest.raises(ValueError, match=r"eval\.repetition\.prompt_tokens"):
        held_out_prompts(ids[:5], RepetitionParams(prompts=4, prompt_tokens=11), bos_token_id=1)


def test_continuations_stop_at_eos(tiny_llama) -> None:
    prompts = torch.randint(2, VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))
    free = torch_continuations(tiny_llama, prompts, 8, eos_token_id=None)
    assert [len(c) for c in free] == [8, 8, 8]
    eos = free[0][3]  # a token the first row produces: it ends that row there
    stopped = torch_continuations(tiny_llama, prompts, 8, eos_token_id=eos)
    assert stopped[0] == free[0][:3] and all(eos not in c for c in stopped)
    assert until_eos([4, 5, 9, 6], 9) == [4, 5] and until_eos([4, 5], None) == [4, 5]


def test_the_gate_judges_what_ships_and_fails_a_looping_model() -> None:
    base = {"perplexity": 10.0, "repeated_ngram_rate": 0.11}
    gate = GateParams(max_perplexity_ratio=None, max_onnx_logit_diff=None, max_bundle_perplexity_ratio=None,
                      max_bundle_bytes_ratio=None, min_bundle_decode_speedup=None)  # fmt: skip
    checks = lambda metrics: {c.name: c for c in run_gate(metrics, base, gate).checks}  # noqa: E731
    # the bundle's continuations decide when there is a bundle, the PyTorch model's otherwise
    looping_bundle = checks({"repeated_ngram_rate": 0.12, "bundle_repeated_ngram_rate": 0.39})["repetition_increase"]
    assert not looping_bundle.passed and looping_bundle.value == pytest.approx(0.28)
    assert checks({"repeated_ngram_rate": 0.12})["repetition_increase"].passed
    assert not checks({"repeated_ngram_rate": 0.68})["repetition_increase"].passed
    # not measured is not passed; switched off is not checked
    assert not checks({})["repetition_increase"].passed
    off = run_gate({}, base, gate.model_copy(update={"max_repetition_increase": None}))
    assert "repetition_increase" not in {c.name for c in off.checks}
