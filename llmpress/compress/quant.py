"""Integer weight grids shared by RTN, GPTQ, AWQ and SmoothQuant, and the fake-quantized state of a layer.

A quantized weight is integer codes q in [0, 2^bits - 1] with, per output row and per group of `group_size`
consecutive inputs, an fp16 scale s and an integer zero point z:  w = s * (q - z).

RTN also offers the other common asymmetric layout, an fp16 *minimum* m per group instead of z (offset "min"):
w = s * q + m, the grid running exactly from the group's smallest to its largest weight. It is llama.cpp's
Q4_1/Q5_1 layout; an integer zero point cannot hold it (the grid's origin would have to be a multiple of s), so
a model that was once stored that way - the shipped SmolLM2 GGUF is Q4_1 - is re-quantized losslessly by the
min grid at its block size and lossily by the zero-point grid.

The grid is fitted as in the GPTQ reference quantizer (min-max over the group with 0 always inside the range;
symmetric fixes z = 2^(bits-1)), or, for symmetric grids with `signed_scale`, as llama.cpp fits Q4_0 (the
group's largest-magnitude weight exactly on code 0, the scale's sign pointing it there). Scales are rounded to
fp16 *before* the codes are chosen, so the weights the pipeline evaluates are exactly the ones
`storage.save_compressed` writes and `storage.load_compressed` reads.

After a method quantizes a layer it calls `attach_(layer, qw)`: the layer's float weight becomes the
dequantized values (every later stage and the evaluation see the quantized model) and `layer.llmpress_quant`
keeps the codes for packing. W8A8 additionally fake-quantizes the layer's input per token (`install_act_quant`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # fp16 [out, groups]
    zero: torch.Tensor  # uint8 [out, groups]
    bits: int
    group_size: int | None  # None: one group per row (per output channel)
    symmetric: bool
    minimum: torch.Tensor | None = None  # fp16 [out, groups]: offset "min", w = s * q + m (zero is then all 0)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        cols = self.codes.shape[1]
        gs = self.group_size or cols
        scale = self.scale.float().repeat_interleave(gs, dim=1)[:, :cols]
        if self.minimum is not None:
            minimum = self.minimum.float().repeat_interleave(gs, dim=1)[:, :cols]
            return (scale * self.codes.float() + minimum).to(dtype)
        zero = self.zero.float().repeat_interleave(gs, dim=1)[:, :cols]
        return (scale * (self.codes.float() - zero)).to(dtype)

    @property
    def offset(self) -> str:
        return "zero-point" if self.minimum is None else "min"

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            self.codes.to(device), self.scale.to(device), self.zero.to(device), self.bits, self.group_size,
            self.symmetric, None if self.minimum is None else self.minimum.to(device),
        )  # fmt: skip


def fit_grid(w: torch.Tensor, bits: int, symmetric: bool, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` [rows, cols] (one group): min-max with 0 inside the range; with `signed`
    (symmetric only) llama.cpp's Q4_0 rule instead (`fit_signed_grid`).

    Returns (scale [rows, 1] as float32 holding fp16-representable values, zero [rows, 1] integral float32).
    """
    if signed:
        return fit_signed_grid(w, bits)
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = w.max(dim=1, keepdim=True).values.clamp(min=0)
    if symmetric:
        # Always [-max|w|, max|w|]. (The GPTQ reference keeps xmin = 0 for an all-positive group, whose upper half
        # then falls off the grid above the fixed zero point and is clamped.)
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = xmin.masked_fill(empty, -1), xmax.masked_fill(empty, 1)
    exact = (xmax - xmin) / maxq
    scale16 = exact.half()
    # Round the scale *up* to fp16, so the group's extremes stay on the grid (never clamped by more than half a
    # step), and keep it above fp16 underflow so codes stay finite.
    scale16 = torch.where(scale16.float() < exact, torch.nextafter(scale16, scale16.new_tensor(torch.inf)), scale16)
    scale = scale16.float().clamp(min=torch.finfo(torch.float16).tiny)
    zero = torch.full_like(scale, (maxq + 1) // 2) if symmetric else torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def fit_signed_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric grid as llama.cpp's Q4_0 reference fits it: the group's largest-magnitude weight, sign
    included, sits exactly on code 0, w = s (0 - 2^(bits-1)), so s = -extreme / 2^(bits-1) takes the opposite
    sign of the extreme. All 2^bits codes are then usable (the balanced symmetric grid spans the extreme with
    2^bits - 1 steps and clips one side), and the step is 2^bits / (2^bits - 1) times finer; weights of the other
    sign beyond (2^(bits-1) - 1)|s| are clamped. Zero is still a grid point (code 2^(bits-1)). The scale is rounded
    to fp16 away from zero, so the extreme keeps its code."""
    half = 2 ** (bits - 1)
    w = w.float()
    extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True))
    exact = torch.where(extreme == 0, torch.ones_like(extreme), -extreme / half)
    size16 = exact.abs().half()
    size16 = torch.where(size16.float() < exact.abs(), torch.nextafter(size16, size16.new_tensor(torch.inf)), size16)
    scale = torch.sign(exact) * size16.float().clamp(min=torch.finfo(torch.float16).tiny)
    return scale, torch.full_like(scale, half)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes for `w` on the grid (scale, zero), as float tensor of integers in [0, 2^bits - 1]."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return scale * (quantize_codes(w, scale, zero, bits) - zero)


def fit_min_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and minimum per row of `w` [rows, cols] for offset "min": the grid from min(w) to max(w).

    Returns (scale [rows, 1], minimum [rows, 1]), both float32 holding fp16 values. The minimum is rounded to
    fp16 and the scale to the nearest fp16 of (max - minimum) / maxq, so a group that already lies on such a
    grid (a Q4_1 block: fp16 d and m, codes 0..15 used at both ends) gets back exactly its d, m and codes."""
    maxq = 2**bits - 1
    w = w.float()
    minimum = w.min(dim=1, keepdim=True).values.half().float()
    span = w.max(dim=1, keepdim=True).values - minimum
    scale = (span / maxq).half().float()
    scale = torch.where(span > 0, scale, torch.ones_like(scale)).clamp(min=torch.finfo(torch.float16).tiny)
    return scale, minimum


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                 offset: str = "zero-point", signed: bool = False) -> QuantizedWeight:  # fmt: skip
    """Round-to-nearest quantization of a [out, in] weight, group-wise along the input (offset "zero-point":
    w = s * (q - z); "min": w = s * q + m)."""
    if offset not in ("zero-point", "min") or (offset == "min" and symmetric):
        raise ValueError(f"offset must be 'zero-point', or 'min' when not symmetric; got {offset!r}")
    rows, cols = weight.shape
    gs = group_size or cols
    maxq = 2**bits - 1
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=weight.device)
    scales, offsets = [], []
    for start in range(0, cols, gs):
        part = weight[:, start : start + gs].float()
        if offset == "min":
            scale, minimum = fit_min_grid(part, bits)
            codes[:, start : start + gs] = torch.clamp(torch.round((part - minimum) / scale), 0, maxq).to(torch.uint8)
            offsets.append(minimum)
        else:
            scale, zero = fit_grid(part, bits, symmetric, signed)
            codes[:, start : start + gs] = quantize_codes(part, scale, zero, bits).to(torch.uint8)
            offsets.append(zero)
        scales.append(scale)
    scale16, offset_all = torch.cat(scales, 1).half(), torch.cat(offsets, 1)
    if offset == "min":
        zeros = torch.zeros_like(scale16, dtype=torch.uint8)
        return QuantizedWeight(codes, scale16, zeros, bits, group_size, symmetric, offset_all.half())
    return QuantizedWeight(codes, scale16, offset_all.to(torch.uint8), bits, group_size, symmetric)


