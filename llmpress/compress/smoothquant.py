"""SmoothQuant: W8A8 with activation outliers migrated into the weights.

Xiao, Lin, Seznec, Wu, Demouth, Han (2023), "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models". Reference: mit-han-lab/smoothquant, `smoothquant/smooth.py` (`smooth_ln_fcs_llama_like`,
`smooth_lm`), `calibration.py` (`get_act_scales`) and `fake_quant.py` (`W8A8Linear`, `quantize_llama_like`).

LLM activations have a few input channels with values 10-100x larger than the rest, so per-token activation
quantization wastes its range on them, while weights are easy to quantize. SmoothQuant divides input channel j by
s_j and multiplies the weights' column j by s_j, an exact transformation in float:

    s_j = max|X_j|^alpha / max_i,layers |W_ij|^(1 - alpha)      (clamped to >= 1e-5)

with max|X_j| over all calibration tokens, and the weight maximum over every linear that reads the same input.
The 1/s_j folds into the RMSNorm before the linears, as in the reference for Llama-like blocks:

    input_layernorm          -> q, k, v
    post_attention_layernorm -> gate, up     (a mixture of experts: every expert's, and the router's columns)

o_proj and down_proj have no norm before them and are not smoothed (as in the reference), but are quantized.
A group is smoothed only if all its linears are targeted. Then every targeted linear gets its weights quantized
per output channel, symmetric, at `weight_bits` (`quant.quantize_rtn(group_size=None, symmetric=True)`), and if
`activation_bits` is set its input fake-quantized per token, dynamic, symmetric (`quant.install_act_quant`): the
reference's W8A8Linear with weight_quant="per_channel", act_quant="per_token".

Differences from the reference: the weight grid is llmpress's symmetric one (256 codes, step max|w| / 127.5,
instead of 255 codes with step max|w| / 127); the q/k/v outputs feeding the attention product (quantize_bmm_input)
are not quantized; and activation scales come from each block's inputs after the previous blocks were quantized
(the engine's sequential calibration) rather than from the float model.

Recipe example (`recipes/smoothquant-w8a8.yaml`):

    name: smoothquant-w8a8
    stages:
      - method: smoothquant
        alpha: 0.5
        weight_bits: 8
        activation_bits: 8
        targets: ['.*_proj']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmpress.compress import quant
from llmpress.compress.anatomy import anatomy, check_unchanged, first_batch_output, fold_into_norm_
from llmpress.compress.calibration import BlockCalibration
from llmpress.compress.methods import Method, register
from llmpress.compress.targets import find_decoder_blocks, matches, targeted_linears
from llmpress.config import SmoothQuantStage
from llmpress.errors import LlmpressError


def smooth_groups(block: nn.Module, prefix: str) -> tuple[list[tuple[nn.Module, dict[str, nn.Linear],
                                                                     list[nn.Module]]], float]:  # fmt: skip
    """(norm, {full name: linear}, readers) for the two norm -> linears groups of a block, by its architecture, and
    the norms' weight offset. In a mixture of experts the MLP norm feeds every expert's gate and up, and the
    router, a reader whose columns are scaled (not quantized) so that its logits stay what they were."""
    a = anatomy(block)
    n = a.names(prefix)
    if a.experts is not None:
        mlp = {name: fc for e in a.expert_names(prefix) for name, fc in (e["gate"], e["up"])}
        readers = [a.router]
    else:
        mlp, readers = {n["gate"]: a.gate, n["up"]: a.up}, []
    return [
        (a.attn_norm, {n["q"]: a.q, n["k"]: a.k, n["v"]: a.v}, []),
        (a.mlp_norm, mlp, readers),
    ], a.architecture.norm_offset


@torch.no_grad()
def activation_scales(
    block: nn.Module, calib: BlockCalibration, layers: dict[str, nn.Linear]
) -> dict[str, torch.Tensor]:
    """max |x_j| per input channel over all calibration tokens, per layer (get_act_scales), float32."""
    scales: dict[str, torch.Tensor] = {}

    def update(name: str, x: torch.Tensor) -> None:
        batch_max = x.detach().abs().amax(dim=0).float()
        scales[name] = torch.maximum(scales[name], batch_max) if name in scales else batch_max

    calib.observe(block, layers, update)
    return scales


@torch.no_grad()
def smooth_ln_fcs_(norm: nn.Module, fcs: list[nn.Linear], act_scales: torch.Tensor, alpha: float,
                   norm_offset: float = 0.0, readers: list[nn.Module] = ()) -> torch.Tensor:  # fmt: skip
    """The reference's smooth_ln_fcs_llama_like: norm.weight /= s, W[:, j] *= s (and the readers' columns, which
    do not count in s). Returns s (float32)."""
    weight_scales = torch.stack([fc.weight.detach().abs().amax(dim=0).float() for fc in fcs]).amax(dim=0)
    weight_scales = weight_scales.clamp(min=1e-5)
    act = act_scales.to(weight_scales.device).float()
    scales = (act.pow(alpha) / weight_scales.pow(1 - alpha)).clamp(min=1e-5)
    fold_into_norm_(norm, scales, norm_offset)
    for fc in [*fcs, *readers]:
        fc.weight.mul_(scales.to(fc.weight.device, fc.weight.dtype).view(1, -1))
    return scales


@torch.no_grad()
def smooth_block_(block: nn.Module, prefix: str, stage: SmoothQuantStage, calib: BlockCalibration) -> list[str]:
    """Smooth every fully targeted norm -> linears group of the block (float output unchanged).
    Returns the names of the linears whose inputs were smoothed."""

    pairs, norm_offset = smooth_groups(block, prefix)
    groups = [(norm, fcs, readers) for norm, fcs, readers in pairs if all(matches(n, stage) for n in fcs)]
    if not groups:
        return []
    # the linears of a group read the same tensor: observe the first of each
    firsts = {next(iter(fcs)): next(iter(fcs.values())) for _, fcs, _ in groups}
    act = activation_scales(block, calib, firsts)
    before = first_batch_output(block, calib)
    smoothed: list[str] = []
    for (norm, fcs, readers), first in zip(groups, firsts, strict=True):
        smooth_ln_fcs_(norm, list(fcs.values()), act[first], stage.alpha, norm_offset, readers)
        smoothed.extend(fcs)
    check_unchanged(block, calib, before, "smoothquant", prefix)
    return smoothed


def check(model: nn.Module, stage: SmoothQuantStage) -> None:
    """The block's parts are described (`anatomy.check_layout`), and its norms can absorb the smoothing scales."""
    a = anatomy(find_decoder_blocks(model)[1][0])
    if not a.architecture.norm_weights:
        raise LlmpressError(f"smoothquant folds its scales into the norms before q/k/v and gate/up, but this model's "
                            f"norms ({type(a.attn_norm).__name__}) have no weight to absorb them; use rtn or gptq "
                            "for its weights")  # fmt: skip


@torch.no_grad()
def apply_block_(
    block: nn.Module, prefix: str, stage: SmoothQuantStage, calib: BlockCalibration
) -> list[dict[str, Any]]:
    """Smooth, then quantize the weights (and install activation quantization) of every targeted linear."""

    if calib is None:
        raise ValueError("smoothquant needs calibration activations")
    layers = targeted_linears(block, prefix, stage)
    smoothed = set(smooth_block_(block, prefix, stage, calib))
    rows = []
    for name, layer in layers.items():
        # weight_bits None leaves the weights to a later RTN/GPTQ stage (recipes/smoothquant-gptq-w8a8.yaml)
        if stage.weight_bits is not None:
            quant.attach_(layer, quant.quantize_rtn(layer.weight.detach(), stage.weight_bits, None, True))
        if stage.activation_bits is not None:
            quant.install_act_quant(layer, stage.activation_bits)
        rows.append({"name": name, "layer": layer, "bits": stage.weight_bits, "group_size": None, "symmetric": True,
                     "activation_bits": stage.activation_bits, "alpha": stage.alpha,
                     "smoothed": name in smoothed})  # fmt: skip
    return rows


register(Method(SmoothQuantStage, "block", apply_block_, check=check))
