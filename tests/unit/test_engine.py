from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from llmpress.compress.engine import compress_
from llmpress.compress.masks import row_mask
from llmpress.config import Recipe
from llmpress.errors import LlmpressError

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _recipe(**stage) -> Recipe:
    return Recipe(name="unit-test", stages=[stage])


def _block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("model.layers.")
    }


def _zero_fraction(layer: nn.Linear) -> float:
    return (layer.weight == 0).float().mean().item()


@pytest.mark.parametrize(
    ("stage", "target"),
    [
        ({"method": "magnitude", "sparsity": 0.5}, 0.5),
        ({"method": "wanda", "sparsity": 0.5}, 0.5),
        ({"method": "wanda", "pattern": "2:4"}, 0.5),
        ({"method": "magnitude", "pattern": "2:4"}, 0.5),
        ({"method": "wanda", "sparsity": 0.3}, 0.3),
    ],
)
def test_compress_reaches_target_sparsity_on_every_layer(tiny_llama, calibration_ids, stage, target) -> None:
    report = compress_(tiny_llama, _recipe(**stage), calibration_ids, batch_size=4)
    linears = _block_linears(tiny_llama)
    assert len(linears) == 3 * len(PROJ)
    for name, layer in linears.items():
        assert abs(_zero_fraction(layer) - target) <= 0.005, name
    # the report records every targeted layer with the sparsity its mask achieved
    assert sorted(rec.name for rec in report.layers) == sorted(linears)
    for rec in report.layers:
        assert rec.method == stage["method"]
        assert rec.target_sparsity == pytest.approx(target)
        assert rec.sparsity == pytest.approx(_zero_fraction(linears[rec.name]), abs=1e-6)
        assert rec.shape == tuple(linears[rec.name].weight.shape)
    assert report.calibration_tokens == (calibration_ids.numel() if stage["method"] == "wanda" else 0)


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_compress_nm_every_group_has_m_minus_n_zeros(tiny_llama, calibration_ids, method, n, m) -> None:
    compress_(tiny_llama, _recipe(method=method, pattern=f"{n}:{m}"), calibration_ids)
    for name, layer in _block_linears(tiny_llama).items():
        rows, cols = layer.weight.shape
        zeros_per_group = (layer.weight == 0).reshape(rows, cols // m, m).sum(dim=2)
        assert (zeros_per_group >= m - n).all(), name


@pytest.mark.parametrize(
    "stage",
    [
        {"method": "magnitude", "sparsity": 0.5},
        {"method": "wanda", "sparsity": 0.5},
        {"method": "wanda", "pattern": "2:4"},
    ],
)
def test_lm_head_embeddings_and_norms_untouched(tiny_llama, calibration_ids, stage) -> None:
    original = copy.deepcopy(tiny_llama)
    compress_(tiny_llama, _recipe(**stage), calibration_ids)
    after = dict(tiny_llama.named_parameters())
    for name, param in original.named_parameters():
        is_target = name.startswith("model.layers.") and name.endswith("_proj.weight")
        if not is_target:
            assert torch.equal(after[name], param), name
    assert torch.equal(tiny_llama.lm_head.weight, original.lm_head.weight)
    assert torch.equal(tiny_llama.model.embed_tokens.weight, original.model.embed_tokens.weight)


def test_magnitude_prunes_smallest_weights_of_each_layer(tiny_llama) -> None:
    original = copy.deepcopy(tiny_llama)
    compress_(tiny_llama, _recipe(method="magnitude", sparsity=0.5), None)
    before = _block_linears(original)
    for name, layer in _block_linears(tiny_llama).items():
        w0 = before[name].weight.abs()
        kept = layer.weight != 0
        assert w0[kept].min() > w0[~kept].max(), name
        # kept weights keep their exact value (no update after pruning)
        assert torch.equal(layer.weight[kept], before[name].weight[kept])


def test_targets_regex_limits_to_mlp(tiny_llama, calibration_ids) -> None:
    original = copy.deepcopy(tiny_llama)
    report = compress_(
        tiny_llama, _recipe(method="wanda", sparsity=0.5, targets=[r".*\.mlp\..*_proj"]), calibration_ids
    )
    before = _block_linears(original)
    for name, layer in _block_linears(tiny_llama).items():
        if ".mlp." in name:
            assert abs(_zero_fraction(layer) - 0.5) <= 0.005, name
        else:
            assert ".self_attn." in name
            assert torch.equal(layer.weight, before[name].weight), name
    assert {rec.name for rec in report.layers} == {n for n in before if ".mlp." in n}
    assert len(report.layers) == 9


def test_ignore_regex_excludes_layers(tiny_llama) -> None:
    original = copy.deepcopy(tiny_llama)
    compress_(tiny_llama, _recipe(method="magnitude", sparsity=0.5, ignore=[r".*\.layers\.0\..*"]), None)
    before = _block_linears(original)
    for name, layer in _block_linears(tiny_llama).items():
        if name.startswith("model.layers.0."):
            assert torch.equal(layer.weight, before[name].weight), name
        else:
            assert _zero_fraction(layer) == pytest.approx(0.5, abs=0.005), name


def test_targets_matching_nothing_raises_and_names_targets(tiny_llama, calibration_ids) -> None:
    original = copy.deepcopy(tiny_llama)
    recipe = _recipe(method="wanda", sparsity=0.5, targets=["no_such_layer_xyz"])
    with pytest.raises(LlmpressError, match=re.escape("['no_such_layer_xyz']")) as info:
        compress_(tiny_llama, recipe, calibration_ids)
    assert "match no Linear layer" in str(info.value)
    assert "model.layers.0.self_attn.q_proj" in str(info.value)  # example names help the user
    for (name, a), b in zip(tiny_llama.named_parameters(), original.parameters(), strict=True):
        assert torch.equal(a, b), name  # failed before any work


@pytest.mark.parametrize("ids", [None, torch.empty(0, 32, dtype=torch.long)])
def test_wanda_without_calibration_data_raises(tiny_llama, ids) -> None:
    with pytest.raises(LlmpressError, match="needs calibration data"):
        compress_(tiny_llama, _recipe(method="wanda", sparsity=0.5), ids)


def test_magnitude_needs_no_calibration_data(tiny_llama) -> None:
    report = compress_(tiny_llama, _recipe(method="magnitude", sparsity=0.5), None)
    assert len(report.layers) == 21
    assert report.calibration_tokens == 0


def _capture_linear_inputs(model: nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum over all tokens of x_j^2 for the inputs of the named Linear layers, from one full forward pass."""
    sums: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []

    def make_hook(name: str):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)

        return hook

    for name in names:
        handles.append(modules[name].register_forward_pre_hook(make_hook(name)))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def test_wanda_mask_matches_reference_for_block0_q_proj(tiny_llama, calibration_ids) -> None:
    original = copy.deepcopy(tiny_llama)
    captured: list[torch.Tensor] = []
    handle = original.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].detach().clone())
    )
    with torch.no_grad():
        original(input_ids=calibration_ids, use_cache=False)
    handle.remove()
    x = torch.cat(captured).reshape(-1, 64)
    assert x.shape == (8 * 32, 64)

    weight = original.model.layers[0].self_attn.q_proj.weight.detach()
    scores = weight.abs() * (x * x).sum(dim=0).sqrt().unsqueeze(0)
    # per row, prune the 50 % lowest scores
    threshold_index = scores.shape[1] // 2
    order = scores.argsort(dim=1)
    expected_keep = torch.ones_like(weight, dtype=torch.bool)
    expected_keep.scatter_(1, order[:, :threshold_index], False)

    compress_(tiny_llama, _recipe(method="wanda", sparsity=0.5), calibration_ids)
    actual_keep = tiny_llama.model.layers[0].self_attn.q_proj.weight != 0
    assert torch.equal(actual_keep, expected_keep)
    # and it is not simply the magnitude mask: activations changed the choice
    magnitude_keep = row_mask(weight.abs(), 0.5)
    assert not torch.equal(actual_keep, magnitude_keep)


def test_wanda_is_sequential_every_block_matches_reference(tiny_llama, calibration_ids) -> None:
    """Block i is calibrated on the outputs of the already-pruned blocks 0..i-1 (the paper's sequential setting)."""
    original = copy.deepcopy(tiny_llama)
    compress_(tiny_llama, _recipe(method="wanda", sparsity=0.5), calibration_ids, batch_size=3)
    for i in range(3):
        hybrid = copy.deepcopy(original)
        for j in range(i):  # blocks before i as the engine left them
            hybrid.model.layers[j].load_state_dict(tiny_llama.model.layers[j].state_dict())
        names = [f"model.layers.{i}.{'self_attn' if p in PROJ[:4] else 'mlp'}.{p}" for p in PROJ]
        sums = _capture_linear_inputs(hybrid, names, calibration_ids)
        modules = dict(hybrid.named_modules())
        pruned = dict(tiny_llama.named_modules())
        for name in names:
            weight = modules[name].weight.detach()
            expected = row_mask(weight.abs() * sums[name].sqrt().unsqueeze(0), 0.5)
            actual = pruned[name].weight != 0
            mismatch = (expected != actual).sum().item()
            assert mismatch == 0, f"{name}: {mismatch} mask entries differ from the sequential reference"


def test_wanda_block1_differs_from_non_sequential_calibration(tiny_llama, calibration_ids) -> None:
    """Sanity check of the test above: calibrating block 1 on dense block-0 outputs gives a different mask."""
    original = copy.deepcopy(tiny_llama)
    compress_(tiny_llama, _recipe(method="wanda", sparsity=0.5), calibration_ids)
    name = "model.layers.1.mlp.down_proj"
    sums = _capture_linear_inputs(original, [name], calibration_ids)
    weight = dict(original.named_modules())[name].weight.detach()
    dense_calibrated = row_mask(weight.abs() * sums[name].sqrt().unsqueeze(0), 0.5)
    actual = dict(tiny_llama.named_modules())[name].weight != 0
    assert not torch.equal(dense_calibrated, actual)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_sparsity_zero_leaves_logits_unchanged(tiny_llama, calibration_ids, method) -> None:
    ids = calibration_ids[:2]
    with torch.no_grad():
        before = tiny_llama(input_ids=ids, use_cache=False).logits.clone()
    report = compress_(tiny_llama, _recipe(method=method, sparsity=0.0), calibration_ids, batch_size=3)
    with torch.no_grad():
        after = tiny_llama(input_ids=ids, use_cache=False).logits
    assert torch.equal(before, after)
    assert len(report.layers) == 21
    assert all(rec.sparsity == 0.0 for rec in report.layers)


def test_batch_size_does_not_change_wanda_masks(make_tiny_llama, calibration_ids) -> None:
    a, b = make_tiny_llama(), make_tiny_llama()
    compress_(a, _recipe(method="wanda", sparsity=0.5), calibration_ids, batch_size=8)
    compress_(b, _recipe(method="wanda", sparsity=0.5), calibration_ids, batch_size=1)
    for (name, la), lb in zip(_block_linears(a).items(), _block_linears(b).values(), strict=True):
        assert torch.equal(la.weight != 0, lb.weight != 0), name


def test_report_to_dict(tiny_llama) -> None:
    report = compress_(tiny_llama, _recipe(method="magnitude", pattern="2:4"), None)
    data = report.to_dict()
    assert data["recipe"] == "unit-test"
    assert data["device"] == "cpu"
    assert len(data["layers"]) == 21
    first = data["layers"][0]
    assert first["name"] == "model.layers.0.self_attn.q_proj"
    assert first["shape"] == [64, 64]
    assert first["sparsity"] == pytest.approx(0.5)
    assert set(data["stage_seconds"]) == {"0"}


@pytest.mark.parametrize("tied", [True, False])
def test_capture_moves_only_what_runs_before_block_0_and_hands_host_tensors_back(tied: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmpress.compress.calibration import capture_block_inputs, pre_block_tensors
    from llmpress.compress.targets import find_decoder_blocks

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, tie_word_embeddings=tied)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    _, blocks = find_decoder_blocks(model)
    moved = {id(t) for _, _, t in pre_block_tensors(model, blocks)}
    assert id(model.model.embed_tokens.weight) in moved
    assert id(model.model.rotary_emb.inv_freq) in moved  # a buffer read before block 0
    assert not moved & {id(t) for t in [*blocks.parameters(), *blocks.buffers()]}
    assert (id(model.lm_head.weight) in moved) is tied  # an untied head is never read before block 0
    before = {name: t.data_ptr() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    hidden, kwargs = capture_block_inputs(model, blocks, list(ids.split(2)), torch.device("cpu"))
    assert torch.equal(torch.cat(hidden), model.model.embed_tokens(ids))
    assert len(kwargs) == 2 and "position_embeddings" in kwargs[0]
    assert before == {name: t.data_ptr() for name, t in [*model.named_parameters(), *model.named_buffers()]}


def test_a_pattern_that_does_not_tile_the_rows_is_refused_before_any_work() -> None:
    """3:7 on 64-input layers: refused by name before a single layer changes, for every N:M method."""
    from llmpress.config import validate
    from tests.unit.conftest import build_tiny_llama

    for method in ("magnitude", "wanda", "sparsegpt"):
        model = build_tiny_llama()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        recipe = validate(Recipe, {"name": "x", "stages": [{"method": method, "pattern": "3:7"}]}, "recipe")
        with pytest.raises(LlmpressError, match="multiple of 7"):
            compress_(model, recipe, torch.randint(0, 100, (2, 16)), batch_size=2)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
