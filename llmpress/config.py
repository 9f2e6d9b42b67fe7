"""Configuration as data: `params.yaml` and recipe files, validated with pydantic.

Every model here forbids unknown keys, so a typo is an error that names the field instead of a silently
ignored setting. `load_params` and `load_recipe` turn pydantic's errors into one `ConfigError` whose message
lists every bad field with the value it got and what is allowed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmpress.errors import ConfigError, redact
from llmpress.loading import read_yaml


def _number_kinds(annotation: Any) -> tuple[bool, bool]:
    """(takes a number, takes a bool or a string) for a field's annotation, unions and Annotated unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _number_kinds(get_args(annotation)[0])
    if origin in (Union, UnionType):
        kinds = [_number_kinds(a) for a in get_args(annotation)]
        return any(k[0] for k in kinds), any(k[1] for k in kinds)
    if annotation in (int, float):
        return True, False
    return False, annotation in (bool, str, Any) or origin is Literal


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # inf/nan: never a setting

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data: Any) -> Any:
        """A number field takes numbers only: YAML's `false` or a quoted "0.5" there is a mistake, not 0 or 0.5."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                if field is not None and isinstance(value, bool | str):
                    number, other = _number_kinds(field.annotation)
                    if number and not other:
                        raise ValueError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
        return data


# ---------------------------------------------------------------------------------------------------------------
# params.yaml
# ---------------------------------------------------------------------------------------------------------------


class DataParams(Strict):
    """How the corpus becomes a calibration set and a held-out evaluation text (the `prepare` DVC stage)."""

    corpus: str = Field(
        "gensim-lee",
        description="'gensim-lee' (news corpus shipped in the gensim wheel on PyPI) or a path to a .txt "
        "(one document per line) or .jsonl ({'text': ...} per line) file",
    )
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of documents held out for evaluation")
    calibration_samples: int = Field(32, ge=1, le=100_000)
    seq_len: int = Field(256, ge=8, le=1_000_000, description="tokens per calibration window")
    seed: int = Field(0, ge=0, le=2**32 - 1)


class ClozeParams(Strict):
    """LAMBADA-style last-word prediction built from the held-out text (llmpress/evaluate/cloze.py)."""

    min_context_words: int = Field(40, ge=1, description="words of the document before the target word")
    min_word_chars: int = Field(3, ge=1, description="letters in a target word")
    per_document: int = Field(2, ge=1)
    max_examples: int = Field(100, ge=1)
    max_context_tokens: int = Field(128, ge=8, description="context kept before the target, in tokens")
    batch_size: int = Field(8, ge=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)


DEFAULT_PROMPTS = [
    "The bushfire near the town",
    "The Prime Minister said today that",
    "Scientists have discovered",
    "In the final match of the series,",
    "The best way to learn a new language is",
]


class GenerationParams(Strict):
    """Greedy generations shown side by side, base and compressed, in the run and the model card."""

    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), max_length=50)
    max_new_tokens: int = Field(32, ge=1, le=512)


class RepetitionParams(Strict):
    """Greedy continuations of held-out prompts, scored by their repeated n-gram rate
    (llmpress/evaluate/repetition.py): what catches a model that loops."""

    prompts: int = Field(16, ge=1, le=64, description="evenly spaced slices of the held-out text")
    prompt_tokens: int = Field(32, ge=4, le=512, description="tokens per prompt, BOS included")
    new_tokens: int = Field(32, ge=8, le=512, description="greedy tokens generated per prompt")
    ngram: int = Field(4, ge=2, le=8, description="n of the repeated n-grams counted")


class SpeedParams(Strict):
    """Latency and throughput protocol (llmpress/evaluate/speed.py)."""

    enabled: bool = True
    prompt_tokens: int = Field(128, ge=1, le=32768)
    decode_tokens: int = Field(16, ge=1, le=32768)
    batch_size: int = Field(4, ge=1, description="the batch > 1 measured besides batch 1")
    warmup: int = Field(1, ge=0)
    repeats: int = Field(3, ge=1)
    threads: int | None = Field(None, ge=1, le=1024, description="torch and ORT threads; null: torch's default")


class EvalParams(Strict):
    """The pinned perplexity protocol; see README 'Evaluation protocol'."""

    window: int = Field(512, ge=8, description="tokens per evaluation window, BOS included")
    stride: int = Field(512, ge=1, description="tokens between window starts; < window scores with overlap")
    add_bos: bool = Field(True, description="prepend the tokenizer's BOS token to every window")
    max_tokens: int = Field(16384, ge=16, description="evaluate the first max_tokens tokens of the held-out text")
    batch_size: int = Field(4, ge=1)
    cloze: ClozeParams = ClozeParams()
    generation: GenerationParams = GenerationParams()
    repetition: RepetitionParams = RepetitionParams()
    speed: SpeedParams = SpeedParams()

    @model_validator(mode="after")
    def _stride_within_window(self) -> EvalParams:
        if self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must be <= window ({self.window}); tokens would be skipped")
        return self


class CompressParams(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(8, ge=1, description="calibration windows per forward pass")
    save_layout: Literal["compressed-tensors", "llmpress"] = Field(
        "compressed-tensors", description="how the compressed HF folder stores quantized layers: "
        "'compressed-tensors' (pack-quantized: stock transformers with compressed-tensors and vLLM load it) "
        "where that format holds the model exactly, else llmpress's own layout, with the reason in the manifest",
    )  # fmt: skip
    sparse_storage: Literal["bitmask", "dense"] = Field(
        "bitmask", description="sparse plain linears in the llmpress layout: 'bitmask' (kept values + 1 bit per "
        "weight, read by llmpress; `llmpress dequantize` writes a plain folder) or 'dense' (a sparse-only model "
        "stays a plain folder any tool loads)",
    )  # fmt: skip


class ExportParams(Strict):
    formats: list[Literal["onnx", "gguf"]] = Field(
        ["onnx"], description="what the version ships as: 'onnx' the edge bundle's graph (onnxruntime, "
        "onnxruntime-genai), 'gguf' one GGUF file for llama.cpp, scored in llama.cpp when llama-cpp-python is "
        "installed; both go into the bundle, each with its hash and scores in the manifest",
    )  # fmt: skip
    gguf_float_type: Literal["f32", "f16", "q8_0", "q4_1"] = Field(
        "f16", description="GGUF block type of weights the recipe left in float (quantized ones keep their codes)"
    )
    gguf_fallback: Literal["q8_0", "q4_1"] = Field(
        "q8_0", description="GGUF block type for quantized weights whose layout no GGUF type holds exactly "
        "(re-rounded from the evaluated weights; the manifest names them)",
    )  # fmt: skip
    opset: int = Field(18, ge=14, le=23)
    parity_tokens: int = Field(128, ge=2, description="tokens of held-out text used to compare ONNX and PyTorch")
    parity_decode_steps: int = Field(32, ge=0, le=1024, description="greedy decode steps compared after the prefill")
    accuracy_level: Literal[0, 1, 2, 4] = Field(
        4, description="onnxruntime's MatMulNBits compute in the shipped graph: 0 float32 on the de-quantized weights "
        "(exact), 4 int8 activations and integer dot products (fastest on CPU); the bundle is scored at this setting",
    )  # fmt: skip
    precision: Literal["recipe", "fp32", "int8", "int4", "int4-full"] = Field(
        "recipe", description="what the bundle's weight matmuls hold for a recipe that does not quantize: 'recipe' "
        "as it comes, 'int8' 8-bit per output channel, 'int4' 4-bit in groups of 32, 'int4-full' also the embedding "
        "table (and tied head) 4-bit; quantized by `quantizer` after the recipe's stages, pruned zeros kept",
    )  # fmt: skip
    quantizer: Literal["rtn", "gptq"] = Field(
        "rtn", description="llmpress's quantizer for export.precision: round-to-nearest, or GPTQ on the calibration set"
    )

    @model_validator(mode="before")
    @classmethod
    def _formats_replace_onnx(cls, data: Any) -> Any:
        if isinstance(data, dict) and "onnx" in data:
            raise ValueError("export.onnx was replaced by export.formats: a list of onnx, gguf ([] exports nothing; "
                             "`onnx: false` is `formats: []`)")  # fmt: skip
        return data

    @field_validator("formats")
    @classmethod
    def _formats_once(cls, formats: list[str]) -> list[str]:
        if len(set(formats)) != len(formats):
            raise ValueError(f"each format at most once, got {formats}")
        return formats

    @property
    def onnx(self) -> bool:
        return "onnx" in self.formats

    @property
    def gguf(self) -> bool:
        return "gguf" in self.formats


class GateParams(Strict):
    """Thresholds a candidate must meet to become `champion`. A null threshold is not checked."""

    max_perplexity: float | None = Field(None, gt=0)
    max_perplexity_ratio: float | None = Field(1.6, gt=0, description="compressed / base perplexity")
    min_sparsity: float | None = Field(None, ge=0, lt=1, description="measured sparsity of the targeted layers")
    min_expert_tokens: int | None = Field(
        None, ge=0, description="mixture of experts: the fewest calibration tokens the router sent any expert "
        "(not checked for a dense model, or a recipe that reads no calibration data)",
    )  # fmt: skip
    max_onnx_logit_diff: float | None = Field(1e-3, gt=0, description="max |logit| difference, ONNX vs PyTorch")
    onnx_noise_factor: float = Field(
        1.5,
        ge=1,
        description="where PyTorch's own one-ulp noise floor exceeds max_onnx_logit_diff (activation "
        "rounding), ONNX's mean |logit| difference may be at most this multiple of the floor's mean",
    )
    onnx_greedy_identical: bool = Field(True, description="ONNX's greedy decode must give PyTorch's tokens")
    max_kl_to_base: float | None = Field(None, gt=0, description="mean KL(base || compressed) per token, nats")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="share of same top-1 next token")
    min_cloze_ratio: float | None = Field(None, ge=0, description="cloze accuracy, compressed / base")
    champion_max_perplexity_increase: float | None = Field(
        0.05, ge=0, description="candidate perplexity may exceed the current champion's by at most this fraction"
    )
    champion_must_be_smaller_or_faster: bool = Field(
        False, description="candidate weights smaller than the champion's, or decode (batch 1) faster by the margin"
    )
    champion_speed_margin: float = Field(0.05, ge=0, description="'faster' means by more than this fraction")
    # What ships: the exported graph scored on its own in onnxruntime (steps.evaluate_bundle). Not checked when
    # nothing is exported (export.onnx false), which the report says.
    max_bundle_perplexity_ratio: float | None = Field(
        1.6, gt=0, description="bundle perplexity in onnxruntime / base perplexity in PyTorch"
    )
    max_bundle_bytes_ratio: float | None = Field(
        1.0, gt=0, description="bundle graph and weights bytes / the base model's fp32 weights bytes"
    )
    min_bundle_decode_speedup: float | None = Field(
        1.0, gt=0, description="batch-1 decode tokens/s of the bundle in onnxruntime / the base model's in PyTorch"
    )
    max_bundle_kl_to_base: float | None = Field(None, gt=0, description="mean KL(base || bundle) per token, nats")
    # The GGUF (export.formats has gguf) scored in llama.cpp; not checked when no GGUF is exported, failed when
    # one was written but llama-cpp-python was not there to score it.
    max_gguf_perplexity_ratio: float | None = Field(
        1.6, gt=0, description="GGUF perplexity in llama.cpp / base perplexity in PyTorch"
    )
    min_gguf_decode_speedup: float | None = Field(
        None, gt=0, description="batch-1 decode tokens/s of the GGUF in llama.cpp / the base model's in PyTorch"
    )
    max_repetition_increase: float | None = Field(
        0.1, ge=0, le=1, description="repeated 4-gram rate of greedy continuations of held-out prompts (the "
        "bundle's in onnxruntime, else the PyTorch model's) minus the base model's",
    )  # fmt: skip


PRINTABLE_NOT_BLANK = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


class TrackingParams(Strict):
    tracking_uri: str | None = Field(
        None, description="null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; relative sqlite paths resolve in the "
        "project dir",
    )  # fmt: skip
    experiment: str = Field("llmpress", min_length=1, max_length=200, pattern=PRINTABLE_NOT_BLANK,
                            description="MLflow experiment name: printable characters, not only spaces")  # fmt: skip
    registered_model: str = Field("smollm2-135m-edge", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    bundle_s3_prefix: str | None = Field(
        None, pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$",
        description="where `llmpress promote` publishes edge bundles: s3://bucket/prefix",
    )  # fmt: skip

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri(cls, uri: str | None) -> str | None:
        if uri is not None and (problem := _tracking_uri_problem(uri)):
            raise ValueError(problem)
        return uri


def _tracking_uri_problem(uri: str) -> str | None:
    scheme = uri.split("://", 1)[0] if "://" in uri else None
    if scheme not in TRACKING_SCHEMES:
        return f"expected a URI starting with one of {', '.join(s + '://' for s in TRACKING_SCHEMES)}"
    if re.match(r"^[a-z0-9+]+://[^/@]*@", uri):
        return "credentials in the URI would be logged; use MLFLOW_TRACKING_USERNAME/PASSWORD"
    if scheme in ("sqlite", "file") and not re.match(rf"^{scheme}:///.", uri):
        return f"{scheme}:// needs a path ({scheme}:///relative/or/absolute/path): an in-memory store keeps nothing"
    return None


S3_URI = r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^?#\s]*)?"
ENDPOINT_URI = r"https?://[^/@?#\s]+(/[^?#\s]*)?"


def check_environment(env: Mapping[str, str] | None = None) -> None:
    """The URIs llmpress takes from the environment, held to params' own rules: no credentials or signed queries
    (they would reach logs, DVC's config and Prefect's records; credentials come from AWS_* and MLFLOW_TRACKING_*
    variables), the right scheme. Checked with params, before any server or DVC stage starts."""
    env = os.environ if env is None else env
    problems = []
    if (uri := env.get("MLFLOW_TRACKING_URI")) and (why := _tracking_uri_problem(uri)):
        problems.append(("MLFLOW_TRACKING_URI", why))
    for name in ("LLMPRESS_DVC_REMOTE", "LLMPRESS_BUNDLE_S3_PREFIX"):
        if (uri := env.get(name)) and not re.fullmatch(S3_URI, uri):
            problems.append((name, "expected s3://bucket/prefix (bucket in lowercase, no credentials, no query)"))
    if (uri := env.get("AWS_ENDPOINT_URL")) and not re.fullmatch(ENDPOINT_URI, uri):
        problems.append(("AWS_ENDPOINT_URL", "expected http(s)://host[:port] with no credentials and no query"))
    if problems:
        raise ConfigError("; ".join(f"environment variable {name}={redact(env[name])!r}: {why}"
                                    for name, why in problems))  # fmt: skip


class Params(Strict):
    model: str = Field("default", min_length=1,
                       description="model source: default, HF folder, .gguf file, s3:// URI, hub id")  # fmt: skip
    recipe: str = "recipes/wanda-50.yaml"
    data: DataParams = DataParams()
    eval: EvalParams = EvalParams()
    compress: CompressParams = CompressParams()
    export: ExportParams = ExportParams()
    gate: GateParams = GateParams()
    tracking: TrackingParams = TrackingParams()

    @field_validator("model")
    @classmethod
    def _no_credentials(cls, source: str) -> str:
        if "://" in source and (re.match(r"^[A-Za-z0-9+.\-]+://[^/@]*@", source) or "?" in source):
            raise ValueError("credentials or a signed query in a model URI would be logged; credentials come from "
                             "the environment")  # fmt: skip
        return source


# ---------------------------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------------------------

# Linear layers inside decoder blocks; names are matched with re.fullmatch against full module names such as
# "model.layers.3.self_attn.q_proj". lm_head and embeddings live outside the blocks and are never touched here.
DEFAULT_TARGETS = [r".*"]


class Targeted(Strict):
    """Which linear layers a stage touches: regexes over full module names (re.fullmatch), minus `ignore`."""

    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)
    ignore: list[str] = Field(default_factory=list)

    @field_validator("targets", "ignore")
    @classmethod
    def _check_regexes(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from None
        return values


class SparsityStage(Targeted):
    """Fields shared by pruning stages: how much to prune, in what pattern, and where."""

    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of weights set to zero")
    pattern: str | None = Field(None, description="'N:M': keep N weights in every M consecutive inputs of a row")

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
        if not match:
            raise ValueError("pattern must look like 'N:M' (e.g. '2:4')")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError("pattern 'N:M' needs 0 < N < M: N weights are kept in every group of M")
        if m > 256:
            raise ValueError("pattern 'N:M': M must be <= 256")
        return f"{n}:{m}"

    @model_validator(mode="after")
    def _one_of_sparsity_or_pattern(self) -> SparsityStage:
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("give exactly one of 'sparsity' (unstructured, e.g. 0.5) or 'pattern' (N:M, e.g. '2:4')")
        return self

    @property
    def n_m(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def target_sparsity(self) -> float:
        if self.n_m is not None:
            n, m = self.n_m
            return 1.0 - n / m
        assert self.sparsity is not None
        return self.sparsity


class OwlParams(Strict):
    """OWL (Yin et al. 2024): non-uniform layer-wise sparsity from each layer's outlier ratio.

    A layer's outlier ratio is the share of Wanda scores |W_ij| * ||X_j|| above `threshold` times the layer's mean
    score. Layers with more outliers are pruned less: sparsities are spread linearly over
    [target - lambda_, target + lambda_] by outlier ratio, then shifted so the parameter-weighted mean is exactly
    the stage's target.
    """

    threshold: float = Field(5.0, gt=1.0, description="'M' in the paper: outlier if score > M * mean score")
    lambda_: float = Field(0.08, ge=0.0, lt=0.5, alias="lambda", description="largest deviation from the target")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class MagnitudeStage(SparsityStage):
    method: Literal["magnitude"]


class WandaStage(SparsityStage):
    method: Literal["wanda"]
    owl: OwlParams | None = Field(None, description="non-uniform layer-wise sparsity (unstructured only)")

    @model_validator(mode="after")
    def _owl_unstructured(self) -> WandaStage:
        if self.owl is not None and self.pattern is not None:
            raise ValueError("owl sets a sparsity per layer; it needs 'sparsity', not an N:M 'pattern'")
        return self


class SparseGPTStage(WandaStage):
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with the layer Hessian, weights updated to compensate."""

    method: Literal["sparsegpt"]  # type: ignore[assignment]
    block_size: int = Field(128, ge=1, le=4096, description="columns pruned and compensated together")
    dampening: float = Field(0.01, gt=0.0, le=1.0, description="added to the Hessian diagonal, x mean(diag)")
    mask_block: int | None = Field(
        None, ge=1, description="columns per adaptive mask selection; null: block_size (the paper's default)"
    )
    importance: Literal["obs", "wanda"] = Field(
        "obs", description="'obs': w^2 / [H^-1]_jj (the paper); 'wanda': |w| * ||x_j|| picks the mask instead"
    )


