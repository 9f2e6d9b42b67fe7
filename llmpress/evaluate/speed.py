"""Cost of the deployable artifact: prefill latency, decode tokens/s and peak memory, PyTorch and onnxruntime.

Each model is measured in a fresh child process (`python -m llmpress.evaluate.speed`), so that the peak resident
memory it reports (the child's ru_maxrss) is that model's footprint alone, and one model's caches never warm
another's. Protocol (`params.yaml` → `eval.speed`):

- prompts are the first `prompt_tokens` tokens of the held-out text (BOS first), repeated to the batch size;
- prefill: one forward pass over the prompt, filling the KV cache (PyTorch, and the ONNX graph with empty pasts);
- decode: `decode_tokens` greedy steps after the prefill, each feeding one token and reusing the cache, in PyTorch
  and in onnxruntime (`llmpress.export.generate`);
- `warmup` untimed runs, then `repeats` timed runs; the median is reported; torch and ORT use the same threads;
- peak memory is the process's VmHWM (peak resident set of its address space, which starts fresh at exec; the
  getrusage maximum is not used because Linux carries it over from the parent across exec).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmpress.config import SpeedParams
from llmpress.errors import LlmpressError


def _median_seconds(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def torch_speed(model: torch.nn.Module, prompt: torch.Tensor, params: SpeedParams) -> dict[str, float]:
    def prefill() -> None:
        model(input_ids=prompt, use_cache=True)

    decode_times: list[float] = []

    def generate() -> None:
        out = model(input_ids=prompt, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        # The decode steps are timed on their own: (total - prefill) from two separate medians can come out near
        # zero or negative when the machine is busy.
        start = time.perf_counter()
        for _ in range(params.decode_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_times.append(time.perf_counter() - start)

    prefill_s = _median_seconds(prefill, params.warmup, params.repeats)
    _median_seconds(generate, params.warmup, params.repeats)
    decode_s = statistics.median(decode_times[params.warmup :])
    batch = prompt.shape[0]
    return {"prefill_ms": prefill_s * 1e3, "decode_tokens_per_s": batch * params.decode_tokens / decode_s}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM, MB); ru_maxrss where /proc is missing."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.is_file() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best available


def ort_speed(onnx_path: str, prompt: torch.Tensor, params: SpeedParams, threads: int) -> dict[str, float]:
    """Prefill latency and KV-cache decode tokens/s of the ONNX graph in onnxruntime (same protocol as PyTorch)."""
    import numpy as np

    from llmpress.export.generate import OrtGenerator, onnx_session

    generator = OrtGenerator(onnx_session(onnx_path, threads=threads))
    ids = prompt.numpy()
    mask = np.ones_like(ids)

    def prefill() -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return generator.forward(ids, mask, generator.empty_cache(ids.shape[0]))

    decode_times: list[float] = []

    def generate() -> None:
        logits, cache = prefill()
        token, step_mask = logits[:, -1:].argmax(-1), mask
        start = time.perf_counter()
        for _ in range(params.decode_tokens):  # one token per step, reusing the cache
            step_mask = np.concatenate([step_mask, np.ones((ids.shape[0], 1), dtype=np.int64)], axis=1)
            logits, cache = generator.forward(token, step_mask, cache)
            token = logits[:, -1:].argmax(-1)
        decode_times.append(time.perf_counter() - start)

    prefill_s = _median_seconds(prefill, params.warmup, params.repeats)
    _median_seconds(generate, params.warmup, params.repeats)
    decode_s = statistics.median(decode_times[params.warmup :])
    return {"prefill_ms": prefill_s * 1e3, "decode_tokens_per_s": ids.shape[0] * params.decode_tokens / decode_s}


def measure(model_path: str, eval_path: str, params: SpeedParams, onnx_path: str | None = None) -> dict[str, Any]:
    """Run in this process: PyTorch (and ORT if `onnx_path`) at batch 1 and `params.batch_size`."""
    from llmpress.sources import load_model, load_tokenizer

    torch.set_num_threads(params.threads or torch.get_num_threads())
    threads = torch.get_num_threads()
    tokenizer = load_tokenizer(model_path)
    ids = tokenizer(Path(eval_path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = torch.tensor([bos + ids[: params.prompt_tokens]])
    if prompt.shape[1] < params.prompt_tokens:
        raise LlmpressError(f"the held-out text has fewer than eval.speed.prompt_tokens={params.prompt_tokens} tokens")
    result: dict[str, Any] = {
        "threads": threads,
        "prompt_tokens": prompt.shape[1],
        "decode_tokens": params.decode_tokens,
    }
    model = load_model(model_path)
    for batch in sorted({1, params.batch_size}):
        for key, value in torch_speed(model, prompt.repeat(batch, 1), params).items():
            result[f"torch_b{batch}_{key}"] = value
    result["torch_peak_rss_mb"] = peak_rss_mb()
    if onnx_path:
        del model
        for batch in sorted({1, params.batch_size}):
            for key, value in ort_speed(onnx_path, prompt.repeat(batch, 1), params, threads).items():
                result[f"ort_b{batch}_{key}"] = value
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def measure_in_subprocess(model_path: str, eval_path: str, params: SpeedParams,
                          onnx_path: str | None = None) -> dict[str, Any]:  # fmt: skip
    cmd = [sys.executable, "-m", "llmpress.evaluate.speed", model_path, eval_path, params.model_dump_json()]
    if onnx_path:
        cmd += ["--onnx", onnx_path]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise LlmpressError(f"speed measurement of {model_path} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure one model's speed; prints one JSON line.")
    parser.add_argument("model_path")
    parser.add_argument("eval_path")
    parser.add_argument("params_json")
    parser.add_argument("--onnx")
    args = parser.parse_args()
    params = SpeedParams.model_validate_json(args.params_json)
    print(json.dumps(measure(args.model_path, args.eval_path, params, args.onnx)))


if __name__ == "__main__":
    main()
