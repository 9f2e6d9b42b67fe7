"""Compressed folders in compressed-tensors' format: stock transformers loads exactly what llmpress evaluated.

The stock loads here use transformers' own compressed-tensors quantizer (no llmpress code on that path)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from llmpress.compress import ct_format, storage
from llmpress.compress.engine import compress_
from llmpress.compress.quant import quantization_of
from llmpress.config import Recipe
from llmpress.errors import LlmpressError

SYMMETRIC = [
    [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}],
    [{"method": "gptq", "bits": 3, "group_size": 32, "act_order": True, "symmetric": True}],
    [{"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "signed_scale": True}],
    [{"method": "awq", "bits": 4, "group_size": 32, "symmetric": True}],  # scales folded into the norms too
    # two grids: attention 8-bit per channel, MLP 4-bit group 32 (two config groups)
    [{"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "targets": [r".*self_attn\..*_proj"]},
     {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True, "targets": [r".*mlp\..*_proj"]}],
]  # fmt: skip


def _compress_and_save(model, ids, stages, folder: Path, **save) -> str | None:
    compress_(model, Recipe(name="q", stages=stages), ids, batch_size=4)
    model.save_pretrained(folder)
    return storage.save_compressed(model, folder, **save)


def _assert_same_model(stock: torch.nn.Module, ours: torch.nn.Module, ids: torch.Tensor) -> None:
    """The logits, and every parameter bit for bit (compressed-tensors' default route decompresses the packed
    weights on the first forward pass, so that runs first)."""
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, ours(ids).logits)
    stock_params = dict(stock.named_parameters())
    for name, param in ours.named_parameters():
        assert torch.equal(stock_params[name].data, param.data), name


@pytest.mark.parametrize("stages", SYMMETRIC, ids=["rtn4-g32", "gptq3-actorder", "rtn8-signed", "awq4", "mixed"])
def test_stock_transformers_loads_the_evaluated_weights(tiny_llama, calibration_ids, tmp_path, stages) -> None:
    assert _compress_and_save(tiny_llama, calibration_ids, stages, tmp_path) == "compressed-tensors"
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert len(config["config_groups"]) == len(stages)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()  # the default route
    _assert_same_model(stock, tiny_llama, calibration_ids[:2])
    # and llmpress reads it back to the same codes
    loaded = storage.load_compressed(tmp_path)
    modules = dict(loaded.named_modules())
    for name, module in tiny_llama.named_modules():
        if (qw := quantization_of(module)) is not None:
            again = quantization_of(modules[name])
            assert again is not None and torch.equal(again.codes, qw.codes) and torch.equal(again.scale, qw.scale)
            assert torch.equal(again.zero, qw.zero) and again.group_size == qw.group_size
    assert not hasattr(loaded.config, "quantization_config")  # a plain folder written from it is plain


def test_asymmetric_grids_load_through_the_dequantize_route(tiny_llama, calibration_ids, tmp_path) -> None:
    stages = [{"method": "gptq", "bits": 4, "group_size": 32}]
    assert _compress_and_save(tiny_llama, calibration_ids, stages, tmp_path) == "compressed-tensors"
    stock = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    _assert_same_model(stock, tiny_llama, calibration_ids[:2])
    loaded = storage.load_compressed(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(calibration_ids[:2]).logits, tiny_llama(calibration_ids[:2]).logits)


def test_packed_bytes_are_the_codes_plus_float32_scales(tiny_llama, calibration_ids, tmp_path) -> None:
    _compress_and_save(tiny_llama, calibration_ids, SYMMETRIC[0], tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
        for name, module in tiny_llama.named_modules():
            if quantization_of(module) is None:
                continue
            out, cols = module.weight.shape
            assert f"{name}.weight" not in names and f"{name}.weight_zero_point" not in names
            packed, scale = f.get_tensor(f"{name}.weight_packed"), f.get_tensor(f"{name}.weight_scale")
            assert packed.dtype == torch.int32 and packed.shape == (out, math.ceil(cols * 4 / 32))
            assert scale.dtype == torch.float32 and scale.shape == (out, cols // 32)
            assert f.get_tensor(f"{name}.weight_shape").tolist() == [out, cols]


@pytest.mark.parametrize(
    ("stages", "reason"),
    [
        ([{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False, "offset": "min"}], "offset 'min'"),
        ([{"method": "rtn", "bits": 4, "group_size": 48}], "ragged groups"),
        ([{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True},
          {"method": "embeddings", "bits": 8, "group_size": 32}], "embedding"),
        ([{"method": "lowrank", "rank_ratio": 0.5, "activation_aware": False}], "low-rank"),
    ],
)  # fmt: skip
def test_what_compressed_tensors_cannot_hold_keeps_the_llmpress_layout(
    tiny_llama, calibration_ids, tmp_path, stages, reason
) -> None:
    assert _compress_and_save(tiny_llama, calibration_ids, stages, tmp_path) == "llmpress"
    manifest = json.loads((tmp_path / storage.MANIFEST).read_text())
    assert manifest["format"] == storage.FORMAT and reason in manifest["compressed_tensors"]
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert ct_format.unsupported(tiny_llama)
    loaded = storage.load_compressed(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(calibration_ids[:2]).logits, tiny_llama(calibration_ids[:2]).logits)


def test_a_sparse_only_model_is_stored_as_bitmasks(tiny_llama, calibration_ids, tmp_path) -> None:
    stages = [{"method": "magnitude", "sparsity": 0.5}]
    dense_dir, sparse_dir = tmp_path / "dense", tmp_path / "sparse"
    assert _compress_and_save(tiny_llama, calibration_ids, stages, dense_dir, sparse="dense") is None
    assert not (dense_dir / storage.MANIFEST).exists()  # a plain folder, as asked
    tiny_llama.save_pretrained(sparse_dir)
    assert storage.save_compressed(tiny_llama, sparse_dir) == "llmpress"
    manifest = json.loads((sparse_dir / storage.MANIFEST).read_text())
    linears = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert set(manifest["sparse"]) == set(linears)
    # kept fp32 values + one bit per weight instead of 4 bytes per weight
    saved = sum(4 * m.weight.numel() - 4 * int(torch.count_nonzero(m.weight)) - math.ceil(m.weight.numel() / 8)
                for m in linears.values())  # fmt: skip
    dense_bytes = (dense_dir / "model.safetensors").stat().st_size
    sparse_bytes = (sparse_dir / "model.safetensors").stat().st_size
    assert dense_bytes - sparse_bytes == pytest.approx(saved, abs=4096)  # safetensors headers differ
    assert saved > 0.4 * sum(4 * m.weight.numel() for m in linears.values())
    loaded = storage.load_compressed(sparse_dir)
    _assert_same_model(loaded, tiny_llama, calibration_ids[:2])


def test_sparse_and_quantized_is_compressed_tensors_with_the_zeros_in_the_codes(
    tiny_llama, calibration_ids, tmp_path
) -> None:
    stages = [{"method": "magnitude", "sparsity": 0.5}, {"method": "rtn", "bits": 4, "group_size": 32,
                                                          "symmetric": True}]  # fmt: skip
    assert _compress_and_save(tiny_llama, calibration_ids, stages, tmp_path) == "compressed-tensors"
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    _assert_same_model(stock, tiny_llama, calibration_ids[:2])
    assert float((stock.model.layers[0].mlp.up_proj.weight == 0).float().mean()) >= 0.5


def test_the_llmpress_layout_is_still_written_and_read_when_asked(tiny_llama, calibration_ids, tmp_path) -> None:
    stages = SYMMETRIC[0]
    assert _compress_and_save(tiny_llama, calibration_ids, stages, tmp_path, layout="llmpress") == "llmpress"
    assert json.loads((tmp_path / storage.MANIFEST).read_text())["format"] == "llmpress-compressed/1"
    loaded = storage.load_compressed(tmp_path)
    _assert_same_model(loaded, tiny_llama, calibration_ids[:2])


def test_a_damaged_compressed_tensors_folder_is_refused_by_name(tiny_llama, calibration_ids, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    _compress_and_save(tiny_llama, calibration_ids, SYMMETRIC[0], tmp_path)
    shard = tmp_path / "model.safetensors"
    tensors = load_file(shard)
    packed = tensors.pop("model.layers.2.self_attn.k_proj.weight_packed")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(LlmpressError, match=r"model.layers.2.self_attn.k_proj.weight_packed"):
        storage.load_compressed(tmp_path)
    tensors["model.layers.2.self_attn.k_proj.weight_packed"] = packed
    tensors["model.layers.1.mlp.up_proj.weight_scale"] += 1e-9  # no longer fp16 values
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(LlmpressError, match=r"up_proj: weight_scale holds values that are not fp16"):
        storage.load_compressed(tmp_path)


def _pyfunc_predict_without_llmpress(folder: Path, tmp_path: Path, prompt: str) -> subprocess.CompletedProcess:
    import mlflow

    from llmpress.tracking import PYFUNC_FILE, SHAPES_FILE

    logged = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(logged, python_model=str(PYFUNC_FILE), artifacts={"hf_model": str(folder)},
                             code_paths=[str(SHAPES_FILE)])  # fmt: skip
    script = ("import sys; sys.modules['llmpress'] = None; import mlflow; "
              f"print(repr(mlflow.pyfunc.load_model({str(logged)!r}).predict([{prompt!r}])[0]))")  # fmt: skip
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("layout", ["compressed-tensors", "llmpress"])
def test_the_registry_pyfunc_serves_a_compressed_folder_without_llmpress(tiny_llama, calibration_ids, tmp_path,
                                                                         layout) -> None:  # fmt: skip
    """compressed-tensors folders generate the evaluated model's tokens on a machine without llmpress; llmpress's
    own layout says it needs llmpress instead of generating from random weights."""
    from conftest import byte_tokenizer_json
    from transformers import PreTrainedTokenizerFast

    from llmpress.steps import save_model

    byte_tokenizer_json(tmp_path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="A")
    stages = [{"method": "rtn", "bits": 4, "group_size": 32}]  # asymmetric: transformers' dequantize route
    compress_(tiny_llama, Recipe(name="q", stages=stages), None)
    folder = tmp_path / "model"
    assert save_model(tiny_llama, tokenizer, folder, {}, layout=layout) == layout
    done = _pyfunc_predict_without_llmpress(folder, tmp_path, "edge")
    if layout == "llmpress":
        assert done.returncode != 0 and "install llmpress to load it" in done.stderr
        return
    assert done.returncode == 0, done.stderr[-2000:]
    prompt_ids = tokenizer("edge", return_tensors="pt")["input_ids"]
    expected = tiny_llama.generate(prompt_ids, max_new_tokens=32, do_sample=False, pad_token_id=0)  # its default
    assert done.stdout.strip().splitlines()[-1] == repr(tokenizer.decode(expected[0, prompt_ids.shape[1] :],
                                                                          skip_special_tokens=True))  # fmt: skip