class SurgeonStage(SparsityStage):
    """The LLM Surgeon (van der Ouderaa et al. 2024): K-FAC curvature of the model's loss, one threshold over all
    targeted layers, correlated weight updates, several shots with the curvature refreshed between them."""

    method: Literal["surgeon"]
    shots: int = Field(5, ge=1, le=100, description="prune in this many steps, curvature recomputed before each")
    fisher: Literal["sampled", "empirical"] = Field(
        "sampled", description="'sampled': labels drawn from the model (true Fisher); 'empirical': the data's tokens"
    )
    dampening_g: float = Field(0.1, gt=0.0, le=10.0, description="added to G's diagonal, x mean(diag G)")
    dampening_a: float = Field(0.01, gt=0.0, le=10.0, description="added to A's diagonal, x mean(diag A)")
    max_layer_sparsity: float = Field(0.95, gt=0.0, le=1.0, description="most any one layer may lose (unstructured)")
    correlate_rows: bool = Field(
        False, description="share each row's update with the other rows through G^-1 (the full Kronecker update)"
    )
    samples: int | None = Field(None, ge=1, le=1_000_000, description="calibration windows for curvature; null: all")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the sampled labels")
    heads: float = Field(0.0, ge=0.0, lt=1.0, description="structured: share of the model's query-head slots removed "
                         "(one head of every KV group each), allocated across blocks")  # fmt: skip
    mlp: float = Field(0.0, ge=0.0, lt=1.0, description="structured: share of the model's MLP channels removed, "
                       "allocated across blocks")  # fmt: skip

    @model_validator(mode="after")
    def _one_of_sparsity_or_pattern(self) -> SurgeonStage:  # replaces SparsityStage's: structured is a third way
        given = [name for name, on in (("sparsity", self.sparsity is not None), ("pattern", self.pattern is not None),
                                       ("heads/mlp", self.heads > 0 or self.mlp > 0)) if on]  # fmt: skip
        if len(given) != 1:
            raise ValueError("give exactly one of 'sparsity' (unstructured, e.g. 0.5), 'pattern' (N:M, e.g. '2:4') "
                             "or 'heads'/'mlp' (structured, e.g. mlp: 0.2)"
                             + (f"; got {' and '.join(given)}" if given else ""))  # fmt: skip
        return self

    @property
    def structured(self) -> bool:
        return self.heads > 0 or self.mlp > 0

    @property
    def target_sparsity(self) -> float | None:  # type: ignore[override]
        return None if self.structured else super().target_sparsity

    @model_validator(mode="after")
    def _cap_reaches_target(self) -> SurgeonStage:
        if self.sparsity is not None and self.max_layer_sparsity < self.sparsity:
            raise ValueError(f"max_layer_sparsity ({self.max_layer_sparsity}) is below the target sparsity "
                             f"({self.sparsity}): no allocation can reach it")  # fmt: skip
        return self


