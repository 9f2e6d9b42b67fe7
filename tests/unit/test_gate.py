from __future__ import annotations

import json
import math

import pytest

from llmpress.config import GateParams
from llmpress.gate import Check, run_gate

NONE = {
    "max_perplexity": None,
    "max_perplexity_ratio": None,
    "min_sparsity": None,
    "max_onnx_logit_diff": None,
    "champion_max_perplexity_increase": None,
    "max_bundle_perplexity_ratio": None,
    "max_bundle_bytes_ratio": None,
    "min_bundle_decode_speedup": None,
    "max_repetition_increase": None,
    "max_gguf_perplexity_ratio": None,
}


def _params(**kwargs) -> GateParams:
    return GateParams(**(NONE | kwargs))


def _only_check(report, name: str) -> Check:
    checks = [c for c in report.checks if c.name == name]
    assert len(checks) == 1
    return checks[0]


@pytest.mark.parametrize(("ppl", "passed"), [(10.0, True), (12.0, True), (12.000001, False), (50.0, False)])
def test_max_perplexity(ppl: float, passed: bool) -> None:
    report = run_gate({"perplexity": ppl}, {}, _params(max_perplexity=12.0))
    assert report.passed is passed
    check = _only_check(report, "perplexity")
    assert (check.value, check.op, check.threshold, check.passed) == (ppl, "<=", 12.0, passed)


@pytest.mark.parametrize(
    ("ppl", "base", "ratio", "passed"),
    [(30.0, 20.0, 1.5, True), (32.0, 20.0, 1.6, True), (33.0, 20.0, 1.65, False), (10.0, 20.0, 0.5, True)],
)
def test_perplexity_ratio(ppl: float, base: float, ratio: float, passed: bool) -> None:
    report = run_gate({"perplexity": ppl}, {"perplexity": base}, _params(max_perplexity_ratio=1.6))
    check = _only_check(report, "perplexity_ratio")
    assert check.value == pytest.approx(ratio, rel=1e-12)
    assert check.passed is passed
    assert report.passed is passed


@pytest.mark.parametrize(("sparsity", "passed"), [(0.5, True), (0.49, False), (0.7, True)])
def test_min_sparsity(sparsity: float, passed: bool) -> None:
    report = run_gate({"sparsity": sparsity}, {}, _params(min_sparsity=0.5))
    check = _only_check(report, "sparsity")
    assert (check.op, check.passed) == (">=", passed)
    assert report.passed is passed


@pytest.mark.parametrize(("diff", "passed"), [(1e-4, True), (1e-3, True), (2e-3, False)])
def test_onnx_logit_diff(diff: float, passed: bool) -> None:
    report = run_gate({"onnx_max_abs_diff": diff}, {}, _params(max_onnx_logit_diff=1e-3))
    assert _only_check(report, "onnx_max_abs_diff").passed is passed
    assert report.passed is passed


@pytest.mark.parametrize(
    ("floor_max", "floor_mean", "onnx_max", "onnx_mean", "name", "passed"),
    [
        (5e-5, 6e-6, 2e-4, 1e-5, "onnx_max_abs_diff", True),  # weights-only: floor far below the bound
        (5e-5, 6e-6, 2e-3, 1e-5, "onnx_max_abs_diff", False),
        (4.8, 0.36, 2.66, 0.335, "onnx_mean_abs_diff", True),  # W8A8 as measured on SmolLM2-135M
        (4.8, 0.36, 2.66, 0.60, "onnx_mean_abs_diff", False),  # beyond 1.5x the floor's mean
        (4.8, 0.36, 2.66, math.nan, "onnx_mean_abs_diff", False),
    ],
)
def test_onnx_parity_judged_against_noise_floor_only_when_it_exceeds_the_bound(
    floor_max: float, floor_mean: float, onnx_max: float, onnx_mean: float, name: str, passed: bool
) -> None:
    metrics = {"onnx_max_abs_diff": onnx_max, "onnx_mean_abs_diff": onnx_mean,
               "onnx_noise_max_abs_diff": floor_max, "onnx_noise_mean_abs_diff": floor_mean}  # fmt: skip
    check = _only_check(run_gate(metrics, {}, _params(max_onnx_logit_diff=1e-3, onnx_noise_factor=1.5)), name)
    assert check.passed is passed
    if name == "onnx_mean_abs_diff":
        assert check.threshold == pytest.approx(1.5 * floor_mean)
        assert "noise floor" in check.note


