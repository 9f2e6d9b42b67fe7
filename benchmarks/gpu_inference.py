"""What compression buys at inference on one GPU, at Llama-2-7B shapes: linear-layer kernels and decode speed.

    python benchmarks/gpu_inference.py [--tokens 1 16 256 4096] [--decode-steps 128] [--out benchmarks/results]

1. Linear layers of the 7B shapes (4096 -> 4096, 4096 -> 11008, 11008 -> 4096) at 1, 16, 256 and 4096 tokens,
   every kernel the installed torch has for a compressed weight, against dense fp16 and bf16:
     - 2:4 semi-structured sparse (torch.sparse.to_sparse_semi_structured; cuSPARSELt and CUTLASS backends);
     - int8 weight-only: torch._weight_int8pack_mm, and a torch.compile'd dequantize-in-the-matmul (gpt-fast's);
     - int4 weight-only, group 128: torch._weight_int4pack_mm (tinygemm);
     - int8 weights and per-token int8 activations (W8A8): torch._int_mm with the activation quantization.
   Each is timed inside a CUDA graph (launch overhead excluded, as in a captured decode loop), and checked against
   x @ W^T with its own dequantized weight (a kernel that computes the wrong thing is reported, not timed).
2. End-to-end greedy decode (batch 1, KV cache, CUDA graph per step) of a 32-block 7B-shaped model whose linear
   layers use dense fp16, int8 or int4 weight-only kernels: tokens/s and weight bytes.

A variant the installed torch lacks is reported as unavailable, with the error. Writes gpu_inference.json and
gpu_inference.md to --out. Random weights: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("gpu_inference")
torch._dynamo.config.cache_size_limit = 64  # one specialised kernel per (shape, tokens): 12 per compiled variant

SHAPES = {"attn 4096->4096": (4096, 4096), "mlp up 4096->11008": (11008, 4096), "mlp down 11008->4096": (4096, 11008)}
HIDDEN, INTER, HEADS, VOCAB = 4096, 11008, 32, 32000
Linear = Callable[[torch.Tensor], torch.Tensor]


# ---- compressed linear layers: each returns (forward, dequantized weight it computes with, weight bytes) ----


def dense(w: torch.Tensor, dtype: torch.dtype) -> tuple[Linear, torch.Tensor, int]:
    wd = w.to(dtype)
    return (lambda x: F.linear(x, wd)), wd, wd.numel() * wd.element_size()


def prune_2of4(w: torch.Tensor) -> torch.Tensor:
    groups = w.reshape(w.shape[0], -1, 4)
    keep = groups.abs().argsort(dim=-1, descending=True)[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(w.shape)


def semi_structured(w: torch.Tensor, cutlass: bool) -> tuple[Linear, torch.Tensor, int]:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    w24 = prune_2of4(w.half())
    ws = to_sparse_semi_structured(w24)
    nbytes = sum(t.numel() * t.element_size() for t in (ws.packed, ws.meta) if t is not None)
    return (lambda x: F.linear(x, ws)), w24, nbytes


def int8_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_weight_only_aten(w: torch.Tensor) -> tuple[Linear, torch.Tensor, int]:
    q, scale = int8_channel(w)
    s = scale.to(torch.bfloat16)
    return (
        (lambda x: torch._weight_int8pack_mm(x, q, s)),
        (q.float() * scale[:, None]).bfloat16(),
        q.numel() + 2 * s.numel(),
    )


@torch.compile(dynamic=False)
def _int8_dequant_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(x, q.to(x.dtype)) * scale


def int8_weight_only_compiled(w: torch.Tensor) -> tuple[Linear, torch.Tensor, int]:
    q, scale = int8_channel(w)
    s = scale.half()
    return (lambda x: _int8_dequant_linear(x, q, s)), (q.float() * scale[:, None]).half(), q.numel() + 2 * s.numel()


def int4_tinygemm(w: torch.Tensor, group: int = 128, inner_k_tiles: int = 8) -> tuple[Linear, torch.Tensor, int]:
    """Asymmetric 4-bit codes per group of 128 inputs in tinygemm's layout: w = (q - 8) * scale + zero."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-6) / 15
    q = torch.round((wg - lo) / scale).clamp(0, 15)
    zero = lo + 8 * scale
    deq = ((q - 8) * scale + zero).reshape(n, k).bfloat16()
    q = q.reshape(n, k).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), inner_k_tiles)
    sz = torch.stack([scale.squeeze(-1).t(), zero.squeeze(-1).t()], dim=-1).bfloat16().contiguous()
    return (
        (lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)),
        deq,
        packed.numel() * packed.element_size() + sz.numel() * 2,
    )


