"""Distillation: recover the quality a compressed model lost by training it on the uncompressed model's outputs.

Knowledge distillation (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network"): the student
(the model as the recipe left it, pruned or shrunk) learns to match the teacher's (the model before the recipe)
next-token distribution, per token,

    L = T^2 * KL( softmax(z_teacher / T) || softmax(z_student / T) )  [+ hidden_weight * MSE(h_student, h_teacher)]

averaged over all tokens. The T^2 factor keeps the gradient scale independent of the temperature (Hinton et al.
§2). The optional second term matches the final hidden states, a reduced form of the per-layer feature loss that
Kurtic et al. (2023, "Sparse Fine-tuning for Inference Acceleration of Large Language Models", SquareHead) use
to recover sparse LLMs; logit distillation is also how Minitron (Muralidharan et al. 2024) retrains structurally
pruned models. The data are the calibration windows: no labels are needed, the teacher supplies the targets.

What stays fixed, so that distillation does not undo the compression:

* pruned weights stay exactly zero. Every linear layer of the decoder blocks with more than 10 % exact zeros (a
  dense trained weight has essentially none) gets its zero mask recorded; gradients of masked weights are zeroed
  and the mask is re-applied after every optimiser step (the "constant pruning" of sparse fine-tuning);
* embeddings and the LM head are frozen: they are outside what llmpress compresses and are tied in SmolLM2;
* structured or low-rank layers keep their smaller shapes (only values are trained);
* quantized layers are refused: a trained weight leaves the integer grid the packed codes describe, so
  distillation must come before quantization in the recipe (prune -> distill -> quantize).

Training: AdamW on the decoder blocks' parameters, linear warm-up over the first 5 % of steps then cosine decay to
zero, gradient norm clipped at 1.0, minibatches of `batch_size` windows drawn without replacement (a fresh seeded
permutation per epoch over the windows). The student stays in eval mode (no dropout), so a run on CPU is
deterministic for a seed.

Cost: CPU-feasible for the shipped 135M model but not cheap: a step of 4 x 256 tokens is a teacher forward plus
a student forward and backward, including the 49k-token vocabulary's logits; it measured 43 s with one thread on
2 cores shared with five other jobs. On SmolLM2-135M, 40 steps (5 passes over the 32 calibration windows) took
Wanda 50 % from perplexity 66.9 to 44.0 (dense 30.8). GPU-ready: on CUDA the forward passes run under bf16
autocast while the weights and the optimiser state stay fp32.

Recipe example (`recipes/wanda-50-distill.yaml`):

    name: wanda-50-distill
    stages:
      - method: wanda
        sparsity: 0.5
        targets: ['.*_proj']
      - method: distill
        steps: 40
        lr: 2.0e-4
        batch_size: 4
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmpress.compress.methods import Method, ModelContext, register
from llmpress.compress.targets import find_decoder_blocks
from llmpress.config import DistillStage
from llmpress.errors import LlmpressError

MASK_MIN_ZEROS = 0.10  # a layer with more exact zeros than this was pruned: its zeros are kept
WARMUP_FRACTION = 0.05
CLIP_NORM = 1.0
PROGRESS_EVERY = 10


def apply_model_(model: nn.Module, stage: DistillStage, ctx: ModelContext) -> list[dict[str, Any]]:
    """Train `model` (the student, in place) to match `ctx.teacher()` on the calibration windows."""

    _refuse_quantized(model)
    ids, teacher = ctx.data("distill"), ctx.teacher_of(model, "distill")
    _, blocks = find_decoder_blocks(model)

    trainable = [p for p in blocks.parameters() if p.is_floating_point()]
    saved_flags = {p: p.requires_grad for p in [*model.parameters(), *teacher.parameters()]}
    device = ctx.device
    start = time.perf_counter()
    try:
        for p in saved_flags:
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        model.to(device).eval()
        teacher.to(device).eval()
        masks = _zero_masks(blocks)
        losses = _train(model, teacher, trainable, masks, ids, stage, device, ctx)
    finally:
        model.to("cpu")
        teacher.to("cpu")
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)

    zeros = sum(int((weight == 0).sum().item()) for weight in _linear_weights(blocks))
    total = sum(weight.numel() for weight in _linear_weights(blocks))
    return [
        {
            "name": "<model>",
            "shape": (),
            "sparsity": zeros / max(total, 1),  # given explicitly: the row has no single `.weight` to measure
            "target_sparsity": None,
            "steps": stage.steps,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "seconds": round(time.perf_counter() - start, 3),
            "trained_parameters": sum(p.numel() for p in trainable),
            "masked_layers": len(masks),
        }
    ]


def _refuse_quantized(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if getattr(module, "llmpress_quant", None) is not None or getattr(module, "llmpress_act_bits", None):
            raise LlmpressError(
                f"distill: layer {name} is already quantized by an earlier stage; training would move its weights "
                "off the integer grid. Put the distill stage before quantization in the recipe "
                "(e.g. wanda -> distill -> gptq)"
            )


def _linear_weights(blocks: nn.Module) -> list[nn.Parameter]:
    return [module.weight for module in blocks.modules() if isinstance(module, nn.Linear)]


def _zero_masks(blocks: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """Keep-masks (True = trainable) for the weights of pruned linear layers: more than 10 % exact zeros."""
    keeps = {weight: weight.detach() != 0 for weight in _linear_weights(blocks)}
    return {weight: keep for weight, keep in keeps.items() if 1.0 - keep.float().mean().item() > MASK_MIN_ZEROS}


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless minibatches of window indices: a fresh permutation per epoch, drawn without replacement."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to zero at the last step."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup + 1) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the softened next-token distributions, averaged per token."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    # batchmean over [tokens, vocab] = sum over the vocabulary, mean over tokens
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _train(model: nn.Module, teacher: nn.Module, trainable: list[nn.Parameter], masks: dict[nn.Parameter, torch.Tensor],
           ids: torch.Tensor, stage: DistillStage, device: torch.device, ctx: ModelContext) -> list[float]:  # fmt: skip
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=stage.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, stage.steps))
    batches = _batches(ids.shape[0], stage.batch_size, torch.Generator().manual_seed(stage.seed))
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    hidden = stage.hidden_weight > 0
    losses: list[float] = []
    t0 = time.perf_counter()
    with torch.enable_grad():  # the engine runs every stage under no_grad
        for step in range(stage.steps):
            batch = ids[next(batches)].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                with torch.no_grad():
                    t_out = teacher(input_ids=batch, use_cache=False, output_hidden_states=hidden)
                s_out = model(input_ids=batch, use_cache=False, output_hidden_states=hidden)
            loss = distill_loss(s_out.logits, t_out.logits, stage.temperature)
            if hidden:
                loss = loss + stage.hidden_weight * F.mse_loss(
                    s_out.hidden_states[-1].float(), t_out.hidden_states[-1].float()
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for param, keep in masks.items():
                if param.grad is not None:
                    param.grad.mul_(keep)  # no gradient, hence no Adam moment, for a pruned weight
            torch.nn.utils.clip_grad_norm_(trainable, CLIP_NORM)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for param, keep in masks.items():
                    param.mul_(keep)  # exact zeros again, whatever the update did (e.g. weight decay rounding)
            losses.append(loss.item())
            if step == 0 or (step + 1) % PROGRESS_EVERY == 0 or step + 1 == stage.steps:
                per_step = (time.perf_counter() - t0) / (step + 1)
                ctx.progress(f"distill step {step + 1}/{stage.steps} loss {losses[-1]:.4f} ({per_step:.2f}s/step)")
    return losses


register(Method(DistillStage, "model", apply_model_, needs_teacher=True))
