"""The shared integer grid (quant.py), bit packing, and the packed storage round trip (storage.py)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from llmpress.compress import storage
from llmpress.compress.engine import compress_
from llmpress.compress.quant import (
    fake_quantize,
    fit_grid,
    pack_bits,
    quantization_of,
    quantize_codes,
    quantize_rtn,
    unpack_bits,
)
from llmpress.config import Recipe

# ---------------------------------------------------------------------------------------------------------------
# bit packing
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip_random_codes(bits) -> None:
    g = torch.Generator().manual_seed(bits)
    sizes = [1, 2, 3, 7, 8, 9, 63, 64 * 48, 1001, *torch.randint(1, 5000, (8,), generator=g).tolist()]
    for n in sizes:
        codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.dim() == 1
        assert packed.numel() == math.ceil(n * bits / 8), n
        assert torch.equal(unpack_bits(packed, bits, n), codes), n


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_extremes_and_2d_shapes(bits) -> None:
    for fill in (0, 2**bits - 1):
        codes = torch.full((5, 13), fill, dtype=torch.uint8)
        assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, codes.numel()).view(5, 13), codes)


def test_pack_layout_is_dense_little_endian() -> None:
    """Pin the on-disk format: codes bit by bit, least significant bit first, bytes filled from bit 0."""
    assert pack_bits(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    # 3-bit codes 1, 2, 3 -> bits 100 010 110 -> byte 0b11010001 then 0b0 (9 bits: 2 bytes)
    assert pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 3).tolist() == [0b11010001, 0]
    assert pack_bits(torch.tensor([200, 7], dtype=torch.uint8), 8).tolist() == [200, 7]


# ---------------------------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------------------------


def _rows() -> torch.Tensor:
    """Rows that stress the range fit: mixed sign, all positive, all negative, all zero, tiny, huge, one outlier."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 40, generator=g)
    base[1] = base[1].abs() + 0.1
    base[2] = -base[2].abs() - 0.1
    base[3] = 0
    base[4] *= 1e-6
    base[5] *= 1e3
    base[6, 7] = 50.0
    base[7] = torch.linspace(-1, 3, 40)
    return base


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_fit_grid_zero_is_exact_and_codes_in_range(bits, symmetric) -> None:
    w = _rows()
    maxq = 2**bits - 1
    scale, zero = fit_grid(w, bits, symmetric)
    assert scale.shape == zero.shape == (w.shape[0], 1)
    assert (scale > 0).all() and torch.isfinite(scale).all()
    assert torch.equal(scale.half().float(), scale)  # what is stored (fp16) is what is used
    assert torch.equal(zero, zero.round()) and (zero >= 0).all() and (zero <= maxq).all()
    if symmetric:
        assert (zero == 2 ** (bits - 1)).all()
    # 0 is a grid point of every row: code = zero point, dequantized exactly 0
    zeros = torch.zeros(w.shape[0], 1)
    assert torch.equal(quantize_codes(zeros, scale, zero, bits), zero)
    assert (fake_quantize(zeros, scale, zero, bits) == 0).all()
    assert (w[3] == fake_quantize(w, scale, zero, bits)[3]).all()  # an all-zero row stays zero
    codes = quantize_codes(w, scale, zero, bits)
    assert codes.min() >= 0 and codes.max() <= maxq and torch.equal(codes, codes.round())