def test_onnx_check_skipped_when_metric_absent() -> None:
    report = run_gate({"perplexity": 10.0}, {}, _params(max_onnx_logit_diff=1e-3))
    assert report.checks == []
    assert report.passed is True


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_perplexity_fails(bad: float) -> None:
    report = run_gate({"perplexity": bad}, {"perplexity": 10.0}, _params(max_perplexity=1e9, max_perplexity_ratio=1e9))
    assert report.passed is False
    assert not _only_check(report, "perplexity").passed
    assert not _only_check(report, "perplexity_ratio").passed
    assert report.failures[0].startswith("perplexity = ")
    assert "required <= 1e+09" in report.failures[0]


def test_nan_base_perplexity_fails_ratio() -> None:
    report = run_gate({"perplexity": 10.0}, {"perplexity": math.nan}, _params(max_perplexity_ratio=1.6))
    assert report.passed is False


@pytest.mark.parametrize(
    ("metrics", "base", "params", "name"),
    [
        ({}, {}, {"max_perplexity": 10.0}, "perplexity"),
        ({}, {"perplexity": 10.0}, {"max_perplexity_ratio": 1.6}, "perplexity_ratio"),
        ({"perplexity": 10.0}, {}, {"max_perplexity_ratio": 1.6}, "perplexity_ratio"),
        ({"perplexity": 10.0}, {"perplexity": 0.0}, {"max_perplexity_ratio": 1.6}, "perplexity_ratio"),
        ({}, {}, {"min_sparsity": 0.5}, "sparsity"),
    ],
)
def test_missing_value_fails(metrics: dict, base: dict, params: dict, name: str) -> None:
    report = run_gate(metrics, base, _params(**params))
    assert report.passed is False
    check = _only_check(report, name)
    assert check.value is None and not check.passed
    assert report.failures == [f"{name} = missing, required {check.op} {check.threshold:.6g}"]


def test_none_thresholds_are_skipped() -> None:
    report = run_gate({"perplexity": math.nan, "sparsity": 0.0, "onnx_max_abs_diff": 99.0}, {}, _params())
    assert report.checks == []
    assert report.passed is True
    assert report.failures == []


def test_all_checks_and_failures_name_each_check() -> None:
    params = _params(max_perplexity=20.0, max_perplexity_ratio=1.5, min_sparsity=0.5, max_onnx_logit_diff=1e-3)
    metrics = {"perplexity": 40.0, "sparsity": 0.25, "onnx_max_abs_diff": 0.01}
    report = run_gate(metrics, {"perplexity": 20.0}, params)
    assert [c.name for c in report.checks] == ["perplexity", "perplexity_ratio", "sparsity", "onnx_max_abs_diff"]
    assert report.passed is False
    assert report.failures == [
        "perplexity = 40, required <= 20",
        "perplexity_ratio = 2, required <= 1.5",
        "sparsity = 0.25, required >= 0.5",
        "onnx_max_abs_diff = 0.01, required <= 0.001",
    ]


def test_one_failure_fails_the_gate_and_only_it_is_listed() -> None:
    params = _params(max_perplexity=20.0, max_perplexity_ratio=1.5, min_sparsity=0.5)
    report = run_gate({"perplexity": 15.0, "sparsity": 0.4}, {"perplexity": 12.0}, params)
    assert report.passed is False
    assert report.failures == ["sparsity = 0.4, required >= 0.5"]


def test_default_gate_params_and_to_dict() -> None:
    measured = {"perplexity": 15.0, "onnx_max_abs_diff": 2e-4, "repeated_ngram_rate": 0.2}
    report = run_gate(measured, {"perplexity": 10.0, "repeated_ngram_rate": 0.12}, GateParams())
    assert report.passed is True
    data = report.to_dict()
    json.dumps(data)  # serialisable as written to disk
    assert data["passed"] is True
    by_name = {c["name"]: c for c in data["checks"]}
    bundle = {"bundle_perplexity_ratio", "bundle_bytes_ratio", "bundle_decode_speedup"}  # on by default
    on = {"perplexity_ratio", "onnx_max_abs_diff", "perplexity_vs_champion", "repetition_increase"}
    assert set(by_name) == on | bundle | {"gguf_perplexity_ratio"}
    assert by_name["gguf_perplexity_ratio"]["passed"] and "no GGUF exported" in by_name["gguf_perplexity_ratio"]["note"]
    assert by_name["repetition_increase"]["value"] == pytest.approx(0.08) and by_name["repetition_increase"]["passed"]
    assert all(by_name[name]["note"].startswith("not checked: nothing exported") for name in bundle)
    assert by_name["perplexity_vs_champion"]["note"] == "no champion yet"
    assert by_name["perplexity_ratio"]["value"] == pytest.approx(1.5)
    assert by_name["perplexity_ratio"]["threshold"] == 1.6
    assert by_name["perplexity_ratio"]["reason"] == "perplexity_ratio = 1.5, required <= 1.6"


