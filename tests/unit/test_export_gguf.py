"""GGUF export on tiny Llamas: every tensor read back with the gguf package equals the weights llmpress evaluated
(bit for bit where the grid is a GGUF block type), q/k rows in llama.cpp's rotary order, the tokenizer inside,
and models the writer does not describe refused by name."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import VOCAB, build_tiny_llama, byte_tokenizer_json
from transformers import PreTrainedTokenizerFast

from llmpress.compress.engine import compress_
from llmpress.config import Recipe
from llmpress.errors import LlmpressError
from llmpress.export.gguf import _permute, export_gguf

GRIDS = {
    "q4_1": ({"method": "rtn", "bits": 4, "group_size": 32, "offset": "min"}, "Q4_1", "exact"),
    "q4_0": ({"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True}, "Q4_0", "exact"),
    "q4_zero": ({"method": "rtn", "bits": 4, "group_size": 32}, "Q4_1", "near"),
    "q8_0": ({"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True}, "Q8_0", "exact"),
    "g64": ({"method": "rtn", "bits": 4, "group_size": 64}, "Q8_0", "requantized"),
}


def _tokenizer(folder) -> None:
    folder.mkdir(exist_ok=True)
    byte_tokenizer_json(folder)
    PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="A", eos_token="B",
                            chat_template="{{ messages[0]['content'] }}").save_pretrained(folder)  # fmt: skip


def _read(path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray], dict[str, str]]:
    reader = gguf.GGUFReader(str(path))
    values = {}
    for t in reader.tensors:
        flat = gguf.quants.dequantize(t.data, t.tensor_type)
        values[t.name] = flat.reshape(t.data.shape[0], -1) if t.data.ndim > 1 else flat
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    return reader, values, kinds


@pytest.mark.parametrize("grid", list(GRIDS))
def test_every_tensor_reads_back_as_evaluated(grid, tmp_path) -> None:
    stage, kind, how = GRIDS[grid]
    model = build_tiny_llama()
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    embeddings = {"method": "embeddings", "bits": 8, "group_size": 32, "symmetric": True}
    compress_(model, Recipe(name="g", stages=[{**stage, "targets": [".*_proj"]}, embeddings]), ids)
    _tokenizer(tmp_path)
    report = export_gguf(model, tmp_path, tmp_path / "model.gguf", fallback="q8_0")
    _, values, kinds = _read(tmp_path / "model.gguf")
    config = model.config
    assert not config.tie_word_embeddings  # an untied head, quantized by the embeddings stage too
    assert kinds["token_embd.weight"] == kinds["output.weight"] == "Q8_0"
    assert np.array_equal(values["token_embd.weight"], model.model.embed_tokens.weight.detach().numpy())
    assert np.array_equal(values["output.weight"], model.lm_head.weight.detach().numpy())
    for i in range(config.num_hidden_layers):
        block = model.model.layers[i]
        attn, mlp = block.self_attn, block.mlp
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        pairs = {"attn_q": (attn.q_proj, heads), "attn_k": (attn.k_proj, kv_heads),
                 "attn_v": (attn.v_proj, None), "attn_output": (attn.o_proj, None), "ffn_gate": (mlp.gate_proj, None),
                 "ffn_up": (mlp.up_proj, None), "ffn_down": (mlp.down_proj, None)}  # fmt: skip
        for short, (layer, heads) in pairs.items():
            name = f"blk.{i}.{short}.weight"
            expected = _permute(layer.weight.detach().float(), heads).numpy()
            assert kinds[name] == kind
            if how == "exact":
                assert np.array_equal(values[name], expected), name
            elif how == "near":
                assert np.abs(values[name] - expected).max() <= 1e-3 * np.abs(expected).max(), name
            else:  # re-rounded to Q8_0 from the evaluated weights
                assert np.abs(values[name] - expected).max() <= np.abs(expected).max() / 100, name
        assert np.array_equal(values[f"blk.{i}.attn_norm.weight"], block.input_layernorm.weight.detach().numpy())
    summary = report.to_dict()
    assert summary["exact"] == (7 * 3 + 2 if how == "exact" else 2)  # + token_embd, output
    assert summary["near_exact"] == (21 if how == "near" else 0) and len(summary["requantized"]) == (
        21 if how == "requantized" else 0
    )
    assert summary["bytes"] == (tmp_path / "model.gguf").stat().st_size


def test_q_and_k_rows_follow_llama_cpps_rotary_pairs() -> None:
    """Row r of head h in llama.cpp's layout is transformers' row (r % 2) * half + r // 2 of that head."""
    rows = torch.arange(16).float()[:, None]
    permuted = _permute(rows, heads=2)[:, 0].long().tolist()
    assert permuted == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_metadata_and_tokenizer(tmp_path) -> None:
    model = build_tiny_llama()
    _tokenizer(tmp_path)
    export_gguf(model, tmp_path, tmp_path / "model.gguf", float_type="f32")
    reader, values, kinds = _read(tmp_path / "model.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    config = model.config
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == config.num_hidden_layers
    assert fields["llama.feed_forward_length"] == config.intermediate_size
    assert fields["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    tokens = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt2"
    assert all(fields["tokenizer.ggml.tokens"][i] == t for t, i in tokens.items())
    assert fields["tokenizer.ggml.eos_token_id"] == tokens["B"]
    assert fields["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"
    assert set(kinds.values()) == {"F32"}  # float_type f32: every weight as it was
    assert np.array_equal(values["blk.1.ffn_down.weight"], model.model.layers[1].mlp.down_proj.weight.detach().numpy())


def test_cli_writes_a_compressed_folder_as_gguf(project, tmp_path, capsys) -> None:
    from flows.cli import main
    from llmpress.steps import save_model

    model = build_tiny_llama()
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    compress_(model, Recipe(name="g", stages=[GRIDS["q4_1"][0]]), ids)
    _tokenizer(tmp_path / "tok")
    folder = tmp_path / "compressed"
    save_model(model, PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok"), folder, {})
    assert main(["--project", str(project), "gguf", str(folder), str(tmp_path / "m.gguf")]) == 0
    assert "21 tensors hold the method's codes exactly" in capsys.readouterr().out
    _, values, kinds = _read(tmp_path / "m.gguf")
    assert kinds["blk.2.ffn_up.weight"] == "Q4_1" and kinds["token_embd.weight"] == "F16"
    assert np.array_equal(values["blk.2.ffn_up.weight"], model.model.layers[2].mlp.up_proj.weight.detach().numpy())


def test_what_the_writer_does_not_describe_is_refused(tmp_path) -> None:
    _tokenizer(tmp_path)
    model = build_tiny_llama()
    model.config.model_type = "qwen2"
    with pytest.raises(LlmpressError, match=r"llama, mistral.*'qwen2'"):
        export_gguf(model, tmp_path, tmp_path / "a.gguf")
    tied = build_tiny_llama()
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    export_gguf(tied, tmp_path, tmp_path / "tied.gguf")
    assert "output.weight" not in _read(tmp_path / "tied.gguf")[2]  # llama.cpp reads a tied head from token_embd
    (tmp_path / "tied.gguf").unlink()
    model = build_tiny_llama()
    with pytest.raises(LlmpressError, match="float_type must be one of"):
        export_gguf(model, tmp_path, tmp_path / "a.gguf", float_type="q3_k")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(LlmpressError, match="byte-level BPE"):
        export_gguf(model, tmp_path, tmp_path / "a.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))
