"""Drop whole decoder blocks: the ones that change their input the least.

Men et al. (2024), "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect". The Block
Influence of block i is one minus the mean cosine similarity between what the block receives and what it returns,
over every calibration token t:

    BI_i = 1 - mean_t  <x_i,t, x_i+1,t> / (||x_i,t|| ||x_i+1,t||)

A block whose output points where its input did (BI ~ 0) mostly adds little to the residual stream, and removing it
costs little. As in the paper, all influences are measured in one pass over the unmodified model, then the
`blocks` lowest are removed together (no fine-tuning; add a `distill` stage after this one to recover).

Removing blocks is a stock-transformers change: the ModuleList gets shorter, `config.num_hidden_layers` (and
`config.layer_types` when the model has one) follow, and the remaining attention modules are renumbered
(`layer_idx` picks the KV-cache slot during generation). The saved folder loads with plain `from_pretrained`.

Recipe example (`recipes/drop-blocks-2.yaml`):

    name: drop-blocks-2
    stages:
      - method: drop_blocks
        blocks: 2
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmpress.compress.methods import Method, ModelContext, register
from llmpress.compress.offload import iterate_blocks
from llmpress.compress.targets import find_decoder_blocks
from llmpress.config import DropBlocksStage
from llmpress.errors import LlmpressError


@torch.no_grad()
def block_influence(model: nn.Module, calibration_ids: torch.Tensor, device: torch.device,
                    batch_size: int) -> list[float]:  # fmt: skip
    """BI_i = 1 - mean cos(input, output) of every decoder block over the calibration tokens, in block order."""

    influence = []
    for _index, _prefix, block, calib in iterate_blocks(model, calibration_ids, device, batch_size):
        assert calib is not None
        pairs = zip(calib.hidden, calib.outputs(block), strict=True)  # (input, output) [batch, seq, hidden]
        total = sum(F.cosine_similarity(x.float(), y.float(), dim=-1).sum().item() for x, y in pairs)  # over tokens
        influence.append(1.0 - total / calib.tokens)
    return influence


@torch.no_grad()
def apply_model_(model: nn.Module, stage: DropBlocksStage, ctx: ModelContext) -> list[dict[str, Any]]:
    """Remove the `stage.blocks` decoder blocks with the lowest block influence; one row per original block."""

    blocks_name, blocks = find_decoder_blocks(model)
    n = len(blocks)
    check(model, stage)
    influence = block_influence(model, ctx.data("drop_blocks"), ctx.device, ctx.batch_size)
    dropped = sorted(sorted(range(n), key=lambda i: influence[i])[: stage.blocks])

    for i in reversed(dropped):
        del blocks[i]
    # The KV cache is indexed by layer_idx: the kept blocks must be numbered 0..n-k-1 again.
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(blocks)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n:
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in dropped]

    ctx.progress(
        f"drop_blocks: removed {', '.join(f'{blocks_name}.{i} (BI {influence[i]:.4f})' for i in dropped)}; "
        f"{len(blocks)} blocks left"
    )
    return [
        {"name": f"{blocks_name}.{i}", "shape": (), "block_influence": influence[i], "removed": i in dropped}
        for i in range(n)
    ]


def check(model: nn.Module, stage: DropBlocksStage) -> None:
    n = len(find_decoder_blocks(model)[1])
    if stage.blocks >= n:
        raise LlmpressError(f"drop_blocks: blocks={stage.blocks} would remove all {n} decoder blocks; use < {n}")


register(Method(DropBlocksStage, "model", apply_model_, check=check))
