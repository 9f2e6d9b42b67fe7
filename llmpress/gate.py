"""The promotion gate: thresholds from `params.yaml` checked against measured metrics, computed once.

A check is `value OP threshold`. The verdict passes only if every configured check passes; a missing or
non-finite value fails its check (a NaN perplexity must never pass a `<=`). The report is written as JSON, logged
to MLflow, and the registry tags and aliases are derived from it, never recomputed elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from llmpress.config import GateParams


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    op: str  # "<=" or ">="
    threshold: float
    passed: bool
    note: str = ""

    @property
    def reason(self) -> str:
        shown = "missing" if self.value is None else f"{self.value:.6g}"
        return f"{self.name} = {shown}, required {self.op} {self.threshold:.6g}"


@dataclass(frozen=True)
class GateReport:
    passed: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [c.reason for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [asdict(c) | {"reason": c.reason} for c in self.checks]}


def _check(name: str, value: float | None, op: str, threshold: float) -> Check:
    ok = value is not None and math.isfinite(value)
    if ok:
        ok = value <= threshold if op == "<=" else value >= threshold
    return Check(name=name, value=value, op=op, threshold=threshold, passed=bool(ok))


def run_gate(metrics: dict[str, float], base: dict[str, float], params: GateParams,
             champion: dict[str, float] | None = None) -> GateReport:  # fmt: skip
    """Check `metrics` of the candidate against `params`, relative to `base` (the uncompressed model's metrics)
    and to `champion` (the current champion's, None when there is none yet)."""
    checks = []
    ppl = metrics.get("perplexity")
    if params.max_perplexity is not None:
        checks.append(_check("perplexity", ppl, "<=", params.max_perplexity))
    if params.max_perplexity_ratio is not None:
        base_ppl = base.get("perplexity")
        ratio = ppl / base_ppl if ppl is not None and base_ppl else None
        checks.append(_check("perplexity_ratio", ratio, "<=", params.max_perplexity_ratio))
    if params.min_sparsity is not None:
        checks.append(_check("sparsity", metrics.get("sparsity"), ">=", params.min_sparsity))
    if params.min_expert_tokens is not None and metrics.get("experts") is not None:  # dense models: nothing to check
        checks.append(_check("expert_min_tokens", metrics.get("expert_min_tokens"), ">=", params.min_expert_tokens))
    if params.max_kl_to_base is not None:
        checks.append(_check("kl_to_base", metrics.get("kl_to_base"), "<=", params.max_kl_to_base))
    if params.min_top1_agreement is not None:
        checks.append(_check("top1_agreement", metrics.get("top1_agreement"), ">=", params.min_top1_agreement))
    if params.min_cloze_ratio is not None:
        cloze = as_shipped(metrics, "cloze_accuracy")
        base_cloze = base.get("cloze_accuracy")
        ratio = cloze / base_cloze if cloze is not None and base_cloze else None
        checks.append(_check("cloze_ratio", ratio, ">=", params.min_cloze_ratio))
    if params.max_onnx_logit_diff is not None and "onnx_max_abs_diff" in metrics:
        checks.append(_onnx_parity(metrics, params))
    if params.onnx_greedy_identical and "onnx_greedy_identical" in metrics:
        checks.append(_check("onnx_greedy_identical", metrics["onnx_greedy_identical"], ">=", 1.0))
    checks += _bundle_checks(metrics, base, params)
    checks += _gguf_checks(metrics, base, params)
    if params.max_repetition_increase is not None:
        checks.append(_repetition(metrics, base, params.max_repetition_increase))
    if params.champion_max_perplexity_increase is not None:
        limit = 1.0 + params.champion_max_perplexity_increase
        if champion is None:
            # Explicit: the first candidate to pass the other checks becomes champion.
            checks.append(Check("perplexity_vs_champion", None, "<=", limit, True, "no champion yet"))
        else:
            champ = champion.get("perplexity")
            ratio = ppl / champ if ppl is not None and champ else None
            checks.append(_check("perplexity_vs_champion", ratio, "<=", limit))
    if params.champion_must_be_smaller_or_faster:
        checks.append(_smaller_or_faster(metrics, champion, params.champion_speed_margin))
    return GateReport(passed=all(c.passed for c in checks), checks=checks)


def _bundle_checks(metrics: dict[str, float], base: dict[str, float], params: GateParams) -> list[Check]:
    """The shipped graph's own numbers in onnxruntime against the base model: quality, size, speed."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    served = metrics.get("decode_speedup_b1") if metrics.get("runtime") == "ort" else None
    wanted = [  # name, op, threshold, value
        ("bundle_perplexity_ratio", "<=", params.max_bundle_perplexity_ratio,
         ratio(metrics.get("bundle_perplexity"), base.get("perplexity"))),
        ("bundle_bytes_ratio", "<=", params.max_bundle_bytes_ratio,
         ratio(metrics.get("bundle_bytes"), base.get("weights_bytes"))),
        ("bundle_decode_speedup", ">=", params.min_bundle_decode_speedup, served),
        ("bundle_kl_to_base", "<=", params.max_bundle_kl_to_base, metrics.get("bundle_kl_to_base")),
    ]  # fmt: skip
    checks = []
    for name, op, limit, value in wanted:
        if limit is None:
            continue
        if "bundle_perplexity" not in metrics:
            checks.append(Check(name, None, op, limit, True, "not checked: nothing exported (export.onnx is false)"))
        elif name == "bundle_decode_speedup" and "decode_speedup_b1" not in metrics:
            checks.append(Check(name, None, op, limit, True, "not checked: speed not measured (eval.speed.enabled)"))
        else:
            checks.append(_check(name, value, op, limit))
    return checks


def _gguf_checks(metrics: dict[str, float], base: dict[str, float], params: GateParams) -> list[Check]:
    """The GGUF's own numbers in llama.cpp against the base model in PyTorch. A GGUF that was written but could not
    be scored (llama-cpp-python absent) fails a configured check: nothing ships unmeasured."""
    base_ppl, base_speed = base.get("perplexity"), base.get("torch_b1_decode_tokens_per_s")
    ppl, speed = metrics.get("gguf_perplexity"), metrics.get("gguf_b1_decode_tokens_per_s")
    wanted = [("gguf_perplexity_ratio", "<=", params.max_gguf_perplexity_ratio,
               ppl / base_ppl if ppl is not None and base_ppl else None),
              ("gguf_decode_speedup", ">=", params.min_gguf_decode_speedup,
               speed / base_speed if speed is not None and base_speed else None)]  # fmt: skip
    checks = []
    for name, op, limit, value in wanted:
        if limit is None:
            continue
        if "gguf_bytes" not in metrics:
            checks.append(Check(name, None, op, limit, True, "not checked: no GGUF exported (export.formats)"))
        elif not metrics.get("gguf_scored"):
            checks.append(Check(name, None, op, limit, False, "the GGUF was not scored: llama-cpp-python is not "
                                "installed on the worker (`make llama-cpp`)"))  # fmt: skip
        elif name == "gguf_decode_speedup" and (speed is None or base_speed is None):
            checks.append(Check(name, None, op, limit, True, "not checked: speed not measured (eval.speed.enabled)"))
        else:
            checks.append(_check(name, value, op, limit))
    return checks


def as_shipped(metrics: dict[str, float], name: str) -> float | None:
    """The bundle's `bundle_<name>` when the graph that ships was scored (then the PyTorch model's is not measured,
    `steps.evaluate`), else the model's `name`."""
    return metrics.get(f"bundle_{name}", metrics.get(name))


def _repetition(metrics: dict[str, float], base: dict[str, float], limit: float) -> Check:
    """How much more the model repeats itself than the base model in greedy continuations of held-out prompts:
    the shipped graph's continuations when there is one, else the PyTorch model's."""
    rate = as_shipped(metrics, "repeated_ngram_rate")
    base_rate = base.get("repeated_ngram_rate")
    increase = rate - base_rate if rate is not None and base_rate is not None else None
    return _check("repetition_increase", increase, "<=", limit)


def _onnx_parity(metrics: dict[str, float], params: GateParams) -> Check:
    """ONNX's max logit difference within the absolute bound - unless PyTorch itself moves by more than that bound
    under one-ulp input noise (a model rounding its activations, see `llmpress.export.onnx`): no implementation
    can then meet it, and ONNX's mean difference is held to `onnx_noise_factor` times the floor's mean instead."""
    bound = params.max_onnx_logit_diff
    floor_max = metrics.get("onnx_noise_max_abs_diff")
    if floor_max is None or not math.isfinite(floor_max) or floor_max <= bound:
        return _check("onnx_max_abs_diff", metrics["onnx_max_abs_diff"], "<=", bound)
    floor_mean = metrics.get("onnx_noise_mean_abs_diff", math.nan)
    check = _check("onnx_mean_abs_diff", metrics.get("onnx_mean_abs_diff"), "<=", params.onnx_noise_factor * floor_mean)
    note = (f"PyTorch's own one-ulp noise floor (max {floor_max:.3g}, mean {floor_mean:.3g}) exceeds the bound "
            f"{bound:g}: held to {params.onnx_noise_factor:g}x the floor's mean")  # fmt: skip
    return Check(check.name, check.value, check.op, check.threshold, check.passed, note)


SPEED_KEYS = ("ort_b1_decode_tokens_per_s", "torch_b1_decode_tokens_per_s")


def decode_speed(metrics: dict[str, Any]) -> float | None:
    """Batch-1 decode tokens/s of what a run ships: the exported graph in onnxruntime, else the PyTorch model."""
    return next((metrics[k] for k in SPEED_KEYS if metrics.get(k)), None)


def _smaller_or_faster(metrics: dict[str, float], champion: dict[str, float] | None, margin: float) -> Check:
    """Passes if the bundle (else the weights) is smaller than the champion's, or decode - each in the runtime it
    ships in - is faster by more than `margin`.
    The value is the better of the two gains (size ratio champion/candidate, speed ratio candidate/champion)."""
    if champion is None:
        return Check("smaller_or_faster_than_champion", None, ">", 1.0, True, "no champion yet")
    gains = []
    # sizes of what ships when both shipped a bundle, else of the PyTorch weights
    size_key = "bundle_bytes" if metrics.get("bundle_bytes") and champion.get("bundle_bytes") else "weights_bytes"
    if metrics.get(size_key) and champion.get(size_key):
        gains.append((champion[size_key] / metrics[size_key], 1.0))
    speed, champion_speed = decode_speed(metrics), decode_speed(champion)
    if speed and champion_speed:
        gains.append((speed / champion_speed, 1.0 + margin))
    if not gains:
        return Check("smaller_or_faster_than_champion", None, ">", 1.0, False, "size and speed not measured")
    passed = any(gain > needed for gain, needed in gains if math.isfinite(gain))
    best = max(gain for gain, _ in gains)
    return Check("smaller_or_faster_than_champion", best, ">", 1.0, passed, f"faster means > {1 + margin:g}x")
