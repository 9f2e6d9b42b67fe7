"""Where the repetition gate's threshold comes from: how much more recipes loop than the base model.

    .venv/bin/python benchmarks/repetition.py [--recipes recipes/edge-int4.yaml ...] [--out benchmarks/results]

For the base model and each recipe (compressed here with params.yaml's calibration set): perplexity under the
pinned protocol, and the repeated n-gram rate of greedy continuations of the held-out prompts
(`llmpress.evaluate.repetition`, params.yaml `eval.repetition`), with its increase over the base model's, and the
first continuations to read. `gate.max_repetition_increase` (README "Why the gate checks repetition") is set
between the recipes people ship and those whose text collapses into loops.

Writes repetition.json ({"machine", "settings", "rows": [{"recipe", "perplexity", "perplexity_ratio",
"repeated_ngram_rate", "increase", "examples"}]}) and repetition.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmpress.compress import compress_  # noqa: E402
from llmpress.config import load_params, load_recipe  # noqa: E402
from llmpress.data import calibration_windows  # noqa: E402
from llmpress.evaluate.perplexity import perplexity  # noqa: E402
from llmpress.evaluate.repetition import repeated_ngram_rate, text_prompts, torch_continuations  # noqa: E402
from llmpress.sources import load_model, load_tokenizer, resolve  # noqa: E402

DEFAULT_RECIPES = ["recipes/edge-int4.yaml", "recipes/gptq-w4g128.yaml", "recipes/sparsegpt-50.yaml",
                   "recipes/wanda-50.yaml", "recipes/wanda-2of4.yaml", "recipes/magnitude-50.yaml"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=DEFAULT_RECIPES)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    rep = params.eval.repetition
    base = resolve("default", REPO / "models")
    tokenizer = load_tokenizer(base.path)
    text = (REPO / "data" / "eval.txt").read_text(encoding="utf-8")
    prompts = text_prompts(tokenizer, text, params.eval)
    windows = calibration_windows(tokenizer, REPO / "data" / "calibration.jsonl", params.data.seq_len,
                                  params.eval.add_bos)[: params.data.calibration_samples]  # fmt: skip

    def measure(name: str, model: torch.nn.Module) -> dict:
        continuations = torch_continuations(model, prompts, rep.new_tokens, tokenizer.eos_token_id)
        row = {"recipe": name, "perplexity": perplexity(model, tokenizer, text, params.eval).perplexity,
               "repeated_ngram_rate": repeated_ngram_rate(continuations, rep.ngram),
               "examples": [tokenizer.decode(c) for c in continuations[:3]]}  # fmt: skip
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
        return row

    rows = [measure("base (dense)", load_model(base.path))]
    for recipe_path in args.recipes:
        recipe = load_recipe(REPO / recipe_path)
        model = load_model(base.path)
        compress_(model, recipe, windows, batch_size=params.compress.batch_size)
        rows.append(measure(recipe.name, model))
        del model
    for row in rows:
        row["perplexity_ratio"] = row["perplexity"] / rows[0]["perplexity"]
        row["increase"] = row["repeated_ngram_rate"] - rows[0]["repeated_ngram_rate"]
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    result = {
        "machine": {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "date": datetime.now(UTC).isoformat(timespec="seconds")},
        "settings": rep.model_dump() | {"threshold": params.gate.max_repetition_increase},
        "rows": rows,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "repetition.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "repetition.md").write_text(markdown(result))


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    limit = s["threshold"]
    lines = [
        "# Repetition of greedy continuations, by recipe",
        "",
        f"{m['cpu']}, {m['cpus']} CPUs, torch {m['torch']}, {m['date']}. `python3 benchmarks/repetition.py` "
        "rewrites this file.",
        "",
        f"{s['prompts']} held-out prompts of {s['prompt_tokens']} tokens, {s['new_tokens']} greedy tokens each; "
        f"rate = share of repeated {s['ngram']}-grams. Gate: increase over the base at most {limit}.",
        "",
        "| recipe | perplexity | x base | repeated rate | increase | gate | first continuation |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in result["rows"]:
        verdict = "-" if limit is None else ("pass" if r["increase"] <= limit else "**fail**")
        example = " ".join(r["examples"][0].split())[:90].replace("|", "\\|")
        lines.append(f"| {r['recipe']} | {r['perplexity']:.2f} | {r['perplexity_ratio']:.2f} | "
                     f"{r['repeated_ngram_rate']:.3f} | {r['increase']:+.3f} | {verdict} | {example} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
