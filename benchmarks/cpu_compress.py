"""Compression speed of llmpress's engine on the CPU, on the shipped SmolLM2-135M, beside the reference figures.

    python benchmarks/cpu_compress.py [--windows 64] [--seq-len 512] [--methods wanda-50 sparsegpt-50 gptq-w4g128]

Calibration as issue 18 sets it: 64 windows of 512 tokens, passages sampled from the Lee corpus the pipeline
ships (`llmpress.data`: the same split and sampler as `llmpress data`), batch 8, every thread torch uses. For each
method, `compress_` runs on a fresh copy of the model: wall seconds, CPU seconds (process time, all threads) and
seconds per phase (capture, statistics, compress, propagate). The reference rows are the public reference code's
CPU seconds as issue 18 reports them, measured on another day on a shared machine (IST-DASLab sparsegpt and gptq,
locuslab wanda) - not measured in this run, and labelled so. Writes cpu_compress.json and cpu_compress.md to --out.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmpress.compress.engine import compress_
from llmpress.config import DataParams, Recipe
from llmpress.data import fetch_corpus, read_documents, sample_passages, split_documents
from llmpress.sources import load_model, load_tokenizer, resolve

log = logging.getLogger("cpu_compress")

METHODS = {
    "wanda-50": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt-50": {"method": "sparsegpt", "sparsity": 0.5},
    "gptq-w4g128": {"method": "gptq", "bits": 4, "group_size": 128},
}
# CPU seconds on 2 cores, 64 x 512 tokens, SmolLM2-135M, as issue 18 reports them (not measured here).
REFERENCE_CPU_SECONDS = {
    "wanda-50": ("locuslab/wanda", 289.0),
    "sparsegpt-50": ("IST-DASLab/sparsegpt", 452.0),
    "gptq-w4g128": ("IST-DASLab/gptq", 433.0),
}
PHASES = ["capture", "statistics", "compress", "propagate"]


def calibration(tokenizer, windows: int, seq_len: int) -> torch.Tensor:
    """[windows, seq_len] ids from the Lee corpus, split and sampled as the pipeline's data stage does."""
    with tempfile.TemporaryDirectory() as tmp:
        docs = read_documents(fetch_corpus("gensim-lee", Path(tmp)))
    params = DataParams(calibration_samples=windows, seq_len=seq_len)
    passages = sample_passages(split_documents(docs, params)[0], params)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [(bos + tokenizer(p, add_special_tokens=False)["input_ids"])[:seq_len] for p in passages]
    return torch.tensor(rows, dtype=torch.long)


def machine() -> dict:
    import transformers

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []  # fmt: skip
    cpu = names[0] if names else platform.processor()
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}  # fmt: skip


def run_method(base: torch.nn.Module, name: str, ids: torch.Tensor, batch_size: int) -> dict:
    model = copy.deepcopy(base)
    recipe = Recipe(name=name, stages=[METHODS[name] | {"targets": [".*_proj"]}])
    wall, cpu = time.perf_counter(), time.process_time()
    report = compress_(model, recipe, ids, device="cpu", batch_size=batch_size, progress=log.info)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    ref_name, ref_cpu = REFERENCE_CPU_SECONDS[name]
    row = {"method": name, "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
           "phase_seconds": {k: round(v, 1) for k, v in report.phase_seconds.items()},
           "reference": ref_name, "reference_cpu_seconds": ref_cpu,
           "cpu_seconds_vs_reference": round(cpu / ref_cpu, 2)}  # fmt: skip
    log.info("%s: %.1f s wall, %.1f s CPU (reference %s: %.0f s CPU)", name, wall, cpu, ref_name, ref_cpu)
    return row


def write(rows: list[dict], info: dict, args: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    settings = {"windows": args.windows, "seq_len": args.seq_len, "batch_size": args.batch_size}
    (out / "cpu_compress.json").write_text(json.dumps({"machine": info, "settings": settings, "rows": rows}, indent=2))
    lines = [
        "# Compression speed on the CPU, SmolLM2-135M",
        "",
        f"{info['cpu']}, {info['cpus']} CPUs ({info['torch_threads']} torch threads), torch {info['torch']}, "
        f"transformers {info['transformers']}, {info['date']}. {args.windows} windows x {args.seq_len} tokens of the "
        f"Lee corpus, batch {args.batch_size}, `python benchmarks/cpu_compress.py`.",
        "",
        "| method | wall (s) | CPU (s) | reference CPU (s), issue 18, not this run | CPU / reference |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['wall_seconds']} | {r['cpu_seconds']} | {r['reference_cpu_seconds']:.0f} "
                     f"({r['reference']}) | {r['cpu_seconds_vs_reference']}x |")  # fmt: skip
    lines += ["", "Wall seconds per phase (all blocks):", "",
              "| method | " + " | ".join(PHASES) + " |", "| --- |" + " ---: |" * len(PHASES)]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(f"{r['phase_seconds'].get(p, 0.0):.1f}" for p in PHASES) + " |")
    (out / "cpu_compress.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", nargs="*", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    folder = resolve("default", Path(__file__).resolve().parents[1] / "models").path
    tokenizer, base = load_tokenizer(folder), load_model(folder)
    ids = calibration(tokenizer, args.windows, args.seq_len)
    rows = [run_method(base, name, ids, args.batch_size) for name in args.methods]
    write(rows, machine(), args, args.out)
    print((args.out / "cpu_compress.md").read_text())


if __name__ == "__main__":
    main()
