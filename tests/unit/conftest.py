"""Shared fixtures for the unit tests: a tiny random Llama and calibration token ids."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[2]

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


def snapshot(root: Path) -> dict[str, str]:
    """Every file (sha256) and folder under `root`: what a refused command must leave exactly as it was."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}  # fmt: skip


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The bad-input catalogs' project: the shipped params and recipes, no server or URI from the environment, and
    Prefect trapped - a refusal comes before any server, so nothing can reach Prefect's database."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "params.yaml", project)
    shutil.copytree(REPO / "recipes", project / "recipes")
    monkeypatch.chdir(project)
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "LLMPRESS_DVC_REMOTE",
                "LLMPRESS_BUNDLE_S3_PREFIX"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)

    def prefect_started() -> None:
        raise AssertionError("Prefect was started for an input that should have been refused first")

    monkeypatch.setattr("flows.cli.ensure_api", prefect_started)
    return project


@pytest.fixture
def registry(tmp_path: Path):
    """An MLflow client on a fresh SQLite store, an experiment, and a tiny model folder to register."""
    from llmpress import tracking

    c = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id(c, "unit", tmp_path)
    folder = tmp_path / "hf"
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return c, exp, folder


@pytest.fixture
def calib() -> torch.Tensor:
    """32 windows of 32 random tokens: enough that training stages (distill, qat) generalise to held-out ids."""
    return torch.randint(0, VOCAB, (32, 32), generator=torch.Generator().manual_seed(1234))


@pytest.fixture
def held_out() -> torch.Tensor:
    """16 windows the training stages never see."""
    return torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(99))
