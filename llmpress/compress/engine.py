"""The block-by-block compression engine: `compress_(model, recipe, calibration_ids)`.

SparseGPT/GPTQ-style sequential calibration. The decoder blocks stay on the host; one block at a time moves to
the compute device:

    1. run the embeddings on the calibration windows and capture what block 0 receives (hidden states plus the
       keyword arguments the model passes every block: rotary position embeddings, attention mask, ...);
    2. for block i: collect the statistics each stage needs from the block's inputs (one batched forward pass
       with hooks on the targeted linear layers: sum x^2 for Wanda, the Hessian 2/n X X^T for SparseGPT and
       GPTQ), compress, then run the compressed block to produce the inputs of block i + 1;
    3. move the block back to the host.

So peak accelerator memory is one block plus the calibration activations, whatever the model's depth, and each
block is calibrated on the inputs it will really see after the blocks before it were compressed.

On a GPU (see benchmarks/gpu_compress.py): layers that read the same input (q/k/v, gate/up) share one set of
statistics, computed once; the statistics pass stops as soon as every hooked layer has its input; Hessians use
tensor cores with fp32 accumulation (`gram`); SparseGPT's and GPTQ's column loops replay CUDA graphs
(`cuda_graphs`); and `BlockMover` uploads the next block and downloads the previous one through pinned memory in
a background thread while the current block is worked on. `CompressionReport.phase_seconds` says where time went.

A method is one module in this package with a `KIND`:

    "layer"  one linear layer at a time: `apply_(layer, stage, stats) -> dict` where `stats` holds what the
             module's `NEEDS` asked for ("input_sq_norms", "hessian" or None);
    "block"  a whole decoder block, for methods that move scales or channels between layers (AWQ, SmoothQuant,
             structured pruning): `apply_block_(block, prefix, stage, calib) -> list[dict]`;
    "model"  the whole model, between block passes (distillation, dropping blocks):
             `apply_model_(model, stage, ctx) -> list[dict]`.

Consecutive layer and block stages share one pass over the blocks; a model stage ends the pass.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn

from llmpress.compress import (
    awq,
    cuda_graphs,
    distill,
    drop_blocks,
    dsnot,
    embeddings,
    gptq,
    lowrank,
    magnitude,
    owl,
    rtn,
    smoothquant,
    sparsegpt,
    structured,
    wanda,
)
from llmpress.config import Recipe
from llmpress.errors import LlmpressError

log = logging.getLogger(__name__)

METHOD_MODULES: dict[str, ModuleType] = {
    "magnitude": magnitude,
    "wanda": wanda,
    "sparsegpt": sparsegpt,
    "dsnot": dsnot,
    "rtn": rtn,
    "gptq": gptq,
    "awq": awq,
    "smoothquant": smoothquant,
    "structured": structured,
    "drop_blocks": drop_blocks,
    "lowrank": lowrank,
    "distill": distill,
    "embeddings": embeddings,
}


@dataclass
class LayerRecord:
    """What one stage did to one layer. `sparsity` is measured on the weight afterwards (zeros / size)."""

    name: str
    method: str
    stage: int
    shape: tuple[int, ...]
    target_sparsity: float | None
    sparsity: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageRecord:
    index: int
    method: str
    settings: dict[str, Any]
    seconds: float = 0.0
    layers: int = 0
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompressionReport:
    recipe: str
    layers: list[LayerRecord] = field(default_factory=list)
    stages: list[StageRecord] = field(default_factory=list)
    total_seconds: float = 0.0
    calibration_tokens: int = 0
    device: str = "cpu"
    phase_seconds: dict[str, float] = field(default_factory=dict)  # see PhaseTimer

    @property
    def stage_seconds(self) -> dict[int, float]:
        return {s.index: s.seconds for s in self.stages}

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "total_seconds": round(self.total_seconds, 3),
            "calibration_tokens": self.calibration_tokens,
            "device": self.device,
            "stage_seconds": {str(k): round(v, 3) for k, v in self.stage_seconds.items()},
            "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()},
            "stages": [vars(s) | {"seconds": round(s.seconds, 3)} for s in self.stages],
            "layers": [vars(rec) | {"shape": list(rec.shape)} for rec in self.layers],
        }


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input over all calibration tokens."""

    tokens: int
    input_sq_norms: torch.Tensor | None = None  # sum_t x_tj^2, [in]
    input_sum: torch.Tensor | None = None  # sum_t x_tj, [in]
    hessian: torch.Tensor | None = None  # 2/n sum_t x_t x_t^T, [in, in], fp32
    dense_weight: torch.Tensor | None = None  # the weight before this pass changed it (modules with USES_DENSE_WEIGHT)