@pytest.mark.parametrize(
    ("metrics", "base", "params", "name", "value", "passed"),
    [
        ({"kl_to_base": 0.2}, {}, {"max_kl_to_base": 0.25}, "kl_to_base", 0.2, True),
        ({"kl_to_base": 0.3}, {}, {"max_kl_to_base": 0.25}, "kl_to_base", 0.3, False),
        ({"top1_agreement": 0.8}, {}, {"min_top1_agreement": 0.75}, "top1_agreement", 0.8, True),
        ({"top1_agreement": 0.7}, {}, {"min_top1_agreement": 0.75}, "top1_agreement", 0.7, False),
        ({"cloze_accuracy": 0.38}, {"cloze_accuracy": 0.40}, {"min_cloze_ratio": 0.95}, "cloze_ratio", 0.95, True),
        ({"cloze_accuracy": 0.30}, {"cloze_accuracy": 0.40}, {"min_cloze_ratio": 0.95}, "cloze_ratio", 0.75, False),
        ({"cloze_accuracy": 0.30}, {"cloze_accuracy": 0.0}, {"min_cloze_ratio": 0.95}, "cloze_ratio", None, False),
        ({}, {}, {"max_kl_to_base": 0.25}, "kl_to_base", None, False),
    ],
)
def test_agreement_and_cloze_checks(metrics, base, params, name, value, passed) -> None:
    report = run_gate(metrics, base, _params(**params))
    check = _only_check(report, name)
    assert check.passed is passed and report.passed is passed
    assert check.value == (pytest.approx(value) if value is not None else None)


def test_champion_relative_check() -> None:
    params = _params(champion_max_perplexity_increase=0.05)
    first = run_gate({"perplexity": 40.0}, {}, params, champion=None)
    check = _only_check(first, "perplexity_vs_champion")
    assert first.passed and check.passed and check.value is None and check.note == "no champion yet"
    better = run_gate({"perplexity": 41.0}, {}, params, champion={"perplexity": 40.0})
    assert better.passed and _only_check(better, "perplexity_vs_champion").value == pytest.approx(1.025)
    worse = run_gate({"perplexity": 43.0}, {}, params, champion={"perplexity": 40.0})
    assert not worse.passed and "perplexity_vs_champion" in worse.failures[0]
    broken = run_gate({"perplexity": 41.0}, {}, params, champion={"perplexity": float("nan")})
    assert not broken.passed


def test_smaller_or_faster_than_champion() -> None:
    params = _params(champion_must_be_smaller_or_faster=True, champion_speed_margin=0.05)
    champion = {"weights_bytes": 1000.0, "torch_b1_decode_tokens_per_s": 10.0}
    first = run_gate({"weights_bytes": 1000.0}, {}, params, None)
    assert first.passed and first.checks[0].note == "no champion yet"
    smaller = run_gate({"weights_bytes": 500.0, "torch_b1_decode_tokens_per_s": 9.0}, {}, params, champion)
    assert smaller.passed and smaller.checks[0].value == pytest.approx(2.0)
    faster = run_gate({"weights_bytes": 1000.0, "torch_b1_decode_tokens_per_s": 11.0}, {}, params, champion)
    assert faster.passed
    noise = run_gate({"weights_bytes": 1000.0, "torch_b1_decode_tokens_per_s": 10.4}, {}, params, champion)
    assert not noise.passed  # 4 % faster is within the margin: not faster
    unmeasured = run_gate({}, {}, params, champion)
    assert not unmeasured.passed and unmeasured.checks[0].note == "size and speed not measured"
    # both shipped bundles: their bytes decide, not the PyTorch folders' (packed codes are not what ships)
    shipped = champion | {"bundle_bytes": 100.0}
    bigger_bundle = run_gate({"weights_bytes": 500.0, "bundle_bytes": 120.0, "torch_b1_decode_tokens_per_s": 9.0}, {},
                             params, shipped)  # fmt: skip
    assert not bigger_bundle.passed  # 100/120 smaller, 0.9x as fast: neither
    smaller_bundle = run_gate({"weights_bytes": 2000.0, "bundle_bytes": 80.0}, {}, params, shipped)
    assert smaller_bundle.passed and smaller_bundle.checks[0].value == pytest.approx(1.25)


