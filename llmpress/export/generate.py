"""Text generation over onnxruntime with a KV cache: greedy and sampling, for batches with left padding.

Needs only numpy and onnxruntime (no torch), so the edge bundle's runner can use it as is. It drives the graph
`llmpress.export.onnx.export_onnx` writes:

    inputs   input_ids [batch, new], attention_mask [batch, past + new], position_ids [batch, new],
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
    outputs  logits [batch, new, vocab], present.{i}.key / .value [batch, kv_heads, past + new, head_dim]

The prefill is the same graph with past length 0. Each decode step feeds the one new token and the presents of the
step before as the pasts, so a step costs one token's compute, not the whole sequence's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with every graph optimisation on (`threads` intra-op threads if given)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Sampling:
    """How the next token is picked. temperature 0 is greedy (argmax); otherwise softmax(logits / temperature)
    restricted to the `top_k` most likely tokens and the smallest set reaching probability `top_p`."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:  # NaN passes `< 0` and poisons softmax
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.rng = np.random.default_rng(self.seed)

    def pick(self, logits: np.ndarray) -> np.ndarray:
        """Next token per row of `logits` [batch, vocab]."""
        if self.temperature == 0:
            return logits.argmax(-1)
        scores = logits.astype(np.float64) / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = np.partition(scores, -self.top_k, axis=-1)[:, -self.top_k][:, None]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if self.top_p is not None and self.top_p < 1:
            order = np.argsort(-probs, axis=-1, kind="stable")
            sorted_probs = np.take_along_axis(probs, order, -1)
            keep_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < self.top_p  # always keeps the top token
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, -1)
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum(-1, keepdims=True)
        return np.array([self.rng.choice(probs.shape[-1], p=row) for row in probs])


class OrtGenerator:
    """Prefill and decode steps over an exported KV-cache graph."""

    def __init__(self, session: Any) -> None:
        self.session = session
        names = [i.name for i in session.get_inputs()]
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        self.output_names = [o.name for o in session.get_outputs()]
        if "logits" not in self.output_names or not self.past_names:
            raise ValueError(f"not an llmpress KV-cache graph: inputs {names}, outputs {self.output_names}")
        shapes = {i.name: i.shape for i in session.get_inputs()}
        first = shapes[self.past_names[0]]
        self.kv_heads, self.head_dim = int(first[1]), int(first[3])
        self.dtype = (
            np.float16 if "float16" in session.get_inputs()[names.index(self.past_names[0])].type else np.float32
        )

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype) for name in self.past_names}

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
        """Logits of the new tokens [batch, new, vocab] and the cache including them.

        `attention_mask` [batch, past + new] covers the cached tokens and the new ones (0 = padding); positions are
        counted over the unpadded tokens, as transformers does for left-padded batches.
        """
        new = input_ids.shape[1]
        positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)[:, -new:]
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": positions.astype(np.int64), **cache}  # fmt: skip
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))
        present = {name: outputs[name.replace("past_key_values.", "present.")] for name in self.past_names}
        return outputs["logits"], present

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, sampling: Sampling | None = None,
                 attention_mask: np.ndarray | None = None, eos_token_id: int | None = None) -> np.ndarray:  # fmt: skip
        """The prompt followed by up to `max_new_tokens` new tokens, [batch, prompt + new]. Rows that produced
        `eos_token_id` keep producing it (padding), and generation stops when every row has."""
        sampling = sampling or Sampling()
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        logits, cache = self.forward(ids, mask, self.empty_cache(ids.shape[0]))
        done = np.zeros(ids.shape[0], dtype=bool)
        out = [ids]
        for step in range(max_new_tokens):
            token = sampling.pick(logits[:, -1])
            if eos_token_id is not None:
                token = np.where(done, eos_token_id, token)
                done |= token == eos_token_id
            out.append(token[:, None])
            if step + 1 == max_new_tokens or done.all():
                break
            mask = np.concatenate([mask, np.ones((ids.shape[0], 1), dtype=np.int64)], axis=1)
            logits, cache = self.forward(token[:, None], mask, cache)
        return np.concatenate(out, axis=1)