@dataclass
class ModelContext:
    """What a model-level stage may use: calibration ids, the device, and the teacher (the model before the
    recipe ran), built lazily."""

    calibration_ids: torch.Tensor | None
    device: torch.device
    batch_size: int
    teacher: Callable[[], nn.Module]
    progress: Callable[[str], None]


class PhaseTimer:
    """Seconds spent per phase of the block passes (capture, onload, statistics, compress, propagate, offload),
    summed over blocks. On CUDA each phase waits for the device at its end, so GPU work is counted in the phase
    that queued it (a few synchronisations per block, negligible against a block's work)."""

    def __init__(self, device: torch.device, seconds: dict[str, float]) -> None:
        self.sync = device.type == "cuda"
        self.seconds = seconds

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def _untimed(_phase: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded; the rest of the forward is not needed."""


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the longest ModuleList whose length is config.num_hidden_layers."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers)
    ]
    if not candidates:
        raise LlmpressError(f"could not find the decoder blocks of {type(model).__name__} (no ModuleList of blocks)")
    return max(candidates, key=lambda item: len(item[1]))


def matches(name: str, stage: Any) -> bool:
    """True if `name` matches one of the stage's target regexes and none of its ignores (re.fullmatch)."""
    return any(re.fullmatch(p, name) for p in stage.targets) and not any(re.fullmatch(p, name) for p in stage.ignore)


def targeted_linears(block: nn.Module, prefix: str, stage: Any) -> dict[str, nn.Linear]:
    """Linear layers of `block` whose full name matches the stage's targets and no ignore."""
    return {
        f"{prefix}.{name}": module
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear) and matches(f"{prefix}.{name}", stage)
    }


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Run everything before block 0 on `device` and record, per batch, block 0's hidden states and kwargs."""
    hidden: list[torch.Tensor] = []
    kwargs_per_batch: list[dict[str, Any]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        states = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(states)
        kwargs_per_batch.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _on_device(pre_block_tensors(model, blocks), device):
            for ids in batches:
                with contextlib.suppress(_StopForward):
                    model(input_ids=ids.to(device), use_cache=False)
    finally:
        handle.remove()
    return hidden, kwargs_per_batch


def pre_block_tensors(model: nn.Module, blocks: nn.ModuleList) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, name, tensor) of every parameter and buffer the forward may read before block 0: all but the
    blocks' and the output head's (unless the head is tied to the input embedding). Block 0's hook stops the
    forward before it computes anything, so no block goes to the device; on a 7B model that leaves 0.7 GB of
    untied head and block weights on the host."""
    skip = {id(t) for t in [*blocks.parameters(), *blocks.buffers()]}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None:
        skip |= {id(p) for p in head.parameters()} - {id(p) for p in embed.parameters()}
    found = []
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            found += [(module, name, t) for name, t in slots.items() if t is not None and id(t) not in skip]
    return found


@contextlib.contextmanager
def _on_device(tensors: list[tuple[nn.Module, str, torch.Tensor]], device: torch.device) -> Iterator[None]:
    """Put `tensors` on `device` for the duration, then hand every module its own host tensors back (nothing is
    copied back: the device copies are only read). A tensor shared by several modules is moved once."""
    host = {id(t): t.data for _, _, t in tensors}
    copies = {key: data.to(device) for key, data in host.items()}
    try:
        for module, name, t in tensors:
            if isinstance(t, nn.Parameter):
                t.data = copies[id(t)]
            else:
                module._buffers[name] = copies[id(t)]
        yield
    finally:
        for module, name, t in tensors:
            if isinstance(t, nn.Parameter):
                t.data = host[id(t)]
            else:
                module._buffers[name] = t


def block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@dataclass
class BlockCalibration:
    """One block's calibration inputs (on the device), batch by batch, with helpers to run and observe it."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    @torch.no_grad()
    def outputs(self, block: nn.Module) -> list[torch.Tensor]:
        return [block_output(block(h, **kw)) for h, kw in zip(self.hidden, self.kwargs, strict=True)]

    @torch.no_grad()
    def observe(self, block: nn.Module, modules: dict[str, nn.Module],
                fn: Callable[[str, torch.Tensor], None], shared: dict[str, str] | None = None) -> None:  # fmt: skip
        """Run the block on every batch and call fn(name, input [tokens, features]) for each module's input.

        With `shared` (a dict filled here), a module that receives the very tensor an earlier module of the same
        forward received (q/k/v, gate/up) is not reported again: `shared[name]` names that earlier module.
        """

        seen: list[tuple[torch.Tensor, str]] = []  # this batch's inputs, kept alive so identities stay unique
        calls: list[str] = []  # this batch's hook calls, in order
        first_calls: list[str] = []  # the first batch's: once each module is reached as often, the rest is skipped

        def make_hook(name: str) -> Callable:
            def hook(_module: nn.Module, args: tuple) -> None:
                calls.append(name)
                if shared is not None and (owner := next((o for x, o in seen if x is args[0]), None)) is not None:
                    shared[name] = owner
                else:
                    seen.append((args[0], name))
                    fn(name, args[0].reshape(-1, args[0].shape[-1]))
                if first_calls and len(calls) == len(first_calls):
                    raise _StopForward  # the rest of the block (down_proj's matmul, ...) is not needed

            return hook

        handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in modules.items()]
        try:
            for h, kw in zip(self.hidden, self.kwargs, strict=True):
                with contextlib.suppress(_StopForward):
                    block(h, **kw)
                if not first_calls:
                    first_calls.extend(calls)
                seen.clear()
                calls.clear()
        finally:
            for handle in handles:
                handle.remove()

    def inputs(self, block: nn.Module, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """Every module's input over all calibration tokens, [tokens, features] (memory: tokens x features)."""
        found: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.observe(block, modules, lambda name, x: found[name].append(x))
        return {name: torch.cat(xs) for name, xs in found.items()}

    def layer_stats(
        self, block: nn.Module, layers: dict[str, nn.Linear], need: str | None, with_sum: bool = False
    ) -> dict[str, LayerStats]:
        """Accumulate `need` ("input_sq_norms" or "hessian") for every layer in one forward pass of the block;
        `with_sum` adds the inputs' sum (for DSnoT). With the Hessian, the squared norms are its diagonal.

        Layers that read the same tensor (q/k/v, gate/up in a Llama block) get the same LayerStats object, computed
        once: methods read it and never modify it (`apply_shared_` uses that to process them together).
        """
        if need is None:
            return {name: LayerStats(tokens=0) for name in layers}

        def empty(n: int, dev: torch.device) -> LayerStats:
            return LayerStats(
                tokens=0,
                input_sq_norms=torch.zeros(n, dtype=torch.float32, device=dev),
                input_sum=torch.zeros(n, dtype=torch.float32, device=dev) if with_sum else None,
                hessian=torch.zeros(n, n, dtype=torch.float32, device=dev) if need == "hessian" else None,
            )

        stats: dict[str, LayerStats] = {}

        def accumulate(name: str, x: torch.Tensor) -> None:
            s = stats.setdefault(name, empty(x.shape[-1], x.device))
            assert s.input_sq_norms is not None
            if s.hessian is not None:
                s.hessian.add_(gram(x))
            else:
                # sum_t x_tj^2 read once from the 16-bit input, accumulated in fp32
                s.input_sq_norms.add_(torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).square())
            if s.input_sum is not None:
                s.input_sum.add_(x.sum(dim=0, dtype=torch.float32))
            s.tokens += x.shape[0]

        shared: dict[str, str] = {}
        self.observe(block, layers, accumulate, shared)
        for s in stats.values():
            if s.hessian is not None:
                assert s.input_sq_norms is not None
                s.input_sq_norms.copy_(s.hessian.diagonal())  # sum_t x_tj^2
                s.hessian.mul_(2.0 / max(s.tokens, 1))
        for name, first in shared.items():
            stats[name] = stats[first]
        for name, layer in layers.items():  # a layer the forward never reached (an unused expert): zero statistics
            if name not in stats:
                stats[name] = empty(layer.in_features, layer.weight.device)
        return {name: stats[name] for name in layers}


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X in fp32 for X [tokens, features].

    fp16/bf16 inputs on CUDA use tensor cores with fp32 accumulation and fp32 output (`out_dtype`), or TF32 on
    torch versions without it: the products of 16-bit values are exact in either, and the sums are fp32, as in
    a plain fp32 matmul. fp32 inputs stay in full fp32 (TF32 would round them).
    """
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(x.T, x, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            with exact_tf32(x.dtype):
                x32 = x.float()
                return x32.T @ x32
    x32 = x.float()
    return x32.T @ x32


@contextlib.contextmanager
def exact_tf32(dtype: torch.dtype) -> Iterator[None]:
    """Allow TF32 tensor cores for an fp32 matmul whose operands came from fp16/bf16 values.

    TF32 keeps 10 mantissa bits and fp32's exponent range, so fp16 (10 bits) and bf16 (7 bits) values are
    represented exactly; products are exact and accumulate in fp32, as in a plain fp32 matmul. For fp32
    activations TF32 would round the operands, so it stays off.
    """
    if dtype not in (torch.float16, torch.bfloat16) or not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def iterate_blocks(
    model: nn.Module,
    calibration_ids: torch.Tensor | None,
    device: torch.device,
    batch_size: int,
    timer: Callable[[str], contextlib.AbstractContextManager[None]] = _untimed,
) -> Iterator[tuple[int, str, nn.Module, BlockCalibration | None]]:
    """Yield (index, prefix, block on `device`, its calibration inputs) for every decoder block in order.

    After the consumer is done with a block, its (possibly compressed) outputs become the next block's inputs
    and it goes back to the host. With no calibration ids, blocks are yielded with `None` and nothing runs.
    On CUDA the next block is uploaded and the previous one downloaded while the current one is worked on.
    """
    blocks_name, blocks = find_decoder_blocks(model)
    calib = None
    if calibration_ids is not None:
        with timer("capture"):
            hidden, kwargs = capture_block_inputs(model, blocks, list(calibration_ids.split(batch_size)), device)
            calib = BlockCalibration(hidden, [to_device(kw, device) for kw in kwargs])
    mover = BlockMover(device)
    try:
        for index, block in enumerate(blocks):
            with timer("onload"):
                mover.onload(block)
                if index + 1 < len(blocks):
                    mover.prefetch(blocks[index + 1])
            yield index, f"{blocks_name}.{index}", block, calib
            if calib is not None and index + 1 < len(blocks):
                with timer("propagate"):
                    calib = BlockCalibration(calib.outputs(block), calib.kwargs)
            with timer("offload"):
                mover.offload(block)
    finally:
        with timer("offload"):
            mover.close()
            if device.type != "cpu":  # a consumer that stopped early (or failed) leaves no block on the device
                for block in blocks:
                    if any(p.device.type != "cpu" for p in block.parameters()):
                        block.to("cpu")


class BlockMover:
    """Moves decoder blocks between the host and the compute device.

    On CUDA the copies run in a background thread on a side stream, through one pinned staging buffer the size of
    a block: the next block's upload and the previous block's download overlap the current block's work. (Plain
    `.to()` copies from and to pageable memory went at 1.5 GB/s down on the H100 machine and held up the compute
    thread while they ran.) A block's host tensors are kept while it is on the device and written back in place.
    Elsewhere blocks move with plain `.to()`. `close` waits for every copy: the model is on the host afterwards.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: dict[int, Future] = {}
        self.asynchronous = device.type == "cuda"
        if self.asynchronous:
            self.stream = torch.cuda.Stream(device)
            self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmpress-blocks")
            self.staging = torch.empty(0, dtype=torch.uint8)
            self.host: dict[int, dict[tuple[int, str], torch.Tensor]] = {}

    def prefetch(self, block: nn.Module) -> None:
        if self.asynchronous and id(block) not in self.pending:
            self.pending[id(block)] = self.worker.submit(self._upload, block)

    def onload(self, block: nn.Module) -> None:
        if not self.asynchronous:
            block.to(self.device)
            return
        self.prefetch(block)
        self.pending.pop(id(block)).result()

    def offload(self, block: nn.Module) -> None:
        if not self.asynchronous:
            block.to("cpu")
            return
        done = torch.cuda.Event()
        done.record()  # after the block's last use on the compute stream
        self.pending[id(block)] = self.worker.submit(self._download, block, done)

    def close(self) -> None:
        if self.asynchronous:
            for future in list(self.pending.values()):
                future.result()
            self.pending.clear()
            self.worker.shutdown(wait=True)

    # -- in the worker thread --------------------------------------------------------------------------------

    def _views(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pinned staging views shaped like `tensors` (64-byte aligned), growing the buffer when needed."""
        sizes = [(t.numel() * t.element_size() + 63) // 64 * 64 for t in tensors]
        if self.staging.numel() < sum(sizes):
            self.staging = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
        views, offset = [], 0
        for t, size in zip(tensors, sizes, strict=True):
            views.append(self.staging[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape))
            offset += size
        return views

    def _upload(self, block: nn.Module) -> None:
        slots = _tensor_slots(block)
        tensors = [get() for _, get, _ in slots]
        views = self._views(tensors)
        with torch.cuda.stream(self.stream):
            on_device = []
            for t, view in zip(tensors, views, strict=True):
                view.copy_(t)
                on_device.append(torch.empty(t.shape, dtype=t.dtype, device=self.device).copy_(view, non_blocking=True))
        self.stream.synchronize()
        self.host[id(block)] = {key: t for (key, _, _), t in zip(slots, tensors, strict=True)}
        for (_, _, put), t in zip(slots, on_device, strict=True):
            put(t)

    def _download(self, block: nn.Module, after: torch.cuda.Event) -> None:
        slots = _tensor_slots(block)
        tensors = [get() for _, get, _ in slots]
        views = self._views(tensors)
        self.stream.wait_event(after)
        with torch.cuda.stream(self.stream):
            for t, view in zip(tensors, views, strict=True):
                view.copy_(t, non_blocking=True)
        self.stream.synchronize()
        host = self.host.pop(id(block), {})
        for (key, _, put), t, view in zip(slots, tensors, views, strict=True):
            dest = host.get(key)
            if dest is None or dest.shape != t.shape or dest.dtype != t.dtype:  # replaced or reshaped on the device
                dest = torch.empty(t.shape, dtype=t.dtype)
            put(dest.copy_(view))


def _tensor_slots(block: nn.Module) -> list[tuple[tuple[int, str], Callable[[], torch.Tensor], Callable]]:
    """(key, get, put) for every parameter and buffer of `block`; `put` swaps the tensor behind it."""
    slots = []
    for module in block.modules():
        for name, param in module._parameters.items():
            if param is not None:
                slots.append(((id(module), name), lambda p=param: p.data, lambda t, p=param: setattr(p, "data", t)))
        for name, buffer in module._buffers.items():
            if buffer is not None:
                slots.append(((id(module), name), lambda m=module, n=name: m._buffers[n],
                              lambda t, m=module, n=name: m._buffers.__setitem__(n, t)))  # fmt: skip
    return slots


def _stage_groups(recipe: Recipe) -> list[list[int]]:
    """Stage indices split into passes: runs of layer/block stages, and every model stage on its own."""
    groups: list[list[int]] = []
    for i, stage in enumerate(recipe.stages):
        kind = METHOD_MODULES[stage.method].KIND
        if kind == "model" or not groups or METHOD_MODULES[recipe.stages[groups[-1][0]].method].KIND == "model":
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def _needs_data(stage: Any) -> bool:
    module = METHOD_MODULES[stage.method]
    if hasattr(module, "needs_data"):  # methods whose settings decide (plain SVD, magnitude-scored structured)
        return bool(module.needs_data(stage))
    return bool(getattr(module, "NEEDS", None)) or module.KIND in ("block", "model") or getattr(stage, "owl", None)


@torch.no_grad()
def compress_(
    model: nn.Module,
    recipe: Recipe,
    calibration_ids: torch.Tensor | None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
    teacher: Callable[[], nn.Module] | None = None,
) -> CompressionReport:
    """Apply `recipe` to `model` in place, stage by stage, and report what was done to every layer.

    `calibration_ids` is a [samples, seq_len] LongTensor of token ids; it may be None only if no stage needs
    activations (magnitude, RTN, plain low-rank). `teacher` builds the model distillation learns from; by default
    a copy of `model` taken before the first stage.
    """
    device = torch.device(device)
    needs_data = any(_needs_data(stage) for stage in recipe.stages)
    if needs_data and (calibration_ids is None or calibration_ids.numel() == 0):
        raise LlmpressError(f"recipe {recipe.name!r} needs calibration data, none was given")
    say = progress or log.info
    report = CompressionReport(recipe=recipe.name, device=str(device))
    report.calibration_tokens = calibration_ids.numel() if needs_data and calibration_ids is not None else 0
    start = time.perf_counter()
    model.eval()
    check_targets(model, recipe)

    snapshot: nn.Module | None = None
    if teacher is None and any(stage.method == "distill" for stage in recipe.stages):
        snapshot = copy.deepcopy(model).cpu()

    def get_teacher() -> nn.Module:
        return teacher() if teacher is not None else snapshot  # type: ignore[return-value]

    for group in _stage_groups(recipe):
        stages = [(i, recipe.stages[i]) for i in group]
        first = recipe.stages[group[0]]
        if METHOD_MODULES[first.method].KIND == "model":
            record = StageRecord(group[0], first.method, first.model_dump(mode="json", by_alias=True))
            t0 = time.perf_counter()
            ctx = ModelContext(calibration_ids, device, batch_size, get_teacher, say)
            rows = METHOD_MODULES[first.method].apply_model_(model, first, ctx)
            record.seconds = time.perf_counter() - t0
            record.summary = _add_layer_records(report, model, group[0], first, rows)
            record.layers = len(rows)
            report.stages.append(record)
            say(f"stage {group[0]} ({first.method}) done in {record.seconds:.1f}s")
            continue
        _run_pass(model, stages, calibration_ids if any(_needs_data(s) for _, s in stages) else None,
                  device, batch_size, report, say)  # fmt: skip

    report.total_seconds = time.perf_counter() - start
    return report


def _run_pass(model: nn.Module, stages: list[tuple[int, Any]], calibration_ids: torch.Tensor | None,
              device: torch.device, batch_size: int, report: CompressionReport,
              say: Callable[[str], None]) -> None:  # fmt: skip
    """One pass over the blocks applying the layer and block stages in `stages` to each block in turn."""
    per_layer_sparsity: dict[int, dict[str, float]] = {}
    for index, stage in stages:
        if getattr(stage, "owl", None) is not None:
            say(f"stage {index} ({stage.method}): OWL outlier ratios (one extra pass)")
            per_layer_sparsity[index] = owl.layer_sparsities(model, stage, calibration_ids, device, batch_size)
    records = {index: StageRecord(index, stage.method, stage.model_dump(mode="json", by_alias=True))
               for index, stage in stages}  # fmt: skip
    n_blocks = len(find_decoder_blocks(model)[1])
    timer = PhaseTimer(device, report.phase_seconds)
    wants_dense = any(getattr(METHOD_MODULES[stage.method], "USES_DENSE_WEIGHT", False) for _, stage in stages)
    for b, prefix, block, calib in iterate_blocks(model, calibration_ids, device, batch_size, timer):
        t_block = time.perf_counter()
        # DSnoT grows pruned weights back at their values from before pruning: keep the block's weights as they
        # were before any stage of this pass changed them (one block's worth of memory, only when asked for).
        dense = {f"{prefix}.{n}": m.weight.detach().clone() for n, m in block.named_modules()
                 if wants_dense and isinstance(m, nn.Linear)}  # fmt: skip
        for index, stage in stages:
            t0 = time.perf_counter()
            module = METHOD_MODULES[stage.method]
            rows: list[dict[str, Any]] = []
            if module.KIND == "block":
                with timer("compress"):
                    rows = module.apply_block_(block, prefix, stage, calib)
            else:
                layers = targeted_linears(block, prefix, stage)
                with_sum = getattr(module, "USES_INPUT_SUM", False)
                with timer("statistics"):
                    stats = {}
                    if calib is not None and layers:
                        stats = calib.layer_stats(block, layers, module.NEEDS, with_sum)
                with timer("compress"):
                    sparsities = per_layer_sparsity.get(index)
                    rows = _apply_layer_stage(module, stage, layers, stats, sparsities, dense)
            records[index].seconds += time.perf_counter() - t0
            records[index].layers += len(rows)
            _add_layer_records(report, model, index, stage, rows)
        say(f"block {b + 1}/{n_blocks} compressed in {time.perf_counter() - t_block:.2f}s")
    cuda_graphs.clear()
    for index, _ in stages:
        records[index].summary = _summarise(report, index)
        report.stages.append(records[index])


def _apply_layer_stage(
    module: ModuleType,
    stage: Any,
    layers: dict[str, nn.Linear],
    stats: dict[str, LayerStats],
    sparsities: dict[str, float] | None,
    dense: dict[str, torch.Tensor],
) -> list[dict[str, Any]]:
    """Apply a layer method to every targeted layer of a block; one row per layer."""
    rows: list[dict[str, Any]] = []
    for names in _shared_groups(layers, stats, module, stage, sparsities):
        layer_stage = stage if sparsities is None else stage.model_copy(update={"sparsity": sparsities[names[0]]})
        group_stats = stats.get(names[0], LayerStats(tokens=0))
        if len(names) > 1:  # layers reading one input, processed as one matrix (same result, fewer steps)
            group = {name: layers[name] for name in names}
            for name, details in module.apply_shared_(group, layer_stage, group_stats).items():
                rows.append({"name": name, "layer": layers[name], **details})
            continue
        name = names[0]
        if getattr(module, "USES_DENSE_WEIGHT", False):
            group_stats = dataclasses.replace(group_stats, dense_weight=dense.get(name))
        details = module.apply_(layers[name], layer_stage, group_stats) or {}
        rows.append({"name": name, "layer": layers[name], **details})
    return rows


def _shared_groups(layers: dict[str, nn.Linear], stats: dict[str, LayerStats], module: ModuleType, stage: Any,
                   sparsities: dict[str, float] | None) -> list[list[str]]:  # fmt: skip
    """Layer names in order, grouped where the method can process layers sharing one input in one go.

    Layers group when they share one LayerStats (the same input tensor), the method has `apply_shared_`, and
    (under OWL) their sparsities are equal; otherwise every layer is its own group.
    """
    groups: list[list[str]] = []
    by_stats: dict[int, list[str]] = {}
    for name in layers:
        s = stats.get(name)
        key = id(s) if s is not None and hasattr(module, "apply_shared_") else None
        if (
            key is not None
            and key in by_stats
            and (sparsities is None or sparsities[name] == sparsities[by_stats[key][0]])
        ):
            by_stats[key].append(name)
            continue
        groups.append([name])
        if key is not None:
            by_stats.setdefault(key, groups[-1])
    return groups


def _add_layer_records(report: CompressionReport, model: nn.Module, index: int, stage: Any,
                       rows: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """Turn a method's rows ({"name", "layer" or "shape", details...}) into LayerRecords."""
    target = stage.target_sparsity if hasattr(stage, "target_sparsity") else None
    for row in rows:
        row = dict(row)
        name = row.pop("name")
        layer = row.pop("layer", None)
        shape = tuple(row.pop("shape", tuple(layer.weight.shape) if layer is not None else ()))
        sparsity = row.pop("sparsity", None)
        if sparsity is None:
            sparsity = (layer.weight == 0).float().mean().item() if layer is not None else 0.0
        row_target = row.pop("target_sparsity", target)
        report.layers.append(LayerRecord(name, stage.method, index, shape, row_target, sparsity, row))
    return _summarise(report, index)


def _summarise(report: CompressionReport, index: int) -> dict[str, Any]:
    recs = [r for r in report.layers if r.stage == index]
    if not recs:
        return {}
    sizes = [max(1, _numel(r.shape)) for r in recs]
    summary: dict[str, Any] = {
        "layers": len(recs),
        "sparsity": sum(r.sparsity * n for r, n in zip(recs, sizes, strict=True)) / sum(sizes),
    }
    bits = {r.details["bits"] for r in recs if r.details.get("bits") is not None}
    if bits:
        summary["bits"] = sorted(bits)
    return summary


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_targets(model: nn.Module, recipe: Recipe) -> None:
    """Fail before any work if a layer stage's targets match nothing, or an N:M pattern's M does not divide the
    input size of a layer it targets (the groups of M would not tile the row)."""
    blocks_name, blocks = find_decoder_blocks(model)
    for i, stage in enumerate(recipe.stages):
        if not hasattr(stage, "targets"):
            continue
        n_m = getattr(stage, "n_m", None)
        for j, block in enumerate(blocks) if n_m else ():
            for name, layer in targeted_linears(block, f"{blocks_name}.{j}", stage).items():
                if layer.in_features % n_m[1]:
                    raise LlmpressError(f"recipe {recipe.name!r} stage {i} ({stage.method}): pattern "
                                        f"{stage.pattern!r} needs every targeted layer's input size to be a multiple "
                                        f"of {n_m[1]}; {name} has {layer.in_features} inputs")  # fmt: skip
        if not any(targeted_linears(b, f"{blocks_name}.{j}", stage) for j, b in enumerate(blocks)):
            examples = [f"{blocks_name}.0.{n}" for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)][:4]
            raise LlmpressError(
                f"recipe {recipe.name!r} stage {i} ({stage.method}): targets {stage.targets} "
                f"(ignore {stage.ignore}) match no Linear layer in {blocks_name}.*; "
                f"example layer names: {', '.join(examples)}"
            )
