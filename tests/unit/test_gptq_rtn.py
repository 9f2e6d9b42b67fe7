"""RTN and GPTQ on single layers (objective, grid, determinism, sparsity) and through the engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmpress.compress import gptq, rtn
from llmpress.compress.calibration import LayerStats
from llmpress.compress.engine import compress_
from llmpress.compress.quant import fit_grid, quantization_of, quantize_codes, quantize_rtn
from llmpress.config import GPTQStage, Recipe, RTNStage


def _problem(rows: int = 48, cols: int = 64, tokens: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and correlated calibration inputs with a few large-magnitude features (as in LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 2 * torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(tokens, cols, generator=g) @ mix
    x[:, :4] *= 5
    w = torch.randn(rows, cols, generator=g)
    return w, x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.T @ x  # what the engine accumulates


def _objective(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return ((x @ (w - q).T) ** 2).sum().item()


def _layer(w: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def _gptq_stage(**kw) -> GPTQStage:
    return GPTQStage(method="gptq", **kw)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [None, 16, 48])  # 48 on 64 columns: a ragged last group
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_objective_below_rtn(bits, group_size, act_order) -> None:
    w, x = _problem()
    rtn_q = quantize_rtn(w, bits, group_size, symmetric=False).dequantize()
    qw, error = gptq.gptq_quantize(w, _hessian(x), bits=bits, group_size=group_size, symmetric=False,
                                   block_size=32, act_order=act_order)  # fmt: skip
    gptq_obj, rtn_obj = _objective(w, qw.dequantize(), x), _objective(w, rtn_q, x)
    # correlated inputs leave GPTQ plenty of room: it should be far better, not just equal
    assert gptq_obj < 0.5 * rtn_obj
    assert error > 0


def _naive_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, dampening: float = 0.01) -> torch.Tensor:
    """The OBS procedure of the paper written plainly (one column at a time, explicit inverse of the remaining
    Hessian, no Cholesky, no blocks), in float64, per-channel grid."""
    w, h = w.double().clone(), h.double().clone()
    cols = w.shape[1]
    h += dampening * h.diag().mean() * torch.eye(cols, dtype=h.dtype)
    scale, zero = fit_grid(w.float(), bits, symmetric=False)
    scale, zero = scale.double(), zero.double()
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for j in range(cols):
        q[:, j] = (scale * (quantize_codes(w[:, j : j + 1], scale, zero, bits) - zero))[:, 0]
        err = (w[:, j] - q[:, j]) / hinv[j, j]
        w[:, j + 1 :] -= err.unsqueeze(1) * hinv[j, j + 1 :].unsqueeze(0)
        # remove column j from the inverse Hessian (Gaussian elimination step, eq. 3 of the paper)
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return q.float()


@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_gptq_matches_plain_obs_procedure(block_size) -> None:
    """Cholesky of the inverse and lazy batch updates are exact rewrites of sequential OBS (paper §4)."""
    w, x = _problem(rows=32, cols=48)
    qw, _ = gptq.gptq_quantize(w, _hessian(x), bits=4, group_size=None, symmetric=False, block_size=block_size)
    naive = _naive_gptq(w, _hessian(x), bits=4)
    step = qw.scale.float()
    # float32 vs float64 can move a value across a rounding boundary; that must stay rare, and one step at most
    diff = (qw.dequantize() - naive).abs() / step
    assert (diff > 1e-3).float().mean().item() < 0.01
    assert diff.max().item() <= 1.001


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(4, 16, False), (3, 48, False), (8, None, True)])
def test_gptq_weight_is_exactly_on_the_stored_grid(act_order, bits, group_size, symmetric) -> None:
    w, x = _problem()
    layer = _layer(w)
    stage = _gptq_stage(bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order, block_size=32)
    details = gptq.apply_(layer, stage, LayerStats(tokens=x.shape[0], hessian=_hessian(x)))
    qw = quantization_of(layer)
    assert qw is not None
    assert torch.equal(layer.weight.data, qw.dequantize())
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == w.shape and int(qw.codes.max()) < 2**bits
    groups = 1 if group_size is None else -(-w.shape[1] // group_size)
    assert qw.scale.dtype == torch.float16 and qw.scale.shape == (w.shape[0], groups)
    assert qw.zero.dtype == torch.uint8 and qw.zero.shape == (w.shape[0], groups)
    if symmetric:
        assert (qw.zero == 2 ** (bits - 1)).all()
    assert (qw.bits, qw.group_size, qw.symmetric) == (bits, group_size, symmetric)
    assert details["bits"] == bits and details["act_order"] == act_order and details["error"] > 0


def test_gptq_is_deterministic() -> None:
    w, x = _problem()
    runs = [gptq.gptq_quantize(w, _hessian(x), bits=4, group_size=16, symmetric=False, act_order=True)
            for _ in range(2)]  # fmt: skip
    assert torch.equal(runs[0][0].codes, runs[1][0].codes)
    assert torch.equal(runs[0][0].scale, runs[1][0].scale) and torch.equal(runs[0][0].zero, runs[1][0].zero)
    assert runs[0][1] == runs[1][1]


def test_gptq_dead_input_gets_zero_weight() -> None:
    w, x = _problem()
    x[:, 5] = 0  # feature 5 never active: H_55 = 0
    qw, error = gptq.gptq_quantize(w, _hessian(x), bits=4, group_size=16, symmetric=False)
    q = qw.dequantize()
    assert torch.isfinite(q).all() and error == error  # no NaN anywhere
    assert (q[:, 5] == 0).all()


def test_gptq_does_not_modify_the_hessian() -> None:
    w, x = _problem()
    h = _hessian(x)
    before = h.clone()
    gptq.apply_(_layer(w), _gptq_stage(bits=4, group_size=16), LayerStats(tokens=x.shape[0], hessian=h))
    assert torch.equal(h, before)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_keeps_pruned_weights_exactly_zero(pattern, act_order) -> None:
    w, x = _problem()
    g = torch.Generator().manual_seed(7)
    if pattern == "2:4":
        pruned = torch.rand(w.shape[0], w.shape[1] // 4, 4, generator=g).argsort(dim=2) < 2
        pruned = pruned.reshape(w.shape)
    else:
        pruned = torch.rand(w.shape, generator=g) < 0.5
    w = w.masked_fill(pruned, 0)
    layer = _layer(w)
    stage = _gptq_stage(bits=4, group_size=16, act_order=act_order, block_size=32)
    gptq.apply_(layer, stage, LayerStats(tokens=x.shape[0], hessian=_hessian(x)))
    qw = quantization_of(layer)
    assert qw is not None
    assert (layer.weight[pruned] == 0).all()
    zero_point = qw.zero.float().repeat_interleave(16, dim=1)
    assert torch.equal(qw.codes[pruned].float(), zero_point[pruned])
    assert torch.equal(layer.weight.data, qw.dequantize())
    # still better than rounding the sparse weight (which keeps zeros too: 0 is on every grid)
    rtn_q = quantize_rtn(w, 4, 16, symmetric=False).dequantize()
    assert _objective(w, layer.weight.data, x) < _objective(w, rtn_q, x)


def test_dense_layer_is_not_treated_as_pruned() -> None:
    """A handful of exact zeros (below 10 %) are not a sparsity pattern: they may move."""
    w, x = _problem()
    w[:, :3] = 0  # 3 of 64 columns: 4.7 %
    qw, _ = gptq.gptq_quantize(w, _hessian(x), bits=3, group_size=16, symmetric=False)
    layer = _layer(w)
    gptq.apply_(layer, _gptq_stage(bits=3, group_size=16), LayerStats(tokens=x.shape[0], hessian=_hessian(x)))
    assert torch.equal(layer.weight.data, qw.dequantize())  # same as without any mask


def test_rtn_apply_rounds_to_nearest() -> None:
    w, _ = _problem()
    layer = _layer(w)
    details = rtn.apply_(layer, RTNStage(method="rtn", bits=4, group_size=48, symmetric=False), LayerStats(tokens=0))
    assert details == {"bits": 4, "group_size": 48, "symmetric": False, "offset": "zero-point"}
    qw = quantization_of(layer)
    assert qw is not None and torch.equal(qw.codes, quantize_rtn(w, 4, 48, False).codes)
    assert torch.equal(layer.weight.data, qw.dequantize())


PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(
    "stage",
    [
        {"method": "gptq", "bits": 4, "group_size": 48},
        {"method": "gptq", "bits": 3, "group_size": 32, "act_order": True},
        {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},
    ],
)
def test_compress_quantizes_every_targeted_layer(tiny_llama, calibration_ids, stage) -> None:
    report = compress_(tiny_llama, Recipe(name="q", stages=[stage]), calibration_ids, batch_size=4)
    layers = {n: m for n, m in tiny_llama.named_modules() if n.split(".")[-1] in PROJ}
    assert len(layers) == 3 * len(PROJ) == len(report.layers)
    for name, layer in layers.items():
        qw = quantization_of(layer)
        assert qw is not None, name
        assert torch.equal(layer.weight.data, qw.dequantize()), name
        assert qw.bits == stage["bits"] and int(qw.codes.max()) < 2 ** stage["bits"]
    for rec in report.layers:
        assert rec.details["bits"] == stage["bits"] and rec.details["group_size"] == stage["group_size"]
        if stage["method"] == "gptq":
            assert rec.details["error"] >= 0
    assert report.stages[0].summary["bits"] == [stage["bits"]]
    assert quantization_of(tiny_llama.lm_head) is None


def test_gptq_beats_rtn_through_the_engine(make_tiny_llama, calibration_ids) -> None:
    """Model level: at 3 bits GPTQ's logits stay closer to the dense model's than RTN's."""
    dense = make_tiny_llama()
    with torch.no_grad():
        reference = dense(calibration_ids).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = make_tiny_llama()
        compress_(model, Recipe(name=method, stages=[{"method": method, "bits": 3, "group_size": 32}]),
                  calibration_ids, batch_size=4)  # fmt: skip
        with torch.no_grad():
            errors[method] = ((model(calibration_ids).logits - reference) ** 2).mean().item()
    assert errors["gptq"] < errors["rtn"]


def test_pruning_then_gptq_keeps_the_nm_pattern(tiny_llama, calibration_ids) -> None:
    recipe = Recipe(name="prune-quant", stages=[{"method": "wanda", "pattern": "2:4", "targets": [".*_proj"]},
                                                {"method": "gptq", "bits": 4, "group_size": 32}])  # fmt: skip
    report = compress_(tiny_llama, recipe, calibration_ids, batch_size=4)
    for name, layer in tiny_llama.named_modules():
        if name.split(".")[-1] in PROJ:
            rows, cols = layer.weight.shape
            assert ((layer.weight == 0).reshape(rows, cols // 4, 4).sum(dim=2) >= 2).all(), name
            assert torch.equal(layer.weight.data, quantization_of(layer).dequantize())
    assert all(r.sparsity >= 0.5 for r in report.layers if r.method == "gptq")