class DSnoTStage(Targeted):
    """DSnoT (Zhang et al. 2024): training-free refinement of an existing mask by pruning-and-growing swaps."""

    method: Literal["dsnot"]
    max_cycles: int = Field(50, ge=1, le=10_000, description="swap rounds per row")
    update_threshold: float = Field(0.1, ge=0.0, description="stop once the row's reconstruction error is below")


class QuantGrid(Strict):
    """An integer weight grid: codes with an fp16 scale and an integer zero point per row and group of inputs."""

    bits: int = Field(4, ge=2, le=8, description="bits per weight (2..8)")
    group_size: int | None = Field(128, ge=1, description="weights per scale along the input; null: per output channel")
    symmetric: bool = Field(False, description="zero point fixed at 2^(bits-1) (true) or fitted per group (false)")
    offset: Literal["zero-point", "min"] = Field(
        "zero-point", description="asymmetric grids: 'zero-point' w = s(q - z), z an integer code; 'min' w = sq + m, "
        "m an fp16 minimum per group (llama.cpp's Q4_1 layout; rtn only)",
    )  # fmt: skip
    signed_scale: bool = Field(
        False, description="symmetric grids: the group's largest-magnitude weight exactly on the lowest code, the "
        "scale signed accordingly, as llama.cpp fits Q4_0 (all 2^bits codes used, a finer step)",
    )  # fmt: skip
    OFFSETS: ClassVar[tuple[str, ...]] = ("zero-point",)
    SIGNED_SCALE: ClassVar[bool] = True  # whether the method fits its grid with fit_grid (QAT learns positive steps)

    @model_validator(mode="after")
    def _offset_supported(self) -> QuantGrid:
        if self.signed_scale and not self.SIGNED_SCALE:
            method = getattr(self, "method", "this stage")
            raise ValueError(f"signed_scale is not supported by {method}; allowed: false")
        if self.signed_scale and not self.symmetric:
            raise ValueError("signed_scale applies to symmetric grids: set symmetric: true, or signed_scale: false")
        if self.offset not in self.OFFSETS:
            method = getattr(self, "method", "this stage")
            raise ValueError(f"offset {self.offset!r} is not supported by {method}; allowed: "
                             f"{', '.join(repr(o) for o in self.OFFSETS)}")  # fmt: skip
        if self.offset == "min" and self.symmetric:
            raise ValueError("offset 'min' is an asymmetric grid: set symmetric: false, or offset: zero-point")
        return self

    @field_validator("group_size")
    @classmethod
    def _group_fits_the_graph(cls, value: int | None) -> int | None:
        # The exported graph holds the codes in onnxruntime's MatMulNBits, whose blocks are powers of two >= 16:
        # a group made of whole blocks is held exactly (llmpress.export.packed), any other would be re-rounded.
        if value is not None and value % 16:
            raise ValueError(f"must be null (per output channel) or a multiple of 16 (16, 32, 48, 64, 128, ...), "
                             f"got {value}")  # fmt: skip
        return value


