"""The engine gives the same masks and codes on CPU and GPU (needs CUDA; skipped elsewhere).

Run on a GPU machine with `pytest tests/gpu` (see benchmarks/README.md). fp32 throughout and TF32 off for fp32
inputs, so the devices differ only in the order of floating-point sums. A mask or code can then flip only where
two candidates were within rounding of each other (a tie); in SparseGPT and GPTQ such a flip also changes the later
updates of its row, and through the compressed block's outputs the next block's statistics. So: layer by layer on
identical inputs, masks and codes agree up to ties; through the whole engine, Wanda's masks (no updates) agree.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from llmpress.compress import sparsegpt
from llmpress.compress.engine import compress_
from llmpress.compress.gptq import gptq_quantize
from llmpress.config import Recipe, SparseGPTStage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROWS, COLS, TOKENS = 512, 1024, 4096


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(COLS) + torch.randn(COLS, COLS, generator=g) / COLS**0.5
    X = (torch.randn(TOKENS, COLS, generator=g) @ mixing) * (torch.rand(COLS, generator=g) * 2 + 0.1)
    W = torch.randn(ROWS, COLS, generator=g) * 0.02
    H = (2.0 / TOKENS * X.double().T @ X.double()).float()  # the same Hessian on both devices
    return W, H


@pytest.mark.parametrize(
    "stage",
    [SparseGPTStage(method="sparsegpt", sparsity=0.5), SparseGPTStage(method="sparsegpt", pattern="2:4"),
     SparseGPTStage(method="sparsegpt", sparsity=0.5, mask_block=32, block_size=128)],
    ids=["unstructured", "2of4", "mask-block-32"],
)  # fmt: skip
def test_sparsegpt_same_mask_on_cpu_and_gpu(stage) -> None:
    W, H = _problem()
    cpu, cpu_loss = sparsegpt.prune_(W, H, stage)
    gpu, gpu_loss = sparsegpt.prune_(W.cuda(), H.cuda(), stage)  # the CUDA-graph column loop
    gpu = gpu.cpu()
    mismatch = ((cpu == 0) != (gpu == 0)).float().mean().item()
    assert mismatch <= 1e-3, f"{mismatch:.2e} of the mask differs"
    assert (cpu == 0).sum() == (gpu == 0).sum()
    assert ((gpu - cpu).norm() / cpu.norm()).item() < 1e-3
    assert gpu_loss.sum().item() == pytest.approx(cpu_loss.sum().item(), rel=1e-3)


@pytest.mark.parametrize(("group_size", "act_order"), [(128, False), (64, True), (None, False), (96, False)])
def test_gptq_same_codes_on_cpu_and_gpu(group_size, act_order) -> None:
    W, H = _problem(seed=1)
    settings = {"bits": 4, "group_size": group_size, "symmetric": False, "act_order": act_order}
    cpu, cpu_loss = gptq_quantize(W, H, **settings)
    gpu, gpu_loss = gptq_quantize(W.cuda(), H.cuda(), **settings)
    mismatch = (cpu.codes != gpu.codes.cpu()).float().mean().item()
    assert mismatch <= 1e-3, f"{mismatch:.2e} of the codes differ"
    assert torch.equal(cpu.scale, gpu.scale.cpu()) or (cpu.scale != gpu.scale.cpu()).float().mean() < 1e-3
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-3)


def _model() -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_engine_wanda_same_masks_and_model_back_on_host(pattern) -> None:
    ids = torch.randint(0, 512, (16, 128), generator=torch.Generator().manual_seed(0))
    stage = {"method": "wanda", "sparsity": 0.5} if pattern is None else {"method": "wanda", "pattern": pattern}
    recipe = Recipe(name="parity", stages=[stage])
    on_cpu, on_gpu = _model(), _model()
    compress_(on_cpu, recipe, ids, device="cpu", batch_size=8)
    compress_(on_gpu, recipe, ids, device="cuda", batch_size=8)
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())  # every block came back
    cpu = {n: m.weight for n, m in on_cpu.named_modules() if isinstance(m, nn.Linear)}
    for name, module in on_gpu.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            mismatch = ((module.weight == 0) != (cpu[name] == 0)).float().mean().item()
            assert mismatch <= 1e-3, f"{name}: {mismatch:.2e} of the mask differs"


def test_capture_leaves_blocks_and_head_on_the_host_and_restores_host_tensors() -> None:
    from llmpress.compress.calibration import capture_block_inputs
    from llmpress.compress.targets import find_decoder_blocks

    model = _model()
    _, blocks = find_decoder_blocks(model)
    placed: dict[str, str] = {}
    probe = blocks[0].register_forward_pre_hook(
        lambda *_: placed.update({n: p.device.type for n, p in model.named_parameters()})
    )  # registered before the capture's own hook, so it sees the placement during the capture
    before = {name: t.data_ptr() for name, t in model.named_parameters()}
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    hidden, _ = capture_block_inputs(model, blocks, list(ids.split(2)), torch.device("cuda"))
    probe.remove()
    assert all(h.is_cuda for h in hidden)
    assert torch.equal(torch.cat(hidden).cpu(), model.model.embed_tokens(ids))
    assert placed["model.embed_tokens.weight"] == "cuda"
    assert all(placed[n] == "cpu" for n in placed if n.startswith("model.layers.") or n == "lm_head.weight")
    assert before == {name: t.data_ptr() for name, t in model.named_parameters()}  # host tensors, not copies back
