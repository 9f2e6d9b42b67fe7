"""Content-keyed caching of the compute tasks: a re-run with identical inputs skips finished steps, and a run that
failed at export resumes at export.

A task's cache key is its name plus a hash of its inputs and of `content_key`, which the flow builds from what
the paths point at: base-model hash, data versions (DVC md5s), recipe hash and code version. Results are
persisted (Prefect's result storage: PREFECT_LOCAL_STORAGE_PATH, or a shared block in the team setup). A cached
result names folders on disk; the flow checks they are still there and recomputes (refresh_cache) if not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext

import flows
import llmpress
import tasks


def code_version() -> str:
    """sha256 of the source that runs (llmpress, tasks, flows): unlike the git commit, it sees uncommitted edits
    and works outside a checkout."""
    digest = hashlib.sha256()
    for module in (llmpress, tasks, flows):
        package = Path(module.__file__).parent
        for path in sorted(package.rglob("*.py")):
            digest.update(path.relative_to(package.parent).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def content_key(lineage: dict[str, str]) -> str:
    """What a run's results depend on beyond its settings: base model, data, recipe and code."""
    keys = ("base_model_hash", "data_version", "recipe_hash")
    payload = {k: lineage.get(k) for k in keys} | {"code": code_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def content_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """None (no caching) unless the call carries a `content_key`."""
    if not parameters.get("content_key"):
        return None
    text = json.dumps(parameters, sort_keys=True, default=_plain)
    return f"{context.task.name}-{hashlib.sha256(text.encode()).hexdigest()}"


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):  # the pydantic settings passed to tasks
        return value.model_dump(mode="json")
    raise TypeError(f"cannot key a cache on a {type(value).__name__}")


CACHED = {"cache_key_fn": content_cache_key, "persist_result": True}
