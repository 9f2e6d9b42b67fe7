"""What ships to the edge: size, perplexity and speed of PyTorch fp32 against onnxruntime fp32, int8 and int4.

    .venv/bin/python benchmarks/edge.py [--models models/smollm2-135m-instruct models/compressed/<run>/hf ...]
                                        [--variants fp32 int8-dynamic int4] [--max-tokens N] [--out benchmarks/results]

For every model folder (default: the shipped model, after `make fetch` / `llmpress resolve default`): the PyTorch
fp32 model and each onnxruntime variant of its KV-cache graph (`llmpress.export.variants`) get the same numbers -
bytes of weights on disk, perplexity under params.yaml's protocol on the held-out text (data/eval.txt), prefill
latency and greedy decode tokens/s at batch 1 with params.yaml's speed protocol, torch and onnxruntime on the same
threads. Writes edge.json and edge.md (with the machine's details) after every model. Goals on 2 cores (issue 5):
ORT int8 or int4 decode >= 2.5x PyTorch fp32, the int4 graph <= 20 % of the fp32 bytes, perplexity within the gate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from llmpress.config import load_params  # noqa: E402
from llmpress.data import calibration_windows  # noqa: E402
from llmpress.evaluate.perplexity import perplexity  # noqa: E402
from llmpress.evaluate.speed import ort_speed, torch_speed  # noqa: E402
from llmpress.export.generate import OrtGenerator, onnx_session  # noqa: E402
from llmpress.export.onnx import export_onnx  # noqa: E402
from llmpress.export.variants import VARIANTS, describe, make_variant, ort_perplexity  # noqa: E402
from llmpress.sources import load_model, load_tokenizer  # noqa: E402


def model_name(folder: Path) -> str:
    """The folder's name, or its parent's for a pipeline output (models/compressed/<run>/hf)."""
    return folder.parent.name if folder.name == "hf" else folder.name


def measure_model(folder: Path, variants: list[str], params, text: str, threads: int, block_size: int,
                  calibration: Path) -> list[dict]:  # fmt: skip
    tokenizer = load_tokenizer(folder)
    windows = calibration_windows(tokenizer, calibration, 256, True)[:16].numpy()  # for int8-static
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = torch.tensor([bos + ids[: params.eval.speed.prompt_tokens]])
    model = load_model(folder)
    rows = []
    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, text, params.eval).perplexity
    speed = torch_speed(model, prompt, params.eval.speed)
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    name = model_name(folder)
    rows.append({"model": name, "runtime": "PyTorch fp32", "bytes": weights, "perplexity": ppl, **speed,
                 "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
    print(f"{name}: PyTorch fp32 ppl {ppl:.3f}, decode {speed['decode_tokens_per_s']:.1f} tok/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        graph = export_onnx(model, Path(tmp) / "onnx")
        del model
        for kind in variants:
            start = time.perf_counter()
            path = make_variant(graph, Path(tmp) / kind, kind, block_size=block_size, calibration_ids=windows)
            info = describe(path)
            ppl = ort_perplexity(path, tokenizer, text, params.eval, threads).perplexity
            speed = ort_speed(OrtGenerator(onnx_session(path, threads=threads)), prompt, params.eval.speed)
            rows.append({"model": name, "runtime": f"ORT {kind}", "bytes": info["bytes"], "perplexity": ppl,
                         **speed, **info, "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
            print(f"{name}: ORT {kind} ppl {ppl:.3f}, decode {speed['decode_tokens_per_s']:.1f} tok/s, "
                  f"{info['bytes'] / 2**20:.1f} MiB", flush=True)  # fmt: skip
    return rows


def write(rows: list[dict], settings: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__,
               "date": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
    try:
        import onnxruntime

        machine["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    (out / "edge.json").write_text(json.dumps({"machine": machine, "settings": settings, "rows": rows}, indent=2))
    lines = [
        "# What ships to the edge: PyTorch fp32 against onnxruntime fp32 / int8 / int4", "",
        f"{machine['processor']}, {machine['cpus']} CPUs, {settings['threads']} threads, torch {machine['torch']}, "
        f"onnxruntime {machine.get('onnxruntime', '?')}, {machine['date']}. Perplexity on {settings['max_tokens']} "
        f"held-out tokens (params.yaml protocol); prompt {settings['prompt_tokens']} tokens, "
        f"{settings['decode_tokens']} greedy decode steps, batch 1; ratios against PyTorch fp32 of the same model.",
        "", "| model | runtime | MiB | size ratio | perplexity | prefill (ms) | decode (tok/s) | decode ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["runtime"] == "PyTorch fp32")
        lines.append(
            f"| {r['model']} | {r['runtime']} | {r['bytes'] / 2**20:.1f} | {r['bytes'] / base['bytes']:.2f} "
            f"| {r['perplexity']:.3f} | {r['prefill_ms']:.1f} | {r['decode_tokens_per_s']:.1f} "
            f"| {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x |"
        )
    (out / "edge.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", type=Path, default=[REPO / "models" / "smollm2-135m-instruct"])
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--max-tokens", type=int, default=None, help="held-out tokens (default: params.yaml)")
    parser.add_argument("--block-size", type=int, default=32, help="int4 block size")
    parser.add_argument("--eval-text", type=Path, default=REPO / "data" / "eval.txt")
    parser.add_argument("--calibration", type=Path, default=REPO / "data" / "calibration.jsonl")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    if args.max_tokens:
        params = params.model_copy(update={"eval": params.eval.model_copy(update={"max_tokens": args.max_tokens})})
    for folder in args.models:
        if not (folder / "config.json").is_file():
            raise SystemExit(f"error: {folder} is not a model folder (run `make fetch` for the shipped model)")
    if not args.eval_text.is_file():
        raise SystemExit(f"error: {args.eval_text} is missing (run `make fetch`)")
    text = args.eval_text.read_text(encoding="utf-8")
    threads = params.eval.speed.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    speed = params.eval.speed
    settings = {"threads": threads, "max_tokens": params.eval.max_tokens, "block_size": args.block_size,
                "prompt_tokens": speed.prompt_tokens, "decode_tokens": speed.decode_tokens}  # fmt: skip
    rows: list[dict] = []
    for folder in args.models:
        rows += measure_model(folder, args.variants, params, text, threads, args.block_size, args.calibration)
        write(rows, settings, args.out)
    print((args.out / "edge.md").read_text())


if __name__ == "__main__":
    main()
