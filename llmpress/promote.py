"""Promotion: a version that passed the gate and that a reviewer approved goes to production, its edge bundle to S3.

    1. resolve the version (a number, or an alias such as `champion`) and check it: tag `gate.passed` = true (set
       by the pipeline) and tag `review.approved` = true (set by a reviewer on the version's page in the MLflow UI;
       `review.approved_by` names who, and is copied into the promotion record);
    2. fetch the bundle the run logged (artifact `bundle/`) and verify every file against its manifest;
    3. upload it to `s3://bucket/prefix/<model>/v<version>/`: files with boto3's managed transfer (multipart above
       `multipart_threshold`), each object's sha256 recomputed from what S3 returns and compared with the manifest,
       `manifest.json` last, so a reader that finds the manifest finds a complete bundle. Files already there with
       the right hash are not sent again (after a complete publish, the hash recorded on each object suffices);
    4. only then re-read the approval (a reviewer may have withdrawn it meanwhile), tag the version
       `bundle.s3_uri`, and move alias `production` to it.

Running it twice changes nothing the second time. Two promotions at once each upload to their own version's prefix
and move the alias only after their own bundle is verified, so `production` always names a version whose bundle
is complete and checked in S3, whichever finishes last.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpress.bundle import MANIFEST, sha256_file, verify_bundle
from llmpress.errors import LlmpressError, redact
from llmpress.sources import parse_s3_uri

ALIAS_PRODUCTION = "production"
APPROVAL_TAG = "review.approved"
APPROVER_TAG = "review.approved_by"
S3_TAG = "bundle.s3_uri"
MULTIPART_THRESHOLD = 64 * 2**20


class PromotionError(LlmpressError):
    """A version that may not be promoted, or a bundle that could not be published; the message says why."""


class UploadError(PromotionError):
    """S3 failed or answered wrongly while publishing: worth retrying (the upload is idempotent)."""


@dataclass
class Published:
    uri: str
    uploaded: int  # files sent this time
    already_there: int  # files found in S3 with the right hash
    bytes: int


def destination(s3_prefix: str | None, configured: str | None) -> str:
    """Where bundles go: `s3_prefix` (--s3), else params' tracking.bundle_s3_prefix, else
    $LLMPRESS_BUNDLE_S3_PREFIX; checked as an S3 URI."""
    prefix = s3_prefix or configured or os.environ.get("LLMPRESS_BUNDLE_S3_PREFIX")
    if not prefix:
        raise PromotionError(
            "no S3 destination: pass --s3 s3://bucket/prefix, set tracking.bundle_s3_prefix or "
            "LLMPRESS_BUNDLE_S3_PREFIX"
        )
    parse_s3_uri(prefix.rstrip("/"))
    return prefix


def check_request(tracking_uri: str, name: str, version_or_alias: str) -> Any:
    """The version a promotion asks for, checked (exists, passed the gate, approved) without writing anything:
    what the command line refuses before Prefect starts. A SQLite registry that does not exist yet has no model,
    and is not created just to say so."""
    from llmpress import tracking

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise PromotionError(f"model {name!r} is not registered: there is no MLflow database at {tracking_uri}")
    if tracking_uri.startswith(("http://", "https://")):
        _check_server(tracking_uri)
    version = resolve_version(tracking.client(tracking_uri), name, version_or_alias)
    check_promotable(version)
    return version


def _check_server(tracking_uri: str, timeout: float = 10.0) -> None:
    """An MLflow server that does not answer: said at once, not after minutes of the client's retries."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout):
            pass
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PromotionError(f"the MLflow server at {redact(tracking_uri)} does not answer ({reason}); start it or "
                             "fix tracking.tracking_uri / MLFLOW_TRACKING_URI") from None  # fmt: skip


def resolve_version(client: Any, name: str, version_or_alias: str) -> Any:
    """The ModelVersion named by a version number or an alias."""
    import mlflow

    try:
        if str(version_or_alias).isdigit():
            return client.get_model_version(name, str(version_or_alias))
        return client.get_model_version_by_alias(name, version_or_alias)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise PromotionError(f"the model registry could not be read: {' '.join(str(exc).split())[:300]}") from None
        raise PromotionError(f"model {name!r} has no version or alias {version_or_alias!r}") from exc


def check_promotable(version: Any) -> None:
    """Refuse a version that did not pass the gate or that no reviewer approved."""
    tags = version.tags or {}
    if tags.get("gate.passed") != "true":
        why = tags.get("gate.failures") or "no gate verdict recorded"
        raise PromotionError(f"version {version.version} did not pass the gate ({why}); it cannot be promoted")
    if tags.get(APPROVAL_TAG, "").lower() != "true":
        raise PromotionError(
            f"version {version.version} has no reviewer approval: a reviewer sets tag {APPROVAL_TAG}=true on its "
            "page in the MLflow UI (and optionally review.approved_by)"
        )


