"""The `promote` flow: an approved, gate-passing model version goes to production and its edge bundle to S3.

Run it with `llmpress promote NAME VERSION_OR_ALIAS --s3 s3://bucket/prefix`, or as a Prefect deployment
(entrypoint `flows/promote.py:promote`), triggered on demand once a reviewer approved a version in the MLflow UI.
What it checks and in which order: `llmpress/promote.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from llmpress import tracking
from llmpress.config import load_params
from llmpress.promote import bundle_uri, destination
from tasks.credentials import BLOCK, load_secret_block
from tasks.promote import check_version, move_production, publish_bundle


@flow(name="promote")
def promote(model_name: str, version: str = "champion", s3_prefix: str | None = None, params_file: str = "params.yaml",
            project_dir: str = ".") -> dict[str, Any]:  # fmt: skip
    """Publish the bundle of `model_name` `version` (a number or an alias) under `s3_prefix`, then move `production`."""
    logger = get_run_logger()
    if added := load_secret_block():
        logger.info("credentials from Prefect Secret block %s: %s", BLOCK, ", ".join(added))
    project = Path(project_dir).resolve()
    params = load_params(project / params_file)
    tracking_uri = tracking.resolve_tracking_uri(params.tracking.tracking_uri, project)
    prefix = destination(s3_prefix, params.tracking.bundle_s3_prefix)
    checked = check_version(tracking_uri, model_name, version)
    uri = bundle_uri(prefix, model_name, checked["version"])
    published = publish_bundle(tracking_uri, checked["run_id"], uri)
    logger.info("bundle at %s: %d files uploaded, %d already there", uri, published["uploaded"],
                published["already_there"])  # fmt: skip
    record = move_production(tracking_uri, model_name, checked["version"], published)
    logger.info("production -> version %s (was %s)", checked["version"], record["production_before"])
    return {"published": published, **record}
