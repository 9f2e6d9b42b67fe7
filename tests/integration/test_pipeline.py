"""The whole compress flow on the real shipped model (SmolLM2-135M), in a throwaway project folder.

Short calibration (8 windows of 128 tokens) and evaluation (first 4096 held-out tokens) keep this to a few minutes
on 2 cores. Prefect runs in ephemeral mode, MLflow on a SQLite file, DVC with a local-folder remote, all inside
tmp_path. Bounds are justified next to each assertion.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient

from flows.cli import main as cli
from llmpress.data import calibration_windows
from llmpress.evaluate import llamacpp
from llmpress.export.onnx import check_parity
from llmpress.sources import SHIPPED_NAME, load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "smollm2-135m-edge"
pytestmark = pytest.mark.integration

PARAMS = {
    "model": "default",
    "recipe": "recipes/wanda-50.yaml",
    "data": {"corpus": "gensim-lee", "eval_fraction": 0.2, "calibration_samples": 8, "seq_len": 128, "seed": 0},
    "eval": {
        "window": 512,
        "stride": 512,
        "add_bos": True,
        "max_tokens": 4096,
        "batch_size": 4,
        "cloze": {"max_examples": 60, "max_context_tokens": 64},
        "generation": {"max_new_tokens": 16},
        "speed": {"prompt_tokens": 64, "decode_tokens": 8, "batch_size": 2, "warmup": 1, "repeats": 1},
    },
    "compress": {"device": "cpu", "batch_size": 8},
    # The GGUF goes along where llama.cpp can score it (make setup builds it; a bare pytest may lack it).
    "export": {"formats": ["onnx", "gguf"] if llamacpp.available() else ["onnx"], "opset": 18, "parity_tokens": 128},
    # Measured on this set-up: Wanda 50 % is 2.18x the dense perplexity, magnitude 50 % about 16x. Its bundle is
    # the fp32 graph (pruning alone stores dense zeros): no smaller than the base, faster only by onnxruntime.
    "gate": {
        "max_perplexity_ratio": 2.5,
        "max_onnx_logit_diff": 1.0e-3,
        "max_bundle_perplexity_ratio": 2.5,
        "max_gguf_perplexity_ratio": 2.5,  # the GGUF holds the same weights (F16): the same bound as the bundle's
        "max_bundle_bytes_ratio": None,
        "min_bundle_decode_speedup": 1.2,
        # Wanda 50 % loops in greedy text more than the base model does: the default 0.1 would fail it (README
        # "Why the gate checks repetition"); this project lets it through so it can be champion below.
        "max_repetition_increase": 0.6,
    },
    "tracking": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "itest", "registered_model": MODEL_NAME},
}


def _project(root: Path) -> Path:
    """A minimal llmpress project: dvc.yaml, params.yaml, recipes, a DVC repo with a local remote."""
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copytree(REPO / "recipes", root / "recipes")
    (root / "llmpress").symlink_to(REPO / "llmpress")  # the prepare stage depends on llmpress/data.py
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    # The shipped model converted by `make fetch`; the default source finds it and skips the 25 s conversion.
    (root / "models").mkdir()
    (root / "models" / SHIPPED_NAME).symlink_to(REPO / "models" / SHIPPED_NAME)
    # The checkout's graph templates (content-keyed): after `make run` the export writes weights into the traced
    # graph of this architecture instead of tracing it again (~20 s); the first export of a checkout traces it.
    (REPO / "models" / "onnx-templates").mkdir(parents=True, exist_ok=True)
    (root / "models" / "onnx-templates").symlink_to(REPO / "models" / "onnx-templates")
    for args in (["init", "--no-scm"], ["remote", "add", "-d", "local", str(root / "dvc-remote")]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True)
    return root


# Credentials planted in the environment of both runs: none may reach a log, a parameter, a tag or an artifact.
PLANTED = {
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-9Xq2",
    "AWS_SESSION_TOKEN": "planted-aws-token-3Rv8",
    "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-pw-7Lk4",
    "MLFLOW_TRACKING_TOKEN": "planted-mlflow-token-5Hn1",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    project = _project(tmp_path_factory.mktemp("itest") / "project")
    results = {"project": project}
    saved = {key: os.environ.get(key) for key in PLANTED}
    os.environ.update(PLANTED)
    try:
        assert cli(["--project", str(project), "run"]) == 0  # wanda-50, the default recipe
        results["wanda"] = _last_summary(project)
        code = cli(["--project", str(project), "run", "--recipe", "recipes/magnitude-50.yaml", "--no-export"])
        assert code == 0  # a failed gate is a verdict, not an error
        results["magnitude"] = _last_summary(project)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return results


def _last_summary(project: Path) -> dict:
    c = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = c.get_experiment_by_name("itest")
    run = c.search_runs([exp.experiment_id], "tags.registered_version != ''", order_by=["start_time DESC"])[0]
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="summary.json",
                                               tracking_uri=c.tracking_uri)  # fmt: skip
    return json.loads(Path(path).read_text())


def test_sparsity_on_every_targeted_layer(runs: dict) -> None:
    model = load_model(runs["wanda"]["compressed_path"])
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith("_proj")]
    assert len(layers) == 30 * 7
    for name, layer in layers:
        sparsity = (layer.weight == 0).float().mean().item()
        assert abs(sparsity - 0.5) <= 0.005, f"{name}: {sparsity}"
    # lm_head (tied to the embeddings), embeddings and norms are not targeted: bit-identical to the base model
    base = load_model(REPO / "models" / SHIPPED_NAME)
    untouched = [n for n, _ in base.named_parameters() if not n.endswith("_proj.weight")]
    assert "lm_head.weight" in dict(base.named_parameters()) or base.config.tie_word_embeddings
    for name in untouched:
        assert torch.equal(base.get_parameter(name), model.get_parameter(name)), name
    # the folder stores the pruned linears as kept values + bitmasks: 538 MB -> about 339 MB
    assert runs["wanda"]["compressed_layout"] == "llmpress"
    assert 0.60 < runs["wanda"]["compressed"]["weights_bytes"] / runs["wanda"]["base"]["weights_bytes"] < 0.66


def test_perplexity_bounds(runs: dict) -> None:
    dense = runs["wanda"]["base"]["perplexity"]
    wanda = runs["wanda"]["compressed"]["perplexity"]
    magnitude = runs["magnitude"]["compressed"]["perplexity"]
    # The dense model scores ~31 on this news text; anything far outside means the protocol or loading broke.
    assert 15 < dense < 60
    assert all(math.isfinite(p) for p in (dense, wanda, magnitude))
    # Wanda 50 % measured at 2.18x dense here (LLaMA-7B in the paper: 1.28x; small models lose more).
    assert dense < wanda < 2.5 * dense
    assert wanda < magnitude  # the point of using activations
    assert runs["wanda"]["compressed"]["sparsity"] == pytest.approx(0.5, abs=0.005)


def test_agreement_cloze_and_generations(runs: dict) -> None:
    comp, base = runs["wanda"]["compressed"], runs["wanda"]["base"]
    magnitude = runs["magnitude"]["compressed"]
    # Pruning half the weights must cost some agreement, and Wanda must keep more of it than magnitude.
    assert 0 < comp["kl_to_base"] < magnitude["kl_to_base"]
    assert magnitude["top1_agreement"] < comp["top1_agreement"] < 1.0
    assert comp["bundle_cloze_examples"] >= 50 and magnitude["cloze_examples"] == comp["bundle_cloze_examples"]
    # cloze of the exported Wanda model is measured on its bundle; magnitude is not exported: on the PyTorch model
    assert 0 < base["cloze_accuracy"] <= 1 and 0 <= comp["bundle_cloze_accuracy"] <= 1
    assert "cloze_accuracy" not in comp and "repeated_ngram_rate" not in comp
    assert magnitude["cloze_accuracy"] <= comp["bundle_cloze_accuracy"]
    generations = runs["wanda"]["generations"]
    assert len(generations) == 5 and all(g["base"].strip() and g["compressed"].strip() for g in generations)
    assert any(g["base"] != g["compressed"] for g in generations)


def test_onnx_matches_pytorch(runs: dict) -> None:
    comp = runs["wanda"]["compressed"]
    # fp32 in both; differences come only from operator fusion and summation order over 30 blocks. Measured
    # ~1e-4 on logits of magnitude ~10-30, so 1e-3 is 10x headroom and still catches any real divergence.
    # The max covers the prefill and 32 greedy decode steps, each side decoding from its own KV cache.
    assert comp["onnx_max_abs_diff"] < 1e-3
    assert comp["onnx_argmax_agreement"] == 1.0
    assert comp["onnx_decode_steps"] == 32 and comp["onnx_greedy_identical"] == 1.0
    # Re-check independently on a batch of two different calibration windows, through dynamic batch/sequence axes.
    path = runs["wanda"]["compressed_path"]
    ids = calibration_windows(load_tokenizer(path), runs["project"] / "data" / "calibration.jsonl", 96, True)[:2]
    parity = check_parity(load_model(path), runs["wanda"]["onnx_path"], ids, decode_steps=32)
    assert parity.max_abs_diff < 1e-3 and parity.argmax_agreement == 1.0 and parity.greedy_identical


def test_the_bundle_is_scored_on_its_own_and_gated(runs: dict) -> None:
    """Wanda's bundle is the fp32 graph: onnxruntime scores it as PyTorch scores the model, and the gate judges it."""
    comp, base, gate = runs["wanda"]["compressed"], runs["wanda"]["base"], runs["wanda"]["gate"]
    assert comp["bundle_precision"] == "fp32" and comp["bundle_accuracy_level"] is None
    assert comp["bundle_precision_counts"] == {"gather_fp32": 1, "matmul_fp32": 30 * 7 + 1}
    # the same weights in another runtime: perplexity, KL and agreement equal to PyTorch's within summation order
    assert comp["bundle_perplexity"] == pytest.approx(comp["perplexity"], rel=1e-4)
    assert comp["bundle_kl_to_base"] == pytest.approx(comp["kl_to_base"], rel=1e-3, abs=1e-5)
    assert abs(comp["bundle_top1_agreement"] - comp["top1_agreement"]) < 2e-3
    assert comp["bundle_greedy_identical"] == 1.0 and comp["bundle_max_abs_diff"] == comp["onnx_max_abs_diff"]
    # graph and weights: the fp32 weights plus the graph, no smaller than the base's safetensors
    assert 0.99 < comp["bundle_bytes"] / base["weights_bytes"] < 1.02
    checks = {c["name"]: c for c in gate["checks"]}
    assert checks["bundle_perplexity_ratio"]["passed"] and checks["bundle_decode_speedup"]["passed"]
    assert checks["bundle_perplexity_ratio"]["value"] == pytest.approx(comp["bundle_perplexity"] / base["perplexity"])
    assert "bundle_bytes_ratio" not in checks  # switched off in this project's params (pruning stores dense zeros)
    magnitude = {c["name"]: c for c in runs["magnitude"]["gate"]["checks"]}
    assert "not checked: nothing exported" in magnitude["bundle_perplexity_ratio"]["note"]  # --no-export
    # Greedy continuations of held-out prompts, the bundle's own: both pruned models repeat themselves more than the
    # base model, magnitude (16x the perplexity) far more. Without a bundle the PyTorch model's are judged.
    increase = checks["repetition_increase"]["value"]
    assert increase == pytest.approx(comp["bundle_repeated_ngram_rate"] - base["repeated_ngram_rate"])
    assert 0.03 < increase < magnitude["repetition_increase"]["value"]
    assert magnitude["repetition_increase"]["value"] == pytest.approx(
        runs["magnitude"]["compressed"]["repeated_ngram_rate"] - base["repeated_ngram_rate"]
    )


