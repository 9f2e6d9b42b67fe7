"""What a run's results are a function of, as hashes: the lineage tags every MLflow run and model version carries,
the content key the compute steps are cached by (tasks/cache.py), and the run key an identical re-run is found by.

    content key = sha256(base model hash, data versions, recipe hash, code version)   (what the steps compute from)
    run key     = sha256(content key, every validated setting)                          (what a registered version is)

A re-run with the same run key reuses every cached step and registers nothing new (`registration`); a change of
code, data, model, recipe or any setting gives a new key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from llmpress.hashing import code_version as code_version  # the code part of the content key

CONTENT = ("base_model_hash", "data_version", "recipe_hash")


def lineage_tags(git_commit: str, data: dict[str, str], base: dict[str, str], recipe: dict[str, Any]) -> dict[str, str]:
    """The lineage of a run: git commit, DVC data versions, recipe name and hash, base model source and hash."""
    return {
        "git_commit": git_commit,
        "data_version": f"calibration:{data['calibration_version']},eval:{data['eval_version']}",
        "recipe": recipe["name"],
        "recipe_hash": recipe["hash"],
        "base_model": base["source"],
        "base_model_hash": base["sha256"],
    }


def content_key(lineage: dict[str, str], code: str) -> str:
    """What a run's results depend on beyond its settings: base model, data, recipe and `code` (a code_version)."""
    payload = {k: lineage.get(k) for k in CONTENT} | {"code": code}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def run_key(content: str, settings: dict[str, Any]) -> str:
    """The identity of a registered version: the content key and every setting (validated params, as JSON)."""
    return hashlib.sha256((content + json.dumps(settings, sort_keys=True)).encode()).hexdigest()
