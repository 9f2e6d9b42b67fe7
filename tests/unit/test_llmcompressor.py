"""llm-compressor recipes (their YAML shape) read as llmpress recipes: exact conversions and clear refusals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from llmpress.compress.engine import compress_
from llmpress.config import Recipe, validate
from llmpress.errors import ConfigError
from llmpress.llmcompressor import from_llmcompressor, is_llmcompressor

REPO = Path(__file__).resolve().parents[2]
ALL = {"targets": [".*"], "ignore": []}

# (llm-compressor recipe, the llmpress stages it must become)
CONVERSIONS = {
    "sparsegpt-2of4-then-gptq-w4-g128 (examples/quantization_2of4_sparse_w4a16)": (
        """
        sparsity_stage:
          run_type: oneshot
          sparsity_modifiers:
            SparseGPTModifier:
              sparsity: 0.5
              mask_structure: "2:4"
              targets: ["Linear"]
              ignore: ["re:.*lm_head"]
        quantization_stage:
          run_type: oneshot
          quantization_modifiers:
            GPTQModifier:
              ignore: ["lm_head"]
              config_groups:
                group_0:
                  weights: {num_bits: 4, type: "int", symmetric: true, strategy: "group", group_size: 128}
                  targets: ["Linear"]
        """,
        [
            {"method": "sparsegpt", "pattern": "2:4", **ALL},
            {"method": "gptq", "bits": 4, "group_size": 128, "symmetric": True, "act_order": True, **ALL},
        ],
    ),
    "gptq scheme preset W4A16, explicit actorder null, block_size, dampening_frac": (
        """
        quant_stage:
          quant_modifiers:
            GPTQModifier: {scheme: W4A16, targets: Linear, ignore: [lm_head], actorder: null,
                           block_size: 64, dampening_frac: 0.001, offload_hessians: true}
        """,
        [
            {
                "method": "gptq",
                "bits": 4,
                "group_size": 128,
                "symmetric": True,
                "block_size": 64,
                "dampening": 0.001,
                "act_order": False,
                **ALL,
            }
        ],
    ),
    "rtn: W8A16 preset is per channel; W4A16_ASYM on attention by regex (re.match prefix semantics)": (
        """
        quant_stage:
          quant_modifiers:
            QuantizationModifier:
              ignore: ["lm_head"]
              scheme: {W4A16_ASYM: ["re:.*self_attn\\\\.(k|q|o|v)_proj$"], W8A16: ["re:.*mlp"]}
        """,
        [
            {
                "method": "rtn",
                "bits": 4,
                "group_size": 128,
                "symmetric": False,
                "targets": [r".*self_attn\.(k|q|o|v)_proj"],
                "ignore": [],
            },
            {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "targets": [".*mlp.*"], "ignore": []},
        ],
    ),
    "gptq channel strategy with weight actorder; group_size -1 is per channel too": (
        """
        stage_a_stage:
          modifiers:
            GPTQModifier:
              config_groups:
                g0:
                  targets: ["re:.*down_proj"]
                  weights: {num_bits: 8, strategy: channel, actorder: weight}
                g1:
                  targets: ["model.layers.0.mlp.up_proj"]
                  weights: {num_bits: 6, symmetric: false, group_size: -1}
        """,
        [
            {
                "method": "gptq",
                "bits": 8,
                "group_size": None,
                "symmetric": True,
                "act_order": False,
                "targets": [".*down_proj.*"],
                "ignore": [],
            },
            {
                "method": "gptq",
                "bits": 6,
                "group_size": None,
                "symmetric": False,
                "act_order": False,
                "targets": [r"model\.layers\.0\.mlp\.up_proj"],
                "ignore": [],
            },
        ],
    ),
    "wanda with the OWL profile; llm-compressor N:M prunes N, so 1:4 keeps 3": (
        """
        sparsity_stage:
          sparsity_modifiers:
            WandaPruningModifier: {sparsity: 0.5, sparsity_profile: owl, owl_m: 7, owl_lmbda: 0.05}
          pruning_modifiers:
            WandaPruningModifier: {sparsity: 0.25, mask_structure: "1:4", targets: ["re:.*o_proj"]}
        """,
        [
            {"method": "wanda", "sparsity": 0.5, "owl": {"threshold": 7, "lambda": 0.05}, **ALL},
            {"method": "wanda", "pattern": "3:4", "targets": [".*o_proj.*"], "ignore": []},
        ],
    ),
    "older shapes: top-level `modifiers:` list, percdamp; `stages:` mapping; magnitude on parameter names": (
        """
        version: "1.0"
        modifiers:
          - SparseGPTModifier: {sparsity: 0.6, block_size: 32, percdamp: 0.02, sequential_update: true}
        stages:
          prune:
            pruning_modifiers:
              MagnitudePruningModifier:
                init_sparsity: 0.1
                final_sparsity: 0.4
                targets: ["re:.*q_proj.weight", "re:.*k_proj.weight"]
                start: 0
                end: 1
        """,
        [
            {"method": "sparsegpt", "sparsity": 0.6, "block_size": 32, "dampening": 0.02, **ALL},
            {"method": "magnitude", "sparsity": 0.4, "targets": [".*q_proj.*", ".*k_proj.*"], "ignore": []},
        ],
    ),
    "smoothquant + gptq W8A8 (examples/quantization_w8a8_int8) -> smoothing + 8-bit activations, then gptq": (
        """
        quant_stage:
          quant_modifiers:
            SmoothQuantModifier:
              smoothing_strength: 0.8
              mappings: [[["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"]]
            GPTQModifier:
              sequential_update: false
              ignore: ["lm_head"]
              config_groups:
                group_0:
                  weights: {num_bits: 8, type: "int", symmetric: true, strategy: "channel"}
                  input_activations: {num_bits: 8, type: "int", symmetric: true, dynamic: true, strategy: "token"}
                  targets: ["Linear"]
        """,
        [
            {"method": "smoothquant", "alpha": 0.8, "weight_bits": None, "activation_bits": 8, **ALL},
            {"method": "gptq", "bits": 8, "group_size": None, "symmetric": True, "act_order": False, **ALL},
        ],
    ),
    "smoothquant + W8A8 QuantizationModifier: one smoothquant stage with its own weight grid": (
        """
        quant_stage:
          quant_modifiers:
            SmoothQuantModifier: {smoothing_strength: 0.6, ignore: ["re:.*down_proj"]}
            QuantizationModifier: {scheme: W8A8, targets: [Linear], ignore: [lm_head]}
        """,
        [
            {
                "method": "smoothquant",
                "alpha": 0.6,
                "weight_bits": 8,
                "activation_bits": 8,
                "targets": [".*"],
                "ignore": [".*down_proj.*"],
            }
        ],
    ),
    "smoothquant + asymmetric weight-only rtn: smoothing alone, then rtn": (
        """
        quant_stage:
          quant_modifiers:
            SmoothQuantModifier: {}
            QuantizationModifier:
              config_groups:
                g: {targets: [Linear], weights: {num_bits: 8, strategy: channel, symmetric: false}}
        """,
        [
            {"method": "smoothquant", "alpha": 0.5, "weight_bits": None, "activation_bits": None, **ALL},
            {"method": "rtn", "bits": 8, "group_size": None, "symmetric": False, **ALL},
        ],
    ),
    "awq absorbs the QuantizationModifier after it (tests/e2e recipe_w4a16_awq_asym)": (
        """
        quant_stage:
          quant_modifiers:
            AWQModifier: {duo_scaling: "both"}
            QuantizationModifier:
              ignore: [lm_head]
              config_groups:
                group_0:
                  weights: {num_bits: 4, type: int, symmetric: false, strategy: "group", group_size: 128}
                  targets: [Linear]
        """,
        [{"method": "awq", "bits": 4, "group_size": 128, "symmetric": False, **ALL}],
    ),
    "awq with its own scheme and n_grid": (
        """
        quant_stage:
          quant_modifiers:
            AWQModifier: {scheme: W4A16_ASYM, targets: [Linear], ignore: [lm_head], n_grid: 10}
        """,
        [{"method": "awq", "bits": 4, "group_size": 128, "symmetric": False, "grid": 10, **ALL}],
    ),
}

# (llm-compressor recipe, a fragment the ConfigError must contain)
REFUSALS = {
    "unknown modifier by name": (
        "s_stage:\n  m_modifiers:\n    OBCQModifier: {sparsity: 0.5}",
        "modifier 'OBCQModifier' is not implemented by llmpress; supported: SparseGPTModifier",
    ),
    "constant pruning points at distill": (
        "s_stage:\n  m_modifiers:\n    ConstantPruningModifier: {targets: __ALL__}",
        "llmpress's own 'distill' stage",
    ),
    "training stage": (
        "f_stage:\n  run_type: train\n  m_modifiers:\n    ConstantPruningModifier: {targets: __ALL__}",
        "run_type 'train'",
    ),
    "W8A8 without smoothing": (
        "q_stage:\n  q_modifiers:\n    QuantizationModifier: {scheme: W8A8, targets: [Linear]}",
        "put a SmoothQuantModifier right before this modifier",
    ),
    "float preset": (
        "q_stage:\n  q_modifiers:\n    QuantizationModifier: {scheme: FP8_DYNAMIC, targets: [Linear]}",
        "scheme 'FP8_DYNAMIC' is not supported",
    ),
    "float weights": (
        "q_stage:\n  q_modifiers:\n    GPTQModifier:\n      config_groups:\n        g: {targets: [Linear], "
        "weights: {num_bits: 8, type: float, strategy: channel}}",
        "float weights",
    ),
    "per-tensor scale": (
        "q_stage:\n  q_modifiers:\n    GPTQModifier:\n      config_groups:\n        g: {targets: [Linear], "
        "weights: {num_bits: 8}}",
        "weight strategy 'tensor' is not supported",
    ),
    "kv cache": (
        "q_stage:\n  q_modifiers:\n    QuantizationModifier: {scheme: W4A16, kv_cache_scheme: {num_bits: 8}}",
        "kv_cache_scheme",
    ),
    "per-layer sparsity list": (
        "s_stage:\n  m_modifiers:\n    WandaPruningModifier: {sparsity: [0.5, 0.6]}",
        "per-layer sparsity lists are not supported",
    ),
    "typo in an argument": (
        "s_stage:\n  m_modifiers:\n    SparseGPTModifier: {sparsity: 0.5, mask_structur: '2:4'}",
        "unsupported argument(s) 'mask_structur'",
    ),
    "smoothquant alone": (
        "q_stage:\n  q_modifiers:\n    SmoothQuantModifier: {smoothing_strength: 0.5}",
        "must be followed by the QuantizationModifier or GPTQModifier",
    ),
    "static activations after smoothquant": (
        "q_stage:\n  q_modifiers:\n    SmoothQuantModifier: {}\n    QuantizationModifier:\n      config_groups:\n"
        "        g: {targets: [Linear], weights: {num_bits: 8, strategy: channel}, input_activations: "
        "{num_bits: 8, strategy: tensor, dynamic: false}}",
        "activation quantization int/tensor/dynamic=False",
    ),
    "awq then gptq": (
        "q_stage:\n  q_modifiers:\n    AWQModifier: {}\n    GPTQModifier: {scheme: W4A16}",
        "AWQModifier needs quantization settings",
    ),
    "recipe variables": (
        "s_stage:\n  m_modifiers:\n    WandaPruningModifier: {sparsity: 'eval(target)'}",
        "recipe variables",
    ),
    "module classes other than Linear": (
        "s_stage:\n  m_modifiers:\n    WandaPruningModifier: {sparsity: 0.5, targets: [LlamaDecoderLayer]}",
        "target class 'LlamaDecoderLayer' is not supported",
    ),
    "scheme and config_groups together": (
        "q_stage:\n  q_modifiers:\n    QuantizationModifier: {scheme: W4A16, config_groups: {}}",
        "give exactly one of 'scheme'",
    ),
}


def _convert(text: str, source: str = "recipes/example.yaml") -> dict:
    return from_llmcompressor(yaml.safe_load(text), source)


@pytest.mark.parametrize("case", list(CONVERSIONS))
def test_conversion_gives_these_stages_and_validates(case: str) -> None:
    text, expected = CONVERSIONS[case]
    data = yaml.safe_load(text)
    assert is_llmcompressor(data)
    recipe = from_llmcompressor(data, "some/dir/my recipe.yaml")
    assert recipe["stages"] == expected
    assert recipe["name"] == "my-recipe"
    validated = validate(Recipe, recipe, "test")  # the converted dict is a valid llmpress recipe
    assert [s.method for s in validated.stages] == [s["method"] for s in expected]


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_what_is_not_supported(case: str) -> None:
    text, fragment = REFUSALS[case]
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        _convert(text)


def test_is_llmcompressor_tells_the_shapes_apart() -> None:
    assert not is_llmcompressor({"name": "x", "stages": [{"method": "wanda", "sparsity": 0.5}]})
    assert not is_llmcompressor(["not", "a", "mapping"])
    assert not is_llmcompressor({"name": "x"})
    assert is_llmcompressor({"stages": {"a": {"modifiers": {}}}})
    assert is_llmcompressor({"modifiers": [{"WandaPruningModifier": {"sparsity": 0.5}}]})
    assert is_llmcompressor({"quant_stage": {}})


@pytest.mark.parametrize(
    ("target", "selected"),
    [
        ("re:.*mlp", {"gate", "up", "down"}),
        ("re:.*q_proj$", {"q"}),
        ("re:.*self_attn\\.(q|k)_proj", {"q", "k"}),
        ("re:model.layers.0.*_proj", {"q", "k", "v", "o", "gate", "up", "down"}),
        ("Linear", {"q", "k", "v", "o", "gate", "up", "down"}),
        ("model.layers.0.mlp.down_proj", {"down"}),
    ],
)
def test_targets_select_what_llm_compressor_would(target: str, selected: set[str]) -> None:
    """llm-compressor's re.match (prefix) semantics, kept under llmpress's re.fullmatch."""
    names = {
        "q": "model.layers.0.self_attn.q_proj", "k": "model.layers.0.self_attn.k_proj",
        "v": "model.layers.0.self_attn.v_proj", "o": "model.layers.0.self_attn.o_proj",
        "gate": "model.layers.0.mlp.gate_proj", "up": "model.layers.0.mlp.up_proj",
        "down": "model.layers.0.mlp.down_proj",
    }  # fmt: skip
    recipe = _convert(f"s_stage:\n  m_modifiers:\n    WandaPruningModifier: {{sparsity: 0.5, targets: ['{target}']}}")
    (pattern,) = recipe["stages"][0]["targets"]
    assert {key for key, name in names.items() if re.fullmatch(pattern, name)} == selected
    if target.startswith("re:"):
        assert {key for key, name in names.items() if re.match(target[3:], name)} == selected


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("recipes/llmcompressor/sparsegpt-2of4-gptq-w4a16.yaml", ["sparsegpt", "gptq"]),
        ("recipes/llmcompressor/smoothquant-w8a8.yaml", ["smoothquant"]),
    ],
)
def test_shipped_llmcompressor_examples_convert(path: str, methods: list[str]) -> None:
    data = yaml.safe_load((REPO / path).read_text())
    assert is_llmcompressor(data)
    recipe = validate(Recipe, from_llmcompressor(data, path), path)
    assert [s.method for s in recipe.stages] == methods
    assert recipe.name == Path(path).stem


def test_converted_wanda_recipe_runs(tiny_llama, calibration_ids) -> None:
    """End to end on the tiny model: an llm-compressor Wanda recipe prunes every block linear to 50 %."""
    text = "sparsity_stage:\n  sparsity_modifiers:\n    WandaPruningModifier: {sparsity: 0.5, ignore: [lm_head]}"
    recipe = validate(Recipe, _convert(text), "test")
    report = compress_(tiny_llama, recipe, calibration_ids)
    assert len(report.layers) == 3 * 7
    assert all(abs(rec.sparsity - 0.5) < 0.01 for rec in report.layers)
    assert (tiny_llama.lm_head.weight != 0).all()


def test_converted_smoothquant_gptq_w8a8_runs(tiny_llama, calibration_ids) -> None:
    """SmoothQuant + GPTQ W8A8 end to end: every block linear ends with 8-bit codes and 8-bit input quantization."""
    text = (
        "quant_stage:\n  quant_modifiers:\n    SmoothQuantModifier: {smoothing_strength: 0.8}\n"
        "    GPTQModifier: {scheme: W8A8, targets: [Linear], ignore: [lm_head]}"
    )
    recipe = validate(Recipe, _convert(text), "test")
    compress_(tiny_llama, recipe, calibration_ids)
    linears = [m for n, m in tiny_llama.named_modules() if n.startswith("model.layers.") and n.endswith("_proj")]
    assert len(linears) == 3 * 7
    assert all(m.llmpress_quant.bits == 8 and m.llmpress_act_bits == 8 for m in linears)
