"""The edge bundle on a tiny model: built, verified, run (same tokens as PyTorch), and every kind of tampering or
bad path refused with a message and a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer_json
from tokenizers import Tokenizer

from flows.cli import main as cli
from llmpress import bundle as edge_bundle
from llmpress.bundle import BundleError, build_bundle, verify_bundle


@pytest.fixture(scope="module")
def built(tiny_onnx, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model, onnx_dir = tiny_onnx
    tokenizer_dir = tmp_path_factory.mktemp("tok")
    byte_tokenizer_json(tokenizer_dir)
    (tokenizer_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    model.config.save_pretrained(tokenizer_dir)  # config.json: what genai_config.json needs beside the graph
    out = tmp_path_factory.mktemp("bundles") / "tiny-bundle"
    build_bundle(out, onnx_dir, tokenizer_dir, precision="fp32", opset=18, metrics={"perplexity": 12.5, "x": [1]},
                 gate={"passed": True, "checks": []}, lineage={"git_commit": "abc", "version": "3"})  # fmt: skip
    return model, out


@pytest.fixture
def copy(built, tmp_path) -> Path:
    """A fresh copy of the bundle to tamper with."""
    return Path(shutil.copytree(built[1], tmp_path / "b"))


def test_manifest_lists_every_file_with_hash_and_size(built) -> None:
    _, path = built
    manifest = verify_bundle(path)
    names = {f["path"] for f in manifest["files"]}
    assert {"model.onnx", "tokenizer.json", "generation_config.json", "run.py", "llmpress_generate.py",
            "genai_config.json"} <= names  # fmt: skip
    assert "config.json" not in names
    assert names == {p.name for p in path.iterdir()} - {"manifest.json"}
    for entry in manifest["files"]:
        assert entry["bytes"] == (path / entry["path"]).stat().st_size
        assert entry["sha256"] == edge_bundle.sha256_file(path / entry["path"])
    assert manifest["model"] == {"graph": "model.onnx", "opset": 18, "precision": "fp32", "kv_cache": True,
                                 "precision_counts": {}, "matmul_nbits_accuracy_level": None, "context_length": 256,
                                 "runtimes": ["llmpress-runner", "onnxruntime-genai"]}  # fmt: skip
    assert manifest["metrics"] == {"perplexity": 12.5}  # scalars only
    assert manifest["gate"]["passed"] is True and manifest["lineage"]["git_commit"] == "abc"


def test_run_generates_what_pytorch_generates(built) -> None:
    model, path = built
    prompt = "edge devices"
    ids = Tokenizer.from_file(str(path / "tokenizer.json")).encode(prompt).ids
    expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids) :]
    decoded = Tokenizer.from_file(str(path / "tokenizer.json")).decode(expected.tolist(), skip_special_tokens=True)
    assert edge_bundle.run(path, prompt, max_new_tokens=12) == decoded
    assert edge_bundle.run(path, prompt, 8, temperature=1.0, seed=3) == edge_bundle.run(path, prompt, 8, 1.0, seed=3)


def test_onnxruntime_genai_generates_what_the_runner_and_pytorch_generate(built) -> None:
    import onnxruntime_genai as og

    model, path = built
    prompt = "edge devices"
    ids = Tokenizer.from_file(str(path / "tokenizer.json")).encode(prompt).ids
    genai = og.Model(str(path))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=len(ids) + 24)  # greedy: the bundle's genai_config.json says so
    generator = og.Generator(genai, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    tokens = [int(t) for t in generator.get_sequence(0)][len(ids) :]
    expected = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=2,
                              pad_token_id=2)[0, len(ids) :].tolist()  # fmt: skip
    assert tokens == expected[: len(tokens)] and len(tokens) == len(expected)  # both stop at eos (2) or at 24
    decoded = Tokenizer.from_file(str(path / "tokenizer.json")).decode(tokens, skip_special_tokens=True)
    assert edge_bundle.run(path, prompt, max_new_tokens=24) == decoded


def test_without_an_end_of_sequence_token_there_is_no_genai_config(tiny_onnx, tmp_path) -> None:
    model, onnx_dir = tiny_onnx
    byte_tokenizer_json(tmp_path)
    config = model.config.to_dict() | {"eos_token_id": None}  # a model that never ends: genai refuses it
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = build_bundle(tmp_path / "b", onnx_dir, tmp_path, precision="fp32", opset=18)
    assert not (out / "genai_config.json").exists()
    assert verify_bundle(out)["model"]["runtimes"] == ["llmpress-runner"]


def test_cli_verify_and_run(built, capsys) -> None:
    _, path = built
    assert cli(["bundle", "verify", str(path)]) == 0
    assert "ok (" in capsys.readouterr().out
    assert cli(["bundle", "run", str(path), "hello", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == edge_bundle.run(path, "hello", 5).strip()


def _edit_manifest(path: Path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _first_path(path: Path, name: str) -> None:
    _edit_manifest(path, lambda m: m["files"][0].update(path=name))


def _flip_byte(path: Path) -> None:
    data = bytearray((path / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.onnx").write_bytes(bytes(data))


TAMPERING = [
    ("a flipped byte in the graph", _flip_byte, "sha256 differs"),
    ("a truncated graph", lambda p: os.truncate(p / "model.onnx", 100), "bytes, the manifest says"),
    ("a missing tokenizer", lambda p: (p / "tokenizer.json").unlink(), "missing"),
    ("an unlisted file", lambda p: (p / "extra.py").write_text("print(1)"), "not in the manifest"),
    ("a '..' path", lambda p: _first_path(p, "../model.onnx"), "leaves the bundle"),
    ("an absolute path", lambda p: _first_path(p, "/etc/passwd"), "leaves the bundle"),
    ("a symlink out", lambda p: (p / "run.py").unlink() or (p / "run.py").symlink_to("/etc/hostname"), "symbolic link"),
    ("no manifest", lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
    ("a manifest that is not JSON", lambda p: (p / "manifest.json").write_text("{nope"), "not valid JSON"),
    ("another format", lambda p: _edit_manifest(p, lambda m: m.update(format="zip/9")), "manifest"),
    ("an entry without a hash", lambda p: _edit_manifest(p, lambda m: m["files"][0].pop("sha256")), "sha256"),
    ("the graph unlisted", lambda p: _edit_manifest(p, lambda m: m["model"].update(graph="other.onnx")), "graph"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "tamper", "message"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_tampered_bundles_are_refused(copy, case, tamper, message, capsys) -> None:
    tamper(copy)
    with pytest.raises(BundleError, match=message):
        verify_bundle(copy)
    assert cli(["bundle", "run", str(copy), "hello"]) == 2  # run verifies first and refuses to generate
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


def test_not_a_folder_is_refused(tmp_path) -> None:
    with pytest.raises(BundleError, match="not a bundle folder"):
        verify_bundle(tmp_path / "nowhere")


def test_bad_sampling_settings_exit_cleanly(built, capsys) -> None:
    assert cli(["bundle", "run", str(built[1]), "hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_build_refuses_missing_inputs_and_leaves_nothing(tiny_onnx, tmp_path, monkeypatch) -> None:
    _, onnx_dir = tiny_onnx
    no_tokenizer = tmp_path / "empty"
    no_tokenizer.mkdir()
    with pytest.raises(BundleError, match=r"tokenizer\.json"):
        build_bundle(tmp_path / "out", onnx_dir, no_tokenizer, precision="fp32", opset=18)
    with pytest.raises(BundleError, match=r"model\.onnx"):
        build_bundle(tmp_path / "out", no_tokenizer, no_tokenizer, precision="fp32", opset=18)
    # a failure half-way through (here: hashing) leaves neither the bundle nor its staging folder
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    byte_tokenizer_json(tokenizer_dir)

    def broken(_path: Path) -> str:
        raise OSError("disk error")

    monkeypatch.setattr(edge_bundle, "sha256_file", broken)
    with pytest.raises(OSError, match="disk error"):
        build_bundle(tmp_path / "out", onnx_dir, tokenizer_dir, precision="fp32", opset=18)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "tok"]


def test_both_formats_each_with_its_files_and_scores(tiny_onnx, tmp_path) -> None:
    """The graph and a GGUF in one bundle: each format lists its files, bytes and scores; the GGUF is hashed like
    every other file, and a manifest whose format names a file the bundle lacks is refused."""
    model, onnx_dir = tiny_onnx
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    byte_tokenizer_json(tokenizer_dir)
    model.config.save_pretrained(tokenizer_dir)
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    formats = {"onnx": {"scores": {"perplexity": 12.5}}, "gguf": {"scores": {"perplexity": 12.7}, "exact": 3}}
    out = build_bundle(tmp_path / "both", onnx_dir, tokenizer_dir, precision="fp32", opset=18, gguf=gguf,
                       formats=formats)  # fmt: skip
    both = verify_bundle(out)
    assert both["model"]["runtimes"] == ["llmpress-runner", "onnxruntime-genai", "llama.cpp"]
    assert both["formats"]["gguf"] == {"scores": {"perplexity": 12.7}, "exact": 3, "files": ["model.gguf"],
                                       "bytes": gguf.stat().st_size}  # fmt: skip
    graph_files = {p.name for p in onnx_dir.iterdir() if p.name != "checksums.json"}
    assert set(both["formats"]["onnx"]["files"]) == graph_files | {"genai_config.json"}
    assert both["formats"]["onnx"]["scores"] == {"perplexity": 12.5}
    assert (out / "model.gguf").read_bytes() == gguf.read_bytes()
    with open(out / "model.gguf", "r+b") as handle:  # one flipped byte in the GGUF
        handle.seek(100)
        handle.write(b"\xff")
    with pytest.raises(BundleError, match=r"model\.gguf: sha256 differs"):
        verify_bundle(out)
    broken = json.loads((out / "manifest.json").read_text())
    broken["formats"]["gguf"]["files"] = ["elsewhere.gguf"]
    (out / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(BundleError, match=r"formats\.gguf\.files must list files of the bundle"):
        verify_bundle(out, check_hashes=False)
    with pytest.raises(BundleError, match="neither an ONNX graph nor a GGUF"):
        build_bundle(tmp_path / "none", None, tokenizer_dir)
