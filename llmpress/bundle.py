"""The edge bundle: the folder an engineer copies to a device, self-describing and verifiable.

    bundle/
      model.onnx (+ model.onnx.data)   the KV-cache graph (llmpress.export.onnx), external weights when > 2 GB
      tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json   (those present)
      run.py, llmpress_generate.py     a runner that needs only numpy, onnxruntime and tokenizers
      manifest.json                    every other file's sha256 and size; opset, precision; metrics, gate report
                                       and lineage of the version it was built for

On the device: `python bundle/run.py "prompt"`. With llmpress: `llmpress bundle run PATH "prompt"` and
`llmpress bundle verify PATH`. Verification re-hashes every file the manifest lists and refuses a manifest path
that is absolute or leaves the bundle (`..`, a symbolic link), a missing file, a size or hash that differs, and a
file the manifest does not list. A bundle is built in a temporary folder beside its destination and renamed into
place, so a failed build never leaves a half-written bundle behind.

This module imports only the standard library at load time; `run` needs numpy, onnxruntime and tokenizers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from llmpress.errors import ConfigError, LlmpressError
from llmpress.files import CHECKSUMS

FORMAT = "llmpress-bundle/1"
MANIFEST = "manifest.json"
GRAPH = "model.onnx"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
RUNNER = Path(__file__).parent / "export" / "generate.py"

RUN_PY = '''"""Generate text from this bundle: python run.py "prompt" [--max-new-tokens N] [--temperature T] [--top-k K]
[--top-p P] [--seed S]. Needs numpy, onnxruntime and tokenizers only."""

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from llmpress_generate import OrtGenerator, Sampling, onnx_session  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    print(generate_text(args.prompt, args.max_new_tokens, sampling))


def generate_text(prompt, max_new_tokens=64, sampling=None):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(HERE / "tokenizer.json"))
    config_file = HERE / "generation_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    ids = tokenizer.encode(prompt).ids
    generator = OrtGenerator(onnx_session(HERE / "model.onnx"))
    out = generator.generate([ids], max_new_tokens, sampling, eos_token_id=eos)
    return tokenizer.decode([int(t) for t in out[0, len(ids):]], skip_special_tokens=True)


if __name__ == "__main__":
    main()
'''


class BundleError(LlmpressError):
    """A bundle that cannot be built, or does not verify; the message says which file and why."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_bundle(out_dir: str | Path, onnx_dir: str | Path, tokenizer_dir: str | Path, *, precision: str,
                 opset: int, metrics: dict[str, Any] | None = None, gate: dict[str, Any] | None = None,
                 lineage: dict[str, str] | None = None, precision_counts: dict[str, int] | None = None,
                 accuracy_level: int | None = None) -> Path:  # fmt: skip
    """Assemble the bundle at `out_dir` (replaced if it exists) and return it. `precision` and `precision_counts`
    say what the graph's weight matmuls and lookups hold (`llmpress.export.packed.precision_counts`)."""
    onnx_dir, tokenizer_dir, out_dir = Path(onnx_dir), Path(tokenizer_dir), Path(out_dir)
    if not (onnx_dir / GRAPH).is_file():
        raise BundleError(f"no {GRAPH} in {onnx_dir}: export the model to ONNX first")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise BundleError(f"no tokenizer.json in {tokenizer_dir}: the runner needs the fast tokenizer's file")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for item in sorted(onnx_dir.iterdir()):  # the graph and its external data files
            if item.is_file() and not item.is_symlink() and item.name != CHECKSUMS:  # the manifest has them
                shutil.copy2(item, staging / item.name)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, staging / name)
        shutil.copy2(RUNNER, staging / "llmpress_generate.py")
        (staging / "run.py").write_text(RUN_PY)
        for path in staging.iterdir():  # durable before the rename makes the bundle visible
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
        files = [
            {"path": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(staging.iterdir())
        ]
        manifest = {
            "format": FORMAT,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model": {
                "graph": GRAPH,
                "opset": opset,
                "precision": precision,
                "kv_cache": True,
                "precision_counts": precision_counts or {},
                "matmul_nbits_accuracy_level": accuracy_level,
            },
            "files": files,
            "metrics": _json_safe(metrics or {}),
            "gate": gate or {},
            "lineage": lineage or {},
        }
        _write_synced(staging / MANIFEST, json.dumps(manifest, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def verify_bundle(path: str | Path, check_hashes: bool = True) -> dict[str, Any]:
    """Check every file against the manifest; returns the manifest, raises BundleError naming the first problem.

    `check_hashes=False` checks everything but the sha256 of each file (layout, sizes, paths): right after
    `build_bundle`, which has just hashed the files it wrote, that is all a re-read could catch."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle folder")
    if not (root / MANIFEST).exists():
        raise BundleError(f"{root} has no {MANIFEST}")
    from llmpress.loading import read_json

    try:
        manifest = read_json(root / MANIFEST)
    except ConfigError as exc:
        raise BundleError(str(exc)) from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), list)
    ):
        raise BundleError(f"{root / MANIFEST}: not an {FORMAT} manifest (format and files are required)")
    resolved_root = root.resolve()
    listed = set()
    for entry in manifest["files"]:
        if not isinstance(entry, dict) or not {"path", "bytes", "sha256"} <= set(entry):
            raise BundleError(f"{MANIFEST}: every file entry needs path, bytes and sha256, got {entry!r}")
        name = str(entry["path"])
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or "\\" in name or name in ("", "."):
            raise BundleError(f"{MANIFEST}: path {name!r} leaves the bundle (absolute or with '..'); refused")
        file = root / pure
        if file.is_symlink() or not file.resolve().is_relative_to(resolved_root):
            raise BundleError(f"{name}: a symbolic link or a path outside the bundle; refused")
        if not file.is_file():
            raise BundleError(f"{name}: listed in the manifest but missing")
        if file.stat().st_size != entry["bytes"]:
            raise BundleError(f"{name}: {file.stat().st_size} bytes, the manifest says {entry['bytes']}")
        if check_hashes and sha256_file(file) != entry["sha256"]:
            raise BundleError(f"{name}: sha256 differs from the manifest (corrupted or modified)")
        listed.add(pure.as_posix())
    unlisted = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir() and p.name != MANIFEST)
    extra = [p for p in unlisted if p not in listed]
    if extra:
        raise BundleError(f"files not in the manifest: {', '.join(extra)}; refused")
    graph = manifest.get("model", {}).get("graph", GRAPH)
    if graph not in listed:
        raise BundleError(f"{MANIFEST}: the model graph {graph!r} is not among the listed files")
    return manifest


def run(path: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
        top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> str:  # fmt: skip
    """Verify the bundle, then generate a continuation of `prompt` with its own runner."""
    root = Path(path)
    verify_bundle(root)
    import runpy

    runner = runpy.run_path(str(root / "run.py"), run_name="llmpress_bundle_runner")
    try:
        sampling = runner["Sampling"](temperature, top_k, top_p, seed)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    return runner["generate_text"](prompt, max_new_tokens, sampling)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """Scalars and short lists only (the manifest is read by people and small devices)."""
    return {k: v for k, v in values.items() if isinstance(v, str | int | float | bool) or v is None}
