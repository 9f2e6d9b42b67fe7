"""A catalog of bad inputs, each given to the `llmpress` command line as a user would: every one is refused with
exit status 2 and one `error:` line naming the problem, no traceback, and nothing left behind in the project
folder (no database, no models/, no .services/, no half-written file, params.yaml untouched)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch

from flows.cli import main
from tests.unit.conftest import build_tiny_llama, byte_tokenizer_json, snapshot

REPO = Path(__file__).resolve().parents[2]
WANDA = "name: x\nstages:\n  - method: wanda\n    sparsity: 0.5\n"
SECRET = "planted-secret-Zq81"


def recipe(text: str) -> Callable[[Path], list[str]]:
    def setup(project: Path) -> list[str]:
        (project / "bad.yaml").write_text(text)
        return ["check", str(project / "bad.yaml")]

    return setup


def params(text: str, *args: str) -> Callable[[Path], list[str]]:
    def setup(project: Path) -> list[str]:
        (project / "params.yaml").write_text(text)
        return list(args) or ["check"]

    return setup


def run_with(*args: str) -> Callable[[Path], list[str]]:
    return lambda project: ["run", *args]


def tiny_model(project: Path, name: str = "tiny") -> Path:
    folder = project / "inputs" / name
    build_tiny_llama().save_pretrained(folder)
    byte_tokenizer_json(folder)
    return folder


def model_folder(mutate: Callable[[Path], None], *command: str) -> Callable[[Path], list[str]]:
    """A tiny model folder changed by `mutate`, given to `command` (default: resolve)."""

    def setup(project: Path) -> list[str]:
        folder = tiny_model(project)
        mutate(folder)
        return [*(command or ("resolve",)), str(folder)]

    return setup


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _garbage_header(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff\xfe{{[[!!"
    weights.write_bytes(bytes(data))


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def _corrupt_pickle(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle at all")


def _no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _remote_code(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModelForCausalLM": "x.Model"}}))


def _config_edit(**changes: int) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {k: config[k] + v for k, v in changes.items()}))

    return mutate


def _integer_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _config_set(**values: object) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | values))

    return mutate


def _weights_replaced(kind: str) -> Callable[[Path], None]:
    """model.safetensors turned into something that is not a regular file."""

    def mutate(folder: Path) -> None:
        weights = folder / "model.safetensors"
        weights.unlink()
        if kind == "folder":
            weights.mkdir()
        elif kind == "dangling-link":
            weights.symlink_to(folder / "gone.safetensors")
        else:
            os.mkfifo(weights)  # opening it would wait for a writer forever

    return mutate


def _tokenizer(text: str | None) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        if text is None:
            (folder / "tokenizer.json").unlink()
        else:
            (folder / "tokenizer.json").write_text(text)

    return mutate


def _gguf_with(arch: str, tokenizer: bool) -> Callable[[], bytes]:
    """A small well-formed GGUF file: one tensor, architecture `arch`, with or without tokenizer metadata."""

    def build() -> bytes:
        import tempfile

        import gguf
        import numpy as np

        with tempfile.TemporaryDirectory() as tmp:
            writer = gguf.GGUFWriter(str(Path(tmp) / "m.gguf"), arch)
            if tokenizer:
                writer.add_tokenizer_model("gpt2")
                writer.add_token_list(["a", "b"])
            writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            return (Path(tmp) / "m.gguf").read_bytes()

    return build


def gguf_file(data: Callable[[], bytes]) -> Callable[[Path], list[str]]:
    def setup(project: Path) -> list[str]:
        path = project / "inputs" / "model.gguf"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data())
        return ["resolve", str(path)]

    return setup


def _shipped_gguf_head() -> bytes:
    from llmpress.sources import shipped_gguf_path

    with open(shipped_gguf_path(), "rb") as handle:
        return handle.read(1 << 16)  # the header and part of the metadata: a download cut short


def _bad_config(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")


def recipe_bytes(data: bytes) -> Callable[[Path], list[str]]:
    def setup(project: Path) -> list[str]:
        (project / "bad.yaml").write_bytes(data)
        return ["check", str(project / "bad.yaml")]

    return setup


def params_bytes(data: bytes) -> Callable[[Path], list[str]]:
    def setup(project: Path) -> list[str]:
        (project / "params.yaml").write_bytes(data)
        return ["check"]

    return setup


def laughs(levels: int = 9, width: int = 9) -> str:
    """A "billion laughs" YAML document: a few hundred bytes that expand to width**levels values."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def dequantize_into(where: Callable[[Path, Path], Path], *flags: str) -> Callable[[Path], list[str]]:
    """`llmpress dequantize SRC DST` with DST placed by `where(project, src)`."""

    def setup(project: Path) -> list[str]:
        src = tiny_model(project)
        return ["dequantize", str(src), str(where(project, src)), *flags]

    return setup


