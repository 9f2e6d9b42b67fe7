"""Who may be promoted, and where its bundle goes (the S3 side is tested against a real server in
tests/integration/test_pipeline.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llmpress.config import ConfigError, load_params
from llmpress.promote import PromotionError, bundle_uri, check_promotable


def _version(**tags: str) -> SimpleNamespace:
    return SimpleNamespace(version="7", tags=tags)


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({}, "did not pass the gate \\(no gate verdict recorded\\)"),
        ({"gate.passed": "false", "gate.failures": "perplexity_ratio = 8.7"}, "perplexity_ratio = 8.7"),
        ({"gate.passed": "true"}, "no reviewer approval"),
        ({"gate.passed": "true", "review.approved": "no"}, "no reviewer approval"),
    ],
)
def test_refused(tags, message) -> None:
    with pytest.raises(PromotionError, match=message):
        check_promotable(_version(**tags))


def test_gate_passed_and_approved_is_promotable() -> None:
    check_promotable(_version(**{"gate.passed": "true", "review.approved": "True"}))


def test_bundle_uri_per_model_and_version() -> None:
    assert bundle_uri("s3://edge/releases/", "m", "3") == "s3://edge/releases/m/v3/"
    assert bundle_uri("s3://edge", "m", "3") == "s3://edge/m/v3/"
    with pytest.raises(PromotionError.__mro__[1], match="not a valid s3:// URI"):
        bundle_uri("s3://Bad_Bucket/x", "m", "3")


def test_params_refuse_a_bad_bundle_prefix(tmp_path) -> None:
    (tmp_path / "params.yaml").write_text("tracking:\n  bundle_s3_prefix: http://edge/releases\n")
    with pytest.raises(ConfigError, match="bundle_s3_prefix"):
        load_params(tmp_path / "params.yaml")
