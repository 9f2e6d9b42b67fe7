"""The model card: one Markdown page per registered version, what a reviewer reads in the MLflow UI.

It is set as the model version's description (the registry page renders it) and logged as `model_card.md`.
Everything in it comes from the run's measurements and the gate report; nothing is recomputed here.
"""

from __future__ import annotations

from typing import Any

from llmpress.gate import GateReport

ROWS = [
    ("perplexity", "perplexity (held-out)", "{:.3f}"),
    ("kl_to_base", "KL to base (nats/token)", "{:.4f}"),
    ("top1_agreement", "top-1 agreement with base", "{:.4f}"),
    ("cloze_accuracy", "cloze accuracy", "{:.3f}"),
    ("repeated_ngram_rate", "repeated n-gram share of greedy continuations", "{:.3f}"),
    ("sparsity", "sparsity of targeted layers", "{:.4f}"),
    ("weights_bytes", "weights on disk", "bytes"),
    ("torch_b1_prefill_ms", "PyTorch prefill, batch 1 (ms)", "{:.1f}"),
    ("torch_b1_decode_tokens_per_s", "PyTorch decode, batch 1 (tokens/s)", "{:.1f}"),
    ("torch_b4_decode_tokens_per_s", "PyTorch decode, batch 4 (tokens/s)", "{:.1f}"),
    ("ort_b1_prefill_ms", "ONNX Runtime prefill, batch 1 (ms)", "{:.1f}"),
    ("ort_b1_decode_tokens_per_s", "ONNX Runtime decode, batch 1 (tokens/s)", "{:.1f}"),
    ("ort_b4_decode_tokens_per_s", "ONNX Runtime decode, batch 4 (tokens/s)", "{:.1f}"),
    ("decode_speedup_b1", "decode speed-up over base PyTorch, batch 1", "{:.2f}x"),
    ("decode_speedup_b4", "decode speed-up over base PyTorch, batch 4", "{:.2f}x"),
    ("torch_peak_rss_mb", "peak memory, PyTorch generating (MB)", "{:.0f}"),
    ("ort_peak_rss_mb", "peak memory, onnxruntime generating (MB)", "{:.0f}"),
    ("onnx_max_abs_diff", "ONNX max abs logit diff (prefill + decode)", "{:.2e}"),
    ("onnx_mean_abs_diff", "ONNX mean abs logit diff (prefill + decode)", "{:.2e}"),
    ("onnx_noise_max_abs_diff", "PyTorch vs itself under one-ulp input noise, max", "{:.2e}"),
    ("onnx_noise_mean_abs_diff", "PyTorch vs itself under one-ulp input noise, mean", "{:.2e}"),
    ("onnx_greedy_identical", "ONNX greedy decode identical to PyTorch (1 = yes)", "{:.0f}"),
    ("bundle_precision", "bundle: what its weight matmuls hold", "{}"),
    ("bundle_bytes", "bundle: graph and weights on disk", "bytes"),
    ("bundle_perplexity", "bundle: perplexity in onnxruntime", "{:.3f}"),
    ("bundle_kl_to_base", "bundle: KL to base (nats/token)", "{:.4f}"),
    ("bundle_top1_agreement", "bundle: top-1 agreement with base", "{:.4f}"),
    ("bundle_cloze_accuracy", "bundle: cloze accuracy in onnxruntime", "{:.3f}"),
    ("bundle_max_abs_diff", "bundle: max abs logit diff to PyTorch compressed", "{:.2e}"),
    ("bundle_greedy_identical", "bundle: greedy decode identical to PyTorch compressed (1 = yes)", "{:.0f}"),
    ("bundle_repeated_ngram_rate", "bundle: repeated n-gram share of greedy continuations", "{:.3f}"),
    ("bundle_accuracy_level", "bundle: onnxruntime MatMulNBits accuracy level", "{}"),
    ("gguf_bytes", "GGUF for llama.cpp on disk", "bytes"),
    ("gguf_perplexity", "GGUF: perplexity in llama.cpp", "{:.3f}"),
    ("gguf_top1_agreement", "GGUF: top-1 agreement with PyTorch compressed (parity tokens)", "{:.4f}"),
    ("gguf_b1_decode_tokens_per_s", "GGUF: llama.cpp decode, batch 1 (tokens/s)", "{:.1f}"),
    ("gguf_requantized_tensors", "GGUF: tensors re-rounded (layout not a GGUF type)", "{:.0f}"),
]


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    if spec == "bytes":
        return f"{value / 2**20:.1f} MiB"
    return spec.format(value)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def model_card(name: str, version: str, run_id: str, lineage: dict[str, str], metrics: dict[str, Any],
               base: dict[str, Any], champion: dict[str, Any] | None, champion_version: str | None,
               report: GateReport, generations: list[dict[str, str]], onnx_artifact: str | None) -> str:  # fmt: skip
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        f"# {name} v{version}",
        "",
        f"**Gate: {verdict}**"
        + ("" if report.passed else " — " + "; ".join(report.failures))
        + f". Recipe `{lineage.get('recipe')}` on `{lineage.get('base_model')}`.",
        "",
        "## Metrics",
        "",
        f"| metric | base | this version | champion{f' (v{champion_version})' if champion_version else ''} |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, label, spec in ROWS:
        if key not in metrics:
            continue
        base_value = {"kl_to_base": 0.0, "top1_agreement": 1.0}.get(key, base.get(key))
        lines.append(
            f"| {label} | {_fmt(base_value, spec)} | {_fmt(metrics.get(key), spec)} | "
            f"{_fmt((champion or {}).get(key), spec) if champion else 'none yet'} |"
        )
    lines += ["", "## Gate report", "", "| check | value | required | result |", "| --- | ---: | --- | --- |"]
    for check in report.checks:
        value = "–" if check.value is None else f"{check.value:.6g}"
        result = ("pass" if check.passed else "**FAIL**") + (f" ({check.note})" if check.note else "")
        lines.append(f"| {check.name} | {value} | {check.op} {check.threshold:.6g} | {result} |")
    lines += ["", "## Generations (greedy)", "", "| prompt | base | this version |", "| --- | --- | --- |"]
    for g in generations:
        lines.append(f"| {_cell(g['prompt'])} | {_cell(g['base'])} | {_cell(g['compressed'])} |")
    lines += ["", "## Lineage", "", "| | |", "| --- | --- |"]
    lines += [f"| {key} | `{value}` |" for key, value in lineage.items()]
    lines.append(f"| MLflow run | `{run_id}` |")
    lines += [
        "",
        "## How to use it",
        "",
        "```python",
        "import mlflow",
        f'lm = mlflow.pyfunc.load_model("models:/{name}/{version}")  # or models:/{name}@champion',
        'print(lm.predict(["The bushfire near"]))',
        f'folder = mlflow.artifacts.download_artifacts("models:/{name}/{version}")',
        "# folder/artifacts/hf is a Hugging Face folder: AutoModelForCausalLM.from_pretrained(...) loads it",
        "```",
    ]
    if onnx_artifact:
        lines += [
            "",
            f"ONNX (logits for a whole sequence, inputs `input_ids` and `attention_mask`): run artifact "
            f'`{onnx_artifact}`; `mlflow.artifacts.download_artifacts(run_id="{run_id}", '
            f'artifact_path="{onnx_artifact}")`, then `onnxruntime.InferenceSession(path)`.',
        ]
    return "\n".join(lines) + "\n"