def gguf_into(name: str, make: Callable[[Path], object] = lambda dst: None,
              tokenizer: dict | None = None) -> Callable[[Path], list[str]]:  # fmt: skip
    """`llmpress gguf SRC DST` with DST named `name` in inputs/ and prepared by `make`."""

    def setup(project: Path) -> list[str]:
        src = tiny_model(project)
        if tokenizer is not None:
            (src / "tokenizer.json").write_text(json.dumps(tokenizer))
        dst = project / "inputs" / name
        make(dst)
        return ["gguf", str(src), str(dst)]

    return setup


def _existing(project: Path, src: Path) -> Path:
    out = project / "inputs" / "existing"
    out.mkdir(parents=True)
    (out / "precious.txt").write_text("keep me")
    return out


def _a_file(project: Path, src: Path) -> Path:
    (project / "inputs" / "a-file").write_text("keep me")
    return project / "inputs" / "a-file"


def config_text(text: str | bytes) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())

    return mutate


def bundle_manifest(data: bytes) -> Callable[[Path], list[str]]:
    def setup(project: Path) -> list[str]:
        folder = project / "inputs" / "bundle"
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_bytes(data)
        return ["bundle", "verify", str(folder)]

    return setup


def corpus_then(*args: str) -> Callable[[Path], list[str]]:
    """A valid corpus given with --data, then something else wrong: the refusal must not touch params.yaml."""

    def setup(project: Path) -> list[str]:
        path = project / "inputs" / "corpus.txt"
        path.parent.mkdir(exist_ok=True)
        words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "by", "an", "old", "mill"]
        path.write_text("\n".join(" ".join(words[(i + j) % len(words)] for j in range(400)) for i in range(300)))
        return ["run", "--data", str(path), *args]

    return setup


def check_with_model(recipe_text: str, params_text: str | None = None) -> Callable[[Path], list[str]]:
    def setup(project: Path) -> list[str]:
        (project / "bad.yaml").write_text(recipe_text)
        text = params_text or ""
        if "eval:" not in text:  # windows that fit the tiny model's 128-token context
            text += "eval:\n  window: 64\n  stride: 64\n  max_tokens: 128\n"
        if "data:" not in text:
            text += "data:\n  seq_len: 64\n"
        (project / "params.yaml").write_text(text)
        return ["check", str(project / "bad.yaml"), "--model", str(tiny_model(project))]

    return setup


def corpus(name: str, text: str) -> Callable[[Path], list[str]]:
    def setup(project: Path) -> list[str]:
        path = project / "inputs" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return ["run", "--data", str(path)]

    return setup


def env_then(name: str, value: str, *args: str) -> Callable[[Path], list[str]]:
    """`args` run with environment variable `name` set to `value` (and unset again by the test)."""

    def setup(project: Path) -> list[str]:
        setup.context = mock.patch.dict(os.environ, {name: value})
        setup.context.__enter__()
        return list(args)

    return setup


def run_on_tiny(recipe_text: str) -> Callable[[Path], list[str]]:
    """`run --recipe R --model TINY` with windows that fit the tiny model's 128-token context."""

    def setup(project: Path) -> list[str]:
        (project / "bad.yaml").write_text(recipe_text)
        text = (project / "params.yaml").read_text()
        for long, short in (
            ("window: 512", "window: 64"),
            ("stride: 512", "stride: 64"),
            ("seq_len: 256", "seq_len: 64"),
        ):
            text = text.replace(long, short)
        (project / "params.yaml").write_text(text)
        return ["run", "--recipe", "bad.yaml", "--model", str(tiny_model(project))]

    return setup


def registry_then(*args: str) -> Callable[[Path], list[str]]:
    """A project whose MLflow registry holds model `m` with no versions."""

    def setup(project: Path) -> list[str]:
        from mlflow import MlflowClient

        MlflowClient(f"sqlite:///{project / 'mlflow.db'}").create_registered_model("m")
        return list(args)

    return setup


