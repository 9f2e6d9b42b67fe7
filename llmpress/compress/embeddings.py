"""Embeddings: quantize the token embedding table (and the LM head) on the same integer grid as the linears.

In a small model the vocabulary is a large share of the weights: SmolLM2-135M's 49,152 x 576 table is 28 M of its
135 M parameters, 113 MB in fp32 - more than the whole of its decoder blocks at 4 bits. Quantizing only the
blocks leaves an edge bundle dominated by one float table. This stage rounds the table to the nearest point of
the grid `llmpress.compress.quant` fits for RTN/GPTQ/AWQ (per row - one token's vector - and per `group_size`
consecutive features: an fp16 scale and an integer zero point), with no calibration data: an embedding lookup
has no input activations to weigh errors by, and for a head tied to the table the same codes serve both.

- Tied head (SmolLM2, most small models): the head *is* the table, so it is quantized with it; the export
  reads the same codes through a GatherBlockQuantized node (the lookup) and a MatMulNBits node (the head),
  `llmpress.export.packed`.
- Untied head (`head: true`, the default): the head is an nn.Linear [vocab, hidden] quantized like the table.
  `head: false` keeps an untied head in float (the head is the most sensitive layer of a small model).

The layer's weight becomes the dequantized values, so evaluation and export see exactly what is stored, and
`storage.save_compressed` packs the codes like a linear's. Cost: seconds, no data.

The edge story this is for is the GGUF one: llama.cpp's Q4_0/Q4_1/Q8_0 files quantize `token_embd` too (the
shipped SmolLM2 GGUF holds it as Q8_0, blocks of 32), which is why an int4 ONNX export that keeps a float table
is not smaller than the GGUF it came from.

Recipe example (`recipes/rtn-w4g32-emb8.yaml`):

    name: rtn-w4g32-emb8
    stages:
      - method: rtn
        bits: 4
        group_size: 32
        targets: ['.*_proj']
      - method: embeddings
        bits: 8
        group_size: 32
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmpress.compress.methods import Method, ModelContext, register
from llmpress.compress.quant import attach_, quantize_rtn
from llmpress.config import EmbeddingsStage
from llmpress.errors import LlmpressError


def _quantize(module: nn.Module, stage: EmbeddingsStage) -> None:
    weight = module.weight.detach().float()
    attach_(module, quantize_rtn(weight, stage.bits, stage.group_size, stage.symmetric, signed=stage.signed_scale))


@torch.no_grad()
def apply_model_(model: nn.Module, stage: EmbeddingsStage, ctx: ModelContext | None = None) -> list[dict[str, Any]]:
    """Quantize the input embedding table and, if untied and `stage.head`, the output head; one row each."""
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(table, nn.Embedding):
        raise LlmpressError("embeddings: the model has no nn.Embedding input table to quantize")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = isinstance(head, nn.Linear) and head.weight is table.weight
    names = {id(m): n for n, m in model.named_modules()}
    details = {"bits": stage.bits, "group_size": stage.group_size, "symmetric": stage.symmetric}
    _quantize(table, stage)
    rows = [{"name": names[id(table)], "layer": table, **details, "tied_head": tied}]
    # A tied head reads the table's weight (now the dequantized values); the export finds it through the table.
    if not tied and isinstance(head, nn.Linear) and stage.head:
        _quantize(head, stage)
        rows.append({"name": names[id(head)], "layer": head, **details})
    if ctx is not None:
        ctx.progress(f"embeddings: {', '.join(r['name'] for r in rows)} to {stage.bits} bits, groups of "
                     f"{stage.group_size or 'a whole row'}{' (head tied to the table)' if tied else ''}")  # fmt: skip
    return rows


register(Method(EmbeddingsStage, "model", apply_model_))
