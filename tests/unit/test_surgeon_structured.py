"""surgeon, structured (rows and columns): costs and updates against the dense Optimal Brain Surgeon formulas with
F = G (x) A, the allocation across blocks, and a model whose blocks end with different widths saved, reloaded,
exported to ONNX, bundled and served by the MLflow pyfunc without llmpress."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB, byte_tokenizer_json
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmpress import layer_shapes
from llmpress.bundle import build_bundle
from llmpress.bundle import run as bundle_run
from llmpress.compress.anatomy import anatomy
from llmpress.compress.engine import compress_
from llmpress.compress.surgeon import Kfac
from llmpress.compress.surgeon_structured import (
    _Curvature,
    _remove_columns,
    _remove_rows,
    column_costs,
    head_costs,
    row_costs,
)
from llmpress.config import Recipe
from llmpress.errors import ConfigError, LlmpressError
from llmpress.export.onnx import check_parity, export_onnx
from llmpress.sources import load_model
from llmpress.steps.compression import save_model


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3 * n, generator=g)
    return x @ x.T / (3 * n) + 0.1 * torch.eye(n)


def _curvature(out: int, inp: int) -> _Curvature:
    return _Curvature(Kfac(_spd(out, 1), _spd(inp, 2)), dampening_g=0.1, dampening_a=0.01)


def _obs(W: torch.Tensor, c: _Curvature, removed: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Dense OBS for removing the weights `removed` (a mask) of W: the loss increase 1/2 w_Q^T (E^T F^-1 E)^-1 w_Q
    and the new W = W - F^-1 E (E^T F^-1 E)^-1 w_Q, with F^-1 = G^-1 (x) A^-1 built explicitly (float64)."""
    F_inv = torch.kron(c.G_inv.double(), c.A_inv.double())
    q = removed.flatten().nonzero().flatten()
    w = W.double().flatten()
    S = F_inv[q][:, q]
    lam = torch.linalg.solve(S, w[q])
    return 0.5 * float(w[q] @ lam), (w - F_inv[:, q] @ lam).view_as(W)


def _linear(out: int, inp: int, seed: int) -> torch.nn.Linear:
    layer = torch.nn.Linear(inp, out, bias=False)
    layer.weight.data = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    return layer


def test_row_and_column_costs_and_updates_are_dense_obs() -> None:
    layer, c = _linear(6, 5, 0), _curvature(6, 5)
    W = layer.weight.detach()
    for r in range(6):
        mask = torch.zeros(6, 5, dtype=torch.bool)
        mask[r] = True
        assert row_costs(layer, c)[r].item() == pytest.approx(_obs(W, c, mask)[0], rel=1e-4)
    for col in range(5):
        mask = torch.zeros(6, 5, dtype=torch.bool)
        mask[:, col] = True
        assert column_costs(layer, c)[col].item() == pytest.approx(_obs(W, c, mask)[0], rel=1e-4)
    rows, cols = torch.tensor([1, 4]), torch.tensor([0, 2, 3])
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[rows] = True
    assert torch.allclose(_remove_rows(W, rows, c).double(), _obs(W, c, mask)[1], atol=1e-4)
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[:, cols] = True
    new = _remove_columns(W, cols, c)
    assert torch.allclose(new.double(), _obs(W, c, mask)[1], atol=1e-4)
    assert new[:, cols].abs().max() < 1e-5  # the removed columns end at zero: taking them out changes nothing


def test_a_heads_cost_is_its_rows_and_columns_removed_jointly() -> None:
    config = LlamaConfig(hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB)  # fmt: skip
    torch.manual_seed(0)
    a = anatomy(LlamaForCausalLM(config).model.layers[0])
    cq, co = _curvature(16, 16), _curvature(16, 16)
    costs = head_costs(a, {id(a.q): cq, id(a.o): co})
    d = a.head_dim
    for h in range(4):
        rows = torch.zeros(16, 16, dtype=torch.bool)
        rows[h * d : (h + 1) * d] = True
        expected = _obs(a.q.weight.detach(), cq, rows)[0] + _obs(a.o.weight.detach(), co, rows.T.clone())[0]
        assert costs[h].item() == pytest.approx(expected, rel=1e-4)


def _gqa_llama(seed: int = 0) -> LlamaForCausalLM:
    """6 query heads over 2 KV heads (3 per group, so 2 head slots per block can go) in 3 blocks."""
    config = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # confident logits: greedy choices are no ties
    return model


STAGE = {"method": "surgeon", "mlp": 0.3, "heads": 0.5, "shots": 2}


@pytest.fixture(scope="module")
def pruned() -> tuple[LlamaForCausalLM, torch.Tensor]:
    model = _gqa_llama()
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(5))
    report = compress_(model, Recipe(name="s", stages=[STAGE]), ids)
    return model, ids, report


