"""Replaying a method's column loop from a CUDA graph.

SparseGPT and GPTQ walk the columns of each block of 128 one at a time, with about ten small kernels per column.
On a GPU the host's kernel launches then set the pace, not the GPU: on an H100 machine the eager loop took about
130 us per column for some 20 us of GPU work. `run` captures one call of such a loop in a CUDA graph the first
time it sees a shape, and replays it for every later block of every layer with that shape. The replay runs the
same kernels in the same order on the same values, so results are identical to the eager loop (which is what runs
on the CPU, and on the GPU for the rare settings whose ops differ from block to block).

`LLMPRESS_CUDA_GRAPHS=0` in the environment turns the graphs off (every loop runs eagerly), for debugging.

A function given to `run` may only update its tensor arguments in place (no host synchronisation, no Python
decisions on tensor values); `run` returns the argument tensors as they are after the replay.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

MAX_GRAPHS = 16  # distinct (function, shapes, settings); a Llama block needs at most 4 per method

_graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor | None]]] = OrderedDict()


def run(fn: Callable[..., None], tensors: Sequence[torch.Tensor | None], settings: tuple[Any, ...] = ()) -> list:
    """fn(*tensors, *settings), replayed from a CUDA graph for CUDA tensors; returns the tensors after the call.

    On CUDA the returned tensors are the graph's own buffers: read (or copy) them before the next call of `run`.
    Elsewhere fn runs eagerly on `tensors` themselves.
    """
    first = next(t for t in tensors if t is not None)
    enabled = os.environ.get("LLMPRESS_CUDA_GRAPHS", "1") != "0"
    if not first.is_cuda or not enabled or torch.cuda.is_current_stream_capturing():
        fn(*tensors, *settings)
        return list(tensors)
    key = (fn, settings, tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in tensors))
    if key not in _graphs:
        _graphs[key] = _capture(fn, tensors, settings)
        while len(_graphs) > MAX_GRAPHS:
            _graphs.popitem(last=False)  # the least recently used
    _graphs.move_to_end(key)
    graph, static = _graphs[key]
    for buffer, value in zip(static, tensors, strict=True):
        if buffer is not None:
            buffer.copy_(value)
    graph.replay()
    return static


def _capture(fn: Callable[..., None], tensors: Sequence[torch.Tensor | None], settings: tuple[Any, ...]) -> tuple:
    static = [None if t is None else t.clone() for t in tensors]
    # CUDA needs the work warmed up (library handles, lazy init) on a side stream before capture; on copies, so the
    # caller's tensors are untouched.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*[None if t is None else t.clone() for t in tensors], *settings)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*static, *settings)
    return graph, static


def clear() -> None:
    """Drop every captured graph and its memory (the engine calls this after each pass)."""
    _graphs.clear()
