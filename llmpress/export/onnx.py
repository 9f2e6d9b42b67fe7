"""ONNX export of a causal LM with a KV cache, and its parity with PyTorch in onnxruntime.

One graph serves prefill and decode (`llmpress.export.generate` drives it):

    inputs   input_ids [batch, new], attention_mask [batch, past + new], position_ids [batch, new] (int64),
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] for every decoder layer i
    outputs  logits [batch, new, vocab], present.{i}.key / .value [batch, kv_heads, past + new, head_dim]

Batch, new-token, past and total lengths are dynamic axes; a prefill feeds pasts of length 0. The graph comes from
torch's dynamo exporter (`torch.onnx.export(dynamo=True)`, which keeps tied embeddings tied): a wrapper turns the
flat past tensors into a transformers `DynamicCache` and the updated cache back into flat presents. Weights go
inline below 2 GB and to external data beside the graph above.

Parity (`check_parity`): the same tokens through PyTorch and onnxruntime's CPU provider, both fp32 - the prefill's
logits at every position, then `decode_steps` greedy steps, each side decoding from its own cache. Reported: the
max and mean absolute logit difference over the prefill and every step, the prefill's argmax agreement, and
whether the two greedy continuations are identical token for token.

Beside it, PyTorch's own noise floor (`noise_floor`): how far the prefill logits move when the input embeddings move
by about one fp32 ulp. For weights-only models it is ~1e-5, far below any parity bound. A model that rounds its
activations (W8A8's per-token dynamic quantization) is discontinuous: a one-ulp change flips some roundings, each
flip perturbs the next layer's inputs by a quantization step, and by the last layer the logits differ by as much as
the quantization noise itself (SmolLM2-135M W8A8: max 2.7-4.8, mean 0.33-0.39). Any two fp32 implementations of
such a model - PyTorch with another GEMM order, onnxruntime - differ that much; the gate then judges ONNX against
this floor instead of an absolute bound (`llmpress.gate`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmpress.export.generate import OrtGenerator, onnx_session

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"


class _WithCache(nn.Module):
    """Flat tensors in and out around a transformers model's DynamicCache (what the exporter can trace)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:  # fmt: skip
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)  # fmt: skip
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_names(layers: int, prefix: str) -> list[str]:
    """`{prefix}.{i}.key`, `{prefix}.{i}.value` for every layer, in the graph's order."""
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def kv_shape(model: nn.Module) -> tuple[int, int]:
    """(key/value heads, head dim) of the model's cache."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


@dataclass(frozen=True)
class ParityResult:
    max_abs_diff: float
    mean_abs_diff: float
    argmax_agreement: float  # prefill positions whose argmax agrees
    tokens: int  # prefill tokens
    decode_steps: int = 0
    greedy_identical: bool = True  # the greedy continuations of both are the same tokens
    noise_max_abs_diff: float = 0.0  # PyTorch against itself under one-ulp input noise (`noise_floor`)
    noise_mean_abs_diff: float = 0.0

    def to_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def export_onnx(model: nn.Module, out_dir: str | Path, opset: int = 18) -> Path:
    """Write `out_dir/model.onnx`, the KV-cache graph described above."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    wrapper = _WithCache(model).eval()
    layers = wrapper.layers
    kv_heads, head_dim = kv_shape(model)
    # Example: 2 sequences, 3 cached tokens, 4 new ones (distinct sizes, so no axis is specialised to another).
    batch_size, past_len, new_len = 2, 3, 4
    ids = torch.arange(1, 1 + batch_size * new_len, dtype=torch.long).reshape(batch_size, new_len)
    mask = torch.ones(batch_size, past_len + new_len, dtype=torch.long)
    positions = torch.arange(past_len, past_len + new_len).expand(batch_size, new_len).contiguous()
    past = [torch.zeros(batch_size, kv_heads, past_len, head_dim) for _ in range(2 * layers)]
    batch = torch.export.Dim("batch", min=1, max=1024)
    new, total = torch.export.Dim("new", min=1, max=8192), torch.export.Dim("total", min=2, max=16384)
    past_dim = torch.export.Dim("past", min=1, max=16384)
    path = out_dir / ONNX_NAME
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (ids, mask, positions, past),
            input_names=["input_ids", "attention_mask", "position_ids", *cache_names(layers, "past_key_values")],
            output_names=["logits", *cache_names(layers, "present")],
            dynamic_shapes={"input_ids": {0: batch, 1: new}, "attention_mask": {0: batch, 1: total},
                            "position_ids": {0: batch, 1: new}, "past": [{0: batch, 2: past_dim}] * (2 * layers)},
            opset_version=opset,
            dynamo=True,
            optimize=True,
        )  # fmt: skip
    big = sum(p.numel() * p.element_size() for p in model.parameters()) >= 2**31 - 2**26
    program.save(str(path), external_data=big)
    log.info("exported %s (KV cache, %d layers) in %.1fs", path, layers, time.perf_counter() - start)
    return path


