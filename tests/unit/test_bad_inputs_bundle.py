"""Bad inputs to `llmpress bundle verify` and `llmpress bundle run`, given as a user would: a manifest of the wrong
shape, a graph that is not one, links and unlisted entries in the folder, impossible sampling settings, a prompt
longer than the model's context. Each is refused with exit 2 and one `error:` line, no traceback, and the bundle
folder is left as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import byte_tokenizer_json

from flows.cli import main
from llmpress import bundle as edge_bundle
from llmpress.bundle import build_bundle, verify_bundle

CONTEXT = 256  # the tiny_onnx model's max_position_embeddings


@pytest.fixture(scope="module")
def built(tiny_onnx, tmp_path_factory) -> Path:
    """A bundle of the tiny model built from a model folder with config.json, so its manifest records the context."""
    model, onnx_dir = tiny_onnx
    model_dir = tmp_path_factory.mktemp("model")
    byte_tokenizer_json(model_dir)
    model.config.save_pretrained(model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    return build_bundle(tmp_path_factory.mktemp("bundles") / "b", onnx_dir, model_dir, precision="fp32", opset=18)


@pytest.fixture
def bundle(built, tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return Path(shutil.copytree(built, tmp_path / "b"))


def _manifest(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        manifest = json.loads((path / "manifest.json").read_text())
        change(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))

    return edit


def _drop(name: str) -> Callable[[Path], None]:
    def drop(path: Path) -> None:
        (path / name).unlink()
        _manifest(lambda m: m.update(files=[f for f in m["files"] if f["path"] != name]))(path)

    return drop


def _model(**fields: object) -> Callable[[Path], None]:
    return _manifest(lambda m: m["model"].update(fields))


def _file(**fields: object) -> Callable[[Path], None]:
    return _manifest(lambda m: m["files"][0].update(fields))


VERIFY = [
    ("model-not-a-mapping", _manifest(lambda m: m.update(model="x")), "model must be an object"),
    ("model-a-list", _manifest(lambda m: m.update(model=[1])), "model must be an object"),
    ("metrics-a-list", _manifest(lambda m: m.update(metrics=[1])), "metrics must be an object"),
    ("graph-a-number", _model(graph=5), "model.graph must be str"),
    ("opset-a-string", _model(opset="18"), "model.opset must be int"),
    ("kv-cache-a-string", _model(kv_cache="yes"), "model.kv_cache must be bool"),
    ("context-a-string", _model(context_length="long"), "model.context_length must be int"),
    ("context-a-bool", _model(context_length=True), "model.context_length must be int"),
    ("context-zero", _model(context_length=0), "model.context_length must be >= 1"),
    ("graph-the-tokenizer", _model(graph="tokenizer.json"), "not an .onnx file"),
    ("graph-unlisted-onnx", _model(graph="other.onnx"), "not an .onnx file"),
    ("bytes-a-string", _file(bytes="12"), "bytes must be an integer"),
    ("bytes-negative", _file(bytes=-1), "bytes must be an integer"),
    ("path-a-number", _file(path=7), "path and sha256 are strings"),
    ("sha256-a-list", _file(sha256=[]), "path and sha256 are strings"),
    ("path-with-nul", _file(path="model.onnx\x00x"), "leaves the bundle"),
    ("files-entry-not-object", _manifest(lambda m: m["files"].append("run.py")), "needs path, bytes and sha256"),
    ("link-to-a-folder", lambda p: (p / "evil").symlink_to("/etc"), "evil: a symbolic link"),
    ("link-to-a-listed-file", lambda p: (p / "alias.onnx").symlink_to(p / "model.onnx"), "a symbolic link"),
    ("dangling-link", lambda p: (p / "gone").symlink_to(p / "nowhere"), "a symbolic link"),
    ("link-in-a-folder", lambda p: (p / "sub").mkdir() or (p / "sub" / "x").symlink_to("/etc"), "sub/x: a symbolic"),
    ("unlisted-empty-folder", lambda p: (p / "extra").mkdir(), "not in the manifest: extra"),
    ("unlisted-nested-file", lambda p: (p / "d").mkdir() or (p / "d" / "f").write_text("x"), "not in the manifest"),
    ("manifest-a-link", lambda p: (p / "manifest.json").symlink_to((p / "manifest.json").rename(p / "m")),
     "manifest.json: a symbolic link"),
    ("listed-file-a-folder", lambda p: (p / "run.py").unlink() or (p / "run.py").mkdir(), "run.py: listed in the"),
]  # fmt: skip

RUN = [
    ("temperature-nan", ["--temperature", "nan"], "temperature must be a finite number >= 0"),
    ("temperature-inf", ["--temperature", "inf"], "temperature must be a finite number >= 0"),
    ("temperature-negative", ["--temperature", "-0.5"], "temperature must be a finite number >= 0"),
    ("top-k-zero", ["--temperature", "1", "--top-k", "0"], "top_k must be >= 1"),
    ("top-p-zero", ["--temperature", "1", "--top-p", "0"], "top_p must be in (0, 1]"),
    ("top-p-above-one", ["--temperature", "1", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    ("top-p-nan", ["--temperature", "1", "--top-p", "nan"], "top_p must be in (0, 1]"),
    ("seed-negative", ["--temperature", "1", "--seed", "-1"], "non-negative"),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` without following links: a file's sha256, 'dir', or a link's target."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[key] = f"-> {os.readlink(path)}"
            else:
                out[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def refused(args: list[str], capsys: pytest.CaptureFixture[str], expected: str, folder: Path | None = None) -> None:
    """`llmpress ARGS` exits 2 with one `error:` line holding `expected`, no traceback, `folder` unchanged."""
    before = snapshot(folder) if folder else None
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\n{out}\n{err}"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err + out
    if folder:
        assert snapshot(folder) == before, "the refusal changed the bundle"


@pytest.mark.parametrize(("name", "tamper", "expected"), VERIFY, ids=[c[0] for c in VERIFY])
def test_bad_bundle_is_refused(bundle, capsys, name, tamper, expected) -> None:
    tamper(bundle)
    refused(["bundle", "verify", str(bundle)], capsys, expected, bundle)
    refused(["bundle", "run", str(bundle), "hello", "--max-new-tokens", "2"], capsys, expected, bundle)


@pytest.mark.parametrize(("name", "options", "expected"), RUN, ids=[c[0] for c in RUN])
def test_bad_sampling_is_refused_before_the_bundle_is_read(bundle, tmp_path, capsys, name, options, expected) -> None:
    refused(["bundle", "run", str(bundle), "hello", *options], capsys, expected, bundle)
    # checked first: a missing bundle is not even looked at
    refused(["bundle", "run", str(tmp_path / "nowhere"), "hello", *options], capsys, expected)


def test_the_context_is_recorded_and_a_prompt_beyond_it_refused(bundle, capsys) -> None:
    assert verify_bundle(bundle)["model"]["context_length"] == CONTEXT
    long_prompt = "word " * 9000  # 45,000 byte-level tokens
    refused(["bundle", "run", str(bundle), long_prompt], capsys, f"context of {CONTEXT} tokens", bundle)
    # fits alone, but not with the new tokens asked for
    prompt = "x" * (CONTEXT - 10)
    refused(["bundle", "run", str(bundle), prompt, "--max-new-tokens", "11"], capsys, f"{CONTEXT - 10} tokens", bundle)
    assert len(edge_bundle.run(bundle, prompt, max_new_tokens=10)) > 0


def test_the_device_runner_refuses_a_long_prompt_too(bundle) -> None:
    done = subprocess.run([sys.executable, str(bundle / "run.py"), "word " * 100, "--max-new-tokens", "200"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and f"context of {CONTEXT} tokens" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, str(bundle / "run.py"), "hi", "--temperature", "nan"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "temperature" in done.stderr and "Traceback" not in done.stderr


def test_a_bundle_without_its_runner_is_refused(bundle, capsys) -> None:
    _drop("run.py")(bundle)
    assert main(["bundle", "verify", str(bundle)]) == 0  # a consistent bundle, but not one that can run
    capsys.readouterr()
    refused(["bundle", "run", str(bundle), "hello"], capsys, "cannot run: run.py", bundle)


def test_running_leaves_the_bundle_as_it_was(bundle, monkeypatch) -> None:
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    monkeypatch.delitem(sys.modules, "llmpress_generate", raising=False)  # imported afresh, from this bundle
    before = snapshot(bundle)
    edge_bundle.run(bundle, "hello", max_new_tokens=3)
    assert snapshot(bundle) == before and sys.dont_write_bytecode is False
    verify_bundle(bundle)
