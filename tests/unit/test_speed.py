"""The speed protocol's pieces on a tiny model: positive, finite timings; medians; peak memory read correctly."""

from __future__ import annotations

import math

import torch

from llmpress.config import SpeedParams
from llmpress.evaluate.speed import peak_rss_mb, time_generation, torch_speed


def test_generation_timing_runs_warmup_and_repeats() -> None:
    prefills, steps = [], []
    result = time_generation(lambda: prefills.append(1) or 0, lambda state: steps.append(1) or state + 1,
                             decode_tokens=4, batch=3, warmup=2, repeats=3)  # fmt: skip
    assert len(prefills) == 5 and len(steps) == 20  # every run is one prefill and decode_tokens steps
    assert result["prefill_ms"] > 0 and result["decode_tokens_per_s"] > 0


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


def test_graph_is_measured_by_a_child_without_torch(tiny_onnx) -> None:
    """The ONNX child imports numpy and onnxruntime only, like the bundle's runner: its peak memory is the
    runner's, not PyTorch's."""
    import json
    import subprocess
    import sys

    _, onnx_dir = tiny_onnx
    params = SpeedParams(prompt_tokens=8, decode_tokens=3, batch_size=2, warmup=0, repeats=1, threads=1)
    code = ("import json, sys; from llmpress.config import SpeedParams; from llmpress.evaluate.speed import measure; "
            f"r = measure('ort', {str(onnx_dir / 'model.onnx')!r}, list(range(1, 10)), "
            f"SpeedParams.model_validate_json({params.model_dump_json()!r})); "
            "print(json.dumps([r, 'torch' in sys.modules]))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result, torch_loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert not torch_loaded
    assert set(result) >= {"ort_b1_prefill_ms", "ort_b2_decode_tokens_per_s", "ort_peak_rss_mb"}
    assert all(result[k] > 0 for k in result if k.startswith("ort_"))


def test_speed_step_measures_an_exported_model_in_onnxruntime_against_the_base_in_pytorch(tiny_onnx, tmp_path) -> None:
    """The base model in PyTorch, the exported model in onnxruntime; the speed-up is their ratio, from the same run.
    (A model that is not exported is measured in PyTorch: the integration test's magnitude run.)"""
    from conftest import byte_tokenizer_json
    from transformers import PreTrainedTokenizerFast

    from llmpress import steps

    model, onnx_dir = tiny_onnx
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    byte_tokenizer_json(folder)
    PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json")).save_pretrained(folder)
    eval_path = tmp_path / "eval.txt"
    eval_path.write_text("the held-out text, long enough for a prompt of a few tokens " * 4)
    params = SpeedParams(prompt_tokens=8, decode_tokens=2, batch_size=2, warmup=0, repeats=1, threads=1)
    job = steps.SpeedJob(model_path=str(folder), base_path=str(folder), eval_path=str(eval_path), params=params,
                         onnx_path=str(onnx_dir / "model.onnx"))  # fmt: skip
    result = steps.speed(job)
    base, comp = result["base"], result["compressed"]
    assert comp["runtime"] == "ort" and comp["ort_b2_decode_tokens_per_s"] > 0 and comp["ort_peak_rss_mb"] > 0
    assert not any(k.startswith("torch_") for k in comp) and not any(k.startswith("ort_") for k in base)
    assert comp["decode_speedup_b2"] == comp["ort_b2_decode_tokens_per_s"] / base["torch_b2_decode_tokens_per_s"]
