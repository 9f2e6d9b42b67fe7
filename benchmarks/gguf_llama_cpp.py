"""GGUF in llama.cpp: llmpress's calibrated 4-bit blocks against llama.cpp's own quantizer, at the same block types
and bytes, every file scored by llama.cpp itself.

    .venv/bin/python benchmarks/gguf_llama_cpp.py [--recipes recipes/gguf-q4_0-gptq.yaml ...] [--max-tokens N]
                                        [--out benchmarks/results]

Rows, each one GGUF file loaded by llama-cpp-python (built by `make setup` for this CPU):
- "llama.cpp <type>": the shipped GGUF (the dense baseline's own Q4_1 weights) re-quantized by llama.cpp's quantizer
  (`llama_model_quantize`, what `llama-quantize` runs, no importance matrix) to <type>, with the token embedding
  table kept at Q8_0 so that the file holds the same block types as llmpress's;
- "llmpress <recipe>": the base model compressed by the recipe on params.yaml's calibration set and written by
  `llmpress.export.gguf` (the method's codes, bit for bit, on Q4_0 / Q8_0 grids; a zero point folded into Q4_1);
- "llmpress f16 (dense)": the base model written as F16, llama.cpp's reference for the dense weights.
The PyTorch fp32 perplexity of the base model is the baseline of the ratios.

Protocol: params.yaml's perplexity windows on the held-out text, the same token ids for every file, logits from
llama.cpp (`llmpress.evaluate.llamacpp`); speed at batch 1 on the speed protocol's prompt (`llmpress.evaluate.speed`,
runtime gguf, a fresh child process per file). Goal (issue 20): at the same block type and no more bytes, a
llmpress GGUF has lower perplexity in llama.cpp than llama.cpp's own quantizer.

Writes gguf.json ({"machine", "settings", "rows", "goal"}) and gguf.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES = ["recipes/gguf-q4_0-rtn.yaml", "recipes/gguf-q4_0-gptq.yaml", "recipes/gguf-q4_0-awq.yaml",
           "recipes/edge-int4.yaml"]  # fmt: skip
LLAMA_TYPES = ["Q4_0", "Q4_1", "Q8_0"]


def block_types(path: Path) -> dict[str, int]:
    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))


def decoder_type(types: dict[str, int]) -> str:
    """The block type of the bulk of the file (the decoder's linears)."""
    return max(types, key=types.get)


def quantize_with_llama_cpp(source: Path, out: Path, type_name: str, threads: int) -> Path:
    """llama.cpp's own quantizer to `type_name`, the token embeddings at Q8_0 (llmpress's embeddings stage)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = threads
    params.allow_requantize = True  # the shipped file is Q4_1: llama.cpp reads its weights back, as from float
    params.token_embedding_type = llama_cpp.GGML_TYPE_Q8_0
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0 or not out.is_file():
        raise SystemExit(f"error: llama.cpp could not quantize {source.name} to {type_name}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="*", default=RECIPES, help="llmpress recipes written as GGUF")
    parser.add_argument("--llama-types", nargs="*", default=LLAMA_TYPES, help="llama.cpp's quantizer's types")
    parser.add_argument("--max-tokens", type=int, default=None, help="held-out tokens scored (params.yaml's)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from llmpress.evaluate import llamacpp

    if not llamacpp.available():
        raise SystemExit(f"error: {llamacpp.INSTALL}")
    run(args)


def run(args: argparse.Namespace) -> None:
    import torch

    from llmpress.compress import compress_
    from llmpress.config import export_recipe, load_params, load_recipe
    from llmpress.data import calibration_windows
    from llmpress.evaluate.llamacpp import gguf_perplexity
    from llmpress.evaluate.perplexity import perplexity
    from llmpress.evaluate.speed import measure_in_subprocess, prompt_ids
    from llmpress.export.gguf import export_gguf
    from llmpress.sources import load_model, load_tokenizer, resolve, shipped_gguf_path

    overrides = {"eval.max_tokens": args.max_tokens} if args.max_tokens else {}
    params = load_params(REPO / "params.yaml", overrides)
    threads = params.eval.speed.threads or len(os.sched_getaffinity(0))
    speed = params.eval.speed.model_copy(update={"threads": threads, "batch_size": 1, "decode_tokens": 64,
                                                 "repeats": 5})  # fmt: skip
    base = resolve("default", REPO / "models")
    tokenizer = load_tokenizer(base.path)
    eval_path = REPO / "data" / "eval.txt"
    text = eval_path.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = prompt_ids(tokenizer, eval_path, speed)
    calibration = calibration_windows(tokenizer, REPO / "data" / "calibration.jsonl", params.data.seq_len,
                                      params.eval.add_bos)[: params.data.calibration_samples]  # fmt: skip
    base_model = load_model(base.path)
    dense = perplexity(base_model, tokenizer, text, params.eval)
    rows: list[dict[str, Any]] = []

    def add(system: str, path: Path, source: str, extra: dict[str, Any] | None = None) -> None:
        scored = gguf_perplexity(path, ids, params.eval, tokenizer.bos_token_id, threads)
        timing = measure_in_subprocess("gguf", str(path), prompt, speed)
        types = block_types(path)
        rows.append({"system": system, "source": source, "block_types": types, "block_type": decoder_type(types),
                     "bytes": path.stat().st_size, "perplexity": scored.perplexity,
                     "perplexity_ratio": scored.perplexity / dense.perplexity,
                     "prefill_ms": timing["gguf_b1_prefill_ms"],
                     "decode_tokens_per_s": timing["gguf_b1_decode_tokens_per_s"],
                     "peak_rss_mb": timing["gguf_peak_rss_mb"], **(extra or {})})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    work = Path(tempfile.mkdtemp(prefix="llmpress-gguf-bench-"))
    try:
        report = export_gguf(base_model, base.path, work / "f16.gguf", float_type="f16")
        add("llmpress f16 (dense)", Path(report.path), "the base model's weights as F16")
        del base_model
        shipped = Path(shipped_gguf_path())
        for type_name in args.llama_types:
            path = quantize_with_llama_cpp(shipped, work / f"llama-{type_name}.gguf", type_name, threads)
            add(f"llama.cpp {type_name}", path, "llama.cpp's quantizer (llama_model_quantize, no imatrix), "
                "token embeddings Q8_0")  # fmt: skip
        for recipe_path in args.recipes:
            recipe = export_recipe(load_recipe(REPO / recipe_path))
            model = load_model(base.path)
            start = time.perf_counter()
            compress_(model, recipe, calibration, batch_size=params.compress.batch_size)
            seconds = time.perf_counter() - start
            report = export_gguf(model, base.path, work / f"{recipe.name}.gguf")
            del model
            add(f"llmpress {recipe.name}", Path(report.path), recipe_path,
                {"compress_seconds": seconds, "exact_tensors": len(report.exact),
                 "near_exact_tensors": len(report.near_exact),
                 "requantized_tensors": len(report.requantized)})  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {"machine": machine(torch.__version__),
              "settings": {"threads": threads, "eval_tokens": dense.tokens, "windows": dense.windows,
                           "window": params.eval.window,
                           "calibration_windows": len(calibration), "seq_len": params.data.seq_len,
                           "prompt_tokens": len(prompt), "decode_tokens": speed.decode_tokens,
                           "repeats": speed.repeats, "pytorch_fp32_perplexity": dense.perplexity},
              "rows": rows, "goal": goal(rows)}  # fmt: skip
    write(result, args.out)


def goal(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per decoder block type: llama.cpp's file against the best llmpress file of that type and no more bytes."""
    out = {}
    for anchor in (r for r in rows if r["system"].startswith("llama.cpp")):
        ours = [r for r in rows if r["system"].startswith("llmpress") and r["block_types"] == anchor["block_types"]
                and r["bytes"] <= anchor["bytes"]]  # fmt: skip
        if not ours:
            continue
        best = min(ours, key=lambda r: r["perplexity"])
        out[anchor["block_type"]] = {"llama_cpp": anchor["perplexity"], "llmpress": best["perplexity"],
                                     "llmpress_system": best["system"],
                                     "met": best["perplexity"] < anchor["perplexity"]}  # fmt: skip
    return out


def machine(torch_version: str) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch_version,
            "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
            "gguf": importlib.metadata.version("gguf"),
            "date": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf.json").write_text(json.dumps(result, indent=2) + "\n")
    m, s = result["machine"], result["settings"]
    lines = [
        "# GGUF in llama.cpp: llmpress's calibrated blocks against llama.cpp's own quantizer", "",
        f"{m['cpu']}, {m['cpus']} CPUs, {s['threads']} threads; llama-cpp-python {m['llama_cpp_python']} (built from "
        f"source here), gguf {m['gguf']}, torch {m['torch']}; {m['date']}. Every row is one GGUF file scored by "
        f"llama.cpp: perplexity from its logits on {s['eval_tokens']} held-out tokens ({s['windows']} windows of "
        f"{s['window']}, params.yaml protocol, the same token ids for every file); speed at batch 1, prompt "
        f"{s['prompt_tokens']} tokens, {s['decode_tokens']} greedy steps, median of {s['repeats']} runs in a fresh "
        f"process. Ratios against the base model in PyTorch fp32 (perplexity {s['pytorch_fp32_perplexity']:.3f}). "
        f"llmpress calibrates on {s['calibration_windows']} windows of {s['seq_len']} tokens. "
        "`python benchmarks/gguf_llama_cpp.py` rewrites this file.", "",
        "| system | block types | MB | perplexity | ppl ratio | prefill (ms) | decode (tok/s) | peak RSS (MB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for r in result["rows"]:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["block_types"].items()))
        lines.append(f"| {r['system']} | {types} | {r['bytes'] / 1e6:.1f} | {r['perplexity']:.3f} "
                     f"| {r['perplexity_ratio']:.3f} | {r['prefill_ms']:.0f} | {r['decode_tokens_per_s']:.1f} "
                     f"| {r['peak_rss_mb']:.0f} |")  # fmt: skip
    lines += ["", "## Goal: lower perplexity in llama.cpp than llama.cpp's quantizer, same block types, no more bytes",
              ""]  # fmt: skip
    for kind, g in result["goal"].items():
        lines.append(f"- {kind}: llama.cpp {g['llama_cpp']:.3f}, {g['llmpress_system']} {g['llmpress']:.3f}: "
                     f"{'met' if g['met'] else 'NOT met'}.")  # fmt: skip
    (out / "gguf.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
