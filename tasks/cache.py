"""Content-keyed caching of the compute tasks: a re-run with identical inputs skips finished steps, and a run that
failed at export resumes at export.

A task's cache key is its name plus a hash of its inputs and of `content_key`, which the flow builds from what
the paths point at (`llmpress.lineage.content_key`): base-model hash, data versions (DVC md5s), recipe hash and
code version. Results are
persisted (Prefect's result storage: PREFECT_LOCAL_STORAGE_PATH, or a shared block in the team setup). A cached
result names folders on disk; the flow checks they are still there and recomputes (refresh_cache) if not.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from prefect.context import TaskRunContext


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
