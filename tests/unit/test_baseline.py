"""The base model's evaluation, kept once and reused: keyed by what it depends on, read back exactly; logits from
kept hidden states equal the forward's own; batched greedy generations equal one prompt at a time."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from llmpress.config import EvalParams
from llmpress.evaluate.baseline import HIDDEN, baseline_key, compute_baseline, load_baseline
from llmpress.evaluate.generate import greedy_generations
from llmpress.evaluate.logits import head_logits, hidden_states

WORDS = ["river", "bridge", "market", "council", "traffic", "meeting", "square", "noise"]
TEXT = " ".join(f"The {WORDS[i % 8]} near the {WORDS[(i * 3) % 8]} was {WORDS[(i * 5) % 8]}." for i in range(60))


class CharTokenizer:
    """One id per character (3..254), BOS 1, EOS 2, pad 0; decodes back."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = False, return_tensors: str | None = None) -> dict:
        return {"input_ids": [3 + ord(c) % 250 for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(int(i) - 3) if int(i) >= 3 else "" for i in ids)


def test_head_logits_equal_the_forward(tiny_llama) -> None:
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = tiny_llama(input_ids=ids).logits
    hidden = hidden_states(tiny_llama, ids)
    assert torch.equal(head_logits(tiny_llama, hidden), full)
    assert torch.equal(head_logits(tiny_llama, hidden[:, 7:19]), full[:, 7:19])
    assert "forward" not in vars(tiny_llama.get_decoder())  # the stand-in is gone afterwards


def test_head_logits_keep_what_the_head_does_after_the_decoder() -> None:
    """Gemma 2 soft-caps its logits after lm_head: the kept hidden states must give the capped logits."""
    config = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, vocab_size=128, final_logit_softcapping=2.0)  # fmt: skip
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=ids).logits
    assert full.abs().max() <= 2.0  # capped
    assert torch.equal(head_logits(model, hidden_states(model, ids)), full)


def test_baseline_is_kept_and_found_by_its_key(tiny_llama, tmp_path) -> None:
    params = EvalParams(window=64, stride=64, batch_size=2)
    params = params.model_copy(update={"cloze": params.cloze.model_copy(update={"min_context_words": 5})})
    tok = CharTokenizer()
    key = baseline_key("base-sha", "eval-md5", params)
    metrics = compute_baseline(tiny_llama, tok, TEXT, params, tmp_path / "b", key, {"bytes_on_disk": 1})
    found = load_baseline(tmp_path / "b", key)
    assert found is not None
    kept, hidden = found
    assert kept == json.loads(json.dumps(metrics))
    assert len(hidden) > 1 and all(h.shape[-1] == tiny_llama.config.hidden_size for h in hidden)
    assert kept["generations"] == greedy_generations(tiny_llama, tok, params.generation.prompts, 32)
    assert (tmp_path / "b" / "checksums.json").is_file()  # written whole (files.atomic_folder)
    # Anything it depends on changes the key; a folder made for another key is not used.
    other_protocol = params.model_copy(update={"max_tokens": 1000})
    keys = {key, baseline_key("other", "eval-md5", params), baseline_key("base-sha", "other", params),
            baseline_key("base-sha", "eval-md5", other_protocol)}  # fmt: skip
    assert len(keys) == 4
    assert load_baseline(tmp_path / "b", baseline_key("other", "eval-md5", params)) is None
    # Speed settings are not part of it: latency is measured again in every run.
    faster = params.model_copy(update={"speed": params.speed.model_copy(update={"repeats": 7})})
    assert baseline_key("base-sha", "eval-md5", faster) == key
    (tmp_path / "b" / HIDDEN).write_bytes(b"not safetensors")
    assert load_baseline(tmp_path / "b", key) is None  # damaged: computed again, never half-read


@pytest.mark.parametrize("new_tokens", [1, 9])
def test_batched_generations_equal_one_prompt_at_a_time(tiny_llama, new_tokens: int) -> None:
    tok = CharTokenizer()
    prompts = ["a", "the longer prompt", "mid size"]
    together = greedy_generations(tiny_llama, tok, prompts, new_tokens)
    alone = [greedy_generations(tiny_llama, tok, [p], new_tokens)[0] for p in prompts]
    assert together == alone
    assert greedy_generations(tiny_llama, tok, [], new_tokens) == []