NOISE_SEEDS = 3


@torch.no_grad()
def noise_floor(model: nn.Module, input_ids: torch.Tensor, seeds: int = NOISE_SEEDS) -> tuple[float, float]:
    """(max, mean) absolute change of the prefill logits when every input embedding is scaled by 1 + 2^-23 * N(0, 1),
    about one fp32 ulp: max over `seeds` draws, mean of their means."""
    model = model.eval()
    embeds = model.get_input_embeddings()(input_ids).float()
    ref = model(inputs_embeds=embeds).logits.float()
    maxes, means = [], []
    for seed in range(seeds):
        noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(seed))
        diff = (model(inputs_embeds=embeds * (1 + 2**-23 * noise)).logits.float() - ref).abs()
        maxes.append(diff.max().item())
        means.append(diff.mean().item())
    return max(maxes), sum(means) / len(means)


@torch.no_grad()
def check_parity(model: nn.Module, onnx_path: str | Path, input_ids: torch.Tensor, decode_steps: int = 32,
                 threads: int | None = None) -> ParityResult:  # fmt: skip
    """Prefill `input_ids` ([batch, sequence]) and decode `decode_steps` greedy tokens in PyTorch and onnxruntime."""
    generator = OrtGenerator(onnx_session(onnx_path, threads))
    model = model.eval()
    ids = input_ids.numpy()
    mask = np.ones_like(ids)
    out = model(input_ids=input_ids, use_cache=True)
    ref_logits, cache = out.logits.float(), out.past_key_values
    got_logits, ort_cache = generator.forward(ids, mask, generator.empty_cache(ids.shape[0]))
    got = torch.from_numpy(got_logits).float()
    diffs = [(got - ref_logits).abs().flatten()]
    agreement = (got.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    ref_token, ort_token = ref_logits[:, -1].argmax(-1), got[:, -1].argmax(-1)
    identical = bool(torch.equal(ref_token, ort_token))
    for _ in range(decode_steps):
        out = model(input_ids=ref_token[:, None], past_key_values=cache, use_cache=True)
        ref_logits, cache = out.logits[:, -1].float(), out.past_key_values
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), dtype=np.int64)], axis=1)
        step_logits, ort_cache = generator.forward(ort_token[:, None].numpy(), mask, ort_cache)
        got = torch.from_numpy(step_logits[:, -1]).float()
        diffs.append((got - ref_logits).abs().flatten())
        ref_token, ort_token = ref_logits.argmax(-1), got.argmax(-1)
        identical = identical and bool(torch.equal(ref_token, ort_token))
    diff = torch.cat(diffs)
    noise_max, noise_mean = noise_floor(model, input_ids)
    return ParityResult(
        max_abs_diff=diff.max().item(),
        mean_abs_diff=diff.mean().item(),
        argmax_agreement=agreement,
        tokens=input_ids.numel(),
        decode_steps=decode_steps,
        greedy_identical=identical,
        noise_max_abs_diff=noise_max,
        noise_mean_abs_diff=noise_mean,
    )
