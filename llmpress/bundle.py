"""The edge bundle: the folder an engineer copies to a device, self-describing and verifiable.

    bundle/
      model.onnx (+ model.onnx.data)   the KV-cache graph (llmpress.export.onnx), external weights when > 2 GB
      tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json   (those present)
      run.py, llmpress_generate.py     a runner that needs only numpy, onnxruntime and tokenizers
      genai_config.json                the same graph for onnxruntime-genai (llmpress.export.genai), when the
                                       model folder has its config.json
      model.gguf                       the same model for llama.cpp (llmpress.export.gguf), when export.formats
                                       has gguf
      manifest.json                    every other file's sha256 and size; opset, precision, context length;
                                       per format (onnx, gguf) its files, bytes, scores in its own runtime and
                                       details; metrics, gate report and lineage of the version it was built for

A bundle holds at least one of the graph and the GGUF; with the GGUF only, there is no runner and `model` lists
llama.cpp as the runtime.

On the device: `python bundle/run.py "prompt"`. With llmpress: `llmpress bundle run PATH "prompt"` and
`llmpress bundle verify PATH`. Verification checks the type of every manifest field that is read, re-hashes every
file the manifest lists and refuses a manifest path that is absolute or leaves the bundle (`..`), a symbolic link
anywhere in the folder, a missing file, a size or hash that differs, and a file or folder the manifest does not
list. A bundle is built in a temporary folder beside its destination and renamed into place, so a failed build
never leaves a half-written bundle behind.

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
GGUF = "model.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
RUNNER = Path(__file__).parent / "export" / "generate.py"
RUN_FILES = ("run.py", "llmpress_generate.py", "tokenizer.json")  # what `run` needs besides the graph
# the manifest's `model` fields and their types (all optional: older bundles lack the later ones)
MODEL_FIELDS: dict[str, tuple[type, ...]] = {
    "graph": (str,), "opset": (int,), "precision": (str,), "kv_cache": (bool,), "precision_counts": (dict,),
    "matmul_nbits_accuracy_level": (int, type(None)), "context_length": (int,), "runtimes": (list,),
}  # fmt: skip

RUN_PY = '''"""Generate text from this bundle: python run.py "prompt" [--max-new-tokens N] [--temperature T] [--top-k K]
[--top-p P] [--seed S]. Needs numpy, onnxruntime and tokenizers only."""

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True  # no __pycache__: the folder stays exactly what its manifest lists

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
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
        print(generate_text(args.prompt, args.max_new_tokens, sampling))
    except ValueError as exc:
        parser.error(str(exc))


def generate_text(prompt, max_new_tokens=64, sampling=None):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(HERE / "tokenizer.json"))
    config_file = HERE / "generation_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    ids = tokenizer.encode(prompt).ids
    context = json.loads((HERE / "manifest.json").read_text())["model"].get("context_length")
    if context and len(ids) + max_new_tokens > context:
        raise ValueError(f"the prompt is {len(ids)} tokens: with {max_new_tokens} new tokens that exceeds the "
                         f"model's context of {context} tokens")
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


def build_bundle(out_dir: str | Path, onnx_dir: str | Path | None, tokenizer_dir: str | Path, *,
                 precision: str | None = None, opset: int | None = None, metrics: dict[str, Any] | None = None,
                 gate: dict[str, Any] | None = None, lineage: dict[str, str] | None = None,
                 precision_counts: dict[str, int] | None = None, accuracy_level: int | None = None,
                 gguf: str | Path | None = None, formats: dict[str, dict[str, Any]] | None = None) -> Path:  # fmt: skip
    """Assemble the bundle at `out_dir` (replaced if it exists) and return it: the graph in `onnx_dir` and/or the
    GGUF file `gguf`. `precision` and `precision_counts` say what the graph's weight matmuls and lookups hold
    (`llmpress.export.packed.precision_counts`); `formats` gives each format's scores and details for the manifest
    ({"onnx": {...}, "gguf": {...}}), to which its files and bytes are added here."""
    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    if onnx_dir is None and gguf is None:
        raise BundleError("nothing to bundle: neither an ONNX graph nor a GGUF file")
    if onnx_dir is not None and not (Path(onnx_dir) / GRAPH).is_file():
        raise BundleError(f"no {GRAPH} in {onnx_dir}: export the model to ONNX first")
    if gguf is not None and not Path(gguf).is_file():
        raise BundleError(f"{gguf}: no such GGUF file")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise BundleError(f"no tokenizer.json in {tokenizer_dir}: the runner needs the fast tokenizer's file")
    context = _context_length(tokenizer_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        members: dict[str, list[str]] = {}  # format -> its files
        runtimes = []
        if onnx_dir is not None:
            for item in sorted(Path(onnx_dir).iterdir()):  # the graph and its external data files
                if item.is_file() and not item.is_symlink() and item.name != CHECKSUMS:  # the manifest has them
                    shutil.copy2(item, staging / item.name)
            members["onnx"] = sorted(p.name for p in staging.iterdir())
            shutil.copy2(RUNNER, staging / "llmpress_generate.py")
            (staging / "run.py").write_text(RUN_PY)
            runtimes.append("llmpress-runner")
            if (tokenizer_dir / "config.json").is_file() and _write_genai_config(staging, tokenizer_dir):
                runtimes.append("onnxruntime-genai")
                members["onnx"].append("genai_config.json")
        if gguf is not None:
            shutil.copy2(gguf, staging / GGUF)
            members["gguf"] = [GGUF]
            runtimes.append("llama.cpp")
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, staging / name)
        for path in staging.iterdir():  # durable before the rename makes the bundle visible
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
        files = [
            {"path": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(staging.iterdir())
        ]
        sizes = {f["path"]: f["bytes"] for f in files}
        per_format = {name: (formats or {}).get(name, {}) | {"files": names, "bytes": sum(sizes[n] for n in names)}
                      for name, names in members.items()}  # fmt: skip
        model: dict[str, Any] = {}
        if onnx_dir is not None:
            model = {"graph": GRAPH, "opset": opset, "precision": precision, "kv_cache": True,
                     "precision_counts": precision_counts or {},
                     "matmul_nbits_accuracy_level": accuracy_level}  # fmt: skip
        manifest = {
            "format": FORMAT,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model": model | ({"context_length": context} if context else {}) | {"runtimes": runtimes},
            "formats": per_format,
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
    if not (root / MANIFEST).is_file():
        raise BundleError(f"{root} has no {MANIFEST}")
    present = _entries(root)
    from llmpress.loading import read_json

    try:
        manifest = read_json(root / MANIFEST)
    except ConfigError as exc:
        raise BundleError(str(exc)) from None
    files = _check_manifest(manifest, root / MANIFEST)
    for name, entry in files.items():
        if present.get(name) is not False:  # absent, or a folder
            raise BundleError(f"{name}: listed in the manifest but missing")
        size = (root / name).stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"{name}: {size} bytes, the manifest says {entry['bytes']}")
        if check_hashes and sha256_file(root / name) != entry["sha256"]:
            raise BundleError(f"{name}: sha256 differs from the manifest (corrupted or modified)")
    folders = {parent.as_posix() for name in files for parent in PurePosixPath(name).parents} - {"."}
    extra = sorted(set(present) - set(files) - folders - {MANIFEST})
    if extra:
        raise BundleError(f"not in the manifest: {', '.join(extra)}; refused")
    return manifest


def _check_manifest(manifest: Any, where: Path) -> dict[str, dict[str, Any]]:
    """The manifest's shape, every field that is read checked for its type; returns the file entries by normalised
    path. BundleError names the first bad field."""
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), list)
    ):
        raise BundleError(f"{where}: not an {FORMAT} manifest (format and files are required)")
    for key in ("model", "formats", "metrics", "gate", "lineage"):
        if not isinstance(manifest.get(key, {}), dict):
            raise BundleError(f"{MANIFEST}: {key} must be an object, got {type(manifest[key]).__name__}")
    model = manifest.get("model", {})
    for key, types in MODEL_FIELDS.items():
        value = model.get(key)
        if key in model and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            expected = " or ".join(t.__name__ for t in types)
            raise BundleError(f"{MANIFEST}: model.{key} must be {expected}, got {type(value).__name__}")
    if model.get("context_length", 1) < 1:
        raise BundleError(f"{MANIFEST}: model.context_length must be >= 1, got {model['context_length']}")
    files: dict[str, dict[str, Any]] = {}
    for entry in manifest["files"]:
        if not isinstance(entry, dict) or not {"path", "bytes", "sha256"} <= set(entry):
            raise BundleError(f"{MANIFEST}: every file entry needs path, bytes and sha256, got {entry!r}")
        name, size = entry["path"], entry["bytes"]
        if not isinstance(name, str) or not isinstance(entry["sha256"], str):
            raise BundleError(f"{MANIFEST}: a file's path and sha256 are strings, got {entry!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BundleError(f"{MANIFEST}: {name}: bytes must be an integer >= 0, got {size!r}")
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or "\\" in name or "\0" in name or name in ("", "."):
            raise BundleError(f"{MANIFEST}: path {name!r} leaves the bundle (absolute, '..' or not a path); refused")
        files[pure.as_posix()] = entry
    formats = manifest.get("formats", {"onnx": {}})  # bundles before formats were recorded hold a graph
    for name, entry in formats.items():
        listed = entry.get("files", []) if isinstance(entry, dict) else None
        if not isinstance(listed, list) or not all(isinstance(f, str) and f in files for f in listed):
            raise BundleError(f"{MANIFEST}: formats.{name}.files must list files of the bundle, got {listed!r}")
    if not formats:
        raise BundleError(f"{MANIFEST}: formats is empty; a bundle holds an ONNX graph, a GGUF file or both")
    if "onnx" in formats:
        graph = model.get("graph", GRAPH)
        if not isinstance(graph, str) or not graph.endswith(".onnx") or graph not in files:
            raise BundleError(f"{MANIFEST}: the model graph {graph!r} is not an .onnx file among the listed files")
    return files


def run(path: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
        top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> str:  # fmt: skip
    """Verify the bundle, then generate a continuation of `prompt` with its own runner. The arguments are checked
    before anything is read, the prompt's length against the model's context before the graph is loaded."""
    from llmpress.export.generate import Sampling

    if not prompt.strip():
        raise BundleError("the prompt is empty")
    if max_new_tokens < 1:
        raise BundleError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    try:
        Sampling(temperature, top_k, top_p, seed)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    root = Path(path)
    manifest = verify_bundle(root)
    missing = [name for name in RUN_FILES if not (root / name).is_file()]  # verified: a file here is listed
    if missing:
        hint = f"; it ships {GGUF} for llama.cpp (e.g. llama-cli -m {GGUF})" if (root / GGUF).is_file() else ""
        raise BundleError(f"{root} cannot run: {', '.join(missing)} not in the bundle{hint}")
    context = manifest.get("model", {}).get("context_length")  # None in bundles built before it was recorded
    if context is not None:
        from tokenizers import Tokenizer

        tokens = len(Tokenizer.from_file(str(root / "tokenizer.json")).encode(prompt).ids)
        if tokens + max_new_tokens > context:
            raise BundleError(f"the prompt is {tokens} tokens: with {max_new_tokens} new tokens that exceeds the "
                              f"model's context of {context} tokens")  # fmt: skip
    import runpy
    import sys

    writes, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # older runners do not set it themselves
    try:
        runner = runpy.run_path(str(root / "run.py"), run_name="llmpress_bundle_runner")
    finally:
        sys.dont_write_bytecode = writes
    return runner["generate_text"](prompt, max_new_tokens, runner["Sampling"](temperature, top_k, top_p, seed))


def _entries(root: Path) -> dict[str, bool]:
    """Everything under `root`: relative POSIX path -> whether it is a folder. A symbolic link (to a file or a
    folder) or a special file anywhere is refused: a bundle holds only its own files."""
    found: dict[str, bool] = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            item = Path(folder) / name
            relative = item.relative_to(root).as_posix()
            if item.is_symlink():
                raise BundleError(f"{relative}: a symbolic link; refused")
            if not item.is_dir() and not item.is_file():
                raise BundleError(f"{relative}: not a regular file or folder; refused")
            found[relative] = item.is_dir()
    return found


def _context_length(model_dir: Path) -> int | None:
    """The model's context in tokens from its config.json, if there is one."""
    from llmpress.loading import read_json_object

    file = model_dir / "config.json"
    config = read_json_object(file, "model config") if file.is_file() else {}
    value = config.get("max_position_embeddings", config.get("n_positions"))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _write_genai_config(staging: Path, model_dir: Path) -> bool:
    """genai_config.json beside the graph; False for a model genai cannot run (no end-of-sequence token)."""
    from llmpress.export.genai import FILE, genai_config
    from llmpress.loading import read_json_object

    generation = model_dir / "generation_config.json"
    settings = read_json_object(generation, "generation config") if generation.is_file() else {}
    try:
        config = genai_config(staging / GRAPH, read_json_object(model_dir / "config.json", "model config"), settings)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    if config is not None:
        (staging / FILE).write_text(json.dumps(config, indent=2))
    return config is not None


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """Scalars and short lists only (the manifest is read by people and small devices)."""
    return {k: v for k, v in values.items() if isinstance(v, str | int | float | bool) or v is None}
