"""ONNX parity on the shipped model after each compression method: what ships computes what was evaluated.

    .venv/bin/python benchmarks/onnx_parity.py [--recipes recipes/a.yaml ...] [--out benchmarks/results]
                                               [--ppl-tokens N] [--calibration-samples N]

Needs `make fetch` first. Each recipe runs in its own child process, as the pipeline does it: load the dense model,
compress, save the folder (packed integers, factorised layers), load it back, export the KV-cache ONNX graph, then
  - parity (`llmpress.export.onnx.check_parity`): prefill of `params.export.parity_tokens` held-out tokens and
    `parity_decode_steps` greedy steps, each side from its own cache: max/mean absolute logit difference, prefill
    argmax agreement, identical greedy tokens;
  - PyTorch's own noise floor on that prefill (its logits against themselves with the input embeddings moved by
    about one fp32 ulp, `llmpress.export.onnx.noise_floor`) and the verdict of the default gate's parity checks;
  - perplexity of the same reloaded model in PyTorch and of its graph in onnxruntime on the first `--ppl-tokens`
    held-out tokens, same protocol.
Writes onnx_parity.json and onnx_parity.md (a table with the machine's details).
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
    "wanda-50", "sparsegpt-2of4", "sparsegpt-50-distill", "gptq-w4g128", "awq-w4g128", "rtn-w8", "smoothquant-w8a8",
    "sparsegpt-2of4-gptq-w4g128", "structured-heads-mlp", "drop-blocks-2", "lowrank-mlp-50",
]  # fmt: skip


def run_one(recipe_path: str | None, ppl_tokens: int, calibration_samples: int | None) -> dict:
    """Compress (unless `recipe_path` is None: the dense model), save, reload, export and compare (this process)."""
    from llmpress.compress import compress_
    from llmpress.config import load_params, load_recipe
    from llmpress.data import calibration_windows
    from llmpress.evaluate.perplexity import perplexity
    from llmpress.export.onnx import check_parity, export_onnx
    from llmpress.export.variants import ort_perplexity
    from llmpress.sources import load_model, load_tokenizer, resolve
    from llmpress.steps import folder_bytes, save_model

    params = load_params(REPO / "params.yaml", {"eval.max_tokens": ppl_tokens})
    base = resolve(params.model, REPO / "models")
    tokenizer = load_tokenizer(base.path)
    text = (REPO / "data" / "eval.txt").read_text(encoding="utf-8")
    model = load_model(base.path)
    name, seconds = "dense", 0.0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        if recipe_path:
            recipe = load_recipe(REPO / recipe_path)
            ids = calibration_windows(tokenizer, REPO / "data" / "calibration.jsonl", params.data.seq_len,
                                      params.eval.add_bos)  # fmt: skip
            ids = ids[:calibration_samples] if calibration_samples else ids
            start = time.perf_counter()
            compress_(model, recipe, ids, batch_size=params.compress.batch_size, progress=lambda _: None)
            name, seconds = recipe.name, time.perf_counter() - start
            save_model(model, tokenizer, folder, extra_files={})
            del model
            model = load_model(folder)  # judge the artifact, as the pipeline does
        start = time.perf_counter()
        graph = export_onnx(model, Path(tmp) / "onnx", opset=params.export.opset)
        export_seconds = time.perf_counter() - start
        prefill = tokenizer(text, add_special_tokens=False)["input_ids"][: params.export.parity_tokens]
        parity = check_parity(model, graph, torch.tensor([prefill]), decode_steps=params.export.parity_decode_steps)
        torch_ppl = perplexity(model, tokenizer, text, params.eval)
        ort_ppl = ort_perplexity(graph, tokenizer, text, params.eval)
        return {
            "recipe": name,
            "compress_seconds": seconds,
            "export_seconds": export_seconds,
            "onnx_bytes": folder_bytes(graph.parent),
            **parity.to_dict(),
            "torch_perplexity": torch_ppl.perplexity,
            "ort_perplexity": ort_ppl.perplexity,
            "perplexity_tokens": torch_ppl.tokens,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="*", default=[f"recipes/{r}.yaml" for r in DEFAULT_RECIPES])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens for the perplexity pair")
    parser.add_argument("--calibration-samples", type=int, default=None, help="use only the first N windows")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one or args.dense:
        print("RESULT " + json.dumps(run_one(args.one, args.ppl_tokens, args.calibration_samples)))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for extra in [["--dense"], *(["--one", r] for r in args.recipes)]:
        row = _child(extra, args)
        rows.append(row)
        print(
            f"{row['recipe']}: max |diff| {row['max_abs_diff']:.2e}, greedy identical {row['greedy_identical']}, "
            f"perplexity torch {row['torch_perplexity']:.3f} / ort {row['ort_perplexity']:.3f}",
            flush=True,
        )
        _write(rows, out)  # after every recipe, so a long run leaves partial results
    failed = [r["recipe"] for r in rows if not r["greedy_identical"]]
    print(f"wrote {out / 'onnx_parity.md'}" + (f"; greedy tokens differ for {', '.join(failed)}" if failed else ""))


def _child(extra: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, *extra, "--ppl-tokens", str(args.ppl_tokens)]
    if args.calibration_samples:
        cmd += ["--calibration-samples", str(args.calibration_samples)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=os.environ.copy(), check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{' '.join(extra)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _write(rows: list[dict], out: Path) -> None:
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__,
               "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip
    (out / "onnx_parity.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    first = rows[0]
    lines = [
        "# ONNX parity after each compression method (shipped SmolLM2-135M)",
        "",
        f"Each model saved, reloaded and exported with its KV cache; parity on a prefill of {first['tokens']} "
        f"held-out tokens then {first['decode_steps']} greedy decode steps (each side from its own cache), fp32, "
        f"onnxruntime CPU provider; perplexity on {first['perplexity_tokens']} held-out tokens in both.",
        f"Machine: {machine['processor']}, {machine['cpus']} CPUs, torch {machine['torch']}, {machine['date']}.",
        "",
        "| recipe | max abs logit diff | mean abs diff | PyTorch noise floor max / mean | prefill argmax agree "
        "| greedy tokens identical | default gate | perplexity torch | perplexity ORT | ONNX MiB | export (s) |",
        "| --- | ---: | ---: | ---: | ---: | :---: | :---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['max_abs_diff']:.2e} | {r['mean_abs_diff']:.2e} "
            f"| {_floor(r)} | {r['argmax_agreement']:.4f} "
            f"| {'yes' if r['greedy_identical'] else '**no**'} | {_verdict(r)} | {r['torch_perplexity']:.3f} "
            f"| {r['ort_perplexity']:.3f} | {r['onnx_bytes'] / 2**20:.1f} | {r['export_seconds']:.1f} |"
        )
    lines += [
        "",
        "Default gate: the parity checks of `params.yaml`'s defaults (`max_onnx_logit_diff` 1e-3 on the max "
        "difference; where PyTorch's own noise floor exceeds that, ONNX's mean difference <= `onnx_noise_factor` "
        "x the floor's mean; identical greedy tokens).",
    ]
    (out / "onnx_parity.md").write_text("\n".join(lines) + "\n")


def _floor(row: dict) -> str:
    if "noise_max_abs_diff" not in row:  # a row measured before the noise floor existed
        return "-"
    return f"{row['noise_max_abs_diff']:.2e} / {row['noise_mean_abs_diff']:.2e}"


def _verdict(row: dict) -> str:
    """The default gate's parity checks on this row, as the pipeline would apply them."""
    if "noise_max_abs_diff" not in row:
        return "-"
    from llmpress.config import GateParams
    from llmpress.gate import run_gate

    keys = ("max_abs_diff", "mean_abs_diff", "noise_max_abs_diff", "noise_mean_abs_diff", "greedy_identical")
    metrics = {f"onnx_{key}": float(row[key]) for key in keys}
    report = run_gate(metrics, {}, GateParams(max_perplexity_ratio=None, champion_max_perplexity_increase=None))
    return "pass" if report.passed else "**fail** (" + "; ".join(report.failures) + ")"


if __name__ == "__main__":
    main()
