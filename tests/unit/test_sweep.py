"""Pareto front, table and plot of a sweep (llmpress/sweep.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llmpress.sweep import Point, mark_front, plot, points_from_runs, table


def _run(label: str, mib: float, ppl: float, passed: bool = True, tok_s: float | None = None) -> dict:
    metrics = {"weights_bytes": mib * 2**20, "perplexity": ppl}
    if tok_s:
        metrics["torch_b1_decode_tokens_per_s"] = tok_s
    return {"label": label, "metrics": metrics, "gate_passed": passed, "version": "1", "run_id": "r"}


def test_front_is_exactly_the_non_dominated_points() -> None:
    runs = [_run("dense", 513, 30.8), _run("w8", 210, 30.9), _run("w4", 161, 39.0), _run("awq", 161, 37.2),
            _run("sparse", 513, 53.0), _run("2of4+w4", 161, 113.7), _run("w3", 149, 61.7)]  # fmt: skip
    points = {p.label: p for p in points_from_runs(runs)}
    assert {k for k, p in points.items() if p.on_front} == {"dense", "w8", "awq", "w3"}
    # a tie on both axes dominates neither
    tied = mark_front([Point("a", 1, 1), Point("b", 1, 1), Point("c", 2, 2)])
    assert [p.on_front for p in tied] == [True, True, False]


def test_runs_without_a_result_are_left_out_and_listed() -> None:
    runs = [_run("ok", 100, 40), {"label": "failed", "metrics": {}}, _run("nan", 90, math.nan)]
    points = points_from_runs(runs)
    assert [p.label for p in points] == ["ok"]
    text = table(points, failed=["default / recipes/x.yaml (Failed)"])
    assert "| ok | 100.00 | 40.000 | pass | 1 | **yes** |" in text
    assert "Runs without a result: default / recipes/x.yaml (Failed)" in text


def test_latency_cost_and_unknown_cost() -> None:
    points = points_from_runs([_run("fast", 100, 40, tok_s=50), _run("slow", 50, 35, tok_s=10)], "decode_latency")
    assert [round(p.cost, 1) for p in points] == [20.0, 100.0]
    assert all(p.on_front for p in points)
    with pytest.raises(ValueError, match="cost 'speed'"):
        points_from_runs([], "speed")


def test_plot_is_written(tmp_path: Path) -> None:
    points = points_from_runs([_run("a", 100, 40), _run("b", 50, 45, passed=False), _run("c", 120, 50)])
    path = plot(points, tmp_path / "pareto.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