@pytest.mark.skipif(not llamacpp.available(), reason=llamacpp.INSTALL)
def test_the_gguf_is_scored_in_llama_cpp_gated_and_bundled(runs: dict) -> None:
    """export.formats has gguf: Wanda's float weights go into the GGUF as F16 (norms F32); llama.cpp's own logits
    give PyTorch's perplexity within 1 % (F16 weights and activations against fp32) and its top-1 token nearly
    everywhere; the gate judges the GGUF's own ratio; the bundle carries the file with its hash and scores."""
    comp, base, gate = runs["wanda"]["compressed"], runs["wanda"]["base"], runs["wanda"]["gate"]
    details = comp["gguf_details"]
    assert details["block_types"] == {"F16": 30 * 7 + 1, "F32": 30 * 2 + 1} and details["requantized"] == []
    assert details["tokenizer_pre"] == "gpt-2" and comp["gguf_scored"] == 1.0
    assert comp["gguf_perplexity"] == pytest.approx(comp["perplexity"], rel=0.01)
    assert comp["gguf_top1_agreement"] >= 0.95
    # F16 weights: half the fp32 graph's bytes, within the tokenizer's and the metadata's
    assert 0.49 < comp["gguf_bytes"] / base["weights_bytes"] < 0.52
    # llama.cpp at batch 1 decodes faster than PyTorch on the same 2 cores
    assert comp["gguf_b1_decode_tokens_per_s"] > base["torch_b1_decode_tokens_per_s"]
    check = next(c for c in gate["checks"] if c["name"] == "gguf_perplexity_ratio")
    assert check["passed"] and check["value"] == pytest.approx(comp["gguf_perplexity"] / base["perplexity"])
    magnitude = next(c for c in runs["magnitude"]["gate"]["checks"] if c["name"] == "gguf_perplexity_ratio")
    assert "no GGUF exported" in magnitude["note"]  # --no-export: nothing written, nothing scored
    bundle = Path(mlflow.artifacts.download_artifacts(
        run_id=runs["wanda"]["mlflow_run_id"], artifact_path="bundle",
        tracking_uri=f"sqlite:///{runs['project'] / 'mlflow.db'}"))  # fmt: skip
    from llmpress.bundle import verify_bundle

    manifest = verify_bundle(bundle)
    entry = manifest["formats"]["gguf"]
    assert entry["files"] == ["model.gguf"] and entry["bytes"] == comp["gguf_bytes"]
    assert entry["scores"]["perplexity"] == pytest.approx(comp["gguf_perplexity"]) and entry["scored"] is True
    assert manifest["formats"]["onnx"]["scores"]["perplexity"] == pytest.approx(comp["bundle_perplexity"])
    assert manifest["model"]["runtimes"] == ["llmpress-runner", "onnxruntime-genai", "llama.cpp"]
    # the shipped file itself, loaded by llama.cpp, continues a held-out prompt as the PyTorch model does
    prompt = load_tokenizer(runs["wanda"]["compressed_path"])("The weather in the mountains")["input_ids"]
    model = load_model(runs["wanda"]["compressed_path"])
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :].tolist()
    assert llamacpp.LlamaCpp(bundle / "model.gguf", 64, all_logits=False).greedy(prompt, 8) == expected


