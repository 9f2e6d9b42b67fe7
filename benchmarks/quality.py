"""Quality and cost of every compression method on the shipped model, under params.yaml's protocol.

    .venv/bin/python benchmarks/quality.py [--recipes recipes/a.yaml ...] [--out benchmarks/results]
                                           [--max-tokens N] [--calibration-samples N] [--model SOURCE]

Needs `make fetch` first (the converted model and the DVC data sets). Each recipe runs in its own child process
so its peak memory is its own: load the dense model, compress, save the compressed folder exactly as the
pipeline does (packed integers for quantized layers), load that folder back and evaluate *it* (perplexity, KL to
the dense model and top-1 agreement on the held-out text). Writes quality.json, quality.md (a table with the
machine's details) and quality.png (perplexity against bytes on disk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPES = [
    "magnitude-50", "wanda-50", "sparsegpt-50", "wanda-owl-50", "sparsegpt-owl-50", "sparsegpt-dsnot-50",
    "wanda-50-distill", "sparsegpt-50-distill",
    "wanda-2of4", "sparsegpt-2of4",
    "rtn-w8", "gptq-w8", "rtn-w4g128", "gptq-w4g128", "awq-w4g128", "gptq-w3g128", "smoothquant-w8a8",
    "sparsegpt-2of4-gptq-w4g128",
    "structured-mlp-20", "structured-heads-mlp", "drop-blocks-2", "lowrank-svd-mlp-50", "lowrank-mlp-50",
    "structured-mlp-20-distill-rtn-w8",
    "llm-pruner-mlp-20", "structured-mlp-20-distill", "llm-pruner-mlp-20-distill", "qat-w4g128",
]  # fmt: skip


def _overrides(max_tokens: int | None, model: str | None) -> dict:
    return ({"eval.max_tokens": max_tokens} if max_tokens else {}) | ({"model": model} if model else {})


def run_one(recipe_path: str, max_tokens: int | None, calibration_samples: int | None,
            model_source: str | None) -> dict:  # fmt: skip
    """Compress, save, reload and evaluate one recipe (in this process)."""
    from llmpress.compress import compress_
    from llmpress.config import load_params, load_recipe
    from llmpress.data import calibration_windows
    from llmpress.evaluate.agreement import compare_to_base
    from llmpress.sources import load_model, load_tokenizer, resolve
    from llmpress.steps import folder_bytes, peak_memory, save_model

    params = load_params(REPO / "params.yaml", _overrides(max_tokens, model_source))
    base = resolve(params.model, REPO / "models")
    tokenizer = load_tokenizer(base.path)
    ids = calibration_windows(tokenizer, REPO / "data" / "calibration.jsonl", params.data.seq_len, params.eval.add_bos)
    if calibration_samples:
        ids = ids[:calibration_samples]
    recipe = load_recipe(REPO / recipe_path)
    model = load_model(base.path)
    start = time.perf_counter()
    report = compress_(model, recipe, ids, batch_size=params.compress.batch_size, progress=lambda _: None)
    seconds = time.perf_counter() - start
    peak = peak_memory()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        save_model(model, tokenizer, folder, extra_files={})
        del model
        weights_bytes = folder_bytes(folder, "*.safetensors")
        reloaded = load_model(folder)
    dense = load_model(base.path)
    text = (REPO / "data" / "eval.txt").read_text()
    agreement = compare_to_base(reloaded, dense, tokenizer, text, params.eval)
    layers = [r for r in report.layers if r.shape and r.target_sparsity is not None]
    sizes = [max(1, r.shape[0] * (r.shape[1] if len(r.shape) > 1 else 1)) for r in layers]
    return {
        "recipe": recipe.name,
        "methods": " → ".join(s.method for s in recipe.stages),
        "settings": "; ".join(_settings(s) for s in recipe.stages),
        "perplexity": agreement.perplexity,
        "dense_perplexity": agreement.base_perplexity,
        "kl_to_base": agreement.kl_to_base,
        "top1_agreement": agreement.top1_agreement,
        "eval_tokens": agreement.tokens,
        "sparsity": sum(r.sparsity * n for r, n in zip(layers, sizes, strict=True)) / sum(sizes) if layers else 0.0,
        "parameters": sum(p.numel() for p in reloaded.parameters()),
        "weights_bytes": weights_bytes,
        "compress_seconds": seconds,
        "stage_seconds": {f"{s.index}_{s.method}": round(s.seconds, 2) for s in report.stages},
        "peak_host_mb": peak.get("host_peak_mb"),
        "calibration": list(ids.shape),
    }


def _settings(stage) -> str:
    skip = {"method", "targets", "ignore"}
    data = stage.model_dump(mode="json", by_alias=True, exclude_none=True)
    items = [f"{k}={v}" for k, v in data.items() if k not in skip and v not in (False, None)]
    targets = getattr(stage, "targets", None)
    if targets and targets != [".*"]:
        items.append(f"targets={','.join(targets)}")
    return f"{stage.method}(" + ", ".join(items) + ")"


def dense_row(max_tokens: int | None, model_source: str | None) -> dict:
    from llmpress.config import load_params
    from llmpress.evaluate.perplexity import perplexity
    from llmpress.sources import load_model, load_tokenizer, resolve
    from llmpress.steps import folder_bytes

    params = load_params(REPO / "params.yaml", _overrides(max_tokens, model_source))
    base = resolve(params.model, REPO / "models")
    model = load_model(base.path)
    result = perplexity(model, load_tokenizer(base.path), (REPO / "data" / "eval.txt").read_text(), params.eval)
    return {
        "recipe": "dense", "methods": "-", "settings": "fp32 from the shipped GGUF", "perplexity": result.perplexity,
        "dense_perplexity": result.perplexity, "kl_to_base": 0.0, "top1_agreement": 1.0, "eval_tokens": result.tokens,
        "sparsity": 0.0, "parameters": sum(p.numel() for p in model.parameters()),
        "weights_bytes": folder_bytes(base.path, "*.safetensors"), "compress_seconds": 0.0, "stage_seconds": {},
        "peak_host_mb": None, "model": base.name, "model_sha256": base.sha256,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="*", default=[f"recipes/{r}.yaml" for r in DEFAULT_RECIPES])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--max-tokens", type=int, default=None, help="held-out tokens (default: params.yaml)")
    parser.add_argument("--calibration-samples", type=int, default=None, help="use only the first N windows")
    parser.add_argument("--model", default=None, help="model source (default: params.yaml's), e.g. gemma3-270m")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one or args.dense:
        row = (dense_row(args.max_tokens, args.model) if args.dense
               else run_one(args.one, args.max_tokens, args.calibration_samples, args.model))  # fmt: skip
        print("RESULT " + json.dumps(row))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [_child(["--dense"], args)]
    print(f"dense: perplexity {rows[0]['perplexity']:.3f}", flush=True)
    for recipe in args.recipes:
        if not (REPO / recipe).is_file():
            print(f"{recipe}: not found, skipped", flush=True)
            continue
        row = _child(["--one", recipe], args)
        rows.append(row)
        print(f"{row['recipe']}: perplexity {row['perplexity']:.3f} ({row['perplexity'] / rows[0]['perplexity']:.2f}x)"
              f", KL {row['kl_to_base']:.3f}, {row['weights_bytes'] / 2**20:.1f} MiB, "
              f"compressed in {row['compress_seconds']:.1f}s", flush=True)  # fmt: skip
        _write(rows, out)  # after every recipe, so a long run leaves partial results
    print(f"wrote {out / 'quality.md'}")


def _child(extra: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, *extra]
    if args.max_tokens:
        cmd += ["--max-tokens", str(args.max_tokens)]
    if args.calibration_samples:
        cmd += ["--calibration-samples", str(args.calibration_samples)]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=os.environ.copy(), check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{' '.join(extra)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _write(rows: list[dict], out: Path) -> None:
    dense = rows[0]
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip
    (out / "quality.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    calibration = next((r["calibration"] for r in rows[1:] if r.get("calibration")), None)
    lines = [
        f"# Compression quality and cost on {dense.get('model')}",
        "",
        f"{dense.get('model')} (dense fp32 from the shipped GGUF; its weights were 4-bit before), calibration "
        f"{calibration[0] if calibration else '?'} x {calibration[1] if calibration else '?'} tokens, perplexity and "
        f"KL(dense || compressed) on {dense['eval_tokens']} held-out tokens; each model evaluated after saving and "
        "reloading its folder.",
        f"Machine: {machine['processor']}, {machine['cpus']} CPUs, torch {machine['torch']}, {machine['date']}.",
        "",
        "| recipe | methods | perplexity | x dense | KL | top-1 | sparsity | params (M) | weights (MiB) "
        "| compress (s) | peak (MiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        peak = f"{r['peak_host_mb']:.0f}" if r.get("peak_host_mb") else "-"
        lines.append(
            f"| {r['recipe']} | {r['methods']} | {r['perplexity']:.2f} | {r['perplexity'] / dense['perplexity']:.3f} "
            f"| {r['kl_to_base']:.3f} | {r['top1_agreement']:.3f} | {r['sparsity']:.3f} | {r['parameters'] / 1e6:.1f} "
            f"| {r['weights_bytes'] / 2**20:.1f} | {r['compress_seconds']:.1f} | {peak} |"
        )
    lines += ["", "Settings:", ""] + [f"- `{r['recipe']}`: {r['settings']}" for r in rows[1:]]
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "quality.png", dense.get("model") or "")


def _plot(rows: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        ax.scatter(r["weights_bytes"] / 2**20, r["perplexity"], s=36)
        ax.annotate(r["recipe"], (r["weights_bytes"] / 2**20, r["perplexity"]), textcoords="offset points",
                    xytext=(4, 3), fontsize=7)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("weights on disk (MiB)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"Perplexity against size, {model}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
