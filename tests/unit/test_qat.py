"""qat (quantization-aware training, LSQ): the converted model is the fake-quantized one bit for bit, the step
sizes get LSQ's gradient, training brings the quantized model closer to the teacher than RTN on the same grid,
an earlier stage's zeros stay zero, and the codes survive saving and loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmpress.compress import storage
from llmpress.compress.distill import distill_loss
from llmpress.compress.engine import compress_
from llmpress.compress.qat import FakeQuant, convert_, prepare_
from llmpress.compress.quant import quantization_of
from llmpress.compress.targets import targeted_linears
from llmpress.config import QATStage, Recipe
from llmpress.errors import LlmpressError

QAT = {"method": "qat", "bits": 3, "group_size": 16, "steps": 30, "lr": 1e-4, "scale_lr": 1e-5, "batch_size": 8}


def _kl(student: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return distill_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits, 1.0).item()


def _layers(model: nn.Module, stage: QATStage) -> dict[str, nn.Linear]:
    return {
        n: m
        for j, b in enumerate(model.model.layers)
        for n, m in targeted_linears(b, f"model.layers.{j}", stage).items()
    }


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(4, 16, False), (3, None, False), (8, 32, True)])
def test_converted_model_equals_the_fake_quantized_model_bit_for_bit(tiny_llama, calibration_ids, bits, group_size,
                                                                     symmetric) -> None:  # fmt: skip
    stage = QATStage(method="qat", bits=bits, group_size=group_size, symmetric=symmetric)
    layers = _layers(tiny_llama, stage)
    fakes = prepare_(layers, stage)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # scales and weights moved off RTN's starting point, as training would move them
        for name, fake in fakes.items():
            fake.scale.mul_(1 + 0.05 * torch.rand(fake.scale.shape, generator=generator))
            original = layers[name].parametrizations.weight.original
            original.add_(0.01 * torch.randn(original.shape, generator=generator))
        fake_logits = tiny_llama(input_ids=calibration_ids).logits
    quantized = convert_(layers)
    with torch.no_grad():
        converted_logits = tiny_llama(input_ids=calibration_ids).logits
    assert torch.equal(converted_logits, fake_logits)
    for name, layer in layers.items():
        qw = quantization_of(layer)
        assert qw is quantized[name] or torch.equal(qw.codes, quantized[name].codes)
        assert qw.bits == bits and qw.group_size == group_size and int(qw.codes.max()) <= 2**bits - 1
        assert torch.equal(layer.weight, qw.dequantize())
        assert not hasattr(layer, "parametrizations")


def test_step_sizes_get_the_lsq_gradient() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 32) * 0.1
    fake = FakeQuant(w, bits=3, group_size=16, symmetric=False)
    with torch.no_grad():
        fake.scale.mul_(0.8)  # some weights now fall outside the grid and are clamped
        fake.scale.copy_(fake.scale.half().float())
    upstream = torch.randn(4, 32)
    (fake(w) * upstream).sum().backward()
    s = fake.scale.detach().repeat_interleave(16, dim=1)
    z = fake.zero.repeat_interleave(16, dim=1)
    unclamped = torch.round(w / s) + z
    inside = (unclamped >= 0) & (unclamped <= 7)
    assert (~inside).any() and inside.any()
    # d w_q / d s: round(w/s) - w/s inside the grid, the clamp bound (q - z) outside (Esser et al., eq. 3)
    per_weight = torch.where(inside, torch.round(w / s) - w / s, unclamped.clamp(0, 7) - z)
    expected = (upstream * per_weight).reshape(4, 2, 16).sum(dim=2) / (16 * 7) ** 0.5
    assert torch.allclose(fake.scale.grad, expected, rtol=1e-5, atol=1e-7)


def test_training_beats_rtn_on_the_same_grid(make_tiny_llama, calib, held_out) -> None:
    teacher = make_tiny_llama()
    rtn = make_tiny_llama()
    compress_(rtn, Recipe(name="rtn", stages=[{"method": "rtn", "bits": 3, "group_size": 16}]), calib)
    trained = make_tiny_llama()
    report = compress_(trained, Recipe(name="qat", stages=[QAT]), calib)
    assert _kl(trained, teacher, held_out) < 0.6 * _kl(rtn, teacher, held_out)  # measured 0.46x
    rows = [r for r in report.layers if r.method == "qat"]
    assert len(rows) == 3 * 7 and all(r.details["bits"] == 3 for r in rows)
    assert rows[0].details["loss_last"] < rows[0].details["loss_first"]
    assert all(r.details["scale_change"] > 0 for r in rows)  # the step sizes learned
    assert all(quantization_of(m) is not None for m in _layers(trained, QATStage(**QAT)).values())
    assert all(p.requires_grad for p in trained.parameters())  # flags restored


def test_pruned_zeros_stay_zero_and_codes_survive_saving(make_tiny_llama, calib, tmp_path) -> None:
    model = make_tiny_llama()
    compress_(model, Recipe(name="w-qat", stages=[{"method": "wanda", "sparsity": 0.5}, QAT]), calib)
    layers = _layers(model, QATStage(**QAT))
    assert all((m.weight == 0).float().mean().item() >= 0.5 for m in layers.values())
    model.save_pretrained(tmp_path)
    storage.save_compressed(model, tmp_path)
    loaded = storage.load_compressed(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=calib[:2]).logits, model(input_ids=calib[:2]).logits)


def test_refusals(tiny_llama, calib) -> None:
    twice = Recipe(name="twice", stages=[{"method": "rtn", "bits": 4}, {"method": "qat", "bits": 4}])
    with pytest.raises(LlmpressError, match="quantized by stage 0 \\(rtn\\) and again by stage 1 \\(qat\\)"):
        compress_(tiny_llama, twice, calib)
    with pytest.raises(LlmpressError, match="needs calibration data"):
        compress_(tiny_llama, Recipe(name="q", stages=[QAT]), None)
    with pytest.raises(ValueError, match="offset 'min' is not supported by qat"):
        QATStage(method="qat", offset="min")
