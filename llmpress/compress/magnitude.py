"""Magnitude pruning: zero the weights with the smallest absolute value.

The classic baseline (Han et al., 2015, "Learning both Weights and Connections for Efficient Neural Networks"),
applied one-shot and without calibration data. Unstructured sparsity compares all weights of a layer against one
threshold; N:M keeps the N largest of every M consecutive inputs of a row.

Recipe example (`recipes/magnitude-50.yaml`):

    name: magnitude-50
    stages:
      - method: magnitude
        sparsity: 0.5
"""

from __future__ import annotations

import torch
from torch import nn

from llmpress.compress.calibration import LayerStats
from llmpress.compress.masks import select_mask
from llmpress.compress.methods import Method, register
from llmpress.config import MagnitudeStage


@torch.no_grad()
def apply_(layer: nn.Linear, stage: MagnitudeStage, stats: LayerStats | None = None) -> dict:
    """Zero the smallest-magnitude weights of `layer` in place."""
    mask = select_mask(layer.weight.detach().abs().float(), stage.sparsity, stage.n_m, per_row=False)
    layer.weight.mul_(mask.to(layer.weight.dtype))
    return {}


register(Method(MagnitudeStage, "layer", apply_))
