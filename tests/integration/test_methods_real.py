"""Every method family on the real shipped model (SmolLM2-135M), short: 8 calibration windows of 256 tokens (16 for
low-rank), perplexity on the first 2048 held-out tokens (dense: 35.5). Each model is saved and loaded back before
it is judged, so these numbers are those of the artifact the pipeline would register.

Bounds come from `benchmarks/results/quality.md` (full protocol) with margin for the shorter calibration; the
orderings (SparseGPT below magnitude, GPTQ below RTN, ...) are the papers' and hold with wide margins here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from llmpress.compress import compress_
from llmpress.compress.storage import MANIFEST
from llmpress.config import EvalParams, Recipe
from llmpress.data import calibration_windows
from llmpress.evaluate.perplexity import perplexity
from llmpress.sources import load_model, load_tokenizer, resolve
from llmpress.steps import folder_bytes, save_model

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
EVAL = EvalParams(max_tokens=2048, batch_size=4)


@pytest.fixture(scope="module")
def real() -> dict:
    base = resolve("default", REPO / "models")
    tokenizer = load_tokenizer(base.path)
    ids = calibration_windows(tokenizer, REPO / "data" / "calibration.jsonl", 256, add_bos=True)[:16]
    text = (REPO / "data" / "eval.txt").read_text()
    dense = perplexity(load_model(base.path), tokenizer, text, EVAL).perplexity
    return {"path": base.path, "tokenizer": tokenizer, "ids": ids, "text": text, "dense": dense}


def _run(
    real: dict, tmp_path: Path, name: str, stages: list[dict], windows: int = 8, start: torch.nn.Module | None = None
) -> tuple[float, Path, torch.nn.Module]:
    """Compress the real model (or `start`, a model already compressed, with the dense model as the teacher), save
    it as the pipeline does, reload it; its perplexity, folder and model."""
    model = load_model(real["path"]) if start is None else start
    teacher = None if start is None else (lambda: load_model(real["path"]))
    compress_(model, Recipe(name=name, stages=stages), real["ids"][:windows], batch_size=8, teacher=teacher)
    folder = tmp_path / name
    save_model(model, real["tokenizer"], folder, extra_files={})
    del model
    reloaded = load_model(folder)
    return perplexity(reloaded, real["tokenizer"], real["text"], EVAL).perplexity, folder, reloaded


def _block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def test_pruning_sparsegpt_2of4_beats_magnitude(real, tmp_path) -> None:
    ppl, _, model = _run(real, tmp_path, "sparsegpt-2of4", [{"method": "sparsegpt", "pattern": "2:4"}])
    for name, layer in _block_linears(model).items():
        groups = (layer.weight != 0).reshape(layer.weight.shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2, name  # exactly the 2:4 pattern on every layer
    # magnitude 2:4 is ~59x dense and Wanda 2:4 ~8.7x on the full protocol; SparseGPT's weight update does better.
    assert ppl < 8.0 * real["dense"], ppl


def test_quantization_gptq_beats_rtn_and_is_packed(real, tmp_path) -> None:
    # At 3 bits the orderings are far apart (full protocol: RTN 139, GPTQ 82, GPTQ act-order 62); at 4 bits on this
    # already 4-bit model they are within noise of each other (39.6 vs 39.1), see benchmarks/results/quality.md.
    rtn, rtn_dir, _ = _run(real, tmp_path, "rtn", [{"method": "rtn", "bits": 3, "group_size": 128}])
    stages = [{"method": "gptq", "bits": 3, "group_size": 128, "act_order": True}]
    gptq, gptq_dir, _ = _run(real, tmp_path, "gptq", stages)
    assert gptq < 0.8 * rtn, (gptq, rtn)
    assert gptq < 3.0 * real["dense"], gptq
    # Block weights are 106M of the 135M parameters: stored at 3 bits + fp16 scales instead of 32 bits they must
    # shrink the folder by at least 300 MB (the embeddings stay fp32).
    dense_bytes = folder_bytes(real["path"], "*.safetensors")
    assert dense_bytes - folder_bytes(gptq_dir, "*.safetensors") > 300e6
    assert folder_bytes(rtn_dir, "*.safetensors") == folder_bytes(gptq_dir, "*.safetensors")
    # 576 inputs are 4.5 groups of 128: compressed-tensors refuses ragged groups, so the llmpress layout, and why
    manifest = json.loads((gptq_dir / MANIFEST).read_text())
    assert manifest["format"] == "llmpress-compressed/1" and "ragged" in manifest["compressed_tensors"]


def test_compressed_tensors_and_bitmask_folders_on_the_real_model(real, tmp_path) -> None:
    """Symmetric W4 g32: the folder loads with plain `from_pretrained` to the evaluated weights (asymmetric g64
    through transformers' dequantize route, tests/unit/test_ct_format.py says why). Magnitude 50 %:
    the bitmask folder is smaller by the zeros' bytes less one bit per weight, and loads back to the same model."""
    model = load_model(real["path"])
    compress_(
        model, Recipe(name="w4", stages=[{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}]), None
    )
    assert save_model(model, real["tokenizer"], tmp_path / "w4", extra_files={}) == "compressed-tensors"
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "w4", dtype=torch.float32)
    ids = real["ids"][:1, :64]
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, model(ids).logits)
    stock_params = dict(stock.named_parameters())
    assert all(torch.equal(stock_params[n].data, p.data) for n, p in model.named_parameters())
    # asymmetric groups of 64 (which divide 576 and 1536): transformers' dequantize route, same logits
    model = load_model(real["path"])
    compress_(model, Recipe(name="w4a", stages=[{"method": "rtn", "bits": 4, "group_size": 64}]), None)
    assert save_model(model, real["tokenizer"], tmp_path / "w4a", extra_files={}) == "compressed-tensors"
    stock = AutoModelForCausalLM.from_pretrained(
        tmp_path / "w4a", dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, model(ids).logits)

    model = load_model(real["path"])
    compress_(model, Recipe(name="m50", stages=[{"method": "magnitude", "sparsity": 0.5}]), None)
    assert save_model(model, real["tokenizer"], tmp_path / "dense", extra_files={}, sparse="dense") is None
    assert save_model(model, real["tokenizer"], tmp_path / "m50", extra_files={}) == "llmpress"
    linears = _block_linears(model).values()
    saved = sum(4 * (w.numel() - int(torch.count_nonzero(w))) - w.numel() // 8 for w in (m.weight for m in linears))
    dense, sparse = folder_bytes(tmp_path / "dense", "*.safetensors"), folder_bytes(tmp_path / "m50", "*.safetensors")
    assert dense - sparse == pytest.approx(saved, abs=64 * 1024), (dense, sparse)
    assert sparse < 0.65 * dense  # 538 MB -> 338 MB: the fp32 embedding table stays dense
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m50")(ids).logits, model(ids).logits)


def test_activation_aware_quantization_awq_and_smoothquant(real, tmp_path) -> None:
    # grid 5 (the paper's search has 20 points) and 8 windows cut AWQ's CPU time to a quarter; the ordering holds
    # (4096 tokens, 16 windows: 38.1 at grid 5, 37.9 at grid 10, RTN 41.1; 2048 tokens, 8 windows: 42.5, RTN 44.9).
    awq, _, _ = _run(real, tmp_path, "awq", [{"method": "awq", "bits": 4, "group_size": 128, "grid": 5}])
    rtn, _, _ = _run(real, tmp_path, "rtn", [{"method": "rtn", "bits": 4, "group_size": 128}])
    assert awq <= rtn, (awq, rtn)
    w8a8, _, model = _run(real, tmp_path, "w8a8", [{"method": "smoothquant", "alpha": 0.5}])
    assert all(getattr(m, "llmpress_act_bits", None) == 8 for m in _block_linears(model).values())
    assert w8a8 < 1.1 * real["dense"], w8a8


def test_structured_pruning_shrinks_shapes_and_loads_with_stock_transformers(real, tmp_path) -> None:
    stages = [{"method": "structured", "mlp": 0.2, "heads": 0.34}]
    ppl, folder, model = _run(real, tmp_path, "structured", stages)
    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert stock.config.intermediate_size == round(1536 * 0.8)
    assert stock.config.num_attention_heads == 6 and stock.config.num_key_value_heads == 3
    ids = real["ids"][:1, :64]
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, model(ids).logits, atol=1e-4)
    assert sum(p.numel() for p in stock.parameters()) < 0.85 * 134.5e6
    assert ppl < 4.0 * real["dense"], ppl