@torch.compile(dynamic=False)
def _w8a8(x: torch.Tensor, q: torch.Tensor, wscale: torch.Tensor) -> torch.Tensor:
    xs = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
    xq = torch.round(x.float() / xs).clamp(-127, 127).to(torch.int8)
    return (torch._int_mm(xq, q.t()).float() * xs * wscale).to(x.dtype)


def int8_w8a8(w: torch.Tensor) -> tuple[Linear, torch.Tensor, int]:
    q, scale = int8_channel(w)
    return (lambda x: _w8a8(x, q, scale)), (q.float() * scale[:, None]).half(), q.numel() + 4 * scale.numel()


VARIANTS: dict[str, tuple[Callable, torch.dtype]] = {
    "dense fp16": (lambda w: dense(w, torch.float16), torch.float16),
    "dense bf16": (lambda w: dense(w, torch.bfloat16), torch.bfloat16),
    "2:4 cuSPARSELt": (lambda w: semi_structured(w, cutlass=False), torch.float16),
    "2:4 CUTLASS": (lambda w: semi_structured(w, cutlass=True), torch.float16),
    "int8 weight-only (aten)": (int8_weight_only_aten, torch.bfloat16),
    "int8 weight-only (compiled dequant)": (int8_weight_only_compiled, torch.float16),
    "int4 weight-only g128 (tinygemm)": (int4_tinygemm, torch.bfloat16),
    "W8A8 int8 (_int_mm)": (int8_w8a8, torch.float16),
}