@torch.no_grad()
def attach_(layer: nn.Linear, qw: QuantizedWeight) -> None:
    """Make `layer` compute with the quantized weight and remember the codes for saving."""
    layer.weight.copy_(qw.dequantize(layer.weight.dtype).to(layer.weight.device))
    layer.llmpress_quant = qw.to("cpu")  # type: ignore[assignment]


def quantization_of(layer: nn.Module) -> QuantizedWeight | None:
    return getattr(layer, "llmpress_quant", None)


# ---------------------------------------------------------------------------------------------------------------
# activations (W8A8): symmetric per-token dynamic fake quantization of a layer's input
# ---------------------------------------------------------------------------------------------------------------


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """In fp32 whatever x's dtype: in fp16 the floor 1e-8 on the step would underflow to 0, and an all-zero
    token would become 0/0 = NaN."""
    maxq = 2 ** (bits - 1) - 1
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / maxq
    return (torch.clamp(torch.round(x32 / scale), -maxq - 1, maxq) * scale).to(x.dtype)


def install_act_quant(layer: nn.Linear, bits: int) -> None:
    """Quantize `layer`'s input per token to `bits` on every forward (what a W8A8 kernel would see)."""
    remove_act_quant(layer)  # installed again: one hook, the new bits

    def hook(_module: nn.Module, args: tuple) -> tuple:
        return (fake_quantize_per_token(args[0], bits), *args[1:])

    layer._llmpress_act_hook = layer.register_forward_pre_hook(hook)  # type: ignore[assignment]
    layer.llmpress_act_bits = bits  # type: ignore[assignment]


def remove_act_quant(layer: nn.Module) -> None:
    if getattr(layer, "llmpress_act_bits", None) is not None:
        layer._llmpress_act_hook.remove()  # type: ignore[union-attr]
        layer.llmpress_act_bits = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------------------------
# bit packing: codes of `bits` bits, densely, little-endian within each byte
# ---------------------------------------------------------------------------------------------------------------


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes < 2^bits into a 1-D uint8 tensor of ceil(numel * bits / 8) bytes."""
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: whole codes per byte, in uint8 arithmetic (the layout below, faster)
        per = 8 // bits
        flat = codes.flatten().to(torch.uint8)
        flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per)]).view(-1, per)
        packed = torch.zeros(flat.shape[0], dtype=torch.uint8)
        for i in range(per):
            packed |= flat[:, i] << (i * bits)
        return packed
    flat = codes.flatten().to(torch.int64)
    bitplanes = ((flat.unsqueeze(1) >> torch.arange(bits, dtype=torch.int64)) & 1).flatten()
    bitplanes = torch.cat([bitplanes, bitplanes.new_zeros((-bitplanes.numel()) % 8)]).view(-1, 8)
    return (bitplanes << torch.arange(8, dtype=torch.int64)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` codes as uint8."""
    if 8 % bits == 0:
        per, mask = 8 // bits, (1 << bits) - 1
        packed = packed.to(torch.uint8)
        codes = torch.stack([(packed >> (i * bits)) & mask for i in range(per)], dim=1)
        return codes.flatten()[:numel].contiguous()
    bitplanes = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8, dtype=torch.int64)) & 1).flatten()
    bitplanes = bitplanes[: numel * bits].view(numel, bits)
    return (bitplanes << torch.arange(bits, dtype=torch.int64)).sum(dim=1).to(torch.uint8)
