"""Wanda: pruning by weights and activations.

Sun, Liu, Bair, Kolter (2023), "A Simple and Effective Pruning Approach for Large Language Models".
The importance of weight W[i, j] is |W[i, j]| * ||X_j||_2, where ||X_j||_2 is the L2 norm of input feature j over
all calibration tokens. Weights are compared within each output row (the paper's per-output comparison group,
§3), and no weight is updated after pruning. N:M keeps the N highest scores in every M consecutive inputs.

The engine accumulates sum_tokens x_j^2 for every targeted layer (`input_sq_norms`) from the block's inputs as
they are after the previous blocks were pruned, which is the paper's sequential setting.

Recipe example (`recipes/wanda-2of4.yaml`):

    name: wanda-2of4
    stages:
      - method: wanda
        pattern: "2:4"
        targets: ['.*_proj']
"""

from __future__ import annotations

import torch
from torch import nn

from llmpress.compress.calibration import LayerStats
from llmpress.compress.masks import select_mask
from llmpress.compress.methods import Method, register
from llmpress.config import WandaStage


def scores(layer: nn.Linear, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, from sum_t x_tj^2 [in] (OWL reads the same scores)."""
    return layer.weight.detach().abs().float() * input_sq_norms.float().sqrt().unsqueeze(0)


@torch.no_grad()
def apply_(layer: nn.Linear, stage: WandaStage, stats: LayerStats) -> dict:
    """Zero the lowest |W| * ||X|| weights of `layer` in place."""
    if stats.input_sq_norms is None:
        raise ValueError("wanda needs calibration activations (input_sq_norms)")
    mask = select_mask(scores(layer, stats.input_sq_norms), stage.sparsity, stage.n_m, per_row=True)
    layer.weight.mul_(mask.to(layer.weight.dtype))
    return {}


register(Method(WandaStage, "layer", apply_, statistic="input_sq_norms"))