def time_in_graph(fn: Callable[[], object], calls: int = 20, repeats: int = 10) -> float:
    """Median microseconds per call of `fn`, replayed from a CUDA graph of `calls` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def layer_benchmark(tokens: list[int], variants: list[str], rows: list[dict], save: Callable[[], None]) -> None:
    """Time every variant at every shape and token count into `rows`, saving after each shape."""
    for shape_name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 0.02
        for variant in variants:
            build, dtype = VARIANTS[variant]
            try:
                fn, ref_w, nbytes = build(w)
            except Exception as exc:  # a kernel this torch lacks is a result, not a failure
                rows.append({"shape": shape_name, "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            for m in tokens:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                row = {"shape": shape_name, "variant": variant, "tokens": m, "weight_bytes": nbytes}
                try:
                    out = fn(x)
                    expected = F.linear(x.float(), ref_w.float())
                    row["rel_error"] = ((out.float() - expected).norm() / expected.norm()).item()
                    if row["rel_error"] > 0.05:
                        raise RuntimeError(f"wrong result: relative error {row['rel_error']:.3f} against its weight")
                    row["us"] = round(time_in_graph(lambda: fn(x)), 2)  # noqa: B023
                    row["tflops"] = round(2 * m * n * k / row["us"] / 1e6, 1)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                rows.append(row)
                log.info("%s %s m=%d: %s", shape_name, variant, m, row.get("us", row.get("error")))
        del w
        torch.cuda.empty_cache()
        save()


# ---- end-to-end decode of a 7B-shaped Llama (gpt-fast style: flat, static KV cache, one CUDA graph per step) ----


class Decoder:
    """A Llama-2-7B-shaped decoder with random weights whose linear layers come from `make_linear`."""

    def __init__(self, make_linear: Callable, blocks: int, max_len: int, dtype: torch.dtype, seed: int = 0) -> None:
        gen = torch.Generator("cuda").manual_seed(seed)

        def weight(n: int, k: int) -> torch.Tensor:
            return torch.empty(n, k, device="cuda", dtype=torch.float16).normal_(0, 0.02, generator=gen)

        self.dtype, self.max_len = dtype, max_len
        self.weight_bytes = 0

        def linear(n: int, k: int) -> Linear:
            fn, _, nbytes = make_linear(weight(n, k))
            self.weight_bytes += nbytes
            return fn

        self.embed = weight(VOCAB, HIDDEN).to(dtype)
        self.head = weight(VOCAB, HIDDEN).to(dtype)
        self.layers = []
        hd = HIDDEN // HEADS
        for _ in range(blocks):
            self.layers.append({
                "q": linear(HIDDEN, HIDDEN), "k": linear(HIDDEN, HIDDEN), "v": linear(HIDDEN, HIDDEN),
                "o": linear(HIDDEN, HIDDEN), "gate": linear(INTER, HIDDEN), "up": linear(INTER, HIDDEN),
                "down": linear(HIDDEN, INTER),
                "kc": torch.zeros(1, HEADS, max_len, hd, device="cuda", dtype=dtype),
                "vc": torch.zeros(1, HEADS, max_len, hd, device="cuda", dtype=dtype),
            })  # fmt: skip
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device="cuda").float() / hd))
        angles = torch.outer(torch.arange(max_len, device="cuda").float(), inv)
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)
        self.mask = torch.tril(torch.ones(max_len, max_len, device="cuda", dtype=torch.bool))
        self.weight_bytes += 2 * self.embed.numel() * self.embed.element_size()

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos[pos].view(1, 1, 1, -1), self.sin[pos].view(1, 1, 1, -1)
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)

    @staticmethod
    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One greedy decode step for a [1] token at [1] position: returns the next token."""
        h = self.embed[token]  # [1, hidden]
        hd = HIDDEN // HEADS
        for layer in self.layers:
            x = self.norm(h)
            q = self.rope(layer["q"](x).view(1, 1, HEADS, hd).transpose(1, 2), pos)
            k = self.rope(layer["k"](x).view(1, 1, HEADS, hd).transpose(1, 2), pos)
            v = layer["v"](x).view(1, 1, HEADS, hd).transpose(1, 2)
            layer["kc"].index_copy_(2, pos, k)
            layer["vc"].index_copy_(2, pos, v)
            attn = F.scaled_dot_product_attention(
                q, layer["kc"], layer["vc"], attn_mask=self.mask[pos].view(1, 1, 1, -1)
            )
            h = h + layer["o"](attn.transpose(1, 2).reshape(1, HIDDEN))
            x = self.norm(h)
            h = h + layer["down"](F.silu(layer["gate"](x)) * layer["up"](x))
        return F.linear(self.norm(h), self.head).argmax(-1)


