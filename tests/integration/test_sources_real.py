"""Model sources against real things: a SeaweedFS S3 server on 127.0.0.1, the shipped GGUF file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmpress.errors import LlmpressError
from llmpress.hashing import folder_hash
from llmpress.sources import SHIPPED_NAME, load_model, resolve, shipped_gguf_path
from tests.s3server import seaweedfs
from tests.unit.conftest import byte_tokenizer_json

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch: pytest.MonkeyPatch):
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3


def _tiny_folder(path: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    byte_tokenizer_json(path)  # a model source needs its tokenizer (resolve refuses a folder without)
    return path


def test_s3_source_downloads_an_identical_folder(s3_env, tmp_path: Path) -> None:
    local = _tiny_folder(tmp_path / "tiny")
    client = s3_env.client()
    client.create_bucket(Bucket="models")
    for file in local.iterdir():
        client.upload_file(str(file), "models", f"team/tiny-llama/{file.name}")
    client.put_object(Bucket="models", Key="team/tiny-llama-other/config.json", Body=b"{}")  # a sibling prefix

    resolved = resolve("s3://models/team/tiny-llama", tmp_path / "models")
    assert resolved.sha256 == folder_hash(local)
    assert sorted(p.name for p in Path(resolved.path).iterdir()) == sorted(p.name for p in local.iterdir())
    a, b = load_model(resolved.path), load_model(local)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_s3_source_errors_are_clear(s3_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LlmpressError, match="no objects under this prefix"):
        resolve("s3://models/does/not/exist", tmp_path / "models")
    with pytest.raises(LlmpressError, match="S3 download failed"):
        resolve("s3://no-such-bucket-here/x", tmp_path / "models")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(LlmpressError, match="S3 download failed"):
        resolve("s3://models/team/tiny-llama", tmp_path / "models")
    assert not (tmp_path / "models" / "s3" / "models" / "team" / "tiny-llama").exists()


def test_s3_source_without_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(LlmpressError, match="credentials"):
        resolve("s3://models/team/tiny-llama", tmp_path / "models")


def test_gguf_file_source_matches_the_default(tmp_path: Path) -> None:
    gguf = shipped_gguf_path()
    resolved = resolve(str(gguf), tmp_path / "models")
    assert Path(resolved.path).parent == (tmp_path / "models").resolve()
    assert resolved.sha256 == folder_hash(REPO / "models" / SHIPPED_NAME)  # same conversion, same bytes
    again = resolve(str(gguf), tmp_path / "models")  # converted once: the second call reuses the folder
    assert again.sha256 == resolved.sha256 and os.path.samefile(again.path, resolved.path)


def test_gguf_export_of_the_shipped_model_matches_the_shipped_file(tmp_path: Path) -> None:
    """The shipped model quantized on the Q4_1 grid (decoder) and symmetric 8-bit (table) and written by
    `export_gguf` is the shipped GGUF again: same tensor names, block types, shapes, hyperparameters and tokens;
    the decoder's blocks bit for bit (q/k rows in llama.cpp's order), the table within one 8-bit step."""
    import gguf
    import numpy as np

    from llmpress.compress import compress_
    from llmpress.config import Recipe
    from llmpress.export.gguf import export_gguf

    folder = REPO / "models" / SHIPPED_NAME
    model = load_model(folder)
    stages = [{"method": "rtn", "bits": 4, "group_size": 32, "offset": "min", "targets": [".*_proj"]},
              {"method": "embeddings", "bits": 8, "group_size": 32, "symmetric": True}]  # fmt: skip
    compress_(model, Recipe(name="q4_1", stages=stages), torch.zeros(1, 16, dtype=torch.long))  # no data is read
    report = export_gguf(model, folder, tmp_path / "llmpress.gguf").to_dict()
    assert report["requantized"] == [] and report["near_exact"] == 0
    ours, theirs = gguf.GGUFReader(str(tmp_path / "llmpress.gguf")), gguf.GGUFReader(str(shipped_gguf_path()))
    mine = {t.name: t for t in ours.tensors}
    assert set(mine) == {t.name for t in theirs.tensors}
    errors = {}
    for original in theirs.tensors:
        t = mine[original.name]
        assert t.tensor_type == original.tensor_type and list(t.shape) == list(original.shape), original.name
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        b = gguf.quants.dequantize(original.data, original.tensor_type)
        errors[original.name] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
        if original.name != "token_embd.weight":
            assert np.array_equal(t.data, original.data), original.name  # the very bytes
    # The decoder's Q4_1 blocks (and norms) are the shipped file's bit for bit: names, q/k row order, layout.
    assert {name: e for name, e in errors.items() if name != "token_embd.weight"} == dict.fromkeys(
        set(errors) - {"token_embd.weight"}, 0.0
    )
    # llmpress's symmetric 8-bit grid (max|w| over 127.5 steps) is not Q8_0's (over 127): within one step.
    assert 0 < errors["token_embd.weight"] < 1 / 127
    fields = {k: f.contents() for k, f in ours.fields.items() if k.startswith(("llama.", "tokenizer.ggml.model"))}
    assert fields == {k: f.contents() for k, f in theirs.fields.items() if k in fields}
    assert ours.fields["tokenizer.ggml.tokens"].contents() == theirs.fields["tokenizer.ggml.tokens"].contents()
