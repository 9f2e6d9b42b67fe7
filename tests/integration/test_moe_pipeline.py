"""The whole compress flow on a mixture of experts: a small Mixtral (2 blocks of 4 experts, 2 per token, randomly
initialised: no package on the registries ships a real one) with the shipped model's tokenizer, in a throwaway
project with Prefect, MLflow on SQLite and a DVC remote, as `test_pipeline.py` runs the shipped model.

GPTQ W4 (symmetric, groups of 32) on every expert: compressed with every expert calibrated, the routed token counts
reported against the recipe's floor, saved in the llmpress layout, evaluated, exported to ONNX with parity and to
GGUF (scored in llama.cpp where it is built), and gated: the gate's `min_expert_tokens` is set above what any expert
got, so the candidate is registered with the failure named and never becomes champion. Quality is not the point of
a random model; the orchestration of a mixture of experts is.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
import yaml
from mlflow import MlflowClient
from test_pipeline import REPO, _last_summary, _project

from flows.cli import main as cli
from llmpress.evaluate import llamacpp
from llmpress.sources import SHIPPED_NAME, load_model, load_tokenizer

pytestmark = pytest.mark.integration
MODEL_NAME = "tiny-moe-w4"
RECIPE = {
    "name": "moe-gptq-w4g32",
    "description": "GPTQ W4 g32 on every expert, a floor of 16 routed calibration tokens per expert",
    "stages": [{"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True, "targets": [".*_proj"]}],
    "experts": {"min_tokens": 16, "below_floor": "warn"},
}
PARAMS = {
    "recipe": "recipes/moe-gptq-w4g32.yaml",
    "data": {"corpus": "gensim-lee", "eval_fraction": 0.2, "calibration_samples": 8, "seq_len": 128, "seed": 0},
    "eval": {
        "window": 256, "stride": 256, "add_bos": True, "max_tokens": 1024, "batch_size": 4,
        "cloze": {"max_examples": 20, "max_context_tokens": 64},
        "generation": {"max_new_tokens": 8},
        "speed": {"enabled": False},
    },
    "compress": {"device": "cpu", "batch_size": 8},
    "export": {"formats": ["onnx", "gguf"] if llamacpp.available() else ["onnx"], "opset": 18, "parity_tokens": 64,
               "parity_decode_steps": 8},
    "gate": {
        "max_perplexity_ratio": 1.5,
        "max_onnx_logit_diff": 1.0e-3,
        "max_bundle_perplexity_ratio": 1.5,
        "max_gguf_perplexity_ratio": 1.5,
        "max_bundle_bytes_ratio": None,
        "min_bundle_decode_speedup": None,
        "max_repetition_increase": None,  # a random model's greedy text repeats whatever it is
        "min_expert_tokens": 1_000_000,  # more than 1024 calibration tokens can give any expert: must fail
    },
    "tracking": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "itest", "registered_model": MODEL_NAME},
}  # fmt: skip


def _tiny_mixtral(folder: Path) -> None:
    """A small Mixtral with the shipped model's tokenizer (and its vocabulary size)."""
    tokenizer = load_tokenizer(REPO / "models" / SHIPPED_NAME)
    config = transformers.MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # a router that spreads tokens unevenly, as trained ones do
                p.normal_(0, 0.5)
        model.lm_head.weight.mul_(20)  # confident next-token logits: greedy choices are no ties
    model.save_pretrained(folder)  # transformers' own checkpoint layout for Mixtral: one tensor per expert
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    project = _project(tmp_path_factory.mktemp("moe") / "project")
    _tiny_mixtral(project / "models" / "tiny-mixtral")
    (project / "recipes" / "moe-gptq-w4g32.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    params = {**PARAMS, "model": str(project / "models" / "tiny-mixtral")}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli(["--project", str(project), "run"]) == 0  # a failing gate is a result, not an error
    return {"project": project, **_last_summary(project)}


def test_every_expert_is_compressed_counted_and_exported(run: dict) -> None:
    comp = run["compressed"]
    assert run["compressed_layout"] == "llmpress"  # compressed-tensors cannot hold experts transformers fuses
    # 8 experts (2 blocks x 4), each sent some of the 8 x 128 calibration tokens (x 2 per token) by its router
    assert comp["experts"] == 8 and 16 <= comp["expert_min_tokens"] < 8 * 128 * 2 / 4
    assert comp["experts_below_floor"] == 0 and comp["expert_floor"] == 16
    model = load_model(run["compressed_path"])
    quantized = [n for n, m in model.named_modules() if getattr(m, "llmpress_quant", None) is not None]
    assert sum(".experts." in n for n in quantized) == 2 * 4 * 3  # every expert's gate, up and down
    assert comp["perplexity"] / run["base"]["perplexity"] < 1.5
    assert comp["onnx_max_abs_diff"] < 1e-3 and comp["onnx_greedy_identical"] == 1.0
    assert comp["bundle_perplexity"] == pytest.approx(comp["perplexity"], rel=0.05)
    if llamacpp.available():  # every expert's GPTQ codes as Q4_0 blocks, scored by llama.cpp itself
        assert comp["gguf_scored"] == 1.0 and comp["gguf_requantized_tensors"] == 0
        assert comp["gguf_perplexity"] == pytest.approx(comp["perplexity"], rel=0.05)


def test_the_gate_refuses_too_few_tokens_per_expert_and_champion_stays_unset(run: dict) -> None:
    gate = run["gate"]
    assert not gate["passed"] and len(gate["failures"]) == 1, gate["failures"]  # nothing else failed
    assert gate["failures"][0] == f"expert_min_tokens = {run['compressed']['expert_min_tokens']}, required >= 1e+06"
    c = MlflowClient(f"sqlite:///{run['project'] / 'mlflow.db'}")
    version = c.get_model_version(MODEL_NAME, gate["version"])
    assert version.tags["gate.passed"] == "false" and "expert_min_tokens" in version.tags["gate.failures"]
    with pytest.raises(Exception, match="champion"):
        c.get_model_version_by_alias(MODEL_NAME, "champion")
    metrics = c.get_run(run["mlflow_run_id"]).data.metrics
    assert metrics["expert_min_tokens"] == run["compressed"]["expert_min_tokens"]
    plots = {a.path for a in c.list_artifacts(run["mlflow_run_id"], "plots")}
    assert "plots/expert_tokens.png" in plots  # the reviewer sees each expert's calibration tokens