def test_lowrank_and_distillation_recovery(real, tmp_path) -> None:
    stages = [{"method": "lowrank", "rank_ratio": 0.5, "targets": [r".*\.mlp\..*_proj"]}]
    ppl, _, _ = _run(real, tmp_path, "lowrank", stages, windows=16)  # 8 windows: 197, close to the bound
    # Keeping half the MLP rank costs a 135M model a lot (4.45x dense on the full protocol; plain SVD at the
    # same rank is ~80,000x): small models have little low-rank redundancy.
    assert ppl < 6.0 * real["dense"], ppl
    pruned, _, model = _run(real, tmp_path, "wanda", [{"method": "wanda", "sparsity": 0.5}])
    # 6 steps of 2 windows (measured on 2048 tokens, 8 windows: 55.4 from 74.8; on 4096 tokens: 50.7 from 70.5,
    # and 12 steps of 4 reach 47.8 at 2.8x the time). Distillation starts from the reloaded Wanda artifact and
    # learns from the dense model: what recipe wanda -> distill does after its first stage, without pruning twice
    # (the two-stage recipe and its default teacher are tests/unit/test_distill.py's).
    stages = [{"method": "distill", "steps": 6, "lr": 4e-4, "batch_size": 2}]
    distilled, _, model = _run(real, tmp_path, "wanda-distill", stages, start=model)
    weights = [layer.weight for layer in _block_linears(model).values()]
    assert sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) == pytest.approx(0.5, abs=0.01)
    assert distilled < 0.97 * pruned, (distilled, pruned)