def test_structures_are_allocated_across_blocks(pruned) -> None:
    model, _, report = pruned
    parts = [anatomy(block) for block in model.model.layers]
    widths = [a.gate.out_features for a in parts]
    heads = [a.n_heads for a in parts]
    assert sum(widths) == 3 * 96 - round(0.3 * 3 * 96)
    assert sum(heads) == 18 - 2 * round(0.5 * 9)  # 4 of 9 slots of one head per KV group
    assert len(set(heads)) > 1  # 4 slots over 3 blocks: no uniform split exists
    assert len(set(widths)) > 1
    for a in parts:
        assert a.n_heads % a.n_kv_heads == 0 and a.attn.num_key_value_groups == a.n_heads // a.n_kv_heads
    removed = sum(r.details["params_removed"] for r in report.layers)
    dense = sum(p.numel() for p in _gqa_llama().parameters())
    assert removed == dense - sum(p.numel() for p in model.parameters())


def test_blocks_of_different_widths_save_reload_export_and_bundle(pruned, tmp_path) -> None:
    model, ids, _ = pruned
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    byte_tokenizer_json(tokenizer_dir)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"), bos_token="A")
    folder = tmp_path / "hf"
    save_model(model, tokenizer, folder, {})
    shapes = json.loads((folder / "config.json").read_text())[layer_shapes.KEY]
    assert "model.layers.0.mlp.gate_proj" in shapes or "model.layers.1.mlp.gate_proj" in shapes
    with pytest.raises(Exception, match="size"):  # stock loading refuses instead of loading something else
        AutoModelForCausalLM.from_pretrained(folder)
    reloaded = load_model(folder)
    with torch.no_grad():
        assert torch.equal(reloaded(ids[:2]).logits, model(ids[:2]).logits)
    graph = export_onnx(reloaded, tmp_path / "onnx")
    parity = check_parity(reloaded, graph, ids[:2, :12], decode_steps=8, noise=False)
    assert parity.max_abs_diff < 1e-4 and parity.greedy_identical
    bundle = tmp_path / "bundle"
    build_bundle(bundle, graph.parent, folder, precision="fp32", opset=18, metrics={}, gate={"passed": True},
                 lineage={})  # fmt: skip
    prompt = "edge"
    prompt_ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(prompt).ids
    expected = model.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    text = Tokenizer.from_file(str(folder / "tokenizer.json")).decode(expected[0, len(prompt_ids) :].tolist())
    assert bundle_run(bundle, prompt, max_new_tokens=8) == text
    # The MLflow pyfunc on a machine without llmpress: the logged copy of layer_shapes.py loads it.
    import mlflow

    from llmpress.tracking import PYFUNC_FILE, SHAPES_FILE

    logged = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(logged, python_model=str(PYFUNC_FILE), artifacts={"hf_model": str(folder)},
                             code_paths=[str(SHAPES_FILE)])  # fmt: skip
    script = ("import sys; sys.modules['llmpress'] = None; import mlflow; "
              f"print(repr(mlflow.pyfunc.load_model({str(logged)!r}).predict([{prompt!r}])[0]))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = model.generate(prompt_ids, max_new_tokens=32, do_sample=False, pad_token_id=0)  # the pyfunc's default
    decoded = tokenizer.decode(expected[0, prompt_ids.shape[1] :], skip_special_tokens=True)
    assert done.stdout.strip().splitlines()[-1] == repr(decoded)


def test_settings_are_checked_before_any_work() -> None:
    from llmpress.config import validate

    with pytest.raises(ConfigError, match=r"exactly one of 'sparsity'.*got sparsity and heads/mlp"):
        validate(Recipe, {"name": "x", "stages": [{"method": "surgeon", "sparsity": 0.5, "mlp": 0.2}]}, "recipe")
    model = _gqa_llama()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    with pytest.raises(LlmpressError, match=r"mlp=0\.001.*between 1 and"):
        compress_(model, Recipe(name="x", stages=[{"method": "surgeon", "mlp": 0.001}]), ids)
    with pytest.raises(LlmpressError, match=r"heads=0\.9.*between 1 and 6"):
        compress_(model, Recipe(name="x", stages=[{"method": "surgeon", "heads": 0.9}]), ids)
    assert all(a.gate.out_features == 96 for a in map(anatomy, model.model.layers))  # nothing changed


def test_channels_alone_in_one_shot() -> None:
    model = _gqa_llama()
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(5))
    compress_(model, Recipe(name="x", stages=[{"method": "surgeon", "mlp": 0.25, "shots": 1}]), ids)
    parts = [anatomy(block) for block in model.model.layers]
    assert sum(a.gate.out_features for a in parts) == 3 * 96 - 72
    assert all(a.n_heads == 6 for a in parts)
