"""Every method family on a tiny randomly initialised model of every decoder family llmpress describes
(llmpress/compress/anatomy.py ARCHITECTURES): compressed, saved as the pipeline saves it, loaded back to the same
logits by llmpress, by stock transformers where the folder is plain or compressed-tensors, and exported to ONNX
with its KV cache matching PyTorch. The README's support matrix is these tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer_json
from test_architectures import FAMILIES, MOE, tiny
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, PreTrainedTokenizerFast

from llmpress.compress.anatomy import ARCHITECTURES
from llmpress.compress.engine import compress_
from llmpress.config import Recipe
from llmpress.errors import LlmpressError
from llmpress.export.onnx import check_parity, export_onnx
from llmpress.sources import load_model
from llmpress.steps import save_model

RECIPES = {
    "magnitude-50 + rtn-w4": [{"method": "magnitude", "sparsity": 0.5}, {"method": "rtn", "bits": 4, "group_size": 16}],
    "wanda-50 + distill": [{"method": "wanda", "sparsity": 0.5}, {"method": "distill", "steps": 2, "batch_size": 2}],
    "sparsegpt-2:4 + gptq-w4": [{"method": "sparsegpt", "pattern": "2:4"},
                                {"method": "gptq", "bits": 4, "group_size": 16, "symmetric": True}],
    "awq-w4": [{"method": "awq", "bits": 4, "group_size": 16, "symmetric": True}],
    "smoothquant-w8a8": [{"method": "smoothquant", "alpha": 0.5}],
    "structured": [{"method": "structured", "heads": 0.5, "mlp": 0.25}],
    "llm-pruner": [{"method": "llm_pruner", "heads": 0.5, "mlp": 0.25}],
    "surgeon-structured": [{"method": "surgeon", "mlp": 0.25, "shots": 2}],
    "drop-blocks": [{"method": "drop_blocks", "blocks": 1}],
    "lowrank": [{"method": "lowrank", "rank_ratio": 0.5}],
}  # fmt: skip


def refusal(family: str, recipe: str) -> str | None:
    """Why a method does not apply to a family (checked before any work), or None."""
    architecture = ARCHITECTURES[family]
    if recipe in ("structured", "llm-pruner", "surgeon-structured") and architecture.fused:
        return "fuses them"
    if recipe == "surgeon-structured" and architecture.experts is not None:
        return "surgeon takes its curvature from the loss's gradients through the model as it routes"
    if recipe in ("structured", "llm-pruner") and architecture.experts is not None:
        return "is a mixture of experts"
    if recipe == "smoothquant-w8a8" and not architecture.norm_weights:
        return "no weight to absorb"
    return None


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    folder = tmp_path_factory.mktemp("tokenizer")
    byte_tokenizer_json(folder)
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="A")


def _compress_save_reload(family: str, recipe: str, tokenizer, folder: Path) -> tuple[torch.nn.Module, str | None]:
    model = tiny(family)
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    report = compress_(model, Recipe(name="r", stages=RECIPES[recipe]), ids, progress=lambda _: None)
    assert report.layers  # it did something
    layout = save_model(model, tokenizer, folder, {})
    with torch.no_grad():
        expected = model(ids[:2]).logits
        assert torch.equal(load_model(folder)(ids[:2]).logits, expected)
        varied = "llmpress_module_shapes" in (folder / "config.json").read_text()  # widths per block: llmpress loads
        if layout in (None, "compressed-tensors") and not varied:  # stock transformers, no llmpress code on that path
            extra = {} if layout is None else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
            stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
            if family in MOE:  # its fused experts: the same weights, gate and up in one matmul (float rounding)
                torch.testing.assert_close(stock(ids[:2]).logits, expected, rtol=0, atol=1e-5)
            else:
                assert torch.equal(stock(ids[:2]).logits, expected)
    return model, layout


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_method_on_every_family_saves_and_loads_back(family: str, recipe: str, tokenizer, tmp_path) -> None:
    if (why := refusal(family, recipe)) is not None:
        with pytest.raises(LlmpressError, match=why):
            _compress_save_reload(family, recipe, tokenizer, tmp_path / "model")
        return
    _, layout = _compress_save_reload(family, recipe, tokenizer, tmp_path / "model")
    plain = recipe in ("structured", "llm-pruner", "surgeon-structured", "drop-blocks")  # smaller shapes, no codes
    assert (layout is None) == plain
    if recipe in ("magnitude-50 + rtn-w4", "sparsegpt-2:4 + gptq-w4", "awq-w4"):
        # integer grids, groups dividing the rows: transformers loads it; not its fused experts
        assert layout == ("llmpress" if family in MOE else "compressed-tensors")


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_export_with_kv_cache_matches_pytorch_on_every_family(family: str, tokenizer, tmp_path) -> None:
    """The reloaded 2:4 + GPTQ model: prefill and 4 greedy steps, each side from its own cache."""
    _compress_save_reload(family, "sparsegpt-2:4 + gptq-w4", tokenizer, tmp_path / "model")
    model = load_model(tmp_path / "model")
    graph = export_onnx(model, tmp_path / "onnx")
    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    parity = check_parity(model, graph, ids, decode_steps=4, noise=False)
    assert parity.max_abs_diff < 1e-4 and parity.greedy_identical, parity