def test_registry_versions_tags_and_aliases(runs: dict) -> None:
    project = runs["project"]
    c = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    wanda_v = runs["wanda"]["gate"]["version"]
    mag_v = runs["magnitude"]["gate"]["version"]
    v1 = c.get_model_version(MODEL_NAME, wanda_v)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}
    assert v1.tags["data_version"] == f"calibration:{outs['data/calibration.jsonl']},eval:{outs['data/eval.txt']}"
    assert len(v1.tags["recipe_hash"]) == 64 and len(v1.tags["base_model_hash"]) == 64
    assert v1.tags["git_commit"]
    assert v1.tags["gate.passed"] == "true"
    assert str(c.get_model_version_by_alias(MODEL_NAME, "champion").version) == wanda_v
    # The failing magnitude candidate: registered, aliased candidate, tagged with why, champion untouched.
    v2 = c.get_model_version(MODEL_NAME, mag_v)
    assert v2.tags["gate.passed"] == "false"
    assert "perplexity_ratio" in v2.tags["gate.failures"]
    # The model card is the version's description: metrics against base and champion, the failure explained.
    assert v2.description.startswith(f"# {MODEL_NAME} v{mag_v}")
    assert "**Gate: FAILED** — perplexity_ratio" in v2.description and f"champion (v{wanda_v})" in v2.description
    assert "**Gate: PASSED**" in v1.description and "no champion yet" in v1.description
    assert str(c.get_model_version_by_alias(MODEL_NAME, "candidate").version) == mag_v
    assert runs["magnitude"]["gate"]["champion"] == wanda_v


