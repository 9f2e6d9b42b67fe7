"""ONNX export of a causal LM with a KV cache, and its parity with PyTorch in onnxruntime.

One graph serves prefill and decode (`llmpress.export.generate` drives it):

    inputs   input_ids [batch, new], attention_mask [batch, past + new], position_ids [batch, new] (int64),
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] for every decoder layer i
    outputs  logits [batch, new, vocab], present.{i}.key / .value [batch, kv_heads, past + new, head_dim]

Batch, new-token, past and total lengths are dynamic axes; a prefill feeds pasts of length 0. The graph comes from
torch's dynamo exporter (`torch.onnx.export(dynamo=True)`, which keeps tied embeddings tied): a wrapper turns the
flat past tensors into a transformers `DynamicCache` and the updated cache back into flat presents. Weights go
to `model.onnx.data` beside the graph.

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
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from llmpress.compress.experts import unfuse_experts_
from llmpress.export.generate import OrtGenerator, onnx_session
from llmpress.export.stitch import StitchError, decoder_blocks, shallow, stitch, uniform
from llmpress.export.template import (
    Binding,
    cacheable,
    load_template,
    save_template,
    state,
    strip_bound,
    template_key,
    write_export,
)

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


def export_onnx(model: nn.Module, out_dir: str | Path, opset: int = 18, cache_dir: str | Path | None = None) -> Path:
    """Write `out_dir/model.onnx` (graph) and `model.onnx.data` (weights), the KV-cache graph described above.

    The graph of a model whose blocks are alike is traced with two blocks and stitched to all of them
    (`llmpress.export.stitch`). With `cache_dir`, the graph is kept there as a template and reused for every later
    model of the same architecture (`llmpress.export.template`): an export is then a copy of the graph and a write
    of the weights. A graph that was not traced from this very model is checked against it before it is used."""
    out_dir = Path(out_dir)
    model = model.eval().float()
    unfuse_experts_(model)  # a mixture of experts exports as linears, every expert weighted by its routing weight
    start = time.perf_counter()
    key = template_key(model, opset) if cache_dir is not None and cacheable(model) else None
    folder = Path(cache_dir) / key[:16] if cache_dir is not None and key is not None else None
    found = load_template(folder, key) if folder is not None and key is not None else None
    if found is not None:
        template, bindings = found
        complete, how = True, f"reused from {folder}"
    else:
        template, bindings, complete, how = _trace(model, opset)
    path = write_export(template, bindings, model, out_dir)
    if how != "traced" and not matches(model, path):
        log.warning("the %s graph does not match the model: tracing every block", how)
        template, bindings, complete = trace_template(model, opset)
        path, how = write_export(template, bindings, model, out_dir), "traced"
    if found is None and folder is not None and key is not None and complete:
        save_template(folder, key, template, bindings)
    log.info("exported %s (KV cache, %d layers, graph %s) in %.1f s", path, model.config.num_hidden_layers, how,
             time.perf_counter() - start)  # fmt: skip
    return path


def _trace(model: nn.Module, opset: int) -> tuple[onnx.ModelProto, dict[str, Binding], bool, str]:
    """Trace two blocks and stitch them to all when the blocks are alike; otherwise trace every block."""
    depth = model.config.num_hidden_layers
    if uniform(model):
        try:
            blocks_name, _ = decoder_blocks(model)
            with shallow(model, 2):
                template, bindings, complete = trace_template(model, opset)
            template, bindings = stitch(template, bindings, blocks_name, depth)
            return template, bindings, complete, f"stitched from 2 traced blocks to {depth}"
        except StitchError as exc:
            log.info("stitching the graph did not apply (%s): tracing every block", exc)
    template, bindings, complete = trace_template(model, opset)
    return template, bindings, complete, "traced"


@torch.no_grad()
def matches(model: nn.Module, onnx_path: str | Path, tolerance: float = 1e-3) -> bool:
    """Whether the graph computes what the model does on a small random input (2 sequences, 3 cached and 4 new
    tokens): logits and every present within `tolerance` relative to their scale."""
    wrapper = _WithCache(model).eval()
    kv_heads, head_dim = kv_shape(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 4), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    positions = torch.arange(3, 7).expand(2, 4).contiguous()
    past = [torch.randn(2, kv_heads, 3, head_dim, generator=g) for _ in range(2 * wrapper.layers)]
    expected = wrapper(ids, mask, positions, past)
    session = onnx_session(onnx_path, threads=1)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    feeds |= {n: p.numpy() for n, p in zip(cache_names(wrapper.layers, "past_key_values"), past, strict=True)}
    got = session.run(None, feeds)
    return len(got) == len(expected) and all(
        np.abs(out - ref.numpy()).max() <= tolerance * max(1.0, float(ref.abs().max()))
        for out, ref in zip(got, expected, strict=True)
    )


def trace_template(model: nn.Module, opset: int) -> tuple[onnx.ModelProto, dict[str, Binding], bool]:
    """Trace the KV-cache graph of `model` with torch's dynamo exporter: (the graph without its weights, what each
    weight initializer binds to, whether the bindings cover every parameter so that the template can be reused)."""
    import onnx_ir as ir
    import onnxscript.optimizer

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
            # onnxscript's pattern rewriter took 40 of 108 s on SmolLM2's 30 layers for a graph onnxruntime runs
            # no faster (it applies its own fusions when a session loads it): constant folding (0.4 s) and the
            # weights' transposes (below) are what the graph needs.
            optimize=False,
        )  # fmt: skip
    log.info("traced %d layers in %.1f s", layers, time.perf_counter() - start)
    graph = program.model.graph
    # The exporter names a weight initializer after its parameter or buffer, under the wrapper's `model.`.
    tensors = state(model)
    sources = {n: n.removeprefix("model.") for n in graph.initializers if n.removeprefix("model.") in tensors}

    def keeps_weights_live(node) -> bool | None:  # fold shapes and casts, never a computation on a weight
        return False if any(v is not None and v.name in sources for v in node.inputs) else None

    onnxscript.optimizer.fold_constants(program.model, should_fold=keeps_weights_live)
    transposed = fold_weight_transposes(program.model)
    onnxscript.optimizer.remove_unused_nodes(program.model)
    for name, value in list(graph.initializers.items()):  # left behind by folding; onnxruntime warns of each
        if not value.uses() and not value.is_graph_output():
            graph.initializers.pop(name)
    bindings = {n: Binding(sources[n]) for n in graph.initializers if n in sources}
    bindings |= {n: Binding(sources[old], transpose=True) for n, old in transposed.items() if old in sources}
    # Weights reach the graph only as bound initializers (not folded into constants, above; held outside
    # parameters and buffers, `cacheable` refuses the model), so what else the graph holds comes from the config
    # and the code, both in the template's key. A large unbound initializer would be a weight under another name.
    large = [v.name for n, v in graph.initializers.items() if n not in bindings and _numel(v) > LARGE_CONSTANT]
    complete = not large
    if large:
        log.warning("the graph of %s holds large constants the template cannot bind (%s): it is not kept for "
                    "reuse", type(model).__name__, ", ".join(large[:3]))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:  # the exporter's own writer; the template keeps only the graph
        ir.save(program.model, Path(tmp) / ONNX_NAME, external_data="weights")
        proto = onnx.load(str(Path(tmp) / ONNX_NAME), load_external_data=False)
        for node in proto.graph.node:  # stack traces (with this machine's paths) and FX dumps: 90 % of the graph
            kept = [(p.key, p.value) for p in node.metadata_props if p.key in NODE_METADATA]
            del node.metadata_props[:]
            for key, value in kept:
                node.metadata_props.add(key=key, value=value)
        for init in proto.graph.initializer:  # constants the trace made stay inside the graph
            if init.name not in bindings and init.data_location == onnx.TensorProto.EXTERNAL:
                onnx.external_data_helper.load_external_data_for_tensor(init, tmp)
                init.data_location = onnx.TensorProto.DEFAULT
                del init.external_data[:]
    return strip_bound(proto, bindings), bindings, complete


LARGE_CONSTANT = 4096  # elements
NODE_METADATA = {"pkg.torch.onnx.name_scopes"}  # which module each node comes from; the rest is dropped


def _numel(value) -> int:
    dims = value.shape.dims if value.shape is not None else ()
    return int(np.prod([d if isinstance(d, int) else 1 for d in dims])) if dims else 1


def fold_weight_transposes(model) -> dict[str, str]:
    """Replace `Transpose(W)` by a transposed copy of W, named `W.T`, for every weight initializer W read by that
    Transpose alone (each linear's weight ahead of its MatMul), so a MatMul reads its weight directly (what
    onnxruntime's quantizers and TensorRT's sparsity check look for). A weight read elsewhere too - a tied
    embedding, also read by the embedding's Gather - keeps its Transpose: folding it would store it twice.
    Returns {new initializer: the one it transposes}. `model` is the exporter's `onnx_ir.Model`."""
    import onnx_ir as ir

    graph = model.graph
    folded: dict[str, str] = {}
    for node in list(graph):
        weight = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if weight is None or not weight.is_initializer() or len(weight.uses()) != 1 or weight.const_value is None:
            continue
        data = weight.const_value.numpy()
        perm = node.attributes.get_ints("perm", list(range(data.ndim))[::-1])
        value = ir.Value(name=f"{weight.name}.T", const_value=ir.tensor(np.ascontiguousarray(data.transpose(perm))))
        graph.register_initializer(value)
        node.outputs[0].replace_all_uses_with(value)
        graph.remove(node, safe=True)
        graph.initializers.pop(weight.name)
        folded[value.name] = weight.name
    return folded


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
def torch_trajectory(model: nn.Module, input_ids: torch.Tensor, decode_steps: int) -> list[torch.Tensor]:
    """PyTorch's side of a parity check: the prefill logits [batch, sequence, vocab] of `input_ids`, then those
    [batch, vocab] of each of `decode_steps` greedy steps, each fed PyTorch's own previous token. It does not depend
    on the graph, so one serves every graph checked against the same model."""
    model = model.eval()
    out = model(input_ids=input_ids, use_cache=True)
    logits, cache = [out.logits.float()], out.past_key_values
    token = logits[0][:, -1].argmax(-1)
    for _ in range(decode_steps):
        out = model(input_ids=token[:, None], past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
        cache, token = out.past_key_values, logits[-1].argmax(-1)
    return logits


@torch.no_grad()
def check_parity(model: nn.Module, onnx_path: str | Path, input_ids: torch.Tensor, decode_steps: int = 32,
                 threads: int | None = None, noise: bool = True,
                 reference: list[torch.Tensor] | None = None) -> ParityResult:  # fmt: skip
    """Prefill `input_ids` ([batch, sequence]) and decode `decode_steps` greedy tokens in PyTorch and onnxruntime.
    With `noise` false, PyTorch's noise floor (a property of the model, not of the graph) is not measured: NaN.
    `reference`: PyTorch's side computed before (`torch_trajectory` of the same ids and steps)."""
    generator = OrtGenerator(onnx_session(onnx_path, threads))
    model = model.eval()
    reference = reference if reference is not None else torch_trajectory(model, input_ids, decode_steps)
    if len(reference) != decode_steps + 1 or reference[0].shape[:2] != input_ids.shape:
        raise ValueError("the reference trajectory is not of these ids and decode steps")
    ids = input_ids.numpy()
    mask = np.ones_like(ids)
    ref_logits = reference[0]
    got_logits, ort_cache = generator.forward(ids, mask, generator.empty_cache(ids.shape[0]))
    got = torch.from_numpy(got_logits).float()
    diffs = [(got - ref_logits).abs().flatten()]
    agreement = (got.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    ref_token, ort_token = ref_logits[:, -1].argmax(-1), got[:, -1].argmax(-1)
    identical = bool(torch.equal(ref_token, ort_token))
    for step in range(decode_steps):
        ref_logits = reference[step + 1]
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), dtype=np.int64)], axis=1)
        step_logits, ort_cache = generator.forward(ort_token[:, None].numpy(), mask, ort_cache)
        got = torch.from_numpy(step_logits[:, -1]).float()
        diffs.append((got - ref_logits).abs().flatten())
        ref_token, ort_token = ref_logits.argmax(-1), got.argmax(-1)
        identical = identical and bool(torch.equal(ref_token, ort_token))
    diff = torch.cat(diffs)
    noise_max, noise_mean = noise_floor(model, input_ids) if noise else (math.nan, math.nan)
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