class QuantStage(Targeted, QuantGrid):
    """Weight quantization settings shared by RTN, GPTQ and AWQ: integer codes with a scale per group."""


class EmbeddingsStage(QuantGrid):
    """The token embedding table (and an untied head) rounded to the grid, as llama.cpp's formats do."""

    method: Literal["embeddings"]
    group_size: int | None = Field(32, ge=1, description="features per scale; null: one scale per token's row")
    bits: int = Field(8, ge=2, le=8, description="bits per weight (2..8)")
    head: bool = Field(True, description="also quantize an untied output head (a tied one is the table)")


class RTNStage(QuantStage):
    """Round-to-nearest: each weight to its nearest grid point."""

    method: Literal["rtn"]
    OFFSETS: ClassVar[tuple[str, ...]] = ("zero-point", "min")


class GPTQStage(QuantStage):
    """GPTQ (Frantar et al. 2023): column-by-column quantization with OBS error compensation."""

    method: Literal["gptq"]
    block_size: int = Field(128, ge=1, le=4096, description="columns quantized together before a lazy batch update")
    dampening: float = Field(0.01, gt=0.0, le=1.0, description="added to the Hessian diagonal, x mean(diag)")
    act_order: bool = Field(False, description="quantize columns in order of decreasing Hessian diagonal")


