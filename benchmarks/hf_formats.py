"""Bytes and loadability of the compressed HF folder, per layout, on the shipped model.

    .venv/bin/python benchmarks/hf_formats.py [--out benchmarks/results] [--tokens N]

Needs `make fetch` first. Each case compresses the dense model once (calibration-free methods: the layout, not the
method, is measured here) and saves it with `steps.save_model` in each layout it can take:
  - plain: dense float safetensors (what a sparse-only model is with `compress.sparse_storage: dense`);
  - compressed-tensors: pack-quantized (`llmpress/compress/ct_format.py`), when that format holds the model;
  - llmpress: llmpress's own layout, sparse plain linears as kept values + bitmask.
For each folder: bytes of *.safetensors, and whether stock transformers (with compressed-tensors, no llmpress code)
loads it to the evaluated model: its logits on the first N held-out tokens against the in-memory model's
(max |difference|; 0 means bit for bit). llmpress's own loader is checked the same way for every folder.
Writes hf_formats.json and hf_formats.md (a table with the machine's details).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CASES = [  # name, stages (None: the dense model), layouts to save
    ("dense", None, [("plain", "compressed-tensors", "dense")]),
    ("magnitude-50", [{"method": "magnitude", "sparsity": 0.5}],
     [("plain", "compressed-tensors", "dense"), ("llmpress", "compressed-tensors", "bitmask")]),
    ("magnitude-2of4", [{"method": "magnitude", "pattern": "2:4"}],
     [("plain", "compressed-tensors", "dense"), ("llmpress", "compressed-tensors", "bitmask")]),
    ("rtn-w4g32-sym", [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}],
     [("compressed-tensors", "compressed-tensors", "bitmask"), ("llmpress", "llmpress", "bitmask")]),
    ("rtn-w4g64", [{"method": "rtn", "bits": 4, "group_size": 64}],
     [("compressed-tensors", "compressed-tensors", "bitmask"), ("llmpress", "llmpress", "bitmask")]),
    ("rtn-w8", [{"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}],
     [("compressed-tensors", "compressed-tensors", "bitmask"), ("llmpress", "llmpress", "bitmask")]),
    ("magnitude-50 + rtn-w4g32-sym", [{"method": "magnitude", "sparsity": 0.5},
                                      {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}],
     [("compressed-tensors", "compressed-tensors", "bitmask")]),
    ("rtn-w4g128 (576 = 4.5 groups)", [{"method": "rtn", "bits": 4, "group_size": 128}],
     [("llmpress", "compressed-tensors", "bitmask")]),
    ("edge-int4 (the default recipe)", "recipes/edge-int4.yaml", [("llmpress", "compressed-tensors", "bitmask")]),
]  # fmt: skip


def _stock_logits(folder: Path, ids: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Logits of the folder loaded by stock transformers, and the route that loaded it."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = json.loads((folder / "config.json").read_text()).get("quantization_config")
    symmetric = config is None or all(g["weights"]["symmetric"] for g in config["config_groups"].values())
    if symmetric:
        model, route = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), "from_pretrained"
    else:  # see ct_format's docstring: the default route refuses packed zero points
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
        route = "from_pretrained, dequantize=True"
    with torch.no_grad():
        return model.eval()(ids).logits, route


def run(tokens: int) -> list[dict]:
    from llmpress.compress import compress_
    from llmpress.config import Recipe, load_recipe
    from llmpress.data import calibration_windows
    from llmpress.sources import load_model, load_tokenizer, resolve
    from llmpress.steps import folder_bytes, save_model

    base = resolve("default", REPO / "models")
    tokenizer = load_tokenizer(base.path)
    text = (REPO / "data" / "eval.txt").read_text(encoding="utf-8")
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]])
    dense_bytes, rows = None, []
    for name, stages, layouts in CASES:
        model = load_model(base.path)
        if isinstance(stages, str):
            calibration = calibration_windows(tokenizer, REPO / "data" / "calibration.jsonl", 256, True)[:8]
            compress_(model, load_recipe(REPO / stages), calibration, progress=lambda _: None)
        elif stages:
            compress_(model, Recipe(name="case", stages=stages), None, progress=lambda _: None)
        with torch.no_grad():
            evaluated = model(ids).logits
        for label, layout, sparse in layouts:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) / "model"
                written = save_model(model, tokenizer, folder, extra_files={}, layout=layout, sparse=sparse)
                assert (written or "plain") == label, (name, written, label)
                size = folder_bytes(folder, "*.safetensors")
                dense_bytes = dense_bytes or size
                manifest = folder / "llmpress_compression.json"
                why = json.loads(manifest.read_text()).get("compressed_tensors", "") if manifest.exists() else ""
                with torch.no_grad():
                    ours = float((load_model(folder)(ids).logits - evaluated).abs().max())
                stock, route = (None, "no: llmpress loads it; `llmpress dequantize` writes a plain folder")
                if label != "llmpress":
                    logits, route = _stock_logits(folder, ids)
                    stock = float((logits - evaluated).abs().max())
            why = why.removeprefix("not written as compressed-tensors: ")
            rows.append({"case": name, "layout": label, "bytes": size, "vs_dense": size / dense_bytes,
                         "stock_route": route, "stock_max_abs_diff": stock, "llmpress_max_abs_diff": ours,
                         "why_not_compressed_tensors": why})  # fmt: skip
            print(f"{name} [{label}]: {size / 1e6:.1f} MB ({size / dense_bytes:.3f} of dense), stock: {route} "
                  f"{'' if stock is None else f'max |diff| {stock:.1e}'}", flush=True)  # fmt: skip
        del model
    return rows


def write(rows: list[dict], out: Path, tokens: int) -> None:
    import compressed_tensors
    import transformers

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
               "compressed_tensors": compressed_tensors.__version__,
               "date": datetime.now(UTC).strftime("%Y-%m-%d")}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_formats.json").write_text(json.dumps({"machine": machine, "tokens": tokens, "rows": rows}, indent=2))
    lines = [
        "# The compressed HF folder: bytes and who loads it (shipped SmolLM2-135M)",
        "",
        f"Machine: {machine['processor']}, {machine['cpus']} CPUs, torch {machine['torch']}, transformers "
        f"{machine['transformers']}, compressed-tensors {machine['compressed_tensors']}, {machine['date']}. "
        f"Logit differences on the first {tokens} held-out tokens against the model llmpress evaluated "
        "(0: bit for bit). `python benchmarks/hf_formats.py` rewrites this file.",
        "",
        "| case | layout | MB | of dense | stock transformers | stock max abs diff | llmpress loader | "
        "why not compressed-tensors |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        stock = "-" if r["stock_max_abs_diff"] is None else f"{r['stock_max_abs_diff']:.1e}"
        lines.append(f"| {r['case']} | {r['layout']} | {r['bytes'] / 1e6:.1f} | {r['vs_dense']:.3f} | "
                     f"{r['stock_route']} | {stock} | {r['llmpress_max_abs_diff']:.1e} | "
                     f"{r['why_not_compressed_tensors'] or '-'} |")  # fmt: skip
    (out / "hf_formats.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--tokens", type=int, default=256, help="held-out tokens for the logit comparison")
    args = parser.parse_args()
    rows = run(args.tokens)
    write(rows, Path(args.out), args.tokens)
    print(f"wrote {Path(args.out) / 'hf_formats.md'}")


if __name__ == "__main__":
    main()
