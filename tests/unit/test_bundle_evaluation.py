"""The graph that ships is scored on its own: a quantized model exported with its codes, set to its serving
accuracy level, and judged in onnxruntime against the base model's baseline - the steps the flow runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import build_tiny_llama, byte_tokenizer_json
from transformers import PreTrainedTokenizerFast

from flows.cli import main as cli
from llmpress import steps
from llmpress.bundle import run as bundle_run
from llmpress.bundle import verify_bundle
from llmpress.compress import compress_
from llmpress.compress.storage import save_compressed
from llmpress.config import EvalParams, ExportParams, GateParams, Recipe
from llmpress.export.generate import OrtGenerator, onnx_session
from llmpress.gate import run_gate

TEXT = " ".join(f"the market near the bridge was quiet on day {i} of the council's long meeting." for i in range(40))


def _folder(model: torch.nn.Module, path) -> str:
    model.save_pretrained(path)
    save_compressed(model, path)
    byte_tokenizer_json(path)
    PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token="A").save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("level", [0, 4])
def test_a_quantized_bundle_is_scored_as_it_ships(tmp_path, level) -> None:
    base = build_tiny_llama()
    base_dir = _folder(base, tmp_path / "base")
    model = build_tiny_llama()
    stages = [{"method": "rtn", "bits": 4, "group_size": 16, "offset": "min"},
              {"method": "embeddings", "bits": 8, "group_size": 16}]  # fmt: skip
    ids = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    compress_(model, Recipe(name="edge", stages=stages), ids, batch_size=4)
    model_dir = _folder(model, tmp_path / "edge")
    eval_path = tmp_path / "eval.txt"
    eval_path.write_text(TEXT)
    params = EvalParams(window=64, stride=64, batch_size=2, max_tokens=1024)
    params = params.model_copy(update={"cloze": params.cloze.model_copy(update={"min_context_words": 5})})
    held_out = steps.DataFile(path=str(eval_path))
    baseline = steps.baseline(steps.BaselineJob(base_path=base_dir, base_sha256="base-sha", held_out=held_out,
                                                params=params, baselines_dir=str(tmp_path / "baselines")))  # fmt: skip
    base_eval = steps.BaselineRef(path=baseline["path"], key=baseline["key"])
    export_params = ExportParams(parity_tokens=32, parity_decode_steps=8, accuracy_level=level)
    exported = steps.export(steps.ExportJob(model_path=model_dir, out_dir=str(tmp_path / "onnx"),
                                            eval_path=str(eval_path), params=export_params))  # fmt: skip
    graph = onnx.load(exported["onnx_path"], load_external_data=False)
    levels = {a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}  # fmt: skip
    assert levels == {level}  # the shipped graph runs at the serving level; parity was checked at level 0
    assert exported["onnx_max_abs_diff"] < 1e-4 and exported["onnx_greedy_identical"] == 1.0
    bundle = steps.evaluate_bundle(steps.BundleJob(
        onnx_path=exported["onnx_path"], model_path=model_dir, base_path=base_dir, baseline=base_eval,
        eval_path=str(eval_path), params=params, export=export_params))  # fmt: skip
    evaluation = steps.evaluate(steps.EvaluateJob(model_path=model_dir, base_path=base_dir, baseline=base_eval,
                                                  held_out=held_out, params=params))  # fmt: skip
    torch_ppl = evaluation["metrics"]["perplexity"]
    assert bundle["bundle_precision"] == "int4-emb8"
    assert bundle["bundle_precision_counts"] == {"gather_8bit": 1, "matmul_4bit": 3 * 7, "matmul_8bit": 1}
    assert bundle["bundle_accuracy_level"] == level
    if level == 0:  # the same weights computed in float32: the PyTorch model's numbers
        assert bundle["bundle_perplexity"] == pytest.approx(torch_ppl, rel=1e-4)
        assert bundle["bundle_kl_to_base"] == pytest.approx(evaluation["metrics"]["kl_to_base"], rel=1e-3, abs=1e-6)
        assert exported["bundle_max_abs_diff"] == exported["onnx_max_abs_diff"]
        assert bundle["bundle_cloze_accuracy"] == evaluation["metrics"]["cloze_accuracy"]
    else:  # int8 activations: close to, not equal to, PyTorch
        assert bundle["bundle_perplexity"] == pytest.approx(torch_ppl, rel=0.05)
        assert exported["bundle_max_abs_diff"] > exported["onnx_max_abs_diff"]
    # 4-bit blocks and an 8-bit table: the weights file far below the fp32 model's bytes (in a model this small the
    # graph's own structure is a good part of the bundle)
    weights = (Path(exported["onnx_path"]).parent / "model.onnx.data").stat().st_size
    assert weights < 0.3 * baseline["metrics"]["weights_bytes"] and bundle["bundle_bytes"] > weights
    gate = GateParams(max_bundle_bytes_ratio=0.6, min_bundle_decode_speedup=3.0)
    measured = evaluation["metrics"] | bundle | {"decode_speedup_b1": 3.5, "runtime": "ort"}
    report = run_gate(measured, evaluation["base"], gate)
    checks = {c.name: c for c in report.checks}
    assert checks["bundle_bytes_ratio"].passed and checks["bundle_decode_speedup"].passed
    # the bundle's own greedy continuations of held-out prompts, against the base model's
    rate, base_rate = bundle["bundle_repeated_ngram_rate"], evaluation["base"]["repeated_ngram_rate"]
    assert 0 <= rate <= 1 and checks["repetition_increase"].value == pytest.approx(rate - base_rate)
    if level == 0:  # float32 arithmetic on the same weights: PyTorch's greedy text, so the same rate
        assert rate == pytest.approx(evaluation["metrics"]["repeated_ngram_rate"], abs=0.02)
    assert checks["bundle_perplexity_ratio"].value == pytest.approx(bundle["bundle_perplexity"]
                                                                     / evaluation["base"]["perplexity"])  # fmt: skip
    # Downstream follows the artifact: the edge bundle carries this graph, says what it holds, verifies, and its
    # runner (numpy + onnxruntime only) generates what the scored graph generates - at level 0, what PyTorch does.
    built = steps.edge_bundle(exported["onnx_path"], model_dir, tmp_path / "bundle", measured, report.to_dict(),
                              {"git_commit": "abc"})  # fmt: skip
    manifest = verify_bundle(built)
    assert manifest["model"]["precision"] == "int4-emb8" and manifest["model"]["matmul_nbits_accuracy_level"] == level
    assert manifest["model"]["precision_counts"] == bundle["bundle_precision_counts"]
    assert cli(["bundle", "verify", str(built)]) == 0
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    prompt = "the market near the bridge"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    generator = OrtGenerator(onnx_session(exported["onnx_path"], 1))
    scored = generator.generate(np.array([ids]), 10)[0, len(ids) :]
    assert bundle_run(built, prompt, max_new_tokens=10) == tokenizer.decode(scored.tolist(), skip_special_tokens=True)
    if level == 0:
        expected = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert scored.tolist() == expected[0, len(ids) :].tolist()