def decode_benchmark(variant: str, blocks: int, steps: int) -> dict:
    build, dtype = VARIANTS[variant]
    decoder = Decoder(build, blocks, max_len=steps + 1, dtype=dtype)
    token = torch.zeros(1, dtype=torch.long, device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            decoder.step(token, pos)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nxt = decoder.step(token, pos)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        pos.fill_(i)
        graph.replay()
        token.copy_(nxt)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"variant": variant, "blocks": blocks, "steps": steps, "tokens_per_s": round(steps / seconds, 1),
           "ms_per_token": round(1000 * seconds / steps, 3), "weight_gib": round(decoder.weight_bytes / 2**30, 2),
           "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}  # fmt: skip
    del decoder, graph
    torch.cuda.empty_cache()
    return row


def machine() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}  # fmt: skip


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_inference.json").write_text(json.dumps(result, indent=2))
    info = result["machine"]
    lines = ["# Inference speed of compressed layers on one GPU, Llama-2-7B shapes", "",
             f"{info['gpu']}, torch {info['torch']} (CUDA {info['cuda']}), {info['date']}. Microseconds per call "
             "inside a CUDA graph (median); speed-up against dense fp16 at the same shape and tokens.", ""]  # fmt: skip
    tokens = result["tokens"]
    for shape in SHAPES:
        lines += [f"## {shape}", "", "| kernel | " + " | ".join(f"{m} tok (us)" for m in tokens) + " | weight MiB |",
                  "| --- |" + " ---: |" * (len(tokens) + 1)]  # fmt: skip
        base = {
            r["tokens"]: r.get("us") for r in result["layers"] if r["shape"] == shape and r["variant"] == "dense fp16"
        }
        for variant in VARIANTS:
            rows = [r for r in result["layers"] if r["shape"] == shape and r["variant"] == variant]
            if rows and "tokens" not in rows[0]:
                lines.append(f"| {variant} | unavailable: {rows[0]['error'][:120]} |" + " |" * len(tokens))
                continue
            cells, nbytes = [], None
            for m in tokens:
                r = next((r for r in rows if r.get("tokens") == m), None)
                if r is None or "us" not in r:
                    cells.append("fails" if r is not None else "-")
                    continue
                nbytes = r["weight_bytes"]
                speed = f" ({base[m] / r['us']:.2f}x)" if base.get(m) else ""
                cells.append(f"{r['us']:.1f}{speed}")
            size = f"{nbytes / 2**20:.1f}" if nbytes else "-"
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | {size} |")
        lines.append("")
    if result.get("decode"):
        lines += ["## End-to-end greedy decode, batch 1, 7B shapes (CUDA graph per step)", "",
                  "| linear layers | tokens/s | ms/token | weights (GiB) | speed-up |",
                  "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
        base_tps = next(
            (r["tokens_per_s"] for r in result["decode"] if r["variant"] == "dense fp16" and "tokens_per_s" in r), None
        )
        for r in result["decode"]:
            if "error" in r:
                lines.append(f"| {r['variant']} | fails: {r['error'][:100]} | | | |")
                continue
            speed = f"{r['tokens_per_s'] / base_tps:.2f}x" if base_tps else "-"
            lines.append(
                f"| {r['variant']} | {r['tokens_per_s']} | {r['ms_per_token']} | {r['weight_gib']} | {speed} |"
            )
    errors = {}
    for r in result["layers"]:
        if "error" in r:
            errors.setdefault(r["variant"], set()).add(r["error"])
    if errors:
        lines += ["", "Failures (the kernel raised, or computed something else than x @ W^T):", ""]
        lines += [f"- {variant}: {'; '.join(sorted(messages))}" for variant, messages in errors.items()]
    if result.get("runs"):
        lines += ["", "Measured in several invocations on the same machine:", ""] + [f"- {r}" for r in result["runs"]]
    (out / "gpu_inference.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 16, 256, 4096])
    parser.add_argument("--decode-blocks", type=int, default=32)
    parser.add_argument("--decode-steps", type=int, default=128)
    parser.add_argument("--decode-variants", nargs="*", default=["dense fp16", "int8 weight-only (compiled dequant)",
                        "int8 weight-only (aten)", "int4 weight-only g128 (tinygemm)", "2:4 cuSPARSELt"])  # fmt: skip
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                        help="linear-layer kernels to time (none: decode only)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_inference.py needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    result: dict = {"machine": machine(), "tokens": args.tokens, "layers": [], "decode": []}
    if args.variants:
        layer_benchmark(args.tokens, args.variants, result["layers"], lambda: write(result, args.out))
    for variant in args.decode_variants:
        try:
            result["decode"].append(decode_benchmark(variant, args.decode_blocks, args.decode_steps))
        except Exception as exc:  # reported in the table
            result["decode"].append({"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:300]})
            torch.cuda.empty_cache()
        log.info("decode %s: %s", variant, result["decode"][-1])
        write(result, args.out)
    print((args.out / "gpu_inference.md").read_text())


if __name__ == "__main__":
    main()