def test_mlflow_run_contents(runs: dict) -> None:
    c = MlflowClient(f"sqlite:///{runs['project'] / 'mlflow.db'}")
    run = c.get_run(runs["wanda"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["recipe.name"] == "wanda-50"
    assert run.data.metrics["perplexity"] == pytest.approx(runs["wanda"]["compressed"]["perplexity"])
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {
        "gate_report.json",
        "summary.json",
        "plots",
        "model_card.md",
        "generations.json",
        "bundle",
    } <= artifacts
    assert "onnx" not in artifacts  # the graph is logged once, inside the bundle
    children = c.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    gguf = {"gguf"} if llamacpp.available() else set()
    assert {r.info.run_name for r in children} == {"data", "baseline", "compress", "evaluate", "export", "bundle",
                                                   "speed"} | gguf  # fmt: skip
    plots = {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/sparsity_per_layer.png", "plots/cost_vs_base.png"}


def test_speed_and_memory_measured(runs: dict) -> None:
    """The base model in PyTorch; the compressed model in the runtime that serves it: onnxruntime when exported
    (wanda), PyTorch when not (magnitude, --no-export)."""
    comp, base, unexported = runs["wanda"]["compressed"], runs["wanda"]["base"], runs["magnitude"]["compressed"]
    for metrics, runtime in ((base, "torch"), (comp, "ort"), (unexported, "torch")):
        for key in ("b1_prefill_ms", "b2_prefill_ms", "b1_decode_tokens_per_s", "b2_decode_tokens_per_s"):
            assert 0 < metrics[f"{runtime}_{key}"] < 1e6, key
        # fp32 weights alone are ~520 MB: a peak below that would mean the measurement missed the model; the
        # measuring process holds one model, so far above ~2 GB would mean it counted something else.
        assert 500 < metrics[f"{runtime}_peak_rss_mb"] < 2500
    assert comp["runtime"] == "ort" and unexported["runtime"] == "torch"
    assert not any(k.startswith("torch_") for k in comp) and not any(k.startswith("ort_") for k in unexported)
    # Speed-up over the base model in PyTorch, measured in the same run: onnxruntime decodes the same fp32 weights
    # faster (2.4x measured on 2 cores), PyTorch the same dense shapes about as fast.
    assert comp["decode_speedup_b1"] > 1.2
    assert 0.5 < unexported["decode_speedup_b1"] < 2.0


def test_registered_model_loads_from_registry(runs: dict) -> None:
    uri = f"sqlite:///{runs['project'] / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    folder = mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion", tracking_uri=uri)
    hf = Path(folder) / "artifacts" / "hf"
    model = load_model(hf)
    ref = load_model(runs["wanda"]["compressed_path"])
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_dvc_repro_is_noop_and_pushed(runs: dict) -> None:
    project = runs["project"]
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project, capture_output=True, text=True)
    assert "Data and pipelines are up to date" in status.stdout
    repro = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, capture_output=True, text=True)
    assert "Running stage" not in repro.stdout and repro.returncode == 0
    assert any((project / "dvc-remote").rglob("*")), "dvc push sent nothing to the remote"