class AWQStage(QuantStage):
    """AWQ (Lin et al. 2024): per-input-channel scales from activation magnitudes, searched on the block output."""

    method: Literal["awq"]
    grid: int = Field(20, ge=2, le=200, description="points of the scale exponent search in [0, 1)")
    clip: bool = Field(True, description="also search a per-group weight clipping ratio (AWQ's auto_clip)")


class QATStage(QuantStage):
    """Quantization-aware training (LSQ): fake-quantized training against the teacher, converted to the same codes
    as RTN and GPTQ."""

    method: Literal["qat"]
    SIGNED_SCALE: ClassVar[bool] = False
    steps: int = Field(40, ge=1, le=1_000_000)
    lr: float = Field(
        1e-5, gt=0.0, le=1.0, description="learning rate of the weights (and the blocks' other parameters)"
    )
    scale_lr: float = Field(1e-5, gt=0.0, le=1.0, description="learning rate of the quantization step sizes")
    batch_size: int = Field(4, ge=1, le=4096)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    seed: int = Field(0, ge=0, le=2**32 - 1)


class SmoothQuantStage(Targeted):
    """SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, then W8A8."""

    method: Literal["smoothquant"]
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength: s_j = max|X_j|^a / max|W_j|^(1-a)")
    weight_bits: int | None = Field(
        8, ge=4, le=8, description="null: smooth (and quantize activations) only; weights left to a later stage"
    )
    activation_bits: int | None = Field(8, ge=4, le=8, description="per-token dynamic; null: weights only")


