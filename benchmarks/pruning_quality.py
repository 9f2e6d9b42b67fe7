"""Perplexity and compression time of every pruning recipe on the shipped model, under params.yaml's protocol.

    .venv/bin/python benchmarks/pruning_quality.py [--recipes recipes/a.yaml ...] [--out benchmarks/results]

Needs `make fetch` first (the converted model and the DVC data sets). Writes pruning_quality.json and
pruning_quality.md (a table with the machine's details) and a perplexity-against-sparsity plot.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from llmpress.compress import compress_
from llmpress.config import load_params, load_recipe
from llmpress.data import calibration_windows
from llmpress.evaluate.perplexity import perplexity
from llmpress.sources import load_model, load_tokenizer, resolve

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPES = ["magnitude-50", "wanda-50", "magnitude-2of4", "wanda-2of4", "wanda-4of8", "wanda-mlp-30"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="*", default=[f"recipes/{r}.yaml" for r in DEFAULT_RECIPES])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    base = resolve(params.model, REPO / "models")
    tokenizer = load_tokenizer(base.path)
    text = (REPO / "data" / "eval.txt").read_text()
    ids = calibration_windows(tokenizer, REPO / "data" / "calibration.jsonl", params.data.seq_len, params.eval.add_bos)

    rows = []
    start = time.perf_counter()
    dense = perplexity(load_model(base.path), tokenizer, text, params.eval)
    rows.append({"recipe": "dense", "sparsity": 0.0, "perplexity": dense.perplexity, "compress_seconds": 0.0,
                 "eval_seconds": time.perf_counter() - start})  # fmt: skip
    print(f"dense: perplexity {dense.perplexity:.3f}")
    for recipe_path in args.recipes:
        recipe = load_recipe(REPO / recipe_path)
        model = load_model(base.path)
        start = time.perf_counter()
        report = compress_(model, recipe, ids, batch_size=params.compress.batch_size, progress=lambda _: None)
        compress_seconds = time.perf_counter() - start
        start = time.perf_counter()
        result = perplexity(model, tokenizer, text, params.eval)
        sizes = [math.prod(r.shape) for r in report.layers]
        sparsity = sum(r.sparsity * n for r, n in zip(report.layers, sizes, strict=True)) / sum(sizes)
        rows.append({"recipe": recipe.name, "sparsity": sparsity, "perplexity": result.perplexity,
                     "compress_seconds": compress_seconds, "eval_seconds": time.perf_counter() - start})  # fmt: skip
        print(f"{recipe.name}: sparsity {sparsity:.4f}, perplexity {result.perplexity:.3f}, "
              f"compressed in {compress_seconds:.1f}s")  # fmt: skip

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": torch.get_num_threads(), "torch": torch.__version__,
               "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip
    setup = {"model": base.name, "model_sha256": base.sha256, "calibration": f"{ids.shape[0]} x {ids.shape[1]} tokens",
             "eval": params.eval.model_dump(), "eval_tokens": dense.tokens}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pruning_quality.json").write_text(json.dumps({"machine": machine, "setup": setup, "rows": rows}, indent=2))
    lines = [
        "# Pruning quality on the shipped model",
        "",
        f"{base.name} (dense fp32 from the shipped GGUF), calibration {setup['calibration']}, perplexity on "
        f"{dense.tokens} held-out tokens (window {params.eval.window}, BOS {params.eval.add_bos}).",
        f"Machine: {machine['processor']}, {machine['cpus']} threads, torch {machine['torch']}, {machine['date']}.",
        "",
        "| recipe | sparsity | perplexity | x dense | compress (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(f"| {row['recipe']} | {row['sparsity']:.4f} | {row['perplexity']:.2f} | "
                     f"{row['perplexity'] / dense.perplexity:.2f} | {row['compress_seconds']:.1f} |")  # fmt: skip
    (out / "pruning_quality.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "pruning_quality.png")
    print(f"wrote {out / 'pruning_quality.md'}")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.scatter(row["sparsity"], row["perplexity"], s=40)
        ax.annotate(row["recipe"], (row["sparsity"], row["perplexity"]), textcoords="offset points", xytext=(5, 4))
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the targeted layers")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("Perplexity against sparsity, SmolLM2-135M")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