def test_bad_recipe_is_refused_before_anything_is_registered(runs: dict, tmp_path: Path, capsys) -> None:
    project = runs["project"]
    c = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    before = len(c.search_model_versions(f"name = '{MODEL_NAME}'"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstages:\n  - method: wanda\n    sparsity: 1.5\n")
    assert cli(["--project", str(project), "run", "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sparsity" in err and "less than 1" in err
    assert len(c.search_model_versions(f"name = '{MODEL_NAME}'")) == before


def test_edge_bundle_runs_with_only_onnxruntime_and_tokenizers(runs: dict, tmp_path: Path) -> None:
    """The run's bundle verifies, carries the verdict and lineage, and generates - in a fresh virtualenv holding
    numpy, onnxruntime and tokenizers only - exactly the greedy tokens PyTorch generates from the compressed model,
    and so does onnxruntime-genai from the same folder."""
    import importlib.metadata as md

    from tokenizers import Tokenizer

    from llmpress.bundle import verify_bundle

    uri = f"sqlite:///{runs['project'] / 'mlflow.db'}"
    run_id = runs["wanda"]["mlflow_run_id"]
    bundle = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="bundle", tracking_uri=uri,
                                                      dst_path=str(tmp_path)))  # fmt: skip
    manifest = verify_bundle(bundle)
    assert manifest["gate"]["passed"] is True and manifest["lineage"]["version"] == runs["wanda"]["gate"]["version"]
    assert manifest["metrics"]["perplexity"] == pytest.approx(runs["wanda"]["compressed"]["perplexity"])

    prompt = "The weather in the mountains"
    ids = Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(prompt).ids
    model = load_model(runs["wanda"]["compressed_path"])
    # the bundle's runner stops at generation_config's eos_token_id, as transformers' generate does
    generated = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :]
    expected = Tokenizer.from_file(str(bundle / "tokenizer.json")).decode(generated.tolist(), skip_special_tokens=True)

    env_dir = tmp_path / "edge-venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    pins = [f"{name}=={md.version(name)}" for name in ("numpy", "onnxruntime", "tokenizers")]
    subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True, timeout=600)
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0  # really minimal
    # the bundle's own runner, as on a device, and `llmpress bundle run` from the checkout (no llmpress install)
    on_device = subprocess.run([str(python), str(bundle / "run.py"), prompt, "--max-new-tokens", "16"],
                               capture_output=True, text=True, timeout=600)  # fmt: skip
    assert on_device.returncode == 0, on_device.stderr
    via_cli = subprocess.run([str(python), "-m", "flows.cli", "bundle", "run", str(bundle), prompt, "--max-new-tokens",
                              "16"], capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2],
                             env={"PYTHONPATH": str(Path(__file__).parents[2]), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert via_cli.returncode == 0, via_cli.stderr
    assert on_device.stdout.rstrip("\n") == via_cli.stdout.rstrip("\n") == expected
    # the same bundle in onnxruntime-genai, through the genai_config.json it carries
    import onnxruntime_genai as og

    assert "onnxruntime-genai" in manifest["model"]["runtimes"]
    genai = og.Model(str(bundle))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=len(ids) + 16)
    generator = og.Generator(genai, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    tokens = [int(t) for t in generator.get_sequence(0)][len(ids) :]
    assert Tokenizer.from_file(str(bundle / "tokenizer.json")).decode(tokens, skip_special_tokens=True) == expected


def test_promote_publishes_the_approved_bundle_to_s3(runs: dict, tmp_path: Path, monkeypatch) -> None:
    """Refused without approval and for a failed gate; once approved: bundle in S3 (multipart, every object's
    sha256 checked), URI on the version, alias production; a second promotion changes nothing."""
    from flows.promote import promote
    from llmpress.bundle import sha256_file, verify_bundle
    from llmpress.promote import PromotionError
    from tests.s3server import seaweedfs

    project = runs["project"]
    c = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    wanda_v, mag_v = runs["wanda"]["gate"]["version"], runs["magnitude"]["gate"]["version"]
    with seaweedfs(tmp_path / "seaweedfs") as s3:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        s3.client().create_bucket(Bucket="edge")
        kwargs = {"s3_prefix": "s3://edge/releases", "project_dir": str(project)}

        with pytest.raises(PromotionError, match="no reviewer approval"):
            promote(MODEL_NAME, wanda_v, **kwargs)
        c.set_model_version_tag(MODEL_NAME, mag_v, "review.approved", "true")
        with pytest.raises(PromotionError, match="did not pass the gate"):
            promote(MODEL_NAME, mag_v, **kwargs)
        assert s3.client().list_objects_v2(Bucket="edge").get("KeyCount", 0) == 0  # nothing published
        assert tracking_alias(c, "production") is None

        c.set_model_version_tag(MODEL_NAME, wanda_v, "review.approved", "true")
        c.set_model_version_tag(MODEL_NAME, wanda_v, "review.approved_by", "reviewer@example.com")
        first = promote(MODEL_NAME, "champion", **kwargs)
        uri = f"s3://edge/releases/{MODEL_NAME}/v{wanda_v}/"
        assert first["published"]["uri"] == uri and first["published"]["already_there"] == 0
        assert first["changed"] and first["approved_by"] == "reviewer@example.com"
        assert tracking_alias(c, "production") == wanda_v
        assert c.get_model_version(MODEL_NAME, wanda_v).tags["bundle.s3_uri"] == uri
        # what S3 holds is the bundle, byte for byte; the weights went up in parts (over the 64 MiB threshold)
        local = tmp_path / "from-s3"
        prefix = f"releases/{MODEL_NAME}/v{wanda_v}/"
        for obj in s3.client().list_objects_v2(Bucket="edge", Prefix=prefix)["Contents"]:
            target = local / obj["Key"].removeprefix(prefix)
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.client().download_file("edge", obj["Key"], str(target))
        manifest = verify_bundle(local)
        assert manifest["lineage"]["version"] == wanda_v
        head = s3.client().head_object(Bucket="edge", Key=prefix + "model.onnx.data")  # the graph's weights
        assert head["ContentLength"] > 64 * 2**20 and "-" in head["ETag"]  # a multipart upload's ETag
        assert head["Metadata"]["sha256"] == sha256_file(local / "model.onnx.data")

        if "gguf" in manifest["formats"]:  # every format the version ships goes up, each hash checked as stored
            head = s3.client().head_object(Bucket="edge", Key=prefix + "model.gguf")
            assert head["Metadata"]["sha256"] == sha256_file(local / "model.gguf") == manifest["files"][
                [f["path"] for f in manifest["files"]].index("model.gguf")]["sha256"]  # fmt: skip

        second = promote(MODEL_NAME, wanda_v, **kwargs)
        assert second["published"]["uploaded"] == 0 and not second["changed"]
        assert tracking_alias(c, "production") == wanda_v

        # As if an earlier publish had been cut short: no manifest, and one object of the right size carrying the
        # right recorded hash but other bytes. Its stored bytes are hashed again, so it is sent again.
        s3.client().delete_object(Bucket="edge", Key=prefix + "manifest.json")
        good = (local / "tokenizer.json").read_bytes()
        s3.client().put_object(Bucket="edge", Key=prefix + "tokenizer.json", Body=bytes([good[0] ^ 1]) + good[1:],
                               Metadata={"sha256": sha256_file(local / "tokenizer.json")})  # fmt: skip
        third = promote(MODEL_NAME, wanda_v, **kwargs)
        assert third["published"]["uploaded"] == 2  # tokenizer.json and manifest.json
        body = s3.client().get_object(Bucket="edge", Key=prefix + "tokenizer.json")["Body"].read()
        assert body == good and tracking_alias(c, "production") == wanda_v


def tracking_alias(c: MlflowClient, alias: str) -> str | None:
    from llmpress.tracking import alias_version

    return alias_version(c, MODEL_NAME, alias)


def test_no_planted_credential_reaches_a_log_param_tag_or_artifact(runs: dict) -> None:
    """Every byte the two runs left: the project (MLflow's database with params, tags and model versions, every
    artifact and registered model, compressed models, DVC files) and the Prefect database (flow and task logs)."""
    from prefect.settings import get_current_settings

    database = get_current_settings().server.database.connection_url.get_secret_value().split(":///")[-1]
    files = [p for p in runs["project"].rglob("*") if p.is_file() and not p.is_symlink()]
    files += [Path(database + suffix) for suffix in ("", "-wal") if Path(database + suffix).is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.suffix == ".onnx" for p in files)
    scanned = 0
    for path in files:
        data = path.read_bytes()
        scanned += len(data)
        for secret in PLANTED.values():
            assert secret.encode() not in data, f"{secret} found in {path}"
    assert scanned > 500 * 2**20  # models and bundles included, not just the small files


def test_killed_during_compression_registers_nothing(runs: dict, tmp_path: Path) -> None:
    """SIGKILL to `llmpress run` (and everything it started) while it compresses: no version, no alias moved,
    no complete output folder; the run it opened is left unfinished, never marked FINISHED."""
    project = runs["project"]
    c = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    before = {(v.version, tuple(sorted(v.aliases))) for v in c.search_model_versions(f"name = '{MODEL_NAME}'")}
    log = tmp_path / "run.log"
    # The Prefect home the SIGTERM and Ctrl-C tests below share: its database is created (~20 s on 2 cores) once
    # for the three. Temporary files stay in tmp_path: a killed process cannot remove its own.
    home = project.parent / "stopped-prefect"
    env = dict(os.environ, PREFECT_HOME=str(home), TMPDIR=str(tmp_path))
    env.pop("PREFECT_API_URL", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "--project", str(project), "run", "--recipe",
                                 "recipes/wanda-mlp-30.yaml", "--no-export", "--set", "eval.speed.enabled=false"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                                env=env)  # fmt: skip
        deadline = time.monotonic() + 300
        while "compress wanda-mlp-30:" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        time.sleep(2)  # a few blocks into the compression
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    after = {(v.version, tuple(sorted(v.aliases))) for v in c.search_model_versions(f"name = '{MODEL_NAME}'")}
    assert after == before
    assert not list((project / "models" / "compressed").glob("wanda-mlp-30-*/hf"))
    exp = c.get_experiment_by_name("itest")
    killed = c.search_runs([exp.experiment_id], "params.`recipe.name` = 'wanda-mlp-30'")
    assert killed and all(r.info.status == "RUNNING" and "registered_version" not in r.data.tags for r in killed)


def _stop_run(project: Path, home: Path, log: Path, sig: signal.Signals, marker: str, after_s: float,
              *args: str) -> int:  # fmt: skip
    """`llmpress run ARGS` in a process group of its own, as a shell starts it, with Prefect in ephemeral mode
    (its database in `home`) and its temporary files in `home/tmp`; `sig` goes to the whole group `after_s`
    seconds after `marker` is logged, as Ctrl-C (SIGINT) and `timeout` (SIGTERM) send it. Returns the exit code."""
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PREFECT_HOME=str(home), TMPDIR=str(home / "tmp"))
    env.pop("PREFECT_API_URL", None)
    with open(log, "wb") as out:
        command = [sys.executable, "-m", "flows.cli", "--project", str(project), "run", *args]
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                                env=env)  # fmt: skip
        deadline = time.monotonic() + 600
        while marker not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        time.sleep(after_s)
        os.killpg(proc.pid, sig)
        return proc.wait(timeout=120)


