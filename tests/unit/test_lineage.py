"""Lineage hashes (llmpress/lineage.py): what changes a key and what does not."""

from __future__ import annotations

from pathlib import Path

from llmpress.lineage import code_version, content_key, lineage_tags, run_key

DATA = {"calibration_version": "c1", "eval_version": "e1"}
BASE = {"source": "default", "sha256": "b1"}
RECIPE = {"name": "wanda-50", "hash": "r1"}


def test_the_content_key_follows_model_data_recipe_and_code_only() -> None:
    tags = lineage_tags("git1", DATA, BASE, RECIPE)
    assert tags["data_version"] == "calibration:c1,eval:e1" and tags["base_model_hash"] == "b1"
    key = content_key(tags, "code1")
    assert content_key(lineage_tags("git2", DATA, {"source": "elsewhere", "sha256": "b1"}, RECIPE), "code1") == key
    changed = [
        content_key(lineage_tags("git1", DATA | {"eval_version": "e2"}, BASE, RECIPE), "code1"),
        content_key(lineage_tags("git1", DATA, BASE | {"sha256": "b2"}, RECIPE), "code1"),
        content_key(lineage_tags("git1", DATA, BASE, RECIPE | {"hash": "r2"}), "code1"),
        content_key(tags, "code2"),
    ]
    assert key not in changed and len(set(changed)) == 4


def test_the_run_key_adds_every_setting_in_any_key_order() -> None:
    key = content_key(lineage_tags("g", DATA, BASE, RECIPE), "code")
    settings = {"eval": {"window": 512, "stride": 256}, "gate": {"max_perplexity_ratio": 2.5}}
    same = {"gate": {"max_perplexity_ratio": 2.5}, "eval": {"stride": 256, "window": 512}}
    assert run_key(key, settings) == run_key(key, same)
    assert run_key(key, settings) != run_key(key, settings | {"gate": {"max_perplexity_ratio": 2.0}})


def test_the_code_version_sees_an_uncommitted_edit(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    before = code_version(package)
    (package / "a.py").write_text("x = 2\n")
    assert code_version(package) != before
