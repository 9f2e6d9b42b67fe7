"""The base model's side of every evaluation, computed once and reused by every run that compresses it.

What the base model contributes to an evaluation - its perplexity, cloze accuracy, greedy generations, and the
distributions KL and top-1 agreement compare against - is a function of the base weights, the held-out text, the
pinned protocol and the code that measures it; no recipe changes it. `ensure_baseline` computes it once into a
folder named by a key over exactly those (`baseline_key`) and reads it back afterwards:

    metrics.json         perplexity, cloze accuracy, generations, sizes, and the key's parts
    hidden.safetensors   the base model's final hidden states on the perplexity windows, one tensor per batch
                         (tokens x hidden x 4 bytes: 36 MB for SmolLM2-135M on 16k tokens, 270 MB for a 7B model)

From the hidden states the base model's own head gives back its logits bit for bit (`llmpress.evaluate.logits`),
so a later run compares against the base model without running its decoder. Speed is not kept: latency is only
comparable when measured on the same machine in the same run, so every run measures the base model's again.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmpress.config import EvalParams
from llmpress.evaluate.agreement import base_pass
from llmpress.evaluate.cloze import build_examples, cloze_accuracy
from llmpress.evaluate.generate import greedy_generations
from llmpress.evaluate.repetition import repetition_rate, torch_continuations
from llmpress.files import atomic_folder
from llmpress.hashing import code_version, data_hash
from llmpress.progress import Progress, phase

log = logging.getLogger(__name__)

METRICS, HIDDEN = "metrics.json", "hidden.safetensors"


def baseline_key(base_sha256: str, eval_md5: str, params: EvalParams) -> str:
    """What a baseline is a function of: base weights, held-out text, protocol (speed aside) and llmpress's code."""
    protocol = params.model_dump(mode="json", exclude={"speed"})
    return data_hash({"base": base_sha256, "eval": eval_md5, "protocol": protocol, "code": code_version()})


def load_baseline(folder: str | Path, key: str) -> tuple[dict[str, Any], list[torch.Tensor]] | None:
    """(metrics, hidden states per batch) of the baseline in `folder` if it was made for `key`, else None."""
    folder = Path(folder)
    try:
        metrics = json.loads((folder / METRICS).read_text())
        if metrics.get("key") != key:
            return None
        tensors = load_file(folder / HIDDEN)
    except (OSError, ValueError, SafetensorError):  # missing, or not what we wrote: compute it again
        return None
    return metrics, [tensors[f"batch_{i}"] for i in range(len(tensors))]


def compute_baseline(base: torch.nn.Module, tokenizer, text: str, params: EvalParams, out_dir: str | Path,
                     key: str, sizes: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    """Evaluate the base model under the protocol and write the baseline folder (atomically)."""
    with Progress("baseline: perplexity (base)", "window") as progress:
        passed = base_pass(base, tokenizer, text, params, progress)
    examples = build_examples(text, params.cloze)
    with Progress("baseline: cloze (base)", "example") as progress:
        cloze = cloze_accuracy(base, tokenizer, examples, params.cloze, params.add_bos, progress)
    generations = greedy_generations(base, tokenizer, params.generation.prompts, params.generation.max_new_tokens)
    with phase("baseline: greedy continuations of held-out prompts (base)"):
        repetition = repetition_rate(partial(torch_continuations, base), tokenizer, text, params)
    metrics = {
        "key": key,
        "perplexity": passed.perplexity,
        "eval_tokens": passed.tokens,
        "cloze_accuracy": cloze,
        "cloze_examples": len(examples),
        "generations": generations,
        "repeated_ngram_rate": repetition,
        "parameters": sum(p.numel() for p in base.parameters()),
        **sizes,
    }
    with atomic_folder(out_dir) as tmp:
        save_file({f"batch_{i}": h.contiguous() for i, h in enumerate(passed.hidden)}, tmp / HIDDEN)
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2))
    log.info("baseline written to %s", out_dir)
    return metrics