def _assert_stopped_cleanly(project: Path, home: Path, log: Path, code: int, sig: signal.Signals, step: str,
                            recipe: str, before: set) -> None:  # fmt: skip
    """The stop's promises: exit 128+signal with one `error:` line naming the step and the MLflow run, no
    traceback; that run KILLED and nothing registered or moved; Prefect's flow run crashed; no temporary folder
    or half-written output left; Prefect's temporary server gone with the run."""
    import sqlite3

    text = log.read_text(errors="replace")
    assert code == 128 + sig, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: stopped by {sig.name} during step {step}; "), text[-3000:]
    assert "Traceback" not in text
    run_id = errors[0].split("MLflow run ")[1].split()[0]
    c = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = c.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.params["recipe.name"] == recipe
    assert "registered_version" not in run.data.tags
    assert {(v.version, tuple(sorted(v.aliases))) for v in c.search_model_versions(f"name = '{MODEL_NAME}'")} == before
    with sqlite3.connect(home / "prefect.db") as db:
        states = db.execute("select state_type from flow_run order by start_time desc limit 1").fetchall()
    assert states == [("CRASHED",)]
    assert not [p.name for p in (home / "tmp").iterdir() if p.name.startswith("tmp")]  # Python's temporary names
    assert not [p for p in (project / "models").rglob(".*") if p.is_dir()]  # atomic folders' staging siblings
    assert not _prefect_servers(home)