def _rtn_error(bits: int, symmetric: bool, w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    qw = quantize_rtn(w, bits, group_size, symmetric)
    step = qw.scale.float().repeat_interleave(group_size, dim=1)[:, : w.shape[1]]
    return (w - qw.dequantize()).abs(), step


def _weights(seed: int, smallest: float) -> torch.Tensor:
    """Rows of very different magnitudes (10^smallest .. 10), 192 columns = 4 groups of 48."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(128, 192, generator=g) * 10 ** torch.empty(128, 1).uniform_(smallest, 1, generator=g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_rtn_error_within_half_step(bits, symmetric) -> None:
    """|w - Q(w)| <= s/2 for every weight: the fp16 scale is rounded up, so a group's extremes stay on the grid
    (rows down to 1e-3 give subnormal fp16 scales at 8 bits, the hardest case for that)."""
    err, step = _rtn_error(bits, symmetric, _weights(bits, smallest=-3), group_size=48)
    assert (err <= step * 0.5 * (1 + 1e-6)).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_rtn_symmetric_all_positive_group(bits) -> None:
    """A symmetric grid spans [-max|w|, max|w|] even when a group has no negative weight (the GPTQ reference's
    quantizer keeps xmin = 0 there and clamps the upper half of the group)."""
    w = torch.rand(4, 32, generator=torch.Generator().manual_seed(0)) + 0.1
    err, step = _rtn_error(bits, True, w, group_size=32)
    assert (err <= step * 0.5 * (1 + 1e-6)).all()


@pytest.mark.parametrize("group_size", [None, 16, 48, 64, 128])  # 48 on 64 columns: a ragged last group
def test_quantize_rtn_layout(group_size) -> None:
    w = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    qw = quantize_rtn(w, 4, group_size, symmetric=False)
    groups = 1 if group_size is None else math.ceil(64 / group_size)
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (10, 64) and int(qw.codes.max()) <= 15
    assert qw.scale.dtype == torch.float16 and qw.scale.shape == (10, groups)
    assert qw.zero.dtype == torch.uint8 and qw.zero.shape == (10, groups)
    # each group is quantized on its own grid: the dequantized weight of the group only depends on the group
    if group_size == 48:
        alone = quantize_rtn(w[:, 48:], 4, None, symmetric=False).dequantize()
        assert torch.equal(qw.dequantize()[:, 48:], alone)


# ---------------------------------------------------------------------------------------------------------------
# storage round trip on the tiny Llama
# ---------------------------------------------------------------------------------------------------------------


def _data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus the 8-byte length and the JSON header)."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header_len


def _tensor_sizes(path: Path) -> dict[str, tuple[str, list[int], int]]:
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()}


@pytest.mark.parametrize(
    "stage",
    [
        {"method": "gptq", "bits": 4, "group_size": 48},  # ragged: 64 columns -> groups of 48 and 16
        {"method": "gptq", "bits": 3, "group_size": 32, "act_order": True, "symmetric": True},
        {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},
        {"method": "rtn", "bits": 2, "group_size": 128},  # one group on 64 columns, two-thirds of one on 128
    ],
)
def test_save_and_load_compressed_round_trip(tiny_llama, calibration_ids, tmp_path, stage) -> None:
    compress_(tiny_llama, Recipe(name="q", stages=[stage]), calibration_ids, batch_size=4)
    dense_dir, packed_dir = tmp_path / "dense", tmp_path / "packed"
    tiny_llama.save_pretrained(dense_dir)
    tiny_llama.save_pretrained(packed_dir)
    storage.save_compressed(tiny_llama, packed_dir, layout="llmpress")

    loaded = storage.load_compressed(packed_dir)
    ids = calibration_ids[:2]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tiny_llama(ids).logits)
    modules = dict(loaded.named_modules())

    bits, gs = stage["bits"], stage["group_size"]
    sizes = _tensor_sizes(packed_dir / "model.safetensors")
    expected_saving = 0
    quantized = {n: m for n, m in tiny_llama.named_modules() if quantization_of(m) is not None}
    assert len(quantized) == 21
    for name, layer in quantized.items():
        qw = quantization_of(layer)
        out, cols = layer.weight.shape
        n, groups = out * cols, 1 if gs is None else math.ceil(cols / gs)
        assert f"{name}.weight" not in sizes
        assert sizes[f"{name}.weight_packed"] == ("U8", [math.ceil(n * bits / 8)], math.ceil(n * bits / 8))
        assert sizes[f"{name}.weight_scale"] == ("F16", [out, groups], 2 * out * groups)
        has_zero = not stage.get("symmetric", False)
        assert (f"{name}.weight_zero" in sizes) == has_zero
        kept = math.ceil(n * bits / 8) + 2 * out * groups + (out * groups if has_zero else 0)
        expected_saving += 4 * n - kept
        # the loaded layer carries the same codes, and computes with exactly the evaluated weight
        again = quantization_of(modules[name])
        assert again is not None and torch.equal(again.codes, qw.codes) and torch.equal(again.scale, qw.scale)
        assert torch.equal(modules[name].weight.data, layer.weight.data)

    saved = _data_bytes(dense_dir / "model.safetensors") - _data_bytes(packed_dir / "model.safetensors")
    assert saved == expected_saving
    manifest = json.loads((packed_dir / storage.MANIFEST).read_text())
    assert set(manifest["quantized"]) == set(quantized)
    assert all(spec["bits"] == bits and spec["group_size"] == gs for spec in manifest["quantized"].values())


def test_packed_weights_are_about_bits_over_32_of_fp32(tiny_llama, calibration_ids, tmp_path) -> None:
    """4-bit, group 32: codes are 1/8 of fp32, plus 3 bytes of scale and zero per 32 weights (~1/42 more)."""
    compress_(tiny_llama, Recipe(name="q", stages=[{"method": "rtn", "bits": 4, "group_size": 32}]), None)
    tiny_llama.save_pretrained(tmp_path)
    storage.save_compressed(tiny_llama, tmp_path, layout="llmpress")
    sizes = _tensor_sizes(tmp_path / "model.safetensors")
    weights = sum(m.weight.numel() for m in tiny_llama.modules() if quantization_of(m) is not None)
    stored = sum(size for key, (_, _, size) in sizes.items() if key.rsplit(".", 1)[-1].startswith("weight_"))
    assert stored / (4 * weights) == pytest.approx(4 / 32 + 3 / (32 * 4), rel=1e-6)


@pytest.mark.parametrize("bits", [3, 4, 5, 8])
def test_signed_grid_puts_the_extreme_on_the_lowest_code(bits) -> None:
    """llama.cpp's Q4_0 rule: the largest-magnitude weight of each group, either sign, is exactly on code 0; zero
    stays a grid point; the step is |extreme| / 2^(bits-1) (rounded up in fp16), finer than the balanced grid's."""
    from llmpress.compress.quant import fit_signed_grid

    w = _rows()
    half = 2 ** (bits - 1)
    scale, zero = fit_signed_grid(w, bits)
    assert (zero == half).all() and torch.equal(scale.half().float(), scale)
    extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True))
    codes = quantize_codes(w, scale, zero, bits)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    nonzero = extreme[:, 0].abs() / half >= torch.finfo(torch.float16).tiny  # smaller: the scale is clamped there
    assert (codes.gather(1, w.abs().argmax(dim=1, keepdim=True))[nonzero] == 0).all()
    assert (torch.sign(scale) == -torch.sign(extreme))[nonzero].all()
    assert ((scale.abs() >= extreme.abs() / half) & (scale.abs() <= extreme.abs() / half * (1 + 2**-10)))[nonzero].all()
    assert (fake_quantize(torch.zeros(w.shape[0], 1), scale, zero, bits) == 0).all()
    balanced, _ = fit_grid(w, bits, symmetric=True)
    assert (scale.abs() <= balanced)[nonzero].all()


def test_signed_grid_is_llama_cpp_q4_0() -> None:
    """The same weights through the gguf package's Q4_0 reference (llama.cpp's quantize_row_q4_0) and through
    llmpress's signed RTN give the same codes, but where llama.cpp picks them with the fp32 scale and llmpress with
    the fp16 one it stores (rounded away from zero, so values differ by that rounding); the balanced symmetric grid
    has a clearly larger error."""
    import gguf

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    reference = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0),
                                       gguf.GGMLQuantizationType.Q4_0)  # fmt: skip
    ours = quantize_rtn(w, 4, 32, True, signed=True).dequantize().numpy()
    balanced = quantize_rtn(w, 4, 32, True).dequantize().numpy()
    assert np.isclose(ours, reference, rtol=2e-3, atol=0).mean() > 0.99
    assert ((ours - w.numpy()) ** 2).mean() < 0.9 * ((balanced - w.numpy()) ** 2).mean()
