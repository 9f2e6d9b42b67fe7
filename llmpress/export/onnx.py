"""ONNX export of a causal LM (logits for a whole sequence, no KV cache yet) and a parity check in onnxruntime.

The graph takes `input_ids` and `attention_mask` ([batch, sequence], both int64, dynamic axes) and returns
`logits` [batch, sequence, vocab]. It is exported with torch's dynamo exporter (`torch.onnx.export(dynamo=True)`),
which keeps tied embeddings tied and needs `dynamic_shapes` rather than the legacy `dynamic_axes`.

Parity: the same token ids go through PyTorch and onnxruntime's CPU provider, both fp32; we report the max
absolute logit difference and whether the argmax token agrees at every position.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@dataclass(frozen=True)
class ParityResult:
    max_abs_diff: float
    mean_abs_diff: float
    argmax_agreement: float
    tokens: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def export_onnx(model: nn.Module, out_dir: str | Path, opset: int = 18) -> Path:
    """Write `out_dir/model.onnx` (weights inline below 2 GB, external data beside it above)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    wrapper = _LogitsOnly(model).eval()
    example = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]], dtype=torch.long)
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("sequence", min=2, max=8192)
    path = out_dir / ONNX_NAME
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example, torch.ones_like(example)),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            opset_version=opset,
            dynamo=True,
            optimize=True,
        )
    big = sum(p.numel() * p.element_size() for p in model.parameters()) >= 2**31 - 2**26
    program.save(str(path), external_data=big)
    log.info("exported %s in %.1fs", path, time.perf_counter() - start)
    return path


def onnx_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_parity(model: nn.Module, onnx_path: str | Path, input_ids: torch.Tensor) -> ParityResult:
    """Compare logits of PyTorch and onnxruntime on `input_ids` ([batch, sequence])."""
    session = onnx_session(onnx_path)
    mask = torch.ones_like(input_ids)
    ref = model.eval()(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
    out = session.run(["logits"], {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})[0]
    got = torch.from_numpy(out).float()
    diff = (got - ref).abs()
    return ParityResult(
        max_abs_diff=diff.max().item(),
        mean_abs_diff=diff.mean().item(),
        argmax_agreement=(got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        tokens=input_ids.numel(),
    )
