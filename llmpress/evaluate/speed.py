"""Cost of the deployable artifact: prefill latency, decode tokens/s and peak memory, PyTorch and onnxruntime.

Each model is measured in a fresh child process (`python -m llmpress.evaluate.speed`), so that the peak resident
memory it reports is that runtime's footprint alone, and one model's caches never warm another's. A PyTorch model
is measured in PyTorch (`--runtime torch`); an exported graph in onnxruntime (`--runtime ort`) by a child that
imports only numpy and onnxruntime, like the edge bundle's runner, so its peak memory is the runner's; a GGUF in
llama.cpp (`--runtime gguf`, batch 1 only: llama-cpp-python's `Llama` holds one sequence). Protocol
(`params.yaml` -> `eval.speed`):

- prompts are the first `prompt_tokens` tokens of the held-out text (BOS first), repeated to the batch size; the
  parent tokenizes once and hands every child the same ids;
- prefill: one forward pass over the prompt, filling the KV cache (PyTorch, and the ONNX graph with empty pasts);
- decode: `decode_tokens` greedy steps after the prefill, each feeding one token and reusing the cache;
- `warmup` untimed runs, then `repeats` timed runs of prefill + decode, each part timed on its own; the medians
  are reported; torch and ORT use the same threads;
- peak memory is the process's VmHWM (peak resident set of its address space, which starts fresh at exec; the
  getrusage maximum is not used because Linux carries it over from the parent across exec).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmpress.config import SpeedParams
from llmpress.errors import LlmpressError

RUNTIMES = ("torch", "ort", "gguf")


def served(metrics: dict[str, Any], key: str) -> Any:
    """`key` (e.g. "b1_decode_tokens_per_s", "peak_rss_mb") in the runtime that serves the model: onnxruntime's
    measurement when the model was exported, else PyTorch's."""
    return metrics.get(f"ort_{key}", metrics.get(f"torch_{key}"))


def time_generation(prefill: Callable[[], Any], step: Callable[[Any], Any], decode_tokens: int, batch: int,
                    warmup: int, repeats: int) -> dict[str, float]:  # fmt: skip
    """Median prefill latency and decode tokens/s over `repeats` timed runs (after `warmup` untimed ones) of one
    prefill followed by `decode_tokens` steps; `step` takes and returns the state its runtime carries (cache, last
    token). The prefill and the decode steps of a run are timed on their own: (total - prefill) from two separate
    medians can come out near zero or negative when the machine is busy."""
    prefill_times, decode_times = [], []
    for run in range(warmup + repeats):
        start = time.perf_counter()
        state = prefill()
        middle = time.perf_counter()
        for _ in range(decode_tokens):
            state = step(state)
        end = time.perf_counter()
        if run >= warmup:
            prefill_times.append(middle - start)
            decode_times.append(end - middle)
    tokens_per_s = batch * decode_tokens / statistics.median(decode_times)
    return {"prefill_ms": statistics.median(prefill_times) * 1e3, "decode_tokens_per_s": tokens_per_s}


def torch_speed(model: Any, prompt: Any, params: SpeedParams) -> dict[str, float]:
    """Prefill latency and KV-cache decode tokens/s of a PyTorch causal LM; `prompt` is a [batch, tokens] tensor."""
    import torch

    @torch.no_grad()
    def prefill() -> tuple[Any, Any]:
        out = model(input_ids=prompt, use_cache=True)
        return out.past_key_values, out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def step(state: tuple[Any, Any]) -> tuple[Any, Any]:
        out = model(input_ids=state[1], past_key_values=state[0], use_cache=True)
        return out.past_key_values, out.logits[:, -1:].argmax(-1)

    return time_generation(prefill, step, params.decode_tokens, prompt.shape[0], params.warmup, params.repeats)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM, MB); ru_maxrss where /proc is missing."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.is_file() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best available


