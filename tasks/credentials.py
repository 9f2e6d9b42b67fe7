"""Credentials from a Prefect Secret block, for workers whose environment holds none.

Where they come from, in order: the process environment (what `llmpress services` and the Compose file set), the
standard AWS chain (profiles, instance roles), and a Prefect Secret block named `llmpress-credentials` holding a JSON
object of environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_USERNAME, ...), created
once by an admin:

    from prefect.blocks.system import Secret
    Secret(value={"AWS_ACCESS_KEY_ID": "...", "AWS_SECRET_ACCESS_KEY": "..."}).save("llmpress-credentials")

A block's values never override a variable already set, and are never logged, written to MLflow or a model card:
they only enter the flow-run process's environment, where boto3, DVC and MLflow read them.
"""

from __future__ import annotations

import os

BLOCK = "llmpress-credentials"
ALLOWED = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
           "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"}  # fmt: skip


def load_secret_block(name: str = BLOCK) -> list[str]:
    """Put the block's allowed variables that are not set yet into os.environ; returns their names (not values).
    No block (the embedded default, ephemeral Prefect): nothing happens."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError:  # no block of that name
        return []
    if not isinstance(value, dict):
        raise ValueError(f"Prefect Secret block {name!r} must hold a JSON object of environment variables")
    if unknown := sorted(set(value) - ALLOWED):
        raise ValueError(f"Prefect Secret block {name!r}: unsupported keys {unknown}; allowed: {sorted(ALLOWED)}")
    added = [k for k in sorted(value) if not os.environ.get(k)]
    for key in added:
        os.environ[key] = str(value[key])
    return added