def _prefect_servers(home: Path) -> list[int]:
    """Processes of a Prefect server started with PREFECT_HOME=`home`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"uvicorn" in cmdline and f"PREFECT_HOME={home}".encode() in environ:
            found.append(int(proc.name))
    return found


def test_sigterm_during_compression_ends_the_run_killed(runs: dict, tmp_path: Path) -> None:
    project = runs["project"]
    c = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    before = {(v.version, tuple(sorted(v.aliases))) for v in c.search_model_versions(f"name = '{MODEL_NAME}'")}
    home, log = project.parent / "stopped-prefect", tmp_path / "run.log"
    code = _stop_run(project, home, log, signal.SIGTERM, "compress sparsegpt-50:", 2, "--recipe",
                     "recipes/sparsegpt-50.yaml", "--set", "eval.speed.enabled=false")  # fmt: skip
    _assert_stopped_cleanly(project, home, log, code, signal.SIGTERM, "compress", "sparsegpt-50", before)
    assert not list((project / "models" / "compressed").glob("sparsegpt-50-*"))


def test_ctrl_c_during_export_ends_the_run_killed(runs: dict, tmp_path: Path) -> None:
    """Compression and evaluation finished and their outputs stay (a re-run resumes from them); the export's
    folder, half-written when the signal came, is not there."""
    project = runs["project"]
    c = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    before = {(v.version, tuple(sorted(v.aliases))) for v in c.search_model_versions(f"name = '{MODEL_NAME}'")}
    home, log = project.parent / "stopped-prefect", tmp_path / "run.log"
    code = _stop_run(project, home, log, signal.SIGINT, "export: ONNX graph with KV cache done", 0.5, "--recipe",
                     "recipes/magnitude-50.yaml", "--set", "eval.speed.enabled=false")  # fmt: skip
    _assert_stopped_cleanly(project, home, log, code, signal.SIGINT, "export", "magnitude-50", before)
    summary = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=log.read_text().split("MLflow run ")[1].split()[0], artifact_path="summary.json",
        tracking_uri=c.tracking_uri)).read_text())  # fmt: skip
    key = summary["lineage"]["run_key"][:12]
    assert (project / "models" / "compressed" / f"magnitude-50-{key}" / "hf" / "checksums.json").is_file()
    assert not (project / "models" / "compressed" / f"magnitude-50-{key}" / "onnx").exists()