def port_taken(project: Path) -> list[str]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port_taken.holder = holder  # kept open for the duration of the call
    return ["services", "up", "--only", "mlflow", "--mlflow-port", str(holder.getsockname()[1])]


def deploy_without_server(project: Path) -> list[str]:
    """prefect.yaml present, no PREFECT_API_URL (even where a test harness set one for the session)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    shutil.copy(REPO / "prefect.yaml", project)
    context = temporary_settings({PREFECT_API_URL: None})
    context.__enter__()
    deploy_without_server.context = context  # left by the test, after the call
    return ["deploy"]


CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    # recipes
    ("recipe-unknown-key", recipe(WANDA + "    sparsity_ratio: 0.3\n"), "sparsity_ratio"),
    ("recipe-sparsity-one", recipe(WANDA.replace("0.5", "1.0")), "stages.0.wanda.sparsity"),
    ("recipe-sparsity-negative", recipe(WANDA.replace("0.5", "-0.1")), "stages.0.wanda.sparsity"),
    ("recipe-nm-n-ge-m", recipe("name: x\nstages:\n  - method: wanda\n    pattern: '4:4'\n"), "0 < N < M"),
    ("recipe-nm-malformed", recipe("name: x\nstages:\n  - method: wanda\n    pattern: '2-4'\n"), "pattern"),
    ("recipe-bits-unsupported", recipe("name: x\nstages:\n  - method: rtn\n    bits: 16\n"), "bits"),
    ("recipe-bits-one", recipe("name: x\nstages:\n  - method: gptq\n    bits: 1\n"), "bits"),
    ("recipe-unknown-method", recipe("name: x\nstages:\n  - method: obc\n"), "unknown method 'obc'"),
    ("recipe-no-stages", recipe("name: x\nstages: []\n"), "stages"),
    ("recipe-not-mapping", recipe("- a\n- b\n"), "a recipe is a mapping"),
    ("recipe-bad-regex", recipe(WANDA + "    targets: ['(']\n"), "not a valid regular expression"),
    ("recipe-bad-yaml", recipe("name: x\nstages: [\n"), "YAML"),
    ("recipe-missing-file", lambda p: ["check", str(p / "nope.yaml")], "not found"),
    (
        "recipe-targets-match-nothing",
        check_with_model(WANDA + "    targets: ['.*\\.conv_.*']\n", "data:\n  seq_len: 64\n"),
        "match no Linear",
    ),
    ("seq-len-over-context", check_with_model(WANDA, "data:\n  seq_len: 4096\n"), "exceeds"),
    (
        "eval-window-over-context",
        check_with_model(WANDA, "eval:\n  window: 4096\n  max_tokens: 8192\n"),
        "eval.window=4096 exceeds",
    ),
    # what a method cannot do to this model, and a layer quantized twice: refused before any layer changes
    (
        "drop-blocks-all",
        check_with_model("name: d\nstages:\n  - method: drop_blocks\n    blocks: 100\n"),
        "would remove all",
    ),
    (
        "structured-heads-all",
        check_with_model("name: s\nstages:\n  - method: structured\n    heads: 0.99\n"),
        "must be between",
    ),
    (
        "structured-mlp-all",
        check_with_model("name: s\nstages:\n  - method: structured\n    mlp: 0.9999\n"),
        "must be between",
    ),
    (
        "quantized-twice",
        check_with_model(
            "name: q\nstages:\n  - method: rtn\n    bits: 4\n    group_size: 32\n"
            "  - method: rtn\n    bits: 8\n    group_size: null\n"
        ),
        "is quantized by stage 0",
    ),
    (
        "recipe-pattern-does-not-tile",
        check_with_model("name: x\nstages:\n  - method: sparsegpt\n    pattern: '3:7'\n", "data:\n  seq_len: 64\n"),
        "multiple of 7",
    ),
    # params
    ("params-unknown-key", params("eval:\n  strid: 2\n"), "eval.strid: unknown key"),
    ("params-window-zero", params("eval:\n  window: 0\n"), "eval.window"),
    ("params-bad-s3-prefix", params("tracking:\n  bundle_s3_prefix: http://bucket/x\n"), "bundle_s3_prefix"),
    ("params-bad-model-name", params("tracking:\n  registered_model: 'my model!'\n"), "registered_model"),
    ("params-not-yaml", params("eval: [\n"), "YAML"),
    ("set-no-equals", run_with("--set", "gate.max_perplexity_ratio"), "expected KEY=VALUE"),
    ("set-data-key", run_with("--set", "data.seed=3"), "data settings are DVC parameters"),
    ("set-bad-device", run_with("--set", "compress.device=tpu"), "compress.device"),
    ("set-negative-threshold", run_with("--set", "gate.max_perplexity_ratio=-1"), "gate.max_perplexity_ratio"),
    ("run-missing-recipe", run_with("--recipe", "recipes/missing.yaml"), "file not found"),
    # model sources
    ("source-unknown", lambda p: ["resolve", "not a model"], "is not a local folder, a .gguf file"),
    ("source-no-weights", model_folder(_no_weights), "has no *.safetensors weights"),
    ("source-pickle-only", model_folder(_pickle_only), "only pickled weights"),
    ("source-remote-code", model_folder(_remote_code), "remote code"),
    ("source-config-not-json", model_folder(_bad_config), "not valid JSON"),
    ("source-truncated-safetensors", model_folder(_truncate), "truncated"),
    ("source-corrupt-safetensors-header", model_folder(_garbage_header), "corrupt"),
    ("source-missing-gguf", lambda p: ["resolve", str(p / "missing.gguf")], "GGUF file not found"),
    ("source-bad-s3-uri", lambda p: ["resolve", "s3://Bad_Bucket/x"], "not a valid s3:// URI"),
    (
        "source-s3-uri-with-credentials",
        lambda p: ["resolve", f"s3://AKIAEXAMPLE:{SECRET}@bucket/x"],
        "not a valid s3:// URI",
    ),
    # corpora
    ("corpus-missing", lambda p: ["run", "--data", str(p / "missing.txt")], "no such file"),
    ("corpus-empty", corpus("empty.txt", ""), "0 document(s)"),
    ("corpus-tiny", corpus("tiny.txt", "one two\nthree four\nfive six\nseven eight\nnine ten\n"), "characters"),
    ("corpus-wrong-kind", corpus("corpus.csv", "a,b\n"), "expected a .txt"),
    ("corpus-bad-jsonl", corpus("bad.jsonl", '{"txt": 1}\n'), "expected a JSON object with a 'text' field"),
    ("corpus-jsonl-not-json", corpus("garbage.jsonl", "{bad\n"), "expected a JSON object"),
    ("corpus-jsonl-array", corpus("array.jsonl", "[1, 2]\n"), "expected a JSON object"),
    (
        "corpus-not-utf8",
        lambda p: (
            (p / "latin1.txt").write_bytes(b"caf\xe9 au lait\n" * 50) and ["run", "--data", str(p / "latin1.txt")]
        ),
        "not UTF-8",
    ),
    # bundles, promotion, services, deployments, sweeps
    ("bundle-not-a-bundle", lambda p: ["bundle", "verify", str(p / "recipes")], "no manifest.json"),
    ("promote-bad-s3-uri", lambda p: ["promote", "m", "1", "--s3", "http://bucket/x"], "not a valid s3:// URI"),
    ("promote-no-destination", lambda p: ["promote", "m", "1"], "no S3 destination"),
    # credentials and signed queries in the environment's URIs: refused, masked, before anything starts
    (
        "env-dvc-remote-credentials",
        env_then("LLMPRESS_DVC_REMOTE", f"s3://AKIA:{SECRET}@bucket/x", "run"),
        "LLMPRESS_DVC_REMOTE",
    ),
    (
        "env-dvc-remote-credentials-data",
        env_then("LLMPRESS_DVC_REMOTE", f"s3://AKIA:{SECRET}@bucket/x", "data"),
        "LLMPRESS_DVC_REMOTE",
    ),
    (
        "env-endpoint-credentials",
        env_then("AWS_ENDPOINT_URL", f"http://admin:{SECRET}@127.0.0.1:8333", "run"),
        "AWS_ENDPOINT_URL",
    ),
    (
        "env-tracking-uri-credentials",
        env_then("MLFLOW_TRACKING_URI", f"https://u:{SECRET}@mlflow.example", "run"),
        "MLFLOW_TRACKING_USERNAME",
    ),
    (
        "env-bundle-prefix-signature",
        env_then("LLMPRESS_BUNDLE_S3_PREFIX", f"s3://bundles/x?X-Amz-Signature={SECRET}", "promote", "m"),
        "LLMPRESS_BUNDLE_S3_PREFIX",
    ),
    ("env-dvc-remote-not-s3", env_then("LLMPRESS_DVC_REMOTE", "ftp://host/dvc", "resolve", "default"), "s3://"),
    # no registry yet: refused without creating one (the snapshot), before Prefect starts
    ("promote-unregistered-model", lambda p: ["promote", "nope", "--s3", "s3://bundles/x"], "is not registered"),
    ("promote-unknown-alias", registry_then("promote", "m", "shipping", "--s3", "s3://bundles/x"), "no version"),
    ("promote-unknown-version", registry_then("promote", "m", "7", "--s3", "s3://bundles/x"), "no version"),
    ("services-port-taken", port_taken, "is taken"),
    ("deploy-without-prefect-yaml", lambda p: ["deploy"], "has no prefect.yaml"),
    ("deploy-without-server", deploy_without_server, "no Prefect server"),
    (
        "sweep-bad-recipe",
        lambda p: (p / "bad.yaml").write_text("name: x\nstages: []\n") and ["sweep", "--recipes", str(p / "bad.yaml")],
        "stages",
    ),
    # encodings, sizes, nesting and aliases: the bounded loader (llmpress/loading.py)
    ("recipe-not-utf8", recipe_bytes(b"name: x\nstages:\n  - method: wanda\n    \xff\xfe: 1\n"), "not UTF-8"),
    ("params-not-utf8", params_bytes(b"eval:\n  window: \xe9\n"), "not UTF-8"),
    ("recipe-utf16", recipe_bytes(WANDA.encode("utf-16")), "not UTF-8"),
    ("recipe-too-large", recipe_bytes(WANDA.encode() + b"# " + b"x" * (2 << 20) + b"\n"), "at most"),
    ("recipe-nested-too-deep", recipe("name: x\nstages: " + "[" * 200 + "]" * 200 + "\n"), "nested"),
    ("recipe-nested-beyond-recursion", recipe("a: " + "[" * 20000 + "]" * 20000 + "\n"), "nested"),
    ("recipe-billion-laughs", recipe(laughs() + WANDA), "expands to more than"),
    ("params-billion-laughs", params(laughs()), "expands to more than"),
    ("recipe-recursive-alias", recipe("name: &n [*n]\nstages: []\n"), "refers to the value that contains it"),
    ("recipe-python-tag", recipe("name: !!python/object/apply:os.system ['true']\nstages: []\n"), "YAML"),
    ("recipe-two-documents", recipe(WANDA + "---\n" + WANDA), "YAML"),
    ("recipe-unhashable-key", recipe("name: x\n? [a, b]\n: 1\nstages: []\n"), "YAML"),
    ("set-billion-laughs", run_with("--set", "gate.max_perplexity_ratio=" + laughs().replace("\n", "; ")), "YAML"),
    # YAML that would silently mean something else
    ("recipe-duplicate-key", recipe(WANDA + "    sparsity: 0.7\n"), "duplicate key 'sparsity'"),
    ("recipe-duplicate-top-key", recipe("name: a\nname: b\nstages: []\n"), "duplicate key 'name'"),
    ("params-duplicate-key", params("eval:\n  window: 256\n  window: 512\n"), "duplicate key 'window'"),
    ("params-duplicate-section", params("gate: {}\ngate: {}\n"), "duplicate key 'gate'"),
    ("recipe-bool-as-sparsity", recipe(WANDA.replace("0.5", "false")), "expected a number"),
    ("recipe-string-as-sparsity", recipe(WANDA.replace("0.5", "'0.5'")), "expected a number"),
    ("recipe-bool-as-bits", recipe("name: x\nstages:\n  - method: rtn\n    bits: true\n"), "expected a number"),
    ("params-bool-as-window", params("eval:\n  window: true\n"), "expected a number"),
    ("params-yes-as-number", params("eval:\n  batch_size: yes\n"), "expected a number"),
    ("set-bool-as-threshold", run_with("--set", "gate.max_perplexity_ratio=false"), "expected a number"),
    ("set-string-as-threshold", run_with("--set", "gate.max_perplexity_ratio='2.5'"), "expected a number"),
    # files and folders that are not there: never replaced by defaults
    ("params-file-missing", lambda p: ["--params", "nope.yaml", "check"], "no such file"),
    ("project-missing", lambda p: ["--project", str(p / "missing"), "check"], "no such folder"),
    ("run-params-missing", lambda p: ["--params", "other.yaml", "run"], "no such file"),
    # a refused run changes nothing, not even params.yaml after --data
    ("run-data-then-missing-recipe", corpus_then("--recipe", "recipes/missing.yaml"), "file not found"),
    ("run-data-then-bad-set", corpus_then("--set", "gate.max_perplexity_ratio=-1"), "gate.max_perplexity_ratio"),
    ("run-data-then-bad-model", corpus_then("--model", "s3://Bad_Bucket/x"), "not a valid s3:// URI"),
    # credentials in inputs: refused before anything starts, never echoed
    ("run-model-s3-credentials", run_with("--model", f"s3://AKIAEXAMPLE:{SECRET}@bucket/x"), "credentials"),
    ("run-model-s3-signature", run_with("--model", f"s3://bucket/x?X-Amz-Signature={SECRET}"), "credentials"),
    ("run-model-http-credentials", run_with("--model", f"https://user:{SECRET}@host/m"), "credentials"),
    ("resolve-s3-signature", lambda p: ["resolve", f"s3://bucket/x?X-Amz-Credential={SECRET}"], "credentials"),
    (
        "promote-s3-credentials",
        lambda p: ["promote", "m", "1", "--s3", f"s3://AKIAEXAMPLE:{SECRET}@bucket/x"],
        "credentials",
    ),
    ("promote-s3-signature", lambda p: ["promote", "m", "1", "--s3", f"s3://b1/x?sig={SECRET}"], "credentials"),
    ("params-model-credentials", params(f"model: s3://AKIAEXAMPLE:{SECRET}@bucket/x\n", "run"), "credentials"),
    ("check-model-credentials", params(f"model: s3://AKIAEXAMPLE:{SECRET}@bucket/x\n"), "credentials"),
    ("check-model-signature", params(f"model: s3://bucket/x?X-Amz-Signature={SECRET}\n"), "credentials"),
    ("tracking-uri-credentials", params(f"tracking:\n  tracking_uri: https://admin:{SECRET}@mlflow/\n"), "credentials"),
    ("tracking-uri-unknown-scheme", params("tracking:\n  tracking_uri: mlflow.db\n"), "tracking.tracking_uri"),
    ("experiment-control-chars", params('tracking:\n  experiment: "run\\x1b[2J"\n'), "tracking.experiment"),
    ("model-source-empty", params("model: ''\n"), "model"),
    # writing commands never delete or change what they were not asked to
    ("dequantize-dst-exists", dequantize_into(_existing), "already exists; pass --overwrite"),
    ("dequantize-overwrite-foreign", dequantize_into(_existing, "--overwrite"), "not a model folder llmpress wrote"),
    ("dequantize-dst-is-file", dequantize_into(_a_file, "--overwrite"), "is not a folder"),
    ("gguf-not-a-gguf-name", gguf_into("model.bin"), "ends in .gguf"),
    ("gguf-dst-exists", gguf_into("there.gguf", lambda dst: dst.write_text("keep me")), "already exists; pass"),
    ("gguf-dst-is-a-folder", gguf_into("dir.gguf", lambda dst: dst.mkdir()), "already exists"),
    ("gguf-unsupported-tokenizer", gguf_into("m.gguf", tokenizer={"model": {"type": "Unigram"}}), "byte-level BPE"),
    ("dequantize-dst-is-source", dequantize_into(lambda p, src: src), "inside the source"),
    ("dequantize-dst-inside-source", dequantize_into(lambda p, src: src / "plain"), "inside the source"),
    (
        "dequantize-dst-parent-of-source",
        dequantize_into(lambda p, src: src.parent, "--overwrite"),
        "contains the source",
    ),
    ("dequantize-dst-project", dequantize_into(lambda p, src: p, "--overwrite"), "contains the source"),
    (
        "pickle-convert-corrupt",
        lambda p: [*model_folder(_corrupt_pickle)(p), "--unsafe-load-pickled-weights"],
        "unpickles nothing else",
    ),
    ("dequantize-dst-under-a-file", dequantize_into(lambda p, src: p / "params.yaml" / "out"), "is a file"),
    ("dequantize-plain-source", dequantize_into(lambda p, src: p / "plain"), "nothing to de-quantize"),
    # model folders transformers would load wrongly without a word, GGUF files that are not whole
    ("source-blocks-missing", model_folder(_config_edit(num_hidden_layers=1)), "initialised at random"),
    ("source-blocks-extra", model_folder(_config_edit(num_hidden_layers=-1)), "would be ignored"),
    ("source-embedding-shape", model_folder(_config_edit(vocab_size=8)), "has shape"),
    ("source-hidden-size", model_folder(_config_edit(hidden_size=16)), "has shape"),
    ("source-integer-weights", model_folder(_integer_weights), "integer weights"),
    ("source-gguf-truncated", gguf_file(_shipped_gguf_head), "truncated or corrupt"),
    ("source-gguf-garbage", gguf_file(lambda: b"GGUF" + bytes(range(256)) * 8), "truncated or corrupt"),
    ("source-gguf-empty", gguf_file(lambda: b""), "truncated or corrupt"),
    ("source-gguf-not-gguf", gguf_file(lambda: b"PK\x03\x04 a zip file"), "truncated or corrupt"),
    ("source-gguf-unknown-architecture", gguf_file(_gguf_with("bogusarch", True)), "cannot be converted"),
    ("source-gguf-no-tokenizer", gguf_file(_gguf_with("llama", False)), "holds no tokenizer"),
    # weights that are not a regular file, configs transformers refuses, tokenizers that do not load
    ("source-weights-folder", model_folder(_weights_replaced("folder")), "not a regular file"),
    ("source-weights-dangling-link", model_folder(_weights_replaced("dangling-link")), "not a regular file"),
    ("source-weights-fifo", model_folder(_weights_replaced("fifo")), "not a regular file"),
    ("source-config-unknown-model-type", model_folder(_config_set(model_type="bogus")), "not a config"),
    ("source-config-heads-do-not-divide", model_folder(_config_set(num_attention_heads=7)), "not a config"),
    ("source-config-layers-a-string", model_folder(_config_set(num_hidden_layers="2")), "not a config"),
    ("source-tokenizer-corrupt", model_folder(_tokenizer("{broken")), "tokenizer"),
    ("source-tokenizer-missing", model_folder(_tokenizer(None)), "has no tokenizer"),
    # a run checks the recipe against the model's skeleton (no weights) when the model is on this machine
    ("run-window-over-model-context", model_folder(lambda folder: None, "run", "--model"), "data.seq_len=256 exceeds"),
    (
        "run-drop-all-blocks",
        run_on_tiny("name: d\nstages:\n  - method: drop_blocks\n    blocks: 9\n"),
        "would remove all",
    ),
    (
        "run-targets-match-nothing",
        run_on_tiny("name: t\nstages:\n  - method: magnitude\n    sparsity: 0.5\n    targets: ['.*conv.*']\n"),
        "match no Linear",
    ),
    ("run-source-tokenizer-missing", model_folder(_tokenizer(None), "run", "--model"), "has no tokenizer"),
    # values the schema took that meant nothing: infinities, unbounded sizes
    ("gate-infinite", params("gate:\n  min_cloze_ratio: .inf\n"), "finite"),
    ("set-gate-nan", run_with("--set", "gate.onnx_noise_factor=.nan"), "finite"),
    ("speed-threads-absurd", params("eval:\n  speed:\n    threads: 100000\n"), "less than or equal to 1024"),
    ("speed-prompt-absurd", run_with("--set", "eval.speed.prompt_tokens=100000"), "less than or equal to 32768"),
    (
        "distill-seed-overflow",
        recipe("name: d\nstages:\n  - method: distill\n    seed: 100000000000000000000000\n"),
        "less than or equal to",
    ),
    ("experiment-blank", params("tracking:\n  experiment: '   '\n"), "experiment"),
    ("tracking-sqlite-in-memory", params("tracking:\n  tracking_uri: 'sqlite://'\n"), "needs a path"),
    ("tracking-file-no-path", params("tracking:\n  tracking_uri: 'file://'\n"), "needs a path"),
    ("params-empty", params(""), "is empty"),
    ("params-only-comments", params("# nothing here\n"), "is empty"),
    # sweeps: every model checked like params' own, before Prefect
    (
        "sweep-model-credentials",
        lambda p: ["sweep", "--recipes", "recipes/wanda-50.yaml", "--models", f"s3://AKIAEXAMPLE:{SECRET}@bucket/x"],
        "credentials",
    ),
    (
        "sweep-model-not-a-model",
        lambda p: ["sweep", "--recipes", "recipes/wanda-50.yaml", "--models", "not a model"],
        "is not a local folder",
    ),
    # data settings only through params.yaml, whichever way --set spells them
    ("set-data-section", run_with("--set", "data={seed: 3}"), "DVC parameters"),
    # params.yaml's own corpus is checked too, not only --data's; a project DVC cannot version is refused
    ("run-params-corpus-missing", params("data:\n  corpus: /nonexistent/corpus.txt\n", "run"), "no such file"),
    ("check-params-corpus-missing", params("data:\n  corpus: /nonexistent/corpus.txt\n", "check"), "no such file"),
    ("check-params-recipe-missing", params("recipe: recipes/nope.yaml\n", "check"), "is not a file"),
    ("run-no-dvc-yaml", run_with(), "has no dvc.yaml"),
    (
        "run-not-a-dvc-repository",
        lambda p: (p / "dvc.yaml").write_text("stages: {}\n") and ["run"],
        "not a DVC repository",
    ),
    (
        "promote-tracking-server-down",
        params("tracking:\n  tracking_uri: http://127.0.0.1:1\n", "promote", "m", "1", "--s3", "s3://bundles/x"),
        "does not answer",
    ),
    # '..' in an S3 prefix would climb out of models/s3/<bucket>/ (and replace what it found there)
    ("source-s3-dot-dot", run_with("--model", "s3://bucket/../../victim"), "'..' are not allowed"),
    ("resolve-s3-dot", lambda p: ["resolve", "s3://bucket/./x"], "'..' are not allowed"),
    # model configs, manifests: bounded JSON
    ("source-config-not-object", model_folder(config_text("[1, 2]")), "is a JSON object"),
    ("source-config-duplicate-key", model_folder(config_text('{"a": 1, "a": 2}')), "duplicate key 'a'"),
    ("source-config-not-utf8", model_folder(config_text(b'{"a": "\xff"}')), "not UTF-8"),
    ("source-config-nested", model_folder(config_text("[" * 100000 + "]" * 100000)), "nested too deeply"),
    ("bundle-manifest-not-json", bundle_manifest(b"{bad"), "not valid JSON"),
    ("bundle-manifest-duplicate-key", bundle_manifest(b'{"format": 1, "format": 2}'), "duplicate key"),
    ("bundle-manifest-not-utf8", bundle_manifest(b'{"format": "\xff"}'), "not UTF-8"),
    ("bundle-manifest-not-object", bundle_manifest(b"[]"), "not an"),
    # --set that does not fit the schema
    ("set-unknown-key", run_with("--set", "gate.max_ppl=2"), "gate.max_ppl: unknown key"),
    ("set-into-a-value", run_with("--set", "eval.window.size=3"), "is not a section"),
    ("set-unknown-section", run_with("--set", "gates.max_perplexity_ratio=2"), "gates: unknown key"),
    ("sweep-missing-recipe", lambda p: ["sweep", "--recipes", str(p / "missing.yaml")], "file not found"),
    # impossible arguments
    ("bundle-run-empty-prompt", lambda p: ["bundle", "run", str(p), "   "], "prompt is empty"),
    ("bundle-run-negative-tokens", lambda p: ["bundle", "run", str(p), "hi", "--max-new-tokens", "-3"], ">= 1"),
    ("services-port-too-high", lambda p: ["services", "up", "--mlflow-port", "70000"], "65535"),
    ("services-port-negative", lambda p: ["services", "up", "--s3-port", "-1"], "65535"),
]


def test_the_catalog_is_large_enough() -> None:
    assert len(CASES) >= 100 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "setup", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_leaves_nothing(
    project: Path, capsys: pytest.CaptureFixture[str], name: str, setup: Callable[[Path], list[str]], expected: str
) -> None:
    args = setup(project)
    before = snapshot(project)
    try:
        code = main(["--project", str(project), *args])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    finally_leave = getattr(setup, "context", None)
    if finally_leave is not None:
        finally_leave.__exit__(None, None, None)
        del setup.context
    out, err = capsys.readouterr()
    assert code == 2, f"{name}: exit {code}\n{out}\n{err}"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in err, err
    assert "Traceback" not in err + out
    assert SECRET not in err + out  # a credential in the input is never echoed back
    assert snapshot(project) == before, "the refusal left something behind"
