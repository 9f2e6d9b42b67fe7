"""Compression speed and memory of llmpress's block-by-block engine on one GPU, at Llama-2-7B shapes.

    python benchmarks/gpu_compress.py [--blocks 32] [--windows 128] [--seq-len 2048] [--methods wanda-50 ...]

Builds a Llama-2-7B-shaped model (hidden 4096, intermediate 11008, 32 heads, 32 blocks) with random weights on
the host (a 7B model's real weights cannot travel to the benchmark machine; speed does not depend on them), then
times `compress_` end to end - block inputs captured, every block moved to the GPU, calibrated, compressed,
propagated and moved back - with 128 windows of 2048 random token ids, for Wanda 50 %, SparseGPT 50 % and 2:4
and GPTQ W4 g128. Only one block is on the GPU at a time. Reports seconds (total, per block, per phase), peak
GPU memory (torch.cuda.max_memory_allocated) and peak host memory, against the public reference code measured on
the same H100 (numbers from issue 7). Writes gpu_compress.json and gpu_compress.md to --out.

`--blocks N` times the first N blocks only (a quicker check); the 32-block figure is then a projection (capture
+ 32 x the mean block time) and is labelled as such. `--profile METHOD` adds a torch.profiler table of one
block. Needs a CUDA GPU; exits with a message on a machine without one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmpress.compress.engine import compress_
from llmpress.compress.targets import find_decoder_blocks
from llmpress.config import Recipe
from llmpress.evaluate.speed import peak_rss_mb

log = logging.getLogger("gpu_compress")

METHODS = {
    "wanda-50": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt-50": {"method": "sparsegpt", "sparsity": 0.5},
    "sparsegpt-2of4": {"method": "sparsegpt", "pattern": "2:4"},
    "gptq-w4g128": {"method": "gptq", "bits": 4, "group_size": 128},
}
# Seconds per block of the public reference code on this H100 with the same shapes and data (issue 7).
REFERENCE_PER_BLOCK = {
    "wanda-50": {"locuslab/wanda": 0.89, "llm-compressor 0.14": 3.0},
    "sparsegpt-50": {"IST-DASLab/sparsegpt": 12.2, "llm-compressor 0.14": 12.5},
    "sparsegpt-2of4": {"IST-DASLab/sparsegpt (50 %)": 12.2, "llm-compressor 0.14 (50 %)": 12.5},
    "gptq-w4g128": {"IST-DASLab/gptq": 16.3, "llm-compressor 0.14": 5.9},
}
TARGET_SECONDS = {"wanda-50": 15, "sparsegpt-50": 100, "sparsegpt-2of4": 100, "gptq-w4g128": 100}
TARGET_GPU_GIB = 24
LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}  # fmt: skip


def build_model(blocks: int, dtype: torch.dtype) -> torch.nn.Module:
    """The 7B-shaped Llama with uninitialised host weights (fill them with `randomize_`)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(num_hidden_layers=blocks, **LLAMA2_7B)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.to_empty(device="cpu")
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # its buffers, left uninitialised by to_empty
    return model.eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random N(0, 0.02) weights and unit norms, drawn on the GPU (fast) and copied into the host tensors."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        values = torch.empty(param.shape, device="cuda", dtype=param.dtype).normal_(0, 0.02, generator=generator)
        param.copy_(values.cpu())
    torch.cuda.synchronize()


def machine() -> dict:
    props = torch.cuda.get_device_properties(0)
    import transformers

    return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count, "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}  # fmt: skip


