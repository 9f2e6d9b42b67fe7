"""Side by side with what users would pick instead: one model, one held-out text, one thread count, each system
scored from its own runtime's logits and timed in its own runtime.

    make bench-anchors      # builds llama-cpp-python from the registry's sdist, installs onnxruntime-genai, runs this
    .venv/bin/python benchmarks/edge_anchors.py [--llama-types Q8_0 Q4_K_M ...] [--siblings fp32 int8 int4 int4-full]
                                                [--max-tokens N] [--out benchmarks/results]

Rows (`system`):
- "llmpress default": params.yaml's recipe compressed on its calibration set and exported as the pipeline exports
  it (quantized layers as MatMulNBits / GatherBlockQuantized holding the method's codes, params.yaml's accuracy
  level), run in onnxruntime;
- "llmpress fp32 | int8 | int4 | int4-full": its siblings, the base model shipped at `export.precision` by
  llmpress's own quantizer (RTN; `config.precision_stages`), run in onnxruntime;
- "onnxruntime-genai int4": onnxruntime-genai's model builder on the base model's safetensors folder, as its README
  says (`-p int4 -e cpu`: symmetric RTN in blocks of 32, embeddings and head too), run by onnxruntime-genai; and the
  same with `is_symmetric=false`, the grid closer to the model's own;
- "llama.cpp Q4_1": the shipped GGUF itself, run by llama-cpp-python; "llama.cpp <type>": that GGUF re-quantized by
  llama.cpp's own quantizer (`llama_model_quantize`, from the Q4_1 weights, i.e. from the dense baseline);
- "pytorch fp32": the base model in PyTorch, the baseline.

Every system reads the same token ids (tokenized once by the base model's tokenizer) under params.yaml's perplexity
protocol (`llmpress.evaluate.perplexity.make_windows`; llama.cpp and onnxruntime-genai one window at a time), and is
timed in a fresh child process on the same prompt (BOS + the first `eval.speed.prompt_tokens` held-out tokens) for
`--decode-tokens` greedy steps at batch 1, median of `--repeats` runs after `eval.speed.warmup`
(`llmpress.evaluate.speed.time_generation`), every system once per round for `--rounds` interleaved rounds (median
of rounds); peak memory is the child's VmHWM. Bytes are the files the runtime loads: ONNX graph + weights; the GGUF
file (its tokenizer inside); the safetensors for PyTorch.

Writes edge_anchors.json ({"machine", "settings", "rows": [{"system", "format", "bytes", "perplexity",
"prefill_ms", "decode_tokens_per_s", "peak_rss_mb", ...}], "failed", "goal"}) and edge_anchors.md. The goal (issue
16): the default bundle has lower perplexity than every anchor that is no larger, and decodes at >= 0.8x the fastest
anchor.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmpress.evaluate.llamacpp import LlamaCpp  # noqa: E402
from llmpress.evaluate.speed import peak_rss_mb, time_generation  # noqa: E402

LLAMA_TYPES = ["Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M"]
SIBLINGS = ["fp32", "int8", "int4", "int4-full"]
ANCHOR_DEPS = "onnxruntime-genai and llama-cpp-python are benchmark dependencies: run `make bench-anchors-deps`"


# ---------------------------------------------------------------------------------------------------------------
# the two anchor runtimes: logits of a window, and one greedy generation (prefill, then one token per step)
# ---------------------------------------------------------------------------------------------------------------


class AnchorFailed(Exception):
    """An anchor's own tooling or runtime failed on this model: reported in the results, not fatal."""


class GenAI:
    """onnxruntime-genai's Generator on a model builder's folder; greedy search."""

    def __init__(self, folder: Path, max_length: int) -> None:
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(str(folder))
        self.params = og.GeneratorParams(self.model)
        self.params.set_search_options(max_length=max_length, do_sample=False)

    def logits(self, ids: list[int]) -> Any:
        import numpy as np

        generator = self.og.Generator(self.model, self.params)
        generator.append_tokens(np.array(ids, dtype=np.int32))
        return generator.get_output("logits")[0]

    def prefill(self, prompt: list[int]) -> Any:
        import numpy as np

        generator = self.og.Generator(self.model, self.params)
        generator.append_tokens(np.array(prompt, dtype=np.int32))  # runs the prompt
        generator.generate_next_token()  # picks from the prompt's logits; runs nothing
        return generator

    def step(self, generator: Any) -> Any:
        generator.generate_next_token()  # one decode step: the last token through the model, then argmax
        return generator


