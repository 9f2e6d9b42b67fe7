"""Shared fixtures for the unit tests: a tiny random Llama and calibration token ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 256


def build_tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    return model.float().eval()


@pytest.fixture(autouse=True)
def _single_torch_thread():
    """The models here are tiny: one intra-op thread is as fast, and it avoids the large slow-downs that thread
    oversubscription causes when other processes share the (2-core) machine. Restored after each test, so other
    test directories run in the same session keep their setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    """A fresh (function-scoped: compress_ works in place) randomly initialised 3-block Llama, fp32, eval mode."""
    return build_tiny_llama()


@pytest.fixture
def make_tiny_llama():
    """The builder behind `tiny_llama`, for tests that need several identical models."""
    return build_tiny_llama


@pytest.fixture
def calibration_ids() -> torch.Tensor:
    """[8, 32] token ids from a seeded generator."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (8, 32), generator=generator)


class CharTokenizer:
    """A minimal tokenizer: one id per character (1..255), BOS = 0. Enough for the code paths under test."""

    bos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        assert add_special_tokens is False
        return {"input_ids": [ord(c) % 255 + 1 for c in text]}


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> tuple[LlamaForCausalLM, Path]:
    """A tiny random Llama (2 blocks, confident logits so greedy choices are no ties) and its KV-cache ONNX graph,
    exported once per session (about 10 s)."""
    from llmpress.export.onnx import export_onnx

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    graph = export_onnx(model, tmp_path_factory.mktemp("onnx"))
    return model, graph.parent


def byte_tokenizer_json(path: Path) -> Path:
    """A byte-level tokenizer.json with ids 0..255 (no merges), so every text maps into the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"