class Shrinking(Strict):
    """What a structured method removes: attention heads and MLP channels (same count in every block)."""

    heads: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of query heads removed per KV group")
    mlp: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of MLP intermediate channels removed")

    @model_validator(mode="after")
    def _something(self) -> Shrinking:
        if self.heads == 0 and self.mlp == 0:
            raise ValueError("set 'heads' and/or 'mlp' to the fraction to remove (e.g. mlp: 0.2)")
        return self


class StructuredStage(Shrinking):
    """Structured pruning scored without gradients, the output projections refitted by least squares."""

    method: Literal["structured"]
    importance: Literal["activation", "magnitude"] = Field(
        "activation", description="'activation': output-energy of each head/channel on calibration data"
    )
    update: Literal["none", "least_squares"] = Field(
        "least_squares", description="refit o_proj / down_proj by least squares on the kept channels"
    )
    dampening: float = Field(0.01, gt=0.0, le=1.0)


class LlmPrunerStage(Shrinking):
    """LLM-Pruner: heads and channels scored by the Taylor expansion of the calibration loss (gradients)."""

    method: Literal["llm_pruner"]
    importance: Literal["element1", "element2", "vector"] = Field(
        "element1", description="'element1': sum |w dL/dw| over the group; 'element2' adds the Fisher term; "
        "'vector': |sum w dL/dw| per layer of the group"
    )  # fmt: skip
    samples: int | None = Field(None, ge=1, le=1_000_000, description="calibration windows for gradients; null: all")


