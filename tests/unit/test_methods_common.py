"""Properties every method shares: deterministic on CPU, and what is saved is what was evaluated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmpress.compress import compress_
from llmpress.compress.storage import MANIFEST, save_compressed, sparse_layers
from llmpress.config import METHODS, Recipe, load_recipe
from llmpress.sources import load_model

REPO = Path(__file__).resolve().parents[2]

STAGES = {
    "magnitude": [{"method": "magnitude", "sparsity": 0.5}],
    "wanda-owl": [{"method": "wanda", "sparsity": 0.5, "owl": {"lambda": 0.1, "threshold": 3}}],
    "sparsegpt": [{"method": "sparsegpt", "sparsity": 0.5, "block_size": 16}],
    "sparsegpt-2of4-dsnot": [{"method": "sparsegpt", "pattern": "2:4"}, {"method": "dsnot"}],
    "surgeon-2of4-gptq": [{"method": "surgeon", "pattern": "2:4", "shots": 2}, {"method": "gptq", "bits": 4}],
    "rtn-w4": [{"method": "rtn", "bits": 4, "group_size": 32}],
    "edge-int4": [
        {"method": "rtn", "bits": 4, "group_size": 32, "offset": "min"},
        {"method": "embeddings", "bits": 8, "group_size": 16},
    ],
    "gptq-w3-act-order": [{"method": "gptq", "bits": 3, "group_size": 32, "act_order": True}],
    "sparsegpt-gptq": [{"method": "sparsegpt", "pattern": "2:4"}, {"method": "gptq", "bits": 4, "group_size": 32}],
    "awq-w4": [{"method": "awq", "bits": 4, "group_size": 32, "grid": 5}],
    "smoothquant-w8a8": [{"method": "smoothquant", "alpha": 0.5}],
    "structured": [{"method": "structured", "heads": 0.5, "mlp": 0.25}],
    "drop-blocks": [{"method": "drop_blocks", "blocks": 1}],
    "lowrank": [{"method": "lowrank", "rank_ratio": 0.25, "targets": [".*mlp.*"]}],
    "wanda-distill-rtn": [
        {"method": "wanda", "sparsity": 0.5},
        {"method": "distill", "steps": 3, "batch_size": 2},
        {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},
    ],
}


def _compress(make_tiny_llama, calibration_ids, stages) -> torch.nn.Module:
    model = make_tiny_llama()
    compress_(model, Recipe(name="t", stages=stages), calibration_ids, batch_size=4)
    return model


@pytest.mark.parametrize("key", list(STAGES))
def test_same_inputs_give_same_weights(make_tiny_llama, calibration_ids, key) -> None:
    first = _compress(make_tiny_llama, calibration_ids, STAGES[key]).state_dict()
    second = _compress(make_tiny_llama, calibration_ids, STAGES[key]).state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{key}: {name} differs between identical runs"


@pytest.mark.parametrize("key", list(STAGES))
def test_saved_folder_reloads_to_the_evaluated_model(make_tiny_llama, calibration_ids, tmp_path, key) -> None:
    model = _compress(make_tiny_llama, calibration_ids, STAGES[key])
    model.save_pretrained(tmp_path)
    save_compressed(model, tmp_path)
    reloaded = load_model(tmp_path)
    ids = calibration_ids[:2]
    with torch.no_grad():
        expected = model(ids).logits
        got = reloaded(ids).logits
    assert (got - expected).abs().max().item() < 1e-5
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    quantized = any(s["method"] in ("rtn", "gptq", "awq", "smoothquant", "embeddings") for s in STAGES[key])
    sparse = bool(sparse_layers(model))  # zeros enough for bitmasks to be smaller: stored as such
    assert (tmp_path / MANIFEST).is_file() == (quantized or key == "lowrank" or sparse)


def test_every_shipped_recipe_is_valid() -> None:
    files = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(files) >= 20
    methods = set()
    for file in files:
        recipe = load_recipe(file)
        methods |= {s.method for s in recipe.stages}
    assert methods == set(METHODS)  # every method has a shipped recipe


@pytest.mark.parametrize("key", ["gptq-w3-act-order", "lowrank", "sparsegpt-gptq", "edge-int4"])
def test_plain_folder_from_compressed_loads_in_stock_transformers(make_tiny_llama, calibration_ids, tmp_path,
                                                                   key) -> None:  # fmt: skip
    from transformers import AutoModelForCausalLM

    from llmpress.compress.storage import to_plain_

    model = _compress(make_tiny_llama, calibration_ids, STAGES[key])
    model.save_pretrained(tmp_path / "packed")
    save_compressed(model, tmp_path / "packed")
    plain = to_plain_(load_model(tmp_path / "packed"))
    plain.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / MANIFEST).exists()
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    ids = calibration_ids[:2]
    with torch.no_grad():
        assert (stock(ids).logits - model(ids).logits).abs().max().item() < 1e-4