def s3_client() -> Any:
    """A fresh boto3 S3 client (a new session: rotated credentials are seen), honouring AWS_ENDPOINT_URL."""
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


def bundle_uri(s3_prefix: str, name: str, version: str) -> str:
    bucket, prefix = parse_s3_uri(s3_prefix)
    key = "/".join(p for p in (prefix, name, f"v{version}") if p)
    return f"s3://{bucket}/{key}/"


def publish_bundle(bundle_dir: str | Path, uri: str, client: Any | None = None,
                   multipart_threshold: int | None = None) -> Published:  # fmt: skip
    """Upload a verified bundle to `uri` (s3://bucket/prefix/) and check every object's sha256 as stored."""
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir)
    bucket, prefix = parse_s3_uri(uri.rstrip("/"))
    client = client or s3_client()
    multipart_threshold = multipart_threshold or MULTIPART_THRESHOLD
    config = TransferConfig(
        multipart_threshold=multipart_threshold, multipart_chunksize=max(multipart_threshold, 5 * 2**20)
    )
    entries = [*manifest["files"], {"path": MANIFEST, "bytes": (bundle_dir / MANIFEST).stat().st_size,
                                    "sha256": sha256_file(bundle_dir / MANIFEST)}]  # fmt: skip
    uploaded = already = 0
    key_of = {e["path"]: f"{prefix}/{e['path']}" if prefix else e["path"] for e in entries}
    try:
        # The manifest goes up last, after every file was verified as stored; finding it with its hash recorded
        # means an earlier publish completed, and the object heads suffice. Otherwise (first or interrupted
        # publish) an object already there is read back and hashed before it is trusted.
        complete = _recorded_sha256(client, bucket, key_of[MANIFEST], entries[-1]["bytes"]) == entries[-1]["sha256"]
        present_sha256 = _recorded_sha256 if complete else _stored_sha256
        for entry in entries:  # manifest.json last
            key = key_of[entry["path"]]
            if present_sha256(client, bucket, key, entry["bytes"]) == entry["sha256"]:
                already += 1
                continue
            client.upload_file(str(bundle_dir / entry["path"]), bucket, key, Config=config,
                               ExtraArgs={"Metadata": {"sha256": entry["sha256"]}})  # fmt: skip
            stored = _stored_sha256(client, bucket, key, entry["bytes"])
            if stored != entry["sha256"]:
                raise UploadError(f"s3://{bucket}/{key}: stored object's sha256 {stored} differs from the bundle's")
            uploaded += 1
    except (BotoCoreError, ClientError) as exc:
        raise UploadError(f"uploading the bundle to {uri} failed: {exc}") from exc
    return Published(uri=uri, uploaded=uploaded, already_there=already, bytes=sum(e["bytes"] for e in entries))


def _head(client: Any, bucket: str, key: str, size: int) -> dict[str, Any] | None:
    """The object's metadata, or None if it is missing or of another size."""
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return head if head["ContentLength"] == size else None


def _recorded_sha256(client: Any, bucket: str, key: str, size: int) -> str | None:
    """The sha256 recorded on the object at upload (metadata `sha256`); None if it is missing, of another size, or
    carries no such record. Trusted only for a bundle whose manifest is there: that went up after every file's
    stored bytes were hashed and matched."""
    head = _head(client, bucket, key, size)
    return (head.get("Metadata") or {}).get("sha256") if head else None


def _stored_sha256(client: Any, bucket: str, key: str, size: int) -> str | None:
    """sha256 of the object as S3 returns it (None if it is missing or of another size)."""
    if _head(client, bucket, key, size) is None:
        return None
    digest = hashlib.sha256()
    for chunk in client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def move_production(client: Any, name: str, version: str, published: Published) -> dict[str, Any]:
    """Re-check the approval, record the bundle's S3 URI on the version, and point `production` at it."""
    current = client.get_model_version(name, version)
    check_promotable(current)  # the reviewer may have withdrawn the approval while the upload ran
    record = {"version": version, "s3_uri": published.uri, "approved_by": current.tags.get(APPROVER_TAG, ""),
              "promoted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}  # fmt: skip
    if current.tags.get(S3_TAG) != published.uri:
        client.set_model_version_tag(name, version, S3_TAG, published.uri)
        client.set_model_version_tag(name, version, "promotion", json.dumps(record))
    from llmpress.tracking import alias_version

    before = alias_version(client, name, ALIAS_PRODUCTION)
    if before != version:
        client.set_registered_model_alias(name, ALIAS_PRODUCTION, version)
    return record | {"production_before": before, "changed": before != version}
