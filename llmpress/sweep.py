"""A recipe sweep's summary: which results are on the Pareto front of cost against perplexity, as a table and a plot.

Each point is one compress run (model x recipe). Cost is bytes on disk (`weights_bytes`, smaller is better) or
batch-1 decode latency of what the run ships (`1 / gate.decode_speed`: onnxruntime's when exported); quality is
perplexity (lower is better). A point is on the front when no other point is at least as good on both and better
on one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpress.gate import decode_speed

COSTS = {
    "weights_bytes": ("weights on disk (MiB)", lambda m: m.get("weights_bytes", math.nan) / 2**20),
    "decode_latency": ("batch-1 decode latency (ms/token)",
                       lambda m: 1e3 / speed if (speed := decode_speed(m)) else math.nan),
}  # fmt: skip


@dataclass
class Point:
    label: str  # model / recipe
    cost: float
    perplexity: float
    gate_passed: bool | None = None
    version: str | None = None
    run_id: str | None = None
    on_front: bool = False


def points_from_runs(results: Sequence[dict[str, Any]], cost: str = "weights_bytes") -> list[Point]:
    """results: [{label, metrics, gate_passed?, version?, run_id?}]; those without the cost or perplexity are kept
    out (a failed run has neither)."""
    if cost not in COSTS:
        raise ValueError(f"cost {cost!r}: choose one of {sorted(COSTS)}")
    points = []
    for result in results:
        metrics = result.get("metrics") or {}
        value, ppl = COSTS[cost][1](metrics), metrics.get("perplexity", math.nan)
        if math.isfinite(value) and isinstance(ppl, int | float) and math.isfinite(ppl):
            points.append(Point(result["label"], value, float(ppl), result.get("gate_passed"), result.get("version"),
                                result.get("run_id")))  # fmt: skip
    return mark_front(points)


def mark_front(points: list[Point]) -> list[Point]:
    """Set `on_front` on the non-dominated points (lower cost and lower perplexity are better)."""
    for p in points:
        p.on_front = not any(
            q is not p and q.cost <= p.cost and q.perplexity <= p.perplexity
            and (q.cost < p.cost or q.perplexity < p.perplexity)
            for q in points
        )  # fmt: skip
    return points


def table(points: Sequence[Point], cost: str = "weights_bytes", failed: Sequence[str] = ()) -> str:
    """Markdown: every point sorted by cost, the front marked; then the runs that produced no result."""
    unit = COSTS[cost][0]
    lines = [f"| model / recipe | {unit} | perplexity | gate | version | Pareto front |",
             "| --- | ---: | ---: | :---: | ---: | :---: |"]  # fmt: skip
    for p in sorted(points, key=lambda p: (p.cost, p.perplexity)):
        gate = "-" if p.gate_passed is None else ("pass" if p.gate_passed else "fail")
        lines.append(f"| {p.label} | {p.cost:.2f} | {p.perplexity:.3f} | {gate} | {p.version or '-'} | "
                     f"{'**yes**' if p.on_front else ''} |")  # fmt: skip
    if failed:
        lines += ["", "Runs without a result: " + ", ".join(failed)]
    return "\n".join(lines) + "\n"


def plot(points: Sequence[Point], path: str | Path, cost: str = "weights_bytes", title: str = "Sweep") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for p in points:
        colour = "tab:red" if p.gate_passed is False else ("tab:blue" if p.on_front else "tab:gray")
        ax.scatter(p.cost, p.perplexity, s=40 if p.on_front else 24, color=colour, zorder=3)
        ax.annotate(p.label, (p.cost, p.perplexity), textcoords="offset points", xytext=(4, 3), fontsize=7)
    front = sorted((p for p in points if p.on_front), key=lambda p: p.cost)
    if len(front) > 1:
        ax.step([p.cost for p in front], [p.perplexity for p in front], where="post", color="tab:blue", lw=1.2,
                label="Pareto front")  # fmt: skip
        ax.legend()
    if points and max(p.perplexity for p in points) / min(p.perplexity for p in points) > 10:
        ax.set_yscale("log")
    ax.set_xlabel(COSTS[cost][0])
    ax.set_ylabel("perplexity (held-out text)")
    ax.set_title(f"{title}: gray dominated, blue on the front, red failed the gate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