BUNDLE = {"bundle_perplexity": 33.0, "bundle_bytes": 100e6, "bundle_kl_to_base": 0.05, "decode_speedup_b1": 3.2,
          "runtime": "ort"}  # fmt: skip
BASE = {"perplexity": 30.0, "weights_bytes": 500e6}


@pytest.mark.parametrize(
    ("limits", "failing"),
    [
        ({"max_bundle_perplexity_ratio": 1.1, "max_bundle_bytes_ratio": 0.2, "min_bundle_decode_speedup": 3.2}, []),
        ({"max_bundle_perplexity_ratio": 1.09}, ["bundle_perplexity_ratio"]),
        ({"max_bundle_bytes_ratio": 0.19}, ["bundle_bytes_ratio"]),
        ({"min_bundle_decode_speedup": 3.3}, ["bundle_decode_speedup"]),
        ({"max_bundle_kl_to_base": 0.04, "max_bundle_bytes_ratio": 0.1}, ["bundle_bytes_ratio", "bundle_kl_to_base"]),
    ],
)
def test_the_bundle_is_gated_on_its_own_numbers(limits: dict, failing: list[str]) -> None:
    report = run_gate({"perplexity": 31.0} | BUNDLE, BASE, _params(**limits))
    assert sorted(c.name for c in report.checks if not c.passed) == failing
    assert report.passed is (not failing)
    assert all(c.value is not None for c in report.checks)


def test_bundle_checks_say_why_they_are_not_checked() -> None:
    limits = {"max_bundle_perplexity_ratio": 1.1, "min_bundle_decode_speedup": 2.0}
    report = run_gate({"perplexity": 31.0}, BASE, _params(**limits))  # nothing exported
    assert report.passed and all("nothing exported" in c.note for c in report.checks)
    no_speed = {k: v for k, v in BUNDLE.items() if k not in ("decode_speedup_b1", "runtime")}
    check = _only_check(run_gate(no_speed, BASE, _params(**limits)), "bundle_decode_speedup")
    assert check.passed and "speed not measured" in check.note
    # a bundle whose perplexity is missing or NaN fails
    nan = BUNDLE | {"bundle_perplexity": math.nan}
    assert not _only_check(run_gate(nan, BASE, _params(**limits)), "bundle_perplexity_ratio").passed
    # the speed-up that counts is the served runtime's: a PyTorch-only measurement is not the bundle's
    torch_only = BUNDLE | {"runtime": "torch"}
    assert not _only_check(run_gate(torch_only, BASE, _params(**limits)), "bundle_decode_speedup").passed


def test_gguf_checks_not_checked_without_a_gguf_and_failed_when_unscored() -> None:
    params = _params(max_gguf_perplexity_ratio=1.3, min_gguf_decode_speedup=3.0)
    base = {"perplexity": 30.0, "torch_b1_decode_tokens_per_s": 20.0}
    absent = run_gate({"perplexity": 31.0}, base, params)
    assert absent.passed and {c.name for c in absent.checks} == {"gguf_perplexity_ratio", "gguf_decode_speedup"}
    assert all("no GGUF exported" in c.note for c in absent.checks)
    # written, but llama-cpp-python was not there to score it: nothing unmeasured passes
    unscored = run_gate({"perplexity": 31.0, "gguf_bytes": 10, "gguf_scored": 0.0}, base, params)
    assert not unscored.passed
    assert all(not c.passed and "not scored" in c.note for c in unscored.checks)
    scored = {"perplexity": 31.0, "gguf_bytes": 10, "gguf_scored": 1.0, "gguf_perplexity": 36.0,
              "gguf_b1_decode_tokens_per_s": 100.0}  # fmt: skip
    report = run_gate(scored, base, params)
    assert _only_check(report, "gguf_perplexity_ratio").value == pytest.approx(1.2)
    assert _only_check(report, "gguf_decode_speedup").value == pytest.approx(5.0)
    assert report.passed
    worse = run_gate(scored | {"gguf_perplexity": 40.0, "gguf_b1_decode_tokens_per_s": 50.0}, base, params)
    assert [c.name for c in worse.checks if not c.passed] == ["gguf_perplexity_ratio", "gguf_decode_speedup"]
    no_speed = run_gate({k: v for k, v in scored.items() if k != "gguf_b1_decode_tokens_per_s"}, base, params)
    assert no_speed.passed and "speed not measured" in _only_check(no_speed, "gguf_decode_speedup").note
