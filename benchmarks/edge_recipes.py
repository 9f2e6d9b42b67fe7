"""Which recipe ships: edge bundles of several recipes, each scored as it ships, in onnxruntime, on one machine.

    .venv/bin/python benchmarks/edge_recipes.py [--recipes recipes/edge-int4.yaml recipes/wanda-50.yaml@int4 ...]
                                                [--max-tokens N]
                                                [--out benchmarks/results]

For each recipe: compress the shipped model (params.yaml's calibration set), export it (quantized layers as
MatMulNBits / GatherBlockQuantized holding the method's codes, `llmpress.export.packed`), set the serving accuracy
level (params.yaml `export.accuracy_level`), then score the graph in onnxruntime under params.yaml's perplexity
protocol, and time it in a child process that imports only numpy and onnxruntime (`llmpress.evaluate.speed`).
Besides the recipes: the base model in PyTorch fp32 (what users would run instead), its fp32 graph, and
onnxruntime's own int4 quantizer on that graph (`int4-full`: symmetric round-to-nearest, embeddings too) - what a
user of onnxruntime's tooling would ship. Same held-out text, threads and prompt for every row.

A recipe written `path@precision` is shipped at that `export.precision` (`config.export_recipe`: a prune-only
recipe followed by llmpress's RTN quantizer, e.g. `recipes/wanda-50.yaml@int4`).

Writes edge_recipes.json ({"machine", "settings", "rows": [{"system", "recipe", "precision", "bytes",
"bytes_ratio", "perplexity_torch", "perplexity", "perplexity_ratio", "prefill_ms", "decode_b1", "decode_b4",
"decode_speedup_b1", "peak_rss_mb"}]}) and edge_recipes.md. The README's "Why edge-int4 is the default" cites it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import onnx
import onnxruntime
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmpress.compress import compress_  # noqa: E402
from llmpress.config import export_recipe, load_params, load_recipe  # noqa: E402
from llmpress.data import calibration_windows  # noqa: E402
from llmpress.evaluate.perplexity import perplexity  # noqa: E402
from llmpress.evaluate.speed import measure_in_subprocess, prompt_ids  # noqa: E402
from llmpress.export.onnx import export_onnx  # noqa: E402
from llmpress.export.packed import precision_counts, precision_label, set_accuracy_level  # noqa: E402
from llmpress.export.variants import make_variant, ort_perplexity  # noqa: E402
from llmpress.sources import load_model, load_tokenizer, resolve  # noqa: E402

DEFAULT_RECIPES = ["recipes/edge-int4.yaml", "recipes/rtn-w4g32-emb8.yaml", "recipes/gptq-w4g32-emb8.yaml",
                   "recipes/smoothquant-w8a8.yaml", "recipes/wanda-50.yaml", "recipes/wanda-50.yaml@int4"]  # fmt: skip


def graph_row(system: str, recipe: str, graph: Path, tokenizer, text: str, params, prompt: list[int]) -> dict:
    proto = onnx.load(str(graph), load_external_data=False)
    speed = measure_in_subprocess("ort", str(graph), prompt, params.eval.speed)
    return {
        "system": system,
        "recipe": recipe,
        "precision": precision_label(precision_counts(proto)),
        "bytes": sum(f.stat().st_size for f in graph.parent.iterdir() if f.is_file()),
        "perplexity": ort_perplexity(graph, tokenizer, text, params.eval, params.eval.speed.threads).perplexity,
        "prefill_ms": speed["ort_b1_prefill_ms"],
        "decode_b1": speed["ort_b1_decode_tokens_per_s"],
        f"decode_b{params.eval.speed.batch_size}": speed[f"ort_b{params.eval.speed.batch_size}_decode_tokens_per_s"],
        "peak_rss_mb": speed["ort_peak_rss_mb"],
    }


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "edge_recipes.json").write_text(json.dumps(result, indent=2) + "\n")
    m, s = result["machine"], result["settings"]
    batch = s["batch_size"]
    lines = [
        "# Which recipe ships: edge bundles scored as they ship, in onnxruntime", "",
        f"{m['cpu']}, {m['cpus']} CPUs, {s['threads']} threads, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
        f"{m['date']}. Perplexity on {s['eval_tokens']} held-out tokens (params.yaml protocol); prompt "
        f"{s['prompt_tokens']} tokens, {s['decode_tokens']} greedy decode steps; ratios against the base model: "
        f"bytes against its fp32 safetensors, perplexity and speed against it in PyTorch fp32. MatMulNBits accuracy "
        f"level {s['accuracy_level']}. `python benchmarks/edge_recipes.py` rewrites this file.", "",
        f"| system | recipe | holds | MB | bytes ratio | ppl (PyTorch) | ppl (as shipped) | ppl ratio | prefill (ms) "
        f"| decode b1 (tok/s) | decode b{batch} (tok/s) | speed-up b1 | peak RSS (MB) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip

    def cell(value, spec: str) -> str:
        return "-" if value is None else spec.format(value)

    for r in result["rows"]:
        lines.append(
            f"| {r['system']} | {r['recipe']} | {r['precision']} | {r['bytes'] / 1e6:.1f} | {r['bytes_ratio']:.3f} "
            f"| {cell(r.get('perplexity_torch'), '{:.3f}')} | {r['perplexity']:.3f} | {r['perplexity_ratio']:.3f} "
            f"| {r['prefill_ms']:.0f} | {r['decode_b1']:.1f} | {cell(r.get(f'decode_b{batch}'), '{:.1f}')} "
            f"| {r['decode_speedup_b1']:.2f}x | {cell(r.get('peak_rss_mb'), '{:.0f}')} |"
        )  # fmt: skip
    (out / "edge_recipes.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=DEFAULT_RECIPES)
    parser.add_argument("--max-tokens", type=int, default=None, help="held-out tokens (default: params.yaml)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    overrides = {"eval.max_tokens": args.max_tokens} if args.max_tokens else {}
    params = load_params(REPO / "params.yaml", overrides)
    threads = params.eval.speed.threads or torch.get_num_threads()
    # one thread count for torch and onnxruntime, stated in the results (params are frozen: a new copy)
    speed = params.eval.speed.model_copy(update={"threads": threads})
    params = params.model_copy(update={"eval": params.eval.model_copy(update={"speed": speed})})
    base = resolve("default", REPO / "models")
    tokenizer = load_tokenizer(base.path)
    text = (REPO / "data" / "eval.txt").read_text(encoding="utf-8")
    prompt = prompt_ids(tokenizer, REPO / "data" / "eval.txt", params.eval.speed)
    windows = calibration_windows(tokenizer, REPO / "data" / "calibration.jsonl", params.data.seq_len,
                                  params.eval.add_bos)[: params.data.calibration_samples]  # fmt: skip
    base_model = load_model(base.path)
    base_ppl = perplexity(base_model, tokenizer, text, params.eval)
    base_bytes = sum(f.stat().st_size for f in Path(base.path).glob("*.safetensors"))
    base_speed = measure_in_subprocess("torch", str(base.path), prompt, params.eval.speed)
    batch = params.eval.speed.batch_size
    rows = [{"system": "pytorch fp32", "recipe": "-", "precision": "fp32", "bytes": base_bytes,
             "perplexity_torch": base_ppl.perplexity, "perplexity": base_ppl.perplexity,
             "prefill_ms": base_speed["torch_b1_prefill_ms"], "decode_b1": base_speed["torch_b1_decode_tokens_per_s"],
             f"decode_b{batch}": base_speed[f"torch_b{batch}_decode_tokens_per_s"],
             "peak_rss_mb": base_speed["torch_peak_rss_mb"]}]  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="llmpress-edge-recipes-"))
    templates = REPO / "models" / "onnx-templates"
    try:
        fp32 = export_onnx(base_model, work / "base-fp32", cache_dir=templates)
        rows.append(graph_row("onnxruntime fp32", "-", fp32, tokenizer, text, params, prompt))
        ort_int4 = make_variant(fp32, work / "base-ort-int4-full", "int4-full", block_size=32)
        rows.append(graph_row("onnxruntime int4 quantizer", "int4-full, g32", ort_int4, tokenizer, text, params,
                              prompt))  # fmt: skip
        del base_model
        for recipe_path in args.recipes:
            path, _, precision = recipe_path.partition("@")
            recipe = export_recipe(load_recipe(REPO / path), precision or "recipe")
            model = load_model(base.path)
            compress_(model, recipe, windows, batch_size=params.compress.batch_size)
            torch_ppl = perplexity(model, tokenizer, text, params.eval).perplexity
            name = recipe.name + (f" @ {precision}" if precision else "")
            graph = export_onnx(model, work / name.replace(" @ ", "-"), cache_dir=templates)
            proto = onnx.load(str(graph), load_external_data=False)
            if set_accuracy_level(proto, params.export.accuracy_level):
                onnx.save(proto, str(graph))
            del model
            row = graph_row("llmpress default" if recipe_path == DEFAULT_RECIPES[0] else "llmpress", name,
                            graph, tokenizer, text, params, prompt)  # fmt: skip
            rows.append(row | {"perplexity_torch": torch_ppl})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        row["bytes_ratio"] = row["bytes"] / base_bytes
        row["perplexity_ratio"] = row["perplexity"] / base_ppl.perplexity
        row["decode_speedup_b1"] = row["decode_b1"] / rows[0]["decode_b1"]
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    result = {
        "machine": {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__, "date": datetime.now(UTC).isoformat(timespec="seconds")},
        "settings": {"threads": threads, "eval_tokens": base_ppl.tokens,
                     "prompt_tokens": params.eval.speed.prompt_tokens,
                     "decode_tokens": params.eval.speed.decode_tokens, "batch_size": batch,
                     "accuracy_level": params.export.accuracy_level},
        "rows": rows,
    }  # fmt: skip
    write(result, args.out)


if __name__ == "__main__":
    main()
