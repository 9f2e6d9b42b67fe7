"""llm_pruner (LLM-Pruner): Taylor scores against finite differences of the loss, the Fisher term against
per-window gradients, and the structures the scores pick removed from a model that loads with stock transformers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from llmpress.compress.engine import compress_
from llmpress.compress.llm_pruner import loss_gradients, structure_scores
from llmpress.config import Recipe
from llmpress.errors import LlmpressError
from tests.unit.conftest import build_tiny_llama

CPU = torch.device("cpu")


def _recipe(**stage) -> Recipe:
    return Recipe(name="unit-llm-pruner", stages=[{"method": "llm_pruner", **stage}])


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """The loss `loss_gradients` differentiates: the mean over windows of each window's mean next-token CE."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        return sum(F.cross_entropy(logits[i, :-1], ids[i, 1:]).item() for i in range(len(ids))) / len(ids)


@pytest.fixture
def double_llama() -> torch.nn.Module:
    """The tiny Llama in float64 throughout: Llama's RMSNorm computes in fp32 even in a float64 model, which would
    leave the loss ~1e-9 of noise and finite differences meaningless at small steps."""
    model = build_tiny_llama().double()
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = _rms_norm_f64(module)
    return model


def _rms_norm_f64(norm: torch.nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)

    return forward


@pytest.mark.parametrize(("part", "along", "size", "index"), [
    ("mlp.gate_proj", 0, 1, 5), ("mlp.up_proj", 0, 1, 77), ("mlp.down_proj", 1, 1, 31),
    ("self_attn.q_proj", 0, 16, 2), ("self_attn.o_proj", 1, 16, 1),
])  # fmt: skip
def test_vector_score_is_the_loss_change_along_the_structure(double_llama, calibration_ids, part, along, size,
                                                             index) -> None:  # fmt: skip
    """|dL/dW . W_G| is the directional derivative of L along W_G: a central finite difference gives it back."""
    ids = calibration_ids[:3]
    layer = double_llama.get_submodule(f"model.layers.1.{part}")
    grads, _ = loss_gradients(double_llama, [layer.weight], ids, CPU, with_fisher=False, progress=lambda _: None)
    scores = structure_scores(layer.weight, grads[id(layer.weight)], None, "vector", along, size)
    direction = torch.zeros_like(layer.weight)
    rows = slice(index * size, (index + 1) * size)
    if along == 0:
        direction[rows] = layer.weight[rows]
    else:
        direction[:, rows] = layer.weight[:, rows]
    eps, original = 1e-4, layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.copy_(original + eps * direction)
        up = _loss(double_llama, ids)
        layer.weight.copy_(original - eps * direction)
        down = _loss(double_llama, ids)
        layer.weight.copy_(original)
    finite = abs(up - down) / (2 * eps)
    assert scores.shape == (layer.weight.shape[along] // size,)
    assert scores[index].item() == pytest.approx(finite, rel=1e-6)


def test_element_scores_and_the_fisher_term(double_llama, calibration_ids) -> None:
    ids = calibration_ids[:2]
    w = double_llama.model.layers[0].mlp.down_proj.weight
    grads, fisher = loss_gradients(double_llama, [w], ids, CPU, with_fisher=True, progress=lambda _: None)
    per_window = [
        loss_gradients(double_llama, [w], ids[i : i + 1], CPU, False, lambda _: None)[0][id(w)] for i in range(2)
    ]
    assert torch.allclose(grads[id(w)], (per_window[0] + per_window[1]) / 2, rtol=1e-9, atol=1e-15)
    assert torch.allclose(fisher[id(w)], (per_window[0] ** 2 + per_window[1] ** 2) / 2, rtol=1e-9, atol=1e-18)
    g, f = grads[id(w)], fisher[id(w)]
    element1 = structure_scores(w, g, None, "element1", 1, 1)
    assert torch.allclose(element1, (g * w).abs().sum(dim=0))
    element2 = structure_scores(w, g, f, "element2", 1, 1)
    assert torch.allclose(element2, (g * w - 0.5 * f * w * w).abs().sum(dim=0))
    assert (element1 >= structure_scores(w, g, None, "vector", 1, 1) - 1e-15).all()  # |sum| <= sum |.|
    assert not w.requires_grad or w.grad is None  # gradients taken with autograd.grad, nothing left on the model


def test_removes_the_lowest_scoring_structures_and_loads_in_stock_transformers(calibration_ids, tmp_path) -> None:
    model = build_tiny_llama()
    reference = copy.deepcopy(model)
    scored = [reference.model.layers[i].mlp for i in range(3)]
    weights = [m.weight for mlp in scored for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    grads, _ = loss_gradients(reference, weights, calibration_ids, CPU, False, lambda _: None)
    report = compress_(model, _recipe(mlp=0.25, heads=0.5), calibration_ids, batch_size=4)
    for i, mlp in enumerate(scored):
        scores = sum(structure_scores(lin.weight, grads[id(lin.weight)], None, "element1", along, 1)
                     for lin, along in ((mlp.gate_proj, 0), (mlp.up_proj, 0), (mlp.down_proj, 1)))  # fmt: skip
        kept_expected = scores.argsort(descending=True)[:96].sort().values
        kept = model.model.layers[i].mlp.gate_proj.weight
        assert torch.equal(kept, mlp.gate_proj.weight[kept_expected])  # the 32 lowest-scoring channels went
    for block in model.model.layers:
        assert block.self_attn.q_proj.weight.shape == (32, 64) and block.self_attn.o_proj.weight.shape == (64, 32)
        assert block.mlp.down_proj.weight.shape == (64, 96)
    rows = [r for r in report.layers if r.method == "llm_pruner"]
    assert len(rows) == 3 * 5 and all(r.details["importance"] == "element1" for r in rows)
    removed = sum(r.details["params_removed"] for r in rows)
    assert removed == sum(p.numel() for p in reference.parameters()) - sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=calibration_ids[:2]).logits, model(input_ids=calibration_ids[:2]).logits)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_taylor_scores_beat_magnitude_on_the_loss(calibration_ids) -> None:
    """The first-order criterion should cost less loss than scoring by weight norms alone (same channels count)."""
    taylor, magnitude = build_tiny_llama(), build_tiny_llama()
    compress_(taylor, _recipe(mlp=0.5), calibration_ids, batch_size=4)
    stage = {"method": "structured", "mlp": 0.5, "importance": "magnitude", "update": "none"}
    compress_(magnitude, Recipe(name="m", stages=[stage]), calibration_ids, batch_size=4)
    assert _loss(taylor, calibration_ids) < _loss(magnitude, calibration_ids)


def test_refusals(calibration_ids) -> None:
    with pytest.raises(LlmpressError, match=r"llm_pruner heads=0\.1: removes round"):
        compress_(build_tiny_llama(), _recipe(heads=0.1), calibration_ids, batch_size=4)
    with pytest.raises(LlmpressError, match="needs calibration data"):
        compress_(build_tiny_llama(), _recipe(mlp=0.25), None)
    with pytest.raises(ValueError, match="importance"):
        _recipe(mlp=0.25, importance="taylor")
