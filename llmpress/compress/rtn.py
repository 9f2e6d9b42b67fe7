"""RTN: round-to-nearest weight quantization, the baseline every quantization paper compares against.

Each weight is rounded to the nearest point of an integer grid fitted to its group, with no calibration data:
per output row and per `group_size` consecutive inputs, a min-max range that always contains 0 gives an fp16
scale s and an integer zero point z (z = 2^(bits-1) when symmetric), and w ~ s * (round(w / s) + z - z).
This is the "RTN" row of GPTQ (Frantar et al. 2023, Tables 2-4) and AWQ (Lin et al. 2024): the grid is the GPTQ
reference quantizer's, shared with GPTQ and AWQ in `llmpress.compress.quant`, so the three differ only in how
they choose the codes.

`offset: min` uses llama.cpp's Q4_1-style grid instead (w = s * q + m, from the group's minimum to its maximum,
fp16 s and m): it spends no grid point on reaching 0 and, on a model that was stored that way, gives back the
stored weights. GPTQ and AWQ keep the zero-point grid.

The layer's weight becomes the dequantized values (the model evaluates exactly what is stored) and the codes are
kept on the layer for `storage.save_compressed`, which packs them to `bits` bits.

Recipe example (`recipes/rtn-w4g128.yaml`; `recipes/edge-int4.yaml` for the min grid):

    name: rtn-w4g128
    stages:
      - method: rtn
        bits: 4
        group_size: 128
        symmetric: false
        targets: ['.*_proj']
"""

from __future__ import annotations

import torch
from torch import nn

from llmpress.compress.calibration import LayerStats
from llmpress.compress.methods import Method, register
from llmpress.compress.quant import attach_, quantize_rtn
from llmpress.config import RTNStage


@torch.no_grad()
def apply_(layer: nn.Linear, stage: RTNStage, stats: LayerStats | None = None) -> dict:
    """Round `layer`'s weight to the nearest grid point in place; keep the codes for saving."""
    qw = quantize_rtn(layer.weight.detach().float(), stage.bits, stage.group_size, stage.symmetric, stage.offset,
                      stage.signed_scale)  # fmt: skip
    attach_(layer, qw)
    return {"bits": stage.bits, "group_size": stage.group_size, "symmetric": stage.symmetric, "offset": stage.offset}


register(Method(RTNStage, "layer", apply_))
