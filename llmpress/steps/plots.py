"""The plots a reviewer sees on a run: sparsity per layer, size and speed against the base model, and for a
mixture of experts the calibration tokens the router sent each expert."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmpress.evaluate.speed import served


def plot_cost(base: dict[str, Any], compressed: dict[str, Any], out_path: str | Path) -> Path:
    """Bars of latency, throughput, memory and size: the base model in PyTorch against the compressed model in the
    runtime that serves it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("b1_prefill_ms", "prefill latency, batch 1 (ms)", 1),
        ("b1_decode_tokens_per_s", "decode tokens/s, batch 1", 1),
        ("peak_rss_mb", "peak memory generating (MB)", 1),
        ("weights_bytes", "weights on disk (MB)", 2**20),
    ]
    values = {key: (base.get(key, base.get(f"torch_{key}")), compressed.get(key, served(compressed, key)))
              for key, _, _ in panels}  # fmt: skip
    panels = [p for p in panels if None not in values[p[0]]]
    runtime = "ONNX Runtime" if compressed.get("runtime") == "ort" else "PyTorch"
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (key, title, scale) in zip(list(axes) if len(panels) > 1 else [axes], panels, strict=True):
        pair = [v / scale for v in values[key]]
        ax.bar(["base\n(PyTorch)", f"compressed\n({runtime})"], pair, color=["#8c8c8c", "#4878d0"])
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(pair):
            ax.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return Path(out_path)


def plot_sparsity(per_layer: dict[str, float], target: float | None, out_path: str | Path) -> Path:
    """Bar chart of measured sparsity per targeted layer, in model order, with the target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_layer)
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.06), 4))
    ax.bar(range(len(names)), [per_layer[n] for n in names], width=1.0, color="#4878d0")
    if target is not None:
        ax.axhline(target, color="#d65f5f", linestyle="--", label=f"target {target:.2f}")
        ax.legend(loc="lower right")
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"targeted linear layers in model order ({len(names)})")
    ax.set_ylabel("fraction of weights that are zero")
    ax.set_title("Measured sparsity per layer")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return Path(out_path)


def plot_expert_tokens(counts: dict[str, list[int]], floor: int, out_path: str | Path) -> Path:
    """Heat map of the calibration tokens the router sent each expert (rows: mixture-of-experts blocks in model
    order, columns: experts), with the experts below the recipe's floor outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(counts)
    grid = np.array([counts[n] for n in names], dtype=float)
    blocks, experts = grid.shape
    fig, ax = plt.subplots(figsize=(min(16, max(5, experts * 0.35 + 2)), min(12, max(3, blocks * 0.3 + 1.5))))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="routed calibration tokens")
    for b, e in zip(*np.nonzero(grid < floor), strict=True):  # below the floor: outlined in red
        ax.add_patch(plt.Rectangle((e - 0.5, b - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=1.5))
    if blocks * experts <= 256:
        bright = 0.6 * grid.max()
        for (b, e), value in np.ndenumerate(grid):
            ax.annotate(f"{value:.0f}", (e, b), ha="center", va="center", fontsize=7,
                        color="black" if value > bright else "white")  # fmt: skip
    ax.set_xlabel(f"expert ({experts})")
    ax.set_ylabel(f"block ({blocks})")
    ax.set_yticks(range(blocks), [n.split(".")[-3] if n.count(".") >= 3 else n for n in names], fontsize=7)
    ax.set_title(f"Calibration tokens per expert: fewest {grid.min():.0f}, floor {floor}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return Path(out_path)