class DropBlocksStage(Strict):
    """Remove whole decoder blocks, the least important by block influence (1 - cos(input, output))."""

    method: Literal["drop_blocks"]
    blocks: int = Field(ge=1, description="number of decoder blocks to remove")


class LowRankStage(Targeted):
    """Factor linear layers W ~ U V into two smaller linears (plain or activation-aware SVD)."""

    method: Literal["lowrank"]
    rank_ratio: float = Field(gt=0.0, lt=1.0, description="kept rank / min(in, out)")
    activation_aware: bool = Field(True, description="whiten by the input's Cholesky factor (SVD-LLM)")
    dampening: float = Field(0.01, gt=0.0, le=1.0)


class DistillStage(Strict):
    """Recover quality: train the compressed student on the teacher's (the model before this recipe) logits."""

    method: Literal["distill"]
    steps: int = Field(100, ge=1, le=1_000_000)
    lr: float = Field(5e-5, gt=0.0, le=1.0)
    batch_size: int = Field(4, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    hidden_weight: float = Field(0.0, ge=0.0, description="weight of the hidden-state MSE term; 0: logits only")
    weight_decay: float = Field(0.0, ge=0.0)
    seed: int = Field(0, ge=0, le=2**32 - 1)


Stage = Annotated[
    MagnitudeStage
    | WandaStage
    | SparseGPTStage
    | SurgeonStage
    | DSnoTStage
    | RTNStage
    | GPTQStage
    | AWQStage
    | QATStage
    | SmoothQuantStage
    | StructuredStage
    | LlmPrunerStage
    | DropBlocksStage
    | LowRankStage
    | DistillStage
    | EmbeddingsStage,
    Field(discriminator="method"),
]
STAGE_SCHEMAS: tuple[type[Strict], ...] = get_args(get_args(Stage)[0])
METHODS = tuple(get_args(schema.model_fields["method"].annotation)[0] for schema in STAGE_SCHEMAS)  # the one list


class ExpertCoverage(Strict):
    """Mixture-of-experts models (llmpress/compress/experts.py): every expert is calibrated on every calibration
    token, but an expert the router sends few of them is tuned to inputs it rarely sees. `min_tokens` is the floor of
    calibration tokens the router must send each expert of each block; below it the run warns or fails."""

    min_tokens: int = Field(0, ge=0, description="routed calibration tokens each expert must get (0: no floor)")
    below_floor: Literal["warn", "fail"] = "warn"


class Recipe(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    description: str = ""
    stages: list[Stage] = Field(min_length=1)
    experts: ExpertCoverage = ExpertCoverage()


def export_recipe(recipe: Recipe, precision: str = "recipe", quantizer: str = "rtn") -> Recipe:
    """The recipe that runs: `recipe`, followed by the quantization `export.precision` asks for when the recipe only
    prunes (or factorises, distils...). Quantization comes last, on an asymmetric zero-point grid (0 is a grid point),
    so pruned zeros stay exactly zero; GPTQ keeps them too (llmpress/compress/gptq.py). A recipe that quantizes
    already decides its own precision: asking for another is refused."""
    if precision == "recipe":
        return recipe
    quantizing = [f"{i} ({s.method})" for i, s in enumerate(recipe.stages)
                  if isinstance(s, QuantGrid | SmoothQuantStage)]  # fmt: skip
    if quantizing:
        raise ConfigError(f"export.precision: {precision!r} is for recipes that do not quantize, and recipe "
                          f"{recipe.name!r} quantizes (stage {quantizing[0]}); allowed with it: 'recipe'")  # fmt: skip
    if precision == "fp32":
        return recipe
    data = recipe.model_dump(mode="json")  # nulls kept: a null group_size means per channel, not the default
    data["stages"] += precision_stages(precision, quantizer)
    return validate(Recipe, data, f"recipe {recipe.name!r} with export.precision {precision!r}")


def precision_stages(precision: str, quantizer: str = "rtn") -> list[dict[str, Any]]:
    """The stages `export.precision` appends (none for fp32): `quantizer` at 8 bits per channel or 4 bits per 32
    inputs, asymmetric; `int4-full` rounds the embedding table (and a tied head) to 4 bits too."""
    if precision == "fp32":
        return []
    bits, group = (8, None) if precision == "int8" else (4, 32)
    stages: list[dict[str, Any]] = [{"method": quantizer, "bits": bits, "group_size": group, "symmetric": False}]
    if precision == "int4-full":
        stages.append({"method": "embeddings", "bits": 4, "group_size": 32})
    return stages


# ---------------------------------------------------------------------------------------------------------------
# loading with readable errors
# ---------------------------------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: {exc.error_count()} invalid value(s)"]
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; allowed keys are listed in the README)"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown method {err['ctx']['tag']!r}; allowed: {', '.join(METHODS)}"
        elif err["type"] == "union_tag_not_found":
            msg = f"missing 'method'; allowed: {', '.join(METHODS)}"
        got = "" if err["type"] in ("missing", "union_tag_not_found") else f" (got {redact(repr(err['input']))})"
        if isinstance(err.get("input"), dict):
            got = ""
        lines.append(f"  {loc}: {msg}{got}")
    return "\n".join(lines)


def validate(model: type[M], data: Any, source: str) -> M:
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate `params.yaml`; `overrides` maps dotted keys ('data.seed') to values, applied first. The
    environment's URIs are checked too (`check_environment`): they stand in for params' own."""
    check_environment()
    path = Path(path)
    data = read_yaml(path) if path.exists() else {}
    if data is None:  # the code's defaults are not the shipped file's: an empty file would silently change the gate
        raise ConfigError(f"{path} is empty; start from the shipped params.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data or {})
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {key!r} is not a section in {path}")
        node[leaf] = value
    return validate(Params, data, str(path))


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe: llmpress's own shape, or llm-compressor's (`llmpress/llmcompressor.py`)."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping with 'name' and 'stages'")
    from llmpress.llmcompressor import from_llmcompressor, is_llmcompressor

    if is_llmcompressor(data):
        data = from_llmcompressor(data, str(path))
    return validate(Recipe, data, str(path))