def run_method(model: torch.nn.Module, name: str, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    randomize_(model, seed=args.seed)
    recipe = Recipe(name=name, stages=[METHODS[name] | {"targets": [".*_proj"]}])
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    report = compress_(model, recipe, ids, device="cuda", batch_size=args.batch_size, progress=log.info)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    blocks = len(find_decoder_blocks(model)[1])
    capture = report.phase_seconds.get("capture", 0.0)
    per_block = (total - capture) / blocks
    sizes = [r.shape[0] * r.shape[1] for r in report.layers]
    sparsity = sum(r.sparsity * n for r, n in zip(report.layers, sizes, strict=True)) / sum(sizes)
    row = {
        "method": name, "blocks": blocks, "seconds": round(total, 2), "seconds_per_block": round(per_block, 3),
        "seconds_32_blocks": round(total if blocks == 32 else capture + 32 * per_block, 1),
        "projected": blocks != 32, "phase_seconds": report.phase_seconds,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "host_peak_gib": round(peak_rss_mb() / 1024, 1), "sparsity": round(sparsity, 4),
        "reference_seconds_per_block": REFERENCE_PER_BLOCK[name], "target_seconds": TARGET_SECONDS[name],
    }  # fmt: skip
    fastest = min(REFERENCE_PER_BLOCK[name].values()) * 32
    row["speedup_vs_fastest_reference"] = round(fastest / row["seconds_32_blocks"], 2)
    log.info("%s: %.1fs for %d blocks (%.2fs/block), peak GPU %.1f GiB, phases %s", name, total, blocks,
             per_block, row["peak_gpu_gib"], {k: round(v, 2) for k, v in report.phase_seconds.items()})  # fmt: skip
    return row


def profile_block(model: torch.nn.Module, name: str, ids: torch.Tensor, args: argparse.Namespace, out: Path) -> None:
    """torch.profiler over a one-block run of `name`: where the time goes, by operator."""
    from torch.profiler import ProfilerActivity, profile

    one = build_model(1, model.dtype)
    randomize_(one, seed=args.seed)
    recipe = Recipe(name=name, stages=[METHODS[name] | {"targets": [".*_proj"]}])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        compress_(one, recipe, ids, device="cuda", batch_size=args.batch_size)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    (out / f"gpu_compress_profile_{name}.txt").write_text(table)
    print(table)


def write(rows: list[dict], info: dict, args: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    settings = {"windows": args.windows, "seq_len": args.seq_len, "batch_size": args.batch_size,
                "dtype": args.dtype, "shapes": LLAMA2_7B}  # fmt: skip
    (out / "gpu_compress.json").write_text(json.dumps({"machine": info, "settings": settings, "rows": rows}, indent=2))
    lines = [
        "# Compression speed on one GPU, Llama-2-7B shapes",
        "",
        f"{info['gpu']} ({info['gpu_memory_gib']} GiB), torch {info['torch']} (CUDA {info['cuda']}), transformers "
        f"{info['transformers']}, {info['cpus']} CPUs, {info['date']}. Random {args.dtype} weights, "
        f"{args.windows} windows x {args.seq_len} tokens (random ids), batch {args.batch_size}, one block on the GPU.",
        "",
        "| method | 32 blocks (s) | per block (s) | target (s) | fastest reference (s, 32 blocks) | speed-up "
        "| peak GPU (GiB) | host peak (GiB) | sparsity |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ref_name, ref = min(r["reference_seconds_per_block"].items(), key=lambda kv: kv[1])
        total = f"{r['seconds_32_blocks']}" + (f" (projected from {r['blocks']})" if r["projected"] else "")
        lines.append(
            f"| {r['method']} | {total} | {r['seconds_per_block']} | ≤ {r['target_seconds']} "
            f"| {ref * 32:.0f} ({ref_name}) | {r['speedup_vs_fastest_reference']}x | {r['peak_gpu_gib']} "
            f"| {r['host_peak_gib']} | {r['sparsity']:.3f} |"
        )
    lines += ["", "Seconds per phase (all blocks):", "",
              "| method | " + " | ".join(PHASES) + " |", "| --- |" + " ---: |" * len(PHASES)]  # fmt: skip
    for r in rows:
        cells = " | ".join(f"{r['phase_seconds'].get(p, 0.0):.2f}" for p in PHASES)
        lines.append(f"| {r['method']} | {cells} |")
    (out / "gpu_compress.md").write_text("\n".join(lines) + "\n")


PHASES = ["capture", "onload", "statistics", "compress", "propagate", "offload"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="float16")
    parser.add_argument("--methods", nargs="*", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--profile", choices=sorted(METHODS), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_compress.py needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")

    info = machine()
    t0 = time.perf_counter()
    model = build_model(args.blocks, getattr(torch, args.dtype))
    log.info("built a %d-block 7B-shaped model on the host in %.1fs", args.blocks, time.perf_counter() - t0)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1, LLAMA2_7B["vocab_size"], (args.windows, args.seq_len), generator=generator)
    rows: list[dict] = []
    for name in args.methods:
        rows.append(run_method(model, name, ids, args))
        write(rows, info, args, args.out)  # after every method, so a cut-off run keeps what it measured
    if args.profile:
        profile_block(model, args.profile, ids, args, args.out)
    print((args.out / "gpu_compress.md").read_text())


if __name__ == "__main__":
    main()
