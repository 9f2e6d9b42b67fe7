"""Content hashes: the identities that lineage tags and cache keys are made of."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_hash(folder: str | Path, ignore: tuple[str, ...] = ()) -> str:
    """sha256 over (relative path, sha256 of content) of every file, sorted: same files, same hash."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in ignore or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        digest.update(f"{rel}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def data_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object in canonical form (sorted keys), e.g. a validated recipe."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def code_version(*packages: str | Path) -> str:
    """sha256 of the Python source of `packages` (folders; default: the llmpress package itself). Unlike a git
    commit it sees uncommitted edits and works outside a checkout: what a cached result's code really was."""
    folders = [Path(p) for p in packages] or [Path(__file__).parent]
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            digest.update(path.relative_to(folder.parent).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