def set_genai_threads(folder: Path, threads: int) -> None:
    """onnxruntime-genai reads its session options from genai_config.json."""
    config_path = folder / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=2))


def anchor_speed(runtime: str, path: str, prompt: list[int], speed: dict[str, Any]) -> dict[str, Any]:
    """In this (child) process: batch-1 prefill latency and decode tokens/s of an anchor, and the peak memory."""
    length = len(prompt) + speed["decode_tokens"] + 1
    engine = (LlamaCpp(Path(path), length, speed["threads"], all_logits=False) if runtime == "llama.cpp"
              else GenAI(Path(path), length))  # fmt: skip
    timing = time_generation(lambda: engine.prefill(prompt), engine.step, speed["decode_tokens"], 1,
                             speed["warmup"], speed["repeats"])  # fmt: skip
    return timing | {"peak_rss_mb": peak_rss_mb()}


def anchor_speed_in_subprocess(runtime: str, path: Path, prompt: list[int], speed: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--speed-child", runtime, str(path), json.dumps(prompt), json.dumps(speed)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise AnchorFailed(f"{runtime} on {path.name}: {done.stderr.strip().splitlines()[-1][:300]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------------------------


def window_perplexity(logits_of, windows, batch_size: int = 1) -> float:
    """params.yaml's perplexity from a runtime's logits of one window ([T, V] array)."""
    import numpy as np
    import torch

    from llmpress.evaluate.perplexity import window_nll

    def logits_fn(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.stack([logits_of(row.tolist()) for row in batch]))

    nll, count = window_nll(logits_fn, windows, batch_size)
    return math.exp(nll / count)


def build_genai(base: Path, out: Path, symmetric: bool, threads: int) -> Path:
    """onnxruntime-genai's model builder, int4 for the CPU, as a user runs it."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(out), "-p", "int4",
           "-e", "cpu", "-c", str(out.parent / "genai-cache")]  # fmt: skip
    if not symmetric:
        cmd += ["--extra_options", "is_symmetric=false"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        raise AnchorFailed(f"model builder: {(done.stderr.strip() or 'no output').splitlines()[-1][:300]}")
    set_genai_threads(out, threads)
    return out


def quantize_gguf(source: Path, out: Path, type_name: str, threads: int) -> Path:
    """llama.cpp's own quantizer (what `llama-quantize` runs), re-quantizing the shipped weights to `type_name`."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.allow_requantize = ftype, threads, True
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0 or not out.is_file():
        raise AnchorFailed(f"llama.cpp could not quantize {source.name} to {type_name}")
    return out


def graph_nodes(proto: Any) -> int:
    """Operators an ONNX graph runs (Constant nodes are data): at batch 1 on a small model, each costs a kernel
    launch and a thread-pool synchronisation, whatever its size."""
    return sum(1 for node in proto.graph.node if node.op_type != "Constant")


def files_bytes(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths)


def onnx_files(graph: Path) -> list[Path]:
    """The graph and its external weights file, where it has one."""
    data = graph.with_name(graph.name + ".data")
    return [graph, data] if data.is_file() else [graph]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-types", nargs="*", default=LLAMA_TYPES, help="llama.cpp types to quantize to")
    parser.add_argument("--siblings", nargs="*", default=SIBLINGS, choices=SIBLINGS)
    parser.add_argument("--max-tokens", type=int, default=None, help="held-out tokens (default: params.yaml)")
    # longer than params.yaml's pipeline protocol (16 steps, 3 repeats): systems this fast need more steps to time
    parser.add_argument("--decode-tokens", type=int, default=64, help="greedy steps timed per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per system, interleaved (median)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--speed-child", nargs=4, metavar=("RUNTIME", "PATH", "PROMPT", "SPEED"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.speed_child:
        runtime, path, prompt, speed = args.speed_child
        print(json.dumps(anchor_speed(runtime, path, json.loads(prompt), json.loads(speed))))
        return
    try:
        import llama_cpp
        import onnxruntime_genai  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"error: {exc}. {ANCHOR_DEPS}") from None
    unknown = [t for t in args.llama_types if not hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{t}")]
    if unknown:
        known = sorted(
            n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_")
        )
        raise SystemExit(f"error: --llama-types: unknown {', '.join(unknown)}; allowed: {', '.join(known)}")
    if min(args.decode_tokens, args.repeats, args.rounds) < 1:
        raise SystemExit("error: --decode-tokens, --repeats and --rounds must be >= 1")
    run(args)


def run(args: argparse.Namespace) -> None:
    import onnx
    import onnxruntime
    import torch

    from llmpress.compress import compress_
    from llmpress.config import Recipe, export_recipe, load_params, load_recipe, precision_stages, validate
    from llmpress.data import calibration_windows
    from llmpress.evaluate.perplexity import make_windows, perplexity
    from llmpress.evaluate.speed import measure_in_subprocess, prompt_ids
    from llmpress.export.onnx import export_onnx
    from llmpress.export.packed import precision_counts, precision_label, set_accuracy_level
    from llmpress.export.variants import ort_perplexity
    from llmpress.sources import load_model, load_tokenizer, resolve, shipped_gguf_path

    overrides = {"eval.max_tokens": args.max_tokens} if args.max_tokens else {}
    params = load_params(REPO / "params.yaml", overrides)
    threads = params.eval.speed.threads or torch.get_num_threads()
    speed = params.eval.speed.model_copy(
        update={"threads": threads, "batch_size": 1, "repeats": args.repeats, "decode_tokens": args.decode_tokens}
    )
    params = params.model_copy(update={"eval": params.eval.model_copy(update={"speed": speed})})
    base = resolve("default", REPO / "models")
    shipped_gguf = Path(shipped_gguf_path())  # the file the default model was converted from
    tokenizer = load_tokenizer(base.path)
    text = (REPO / "data" / "eval.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = make_windows(ids, params.eval, tokenizer.bos_token_id)
    scored = sum(len(w.tokens) - w.first_scored for w in windows)
    prompt = prompt_ids(tokenizer, REPO / "data" / "eval.txt", params.eval.speed)
    calibration = calibration_windows(tokenizer, REPO / "data" / "calibration.jsonl", params.data.seq_len,
                                      params.eval.add_bos)[: params.data.calibration_samples]  # fmt: skip
    speed_args = {k: getattr(speed, k) for k in ("threads", "decode_tokens", "warmup", "repeats")}
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    timers: dict[str, Any] = {}  # system -> () -> {"prefill_ms", "decode_tokens_per_s", "peak_rss_mb"}

    def add(row: dict[str, Any], timer) -> None:
        rows.append(row)
        timers[row["system"]] = timer
        print(json.dumps(row), flush=True)

    def timed(runtime: str, path: Path):
        def timer() -> dict[str, Any]:
            got = measure_in_subprocess(runtime, str(path), prompt, speed)
            return {"prefill_ms": got[f"{runtime}_b1_prefill_ms"],
                    "decode_tokens_per_s": got[f"{runtime}_b1_decode_tokens_per_s"],
                    "peak_rss_mb": got[f"{runtime}_peak_rss_mb"]}  # fmt: skip

        return timer

    base_model = load_model(base.path)
    add({"system": "pytorch fp32", "format": "safetensors fp32", "nodes": None,
         "bytes": files_bytes(*Path(base.path).glob("*.safetensors")),
         "perplexity": perplexity(base_model, tokenizer, text, params.eval).perplexity},
        timed("torch", Path(base.path)))  # fmt: skip
    del base_model

    work = Path(tempfile.mkdtemp(prefix="llmpress-edge-anchors-"))
    templates = REPO / "models" / "onnx-templates"
    try:
        # 1. build every system and score its perplexity
        default = load_recipe(REPO / params.recipe)
        llmpress_rows = [("llmpress default", default)] + [
            (f"llmpress {p}", validate(Recipe, {"name": f"base-{p}", "stages": precision_stages(p)}, p) if p != "fp32"
             else None) for p in args.siblings]  # fmt: skip
        for system, recipe in llmpress_rows:
            model = load_model(base.path)
            if recipe is not None:
                compress_(model, export_recipe(recipe), calibration, batch_size=params.compress.batch_size)
            graph = export_onnx(model, work / system.replace(" ", "-"), cache_dir=templates)
            del model
            levels = [params.export.accuracy_level]
            if system == "llmpress default" and params.export.accuracy_level != 0:
                levels.append(0)  # the same codes computed in float32: what onnxruntime's int8 activations cost
            for level in levels:
                if level != levels[0]:
                    shutil.copytree(graph.parent, work / f"{graph.parent.name}-level{level}")
                    graph = work / f"{graph.parent.name}-level{level}" / graph.name
                proto = onnx.load(str(graph), load_external_data=False)
                if set_accuracy_level(proto, level):
                    onnx.save(proto, str(graph))
                add({"system": system + ("" if level == levels[0] else f", accuracy level {level}"),
                     "format": f"onnx {precision_label(precision_counts(proto))}"
                     + (f" ({recipe.name}, level {level})" if system == "llmpress default" else ""),
                     "bytes": files_bytes(*onnx_files(graph)), "nodes": graph_nodes(proto),
                     "perplexity": ort_perplexity(graph, tokenizer, text, params.eval, threads).perplexity},
                    timed("ort", graph))  # fmt: skip

        def anchor(system: str, fmt: str, files: list[Path], runtime: str, engine, nodes: int | None = None) -> None:
            """One anchor's row; an anchor its own runtime cannot load or run is reported, not fatal."""
            try:
                row = {"system": system, "format": fmt, "bytes": files_bytes(*files), "nodes": nodes,
                       "perplexity": window_perplexity(engine().logits, windows)}  # fmt: skip
            except RuntimeError as exc:
                error = str(exc).strip().splitlines()[-1].replace(str(work), "<work>")[:300]
                failed.append({"system": system, "format": fmt, "error": error})
                print(json.dumps(failed[-1]), flush=True)
                return
            path = files[0] if runtime == "llama.cpp" else files[0].parent
            add(row, lambda: anchor_speed_in_subprocess(runtime, path, prompt, speed_args))

        for symmetric in (True, False):
            kind = "symmetric" if symmetric else "asymmetric"
            system = "onnxruntime-genai int4" + ("" if symmetric else " asym")
            try:
                folder = build_genai(Path(base.path), work / f"genai-int4-{kind}", symmetric, threads)
            except AnchorFailed as exc:
                failed.append({"system": system, "format": f"onnx int4 ({kind})", "error": str(exc)[-300:]})
                continue
            nodes = graph_nodes(onnx.load(str(folder / "model.onnx"), load_external_data=False))
            anchor(system, f"onnx int4 (model builder, {kind})", onnx_files(folder / "model.onnx"), "genai",
                   lambda folder=folder: GenAI(folder, params.eval.window), nodes)  # fmt: skip

        anchor("llama.cpp Q4_1", "gguf Q4_1 (the shipped file)", [shipped_gguf], "llama.cpp",
               lambda: LlamaCpp(shipped_gguf, params.eval.window, threads, all_logits=True))  # fmt: skip
        for type_name in args.llama_types:
            try:
                gguf = quantize_gguf(shipped_gguf, work / f"model-{type_name}.gguf", type_name, threads)
            except AnchorFailed as exc:
                failed.append({"system": f"llama.cpp {type_name}", "format": f"gguf {type_name}", "error": str(exc)})
                continue
            anchor(f"llama.cpp {type_name}", f"gguf {type_name}", [gguf], "llama.cpp",
                   lambda gguf=gguf: LlamaCpp(gguf, params.eval.window, threads, all_logits=True))  # fmt: skip

        # 2. time them in rounds, every system once a round: a shared machine's speed drifts over minutes, and
        # interleaving spreads that drift over all systems alike instead of favouring whichever ran in a calm spell
        timings: dict[str, list[dict[str, Any]]] = {row["system"]: [] for row in rows}
        for round_index in range(args.rounds):
            for row in list(rows):
                try:
                    timings[row["system"]].append(timers[row["system"]]())
                except AnchorFailed as exc:
                    failed.append({"system": row["system"], "format": row["format"], "error": str(exc)})
                    rows.remove(row)
            print(f"timing round {round_index + 1}/{args.rounds} done", flush=True)
        for row in rows:
            runs = timings[row["system"]]
            row["prefill_ms"] = statistics.median(r["prefill_ms"] for r in runs)
            row["decode_tokens_per_s"] = statistics.median(r["decode_tokens_per_s"] for r in runs)
            row["decode_tokens_per_s_rounds"] = [round(r["decode_tokens_per_s"], 1) for r in runs]
            row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base_row = rows[0]
    for row in rows:
        row["bytes_ratio"] = row["bytes"] / base_row["bytes"]
        row["perplexity_ratio"] = row["perplexity"] / base_row["perplexity"]
    result = {"machine": machine(onnxruntime.__version__, torch.__version__),
              "settings": {"threads": threads, "eval_tokens": scored, "windows": len(windows),
                           "window": params.eval.window, "prompt_tokens": len(prompt),
                           "decode_tokens": speed.decode_tokens, "repeats": speed.repeats, "rounds": args.rounds,
                           "accuracy_level": params.export.accuracy_level, "recipe": params.recipe},
              "rows": rows, "failed": failed, "goal": goal(rows)}  # fmt: skip
    write(result, args.out)


def goal(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goal, read off the rows: lower perplexity than every anchor no larger than the default bundle
    (an anchor with more bytes buys its quality with size), and >= 0.8x the decode speed of the fastest anchor."""
    default = next(r for r in rows if r["system"] == "llmpress default")
    anchors = [r for r in rows if not r["system"].startswith(("llmpress", "pytorch"))]
    no_larger = [r for r in anchors if r["bytes"] <= default["bytes"]]
    beaten_by = [r["system"] for r in no_larger if r["perplexity"] <= default["perplexity"]]
    fastest = max(anchors, key=lambda r: r["decode_tokens_per_s"])
    speed_ratio = default["decode_tokens_per_s"] / fastest["decode_tokens_per_s"]
    return {"anchors_no_larger": [r["system"] for r in no_larger], "anchors_no_larger_with_lower_or_equal_perplexity":
            beaten_by, "quality_met": not beaten_by, "fastest_anchor": fastest["system"],
            "decode_ratio_to_fastest": speed_ratio, "speed_met": speed_ratio >= 0.8}  # fmt: skip


def machine(ort_version: str, torch_version: str) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch_version,
            "onnxruntime": ort_version, "onnxruntime_genai": importlib.metadata.version("onnxruntime-genai"),
            "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
            "date": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "edge_anchors.json").write_text(json.dumps(result, indent=2) + "\n")
    m, s, g = result["machine"], result["settings"], result["goal"]
    default = next(r for r in result["rows"] if r["system"] == "llmpress default")
    lines = [
        "# Side by side: llmpress's edge bundle and what users would pick instead", "",
        f"{m['cpu']}, {m['cpus']} CPUs, {s['threads']} threads; torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
        f"onnxruntime-genai {m['onnxruntime_genai']}, llama-cpp-python {m['llama_cpp_python']} (built from source "
        f"here); {m['date']}. Perplexity on {s['eval_tokens']} held-out tokens ({s['windows']} windows of "
        f"{s['window']}, params.yaml protocol), the same token ids for every system, each scored from its own "
        f"runtime's logits. Speed at batch 1: prompt {s['prompt_tokens']} tokens, {s['decode_tokens']} greedy "
        f"decode steps, median of {s['repeats']} runs in a fresh child process (peak RSS is that process's), measured "
        f"{s['rounds']} times per system in interleaved rounds (median; the decode column lists every round). "
        f"Bytes: the files the runtime loads. Default recipe: {s['recipe']}, MatMulNBits accuracy level "
        f"{s['accuracy_level']}. `make bench-anchors` rewrites this file.", "",
        "| system | format | MB | bytes ratio | perplexity | ppl ratio | graph nodes | prefill (ms) "
        "| decode (tok/s): median (rounds) | peak RSS (MB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for r in result["rows"]:
        rounds = ", ".join(f"{v:.0f}" for v in r["decode_tokens_per_s_rounds"])
        lines.append(f"| {r['system']} | {r['format']} | {r['bytes'] / 1e6:.1f} | {r['bytes_ratio']:.3f} "
                     f"| {r['perplexity']:.3f} | {r['perplexity_ratio']:.3f} | {r.get('nodes') or '-'} "
                     f"| {r['prefill_ms']:.0f} "
                     f"| {r['decode_tokens_per_s']:.1f} ({rounds}) "
                     f"| {r['peak_rss_mb']:.0f} |")  # fmt: skip
    beaten = ", ".join(g["anchors_no_larger_with_lower_or_equal_perplexity"]) or "none"
    lines += [
        "", "## Goal: lower perplexity than every anchor at no more bytes, decode >= 0.8x the fastest anchor", "",
        f"- Anchors no larger than the default bundle ({default['bytes'] / 1e6:.1f} MB): "
        f"{', '.join(g['anchors_no_larger']) or 'none'}; of those with perplexity at or below its "
        f"{default['perplexity']:.3f}: {beaten}. Quality goal {'met' if g['quality_met'] else 'NOT met'}.",
        f"- Fastest anchor: {g['fastest_anchor']}; the default bundle decodes at {g['decode_ratio_to_fastest']:.2f}x "
        f"its speed. Speed goal {'met' if g['speed_met'] else 'NOT met'}.",
    ]  # fmt: skip
    if result["failed"]:
        lines += ["", "## Anchors that did not run", ""]
        lines += [f"- {f['system']} ({f['format']}): {f['error']}" for f in result["failed"]]
    (out / "edge_anchors.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
