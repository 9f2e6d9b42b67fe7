"""Quantization-aware training: the model learns under its own quantization, then is stored as the same codes.

Esser et al. (ICLR 2020), "Learned Step Size Quantization" (LSQ), arXiv 1902.08153; the prepare -> train -> convert
flow of torchao's QAT (`torchao.quantization.qat`) and NVIDIA ModelOpt's QAD (QAT with the unquantized model as
the teacher).

Every targeted linear computes with fake-quantized weights on the recipe's grid (`bits`, `group_size`,
`symmetric`; the grid RTN and GPTQ write):

    w_q = s * (clamp(round(w / s) + z, 0, 2^b - 1) - z)        per output row and group of inputs

`round` passes its gradient straight through (the STE), so the float weights w keep learning. The step sizes s
learn too: through the same expression their gradient is LSQ's, round(w/s) - w/s inside the range and the clamp
bound outside (paper, eq. 3), scaled by 1 / sqrt(weights per group x (2^b - 1)) so that steps and weights learn
at comparable rates (section 2.2). s starts at RTN's min-max grid (`quant.fit_grid`), whose zero points z stay
fixed; s enters the forward rounded to fp16, the precision it is stored at, so what trains is what ships.

The loss is `distill`'s: KL to the softened logits of the teacher (the model before the recipe: the dense model),
on the calibration windows; the blocks' other parameters (norms, untargeted linears) train with the weights.
At the end every layer is converted: its codes are the fake-quantized forward's own, its fp16 scales the
learned ones, attached as RTN and GPTQ attach theirs - the saved folder, the ONNX export (MatMulNBits) and the
evaluation all compute with the last step's weights, and the converted model's logits equal the fake-quantized
model's bit for bit (tests/unit/test_qat.py). Weights an earlier stage pruned stay zero: 0 is on both grids.

Recipe example (`recipes/qat-w4g128.yaml`):

    name: qat-w4g128
    stages:
      - method: qat
        bits: 4
        group_size: 128
        steps: 40
        lr: 1.0e-5
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from llmpress.compress.distill import distill_loss
from llmpress.compress.methods import Method, ModelContext, register
from llmpress.compress.quant import QuantizedWeight, attach_, fit_grid, quantization_of
from llmpress.compress.targets import find_decoder_blocks, targeted_linears
from llmpress.config import QATStage
from llmpress.errors import LlmpressError

CLIP_NORM = 1.0


class _RoundSTE(torch.autograd.Function):
    """round(x) forward, identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _Fp16STE(torch.autograd.Function):
    """x rounded to fp16 (kept in x's dtype) forward; backward the identity scaled by `factor` (LSQ's g)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.half().to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


class FakeQuant(nn.Module):
    """The parametrization of a linear's weight during training: w -> w_q, with learnable step sizes."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> None:
        super().__init__()
        cols = weight.shape[1]
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.group, self.cols = group_size or cols, cols
        fitted = [fit_grid(weight[:, i : i + self.group], bits, symmetric) for i in range(0, cols, self.group)]
        self.scale = nn.Parameter(torch.cat([s for s, _ in fitted], dim=1))  # [rows, groups], fp16 values
        self.register_buffer("zero", torch.cat([z for _, z in fitted], dim=1))
        self.register_buffer("keep", (weight != 0).to(weight.dtype))  # an earlier stage's zeros stay zero
        self.lsq_factor = 1.0 / math.sqrt(self.group * (2**bits - 1))

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.group, dim=1)[:, : self.cols]

    def _codes(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scale, zero), the last two expanded to the weight's shape; the scale once per forward."""
        scale, zero = self._expand(_Fp16STE.apply(self.scale, self.lsq_factor)), self._expand(self.zero)
        return torch.clamp(_RoundSTE.apply(weight * self.keep / scale) + zero, 0, 2**self.bits - 1), scale, zero

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # the same arithmetic as QuantizedWeight.dequantize, so the converted layer computes the same bits
        codes, scale, zero = self._codes(weight)
        return scale * (codes - zero)

    @torch.no_grad()
    def quantized(self, weight: torch.Tensor) -> QuantizedWeight:
        codes = self._codes(weight)[0].to(torch.uint8)
        return QuantizedWeight(codes, self.scale.half(), self.zero.to(torch.uint8), self.bits, self.group_size,
                               self.symmetric)  # fmt: skip


