"""The speed protocol's pieces on a tiny model: positive, finite timings; medians; peak memory read correctly."""

from __future__ import annotations

import math

import torch

from llmpress.config import SpeedParams
from llmpress.evaluate.speed import _median_seconds, peak_rss_mb, torch_speed


def test_median_of_repeats_ignores_warmup() -> None:
    calls = []
    assert _median_seconds(lambda: calls.append(1), warmup=2, repeats=3) >= 0
    assert len(calls) == 5


def test_torch_speed_on_tiny_model(tiny_llama) -> None:
    params = SpeedParams(prompt_tokens=8, decode_tokens=4, warmup=0, repeats=1)
    prompt = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    result = torch_speed(tiny_llama, prompt, params)
    assert set(result) == {"prefill_ms", "decode_tokens_per_s"}
    assert all(math.isfinite(v) and v > 0 for v in result.values())


def test_peak_rss_is_this_process() -> None:
    before = peak_rss_mb()
    block = bytearray(200 * 2**20)  # touch 200 MB
    block[::4096] = b"x" * len(block[::4096])
    assert peak_rss_mb() >= before and peak_rss_mb() > 200
