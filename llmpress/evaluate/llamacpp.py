"""A GGUF scored in llama.cpp itself: perplexity from llama.cpp's logits, and batch-1 prefill / decode speed.

llama.cpp is reached through llama-cpp-python (`llama_cpp.Llama`), an optional dependency built from source for
the machine's CPU (`make llama-cpp`). Nothing here is imported at load time, so the rest of llmpress never needs it;
`available()` says whether this interpreter has it.

Protocol: the same as every other runtime's (`llmpress.evaluate.perplexity`): the held-out text tokenized once by
the model's own tokenizer, cut into `params.yaml`'s windows, each window evaluated in one llama.cpp batch with
logits for every position, scored positions as in PyTorch. Speed uses `llmpress.evaluate.speed.time_generation`
with the same prompt ids and greedy steps as PyTorch and onnxruntime (`speed.measure(runtime="gguf")`).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmpress.config import EvalParams
from llmpress.errors import LlmpressError
from llmpress.evaluate.perplexity import PerplexityResult, make_windows, window_nll

INSTALL = "llama-cpp-python is not installed: `make llama-cpp` builds it from source for this CPU (a few minutes)"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCpp:
    """One GGUF loaded by llama.cpp on the CPU: logits of a token sequence, and greedy prefill / step."""

    def __init__(self, gguf: str | Path, context: int, threads: int | None = None, all_logits: bool = True) -> None:
        if not available():
            raise LlmpressError(INSTALL)
        from llama_cpp import Llama

        threads = threads or len(os.sched_getaffinity(0))
        # one batch holds a whole window: its logits come from one pass, as PyTorch's and onnxruntime's do
        self.llm = Llama(model_path=str(gguf), n_ctx=context, n_batch=context, n_ubatch=context, n_threads=threads,
                         n_threads_batch=threads, logits_all=all_logits, verbose=False)  # fmt: skip

    def logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] float32: the next-token logits after each prefix, from an empty cache."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def last_logits(self) -> np.ndarray:
        # without all_logits llama.cpp computes (and llama-cpp-python keeps) only the last position's row
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def prefill(self, prompt: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(prompt)
        return int(self.last_logits().argmax())

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return int(self.last_logits().argmax())

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        tokens = [self.prefill(prompt)]
        for _ in range(steps - 1):
            tokens.append(self.step(tokens[-1]))
        return tokens


def window_perplexity(logits_of: Any, ids: list[int], params: EvalParams, bos_id: int | None) -> PerplexityResult:
    """params.yaml's perplexity from a runtime's logits of one window (`logits_of(list[int]) -> [T, V] array`)."""
    windows = make_windows(ids, params, bos_id)

    def logits_fn(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.stack([logits_of(row.tolist()) for row in batch]))

    nll, count = window_nll(logits_fn, windows, 1)
    if count == 0:
        raise LlmpressError("the evaluation text is too short: no token could be scored")
    return PerplexityResult(perplexity=math.exp(nll / count), nll=nll, tokens=count, windows=len(windows))


def gguf_perplexity(gguf: str | Path, ids: list[int], params: EvalParams, bos_id: int | None,
                    threads: int | None = None) -> PerplexityResult:  # fmt: skip
    """Perplexity of a GGUF in llama.cpp on the held-out token ids, under the pinned protocol."""
    model = LlamaCpp(gguf, params.window, threads, all_logits=True)
    return window_perplexity(model.logits, ids, params, bos_id)