def prepare_(layers: dict[str, nn.Linear], stage: QATStage) -> dict[str, FakeQuant]:
    """Make every layer compute with fake-quantized weights (a parametrization of `weight`)."""
    fakes = {}
    for name, layer in layers.items():
        if quantization_of(layer) is not None:
            raise LlmpressError(f"qat: {name} is already quantized by an earlier stage; quantize each layer once")
        fakes[name] = FakeQuant(layer.weight.detach(), stage.bits, stage.group_size, stage.symmetric)
        parametrize.register_parametrization(layer, "weight", fakes[name])
    return fakes


@torch.no_grad()
def convert_(layers: dict[str, nn.Linear]) -> dict[str, QuantizedWeight]:
    """Replace each layer's parametrization by its codes and learned scales (`quant.attach_`)."""
    out = {}
    for name, layer in layers.items():
        fake = layer.parametrizations.weight[0]
        out[name] = fake.quantized(layer.parametrizations.weight.original)
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        attach_(layer, out[name])
    return out


def apply_model_(model: nn.Module, stage: QATStage, ctx: ModelContext) -> list[dict[str, Any]]:
    """Fake-quantize the targeted linears, train against the teacher, convert to codes; one row per layer."""
    ids, teacher = ctx.data("qat"), ctx.teacher_of(model, "qat")
    blocks_name, blocks = find_decoder_blocks(model)
    layers = {n: m for j, b in enumerate(blocks) for n, m in targeted_linears(b, f"{blocks_name}.{j}", stage).items()}
    flags = {p: p.requires_grad for p in [*model.parameters(), *teacher.parameters()]}
    device, start = ctx.device, time.perf_counter()
    try:
        for p in flags:
            p.requires_grad_(False)
        model.to(device).eval()
        teacher.to(device).eval()
        fakes = prepare_(layers, stage)
        initial = {name: fake.scale.detach().clone() for name, fake in fakes.items()}
        weights = [p for p in blocks.parameters() if p.is_floating_point()]
        scales = [fake.scale for fake in fakes.values()]
        for p in weights:
            p.requires_grad_(True)
        scale_ids = {id(s) for s in scales}
        losses = _train(model, teacher, [p for p in weights if id(p) not in scale_ids], scales, ids, stage, ctx)
        quantized = convert_(layers)
    finally:
        for layer in layers.values():  # a failed run leaves no parametrization behind
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        model.to("cpu")
        teacher.to("cpu")
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    rows: list[dict[str, Any]] = []
    for name, qw in quantized.items():
        change = (qw.scale.float().cpu() / initial[name].cpu() - 1).abs().mean().item()  # mean |s / s_rtn - 1|
        rows.append({"name": name, "layer": layers[name], "bits": stage.bits, "group_size": stage.group_size,
                     "symmetric": stage.symmetric, "scale_change": change})  # fmt: skip
    ctx.progress(f"qat: {len(rows)} layers to {stage.bits} bits after {stage.steps} steps, loss {losses[0]:.4f} -> "
                 f"{losses[-1]:.4f} ({seconds:.1f}s)")  # fmt: skip
    rows[0] |= {"loss_first": losses[0], "loss_last": losses[-1], "steps": stage.steps}
    return rows


def _train(model: nn.Module, teacher: nn.Module, weights: list[nn.Parameter], scales: list[nn.Parameter],
           ids: torch.Tensor, stage: QATStage, ctx: ModelContext) -> list[float]:  # fmt: skip
    optimizer = torch.optim.AdamW([{"params": weights, "lr": stage.lr}, {"params": scales, "lr": stage.scale_lr}],
                                  weight_decay=0.0)  # fmt: skip
    generator = torch.Generator().manual_seed(stage.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    with torch.enable_grad():  # the engine runs every stage under no_grad
        for step in range(stage.steps):
            batch = ids[torch.randperm(ids.shape[0], generator=generator)[: stage.batch_size]].to(ctx.device)
            with torch.no_grad():
                target = teacher(input_ids=batch, use_cache=False).logits
            loss = distill_loss(model(input_ids=batch, use_cache=False).logits, target, stage.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*weights, *scales], CLIP_NORM)
            optimizer.step()
            with torch.no_grad():
                for scale in scales:  # a step size stays positive and representable in fp16
                    scale.clamp_(min=torch.finfo(torch.float16).tiny, max=torch.finfo(torch.float16).max)
            losses.append(loss.item())
            if step == 0 or (step + 1) % 10 == 0 or step + 1 == stage.steps:
                per_step = (time.perf_counter() - t0) / (step + 1)
                ctx.progress(f"qat step {step + 1}/{stage.steps} loss {losses[-1]:.4f} ({per_step:.2f}s/step)")
    return losses


register(Method(QATStage, "model", apply_model_, needs_teacher=True))
