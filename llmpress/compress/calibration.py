"""Calibration activations and the statistics methods read from them.

`capture_block_inputs` runs everything before block 0 and records what block 0 receives; `BlockCalibration` holds
one block's inputs batch by batch, runs the block on them and accumulates, per targeted layer, what a method asked
for (`LayerStats`: sum x^2 for Wanda, the Hessian 2/n X X^T for SparseGPT and GPTQ). Layers reading the same tensor
(q/k/v, gate/up) share one `LayerStats`, computed once; the statistics pass stops as soon as every hooked layer
has its input. Hessians use tensor cores with fp32 accumulation on a GPU (`gram`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input over all calibration tokens."""

    tokens: int
    input_sq_norms: torch.Tensor | None = None  # sum_t x_tj^2, [in]
    input_sum: torch.Tensor | None = None  # sum_t x_tj, [in]
    hessian: torch.Tensor | None = None  # 2/n sum_t x_t x_t^T, [in, in], fp32
    dense_weight: torch.Tensor | None = None  # the weight before this pass changed it (for dense_weight methods)


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded; the rest of the forward is not needed."""


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        moved = [to_device(o, device) for o in obj]
        return tuple(moved) if isinstance(obj, tuple) else moved
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Run everything before block 0 on `device` and record, per batch, block 0's hidden states and kwargs."""
    hidden, kwargs_per_batch = [], []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        kwargs_per_batch.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with on_device(pre_block_tensors(model, blocks), device):
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
def on_device(tensors: list[tuple[nn.Module, str, torch.Tensor]], device: torch.device) -> Iterator[None]:
    """Put `tensors` on `device` for the duration, then hand every module its own host tensors back (nothing is
    copied back: the device copies are only read). A tensor shared by several modules is moved once."""
    host = {id(t): t.data if isinstance(t, nn.Parameter) else t for _, _, t in tensors}
    copies = {key: data.to(device) for key, data in host.items()}

    def place(data: dict[int, torch.Tensor]) -> None:
        for module, name, t in tensors:
            if isinstance(t, nn.Parameter):
                t.data = data[id(t)]
            else:
                module._buffers[name] = data[id(t)]

    try:
        place(copies)
        yield
    finally:
        place(host)


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
        once: methods read it and never modify it (a method's `apply_shared` uses that to process them together).
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
        stats.update({name: stats[first] for name, first in shared.items()})
        # a layer the forward never reached (an unused expert): zero statistics
        return {n: stats.get(n) or empty(layer.in_features, layer.weight.device) for n, layer in layers.items()}


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X in fp32 for X [tokens, features].

    fp16/bf16 inputs on CUDA use tensor cores with fp32 accumulation and fp32 output (`out_dtype`): the products of
    16-bit values are exact and the sums are fp32, as in a plain fp32 matmul. Elsewhere, and for fp32 inputs, a plain
    fp32 matmul.
    """
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(x.T, x, out_dtype=torch.float32)
    x32 = x.float()
    return x32.T @ x32