def ort_speed(generator: Any, prompt: Any, params: SpeedParams) -> dict[str, float]:
    """Prefill latency and KV-cache decode tokens/s of an `OrtGenerator`'s graph (same protocol as PyTorch);
    `prompt` is a [batch, tokens] array or tensor of ids."""
    import numpy as np

    ids = np.asarray(prompt, dtype=np.int64)
    batch = ids.shape[0]

    def prefill() -> tuple[Any, np.ndarray, np.ndarray]:
        mask = np.ones_like(ids)
        logits, cache = generator.forward(ids, mask, generator.empty_cache(batch))
        return cache, logits[:, -1:].argmax(-1), mask

    def step(state: tuple[Any, np.ndarray, np.ndarray]) -> tuple[Any, np.ndarray, np.ndarray]:
        cache, token, mask = state
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        logits, cache = generator.forward(token, mask, cache)
        return cache, logits[:, -1:].argmax(-1), mask

    return time_generation(prefill, step, params.decode_tokens, batch, params.warmup, params.repeats)


def prompt_ids(tokenizer, eval_path: str | Path, params: SpeedParams) -> list[int]:
    """The protocol's prompt: BOS, then the first `prompt_tokens` held-out tokens."""
    ids = tokenizer(Path(eval_path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) < params.prompt_tokens:
        raise LlmpressError(f"the held-out text has fewer than eval.speed.prompt_tokens={params.prompt_tokens} tokens")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + ids[: params.prompt_tokens]


def measure(runtime: str, path: str, prompt: list[int], params: SpeedParams) -> dict[str, Any]:
    """Run in this process: `path` (a model folder for "torch", a graph for "ort", a GGUF file for "gguf") at batch
    1 and `params.batch_size` (gguf: batch 1). Keys are prefixed with the runtime: torch_b1_prefill_ms,
    ort_b4_decode_tokens_per_s, gguf_b1_decode_tokens_per_s, ..."""
    result: dict[str, Any] = {"prompt_tokens": len(prompt), "decode_tokens": params.decode_tokens}
    batches = sorted({1, params.batch_size})
    if runtime == "gguf":
        from llmpress.evaluate.llamacpp import LlamaCpp

        result["threads"] = threads = params.threads or len(os.sched_getaffinity(0))
        engine = LlamaCpp(path, len(prompt) + params.decode_tokens + 1, threads, all_logits=False)
        timings = {1: time_generation(lambda: engine.prefill(prompt), engine.step, params.decode_tokens, 1,
                                      params.warmup, params.repeats)}  # fmt: skip
    elif runtime == "torch":
        import torch

        from llmpress.sources import load_model

        torch.set_num_threads(params.threads or torch.get_num_threads())
        result["threads"] = torch.get_num_threads()
        model = load_model(path)
        timings = {b: torch_speed(model, torch.tensor([prompt] * b), params) for b in batches}
    else:
        import numpy as np

        from llmpress.export.generate import OrtGenerator, onnx_session

        result["threads"] = threads = params.threads or len(os.sched_getaffinity(0))
        generator = OrtGenerator(onnx_session(path, threads=threads))  # one session for every batch size
        timings = {b: ort_speed(generator, np.array([prompt] * b), params) for b in batches}
    for batch, timing in timings.items():
        for key, value in timing.items():
            result[f"{runtime}_b{batch}_{key}"] = value
    result[f"{runtime}_peak_rss_mb"] = peak_rss_mb()
    return result


def measure_in_subprocess(runtime: str, path: str, prompt: list[int], params: SpeedParams) -> dict[str, Any]:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: one of {RUNTIMES}")
    cmd = [sys.executable, "-m", "llmpress.evaluate.speed", runtime, path, json.dumps(prompt), params.model_dump_json()]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise LlmpressError(f"speed measurement of {path} ({runtime}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure one model's speed; prints one JSON line.")
    parser.add_argument("runtime", choices=RUNTIMES)
    parser.add_argument("path", help="model folder (torch), ONNX graph (ort) or GGUF file (gguf)")
    parser.add_argument("prompt_json", help="the prompt's token ids, a JSON list")
    parser.add_argument("params_json")
    args = parser.parse_args()
    params = SpeedParams.model_validate_json(args.params_json)
    print(json.dumps(measure(args.runtime, args.path, json.loads(args.prompt_json), params)))


if __name__ == "__main__":
    main()
