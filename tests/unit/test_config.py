from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmpress.config import Params, Recipe, load_params, load_recipe, validate
from llmpress.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))


def _write(tmp_path: Path, data, name: str = "file.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _recipe_error(tmp_path: Path, stage: dict) -> str:
    path = _write(tmp_path, {"name": "r", "stages": [stage]})
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message


def test_valid_recipe_round_trip(tmp_path: Path) -> None:
    path = _write(tmp_path, {"name": "ok-1", "stages": [{"method": "wanda", "pattern": " 2 : 4 "}]})
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    stage = recipe.stages[0]
    assert stage.method == "wanda"
    assert stage.pattern == "2:4"  # normalised
    assert stage.n_m == (2, 4)
    assert stage.target_sparsity == pytest.approx(0.5)
    assert stage.targets == [".*"]
    assert stage.ignore == []


def test_unknown_stage_key_names_the_path(tmp_path: Path) -> None:
    message = _recipe_error(tmp_path, {"method": "wanda", "sparsty": 0.5})
    assert "stages.0.wanda.sparsty: unknown key" in message
    # the typo leaves the stage with neither sparsity nor pattern; the key path is what matters
    assert "sparsty" in message


def test_sparsity_out_of_range_refused(tmp_path: Path) -> None:
    message = _recipe_error(tmp_path, {"method": "wanda", "sparsity": 1.5})
    assert "stages.0.wanda.sparsity:" in message
    assert "less than 1" in message
    assert "1.5" in message


def test_negative_sparsity_refused(tmp_path: Path) -> None:
    message = _recipe_error(tmp_path, {"method": "magnitude", "sparsity": -0.1})
    assert "stages.0.magnitude.sparsity:" in message


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("4:2", "needs 0 < N < M"),
        ("2:2", "needs 0 < N < M"),
        ("0:4", "needs 0 < N < M"),
        ("2:4:8", "must look like 'N:M'"),
        ("abc", "must look like 'N:M'"),
        ("2:512", "M must be <= 256"),
    ],
)
def test_bad_pattern_refused(tmp_path: Path, pattern: str, expected: str) -> None:
    message = _recipe_error(tmp_path, {"method": "wanda", "pattern": pattern})
    assert "stages.0.wanda.pattern:" in message
    assert expected in message
    assert repr(pattern) in message


@pytest.mark.parametrize("stage", [{"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}, {"method": "wanda"}])
def test_exactly_one_of_sparsity_or_pattern(tmp_path: Path, stage: dict) -> None:
    message = _recipe_error(tmp_path, stage)
    assert "stages.0.wanda:" in message
    assert "exactly one of 'sparsity'" in message


def test_unknown_method_lists_allowed_methods(tmp_path: Path) -> None:
    message = _recipe_error(tmp_path, {"method": "sparsegpt_xyz", "sparsity": 0.5})
    assert "stages.0:" in message
    assert "sparsegpt_xyz" in message
    assert "allowed: magnitude, wanda" in message


def test_unknown_method_message_quotes_the_method_not_the_stage(tmp_path: Path) -> None:
    # The message should name the bad method, not dump the whole stage mapping.
    message = _recipe_error(tmp_path, {"method": "sparsegpt_xyz", "sparsity": 0.5})
    assert "unknown method 'sparsegpt_xyz';" in message


def test_missing_method_refused(tmp_path: Path) -> None:
    message = _recipe_error(tmp_path, {"sparsity": 0.5})
    assert "stages.0: missing 'method'; allowed: magnitude, wanda" in message


@pytest.mark.parametrize("field", ["targets", "ignore"])
def test_invalid_regex_refused(tmp_path: Path, field: str) -> None:
    message = _recipe_error(tmp_path, {"method": "magnitude", "sparsity": 0.5, field: ["model.(layers"]})
    assert f"stages.0.magnitude.{field}:" in message
    assert "'model.(layers' is not a valid regular expression" in message


def test_empty_targets_refused(tmp_path: Path) -> None:
    message = _recipe_error(tmp_path, {"method": "magnitude", "sparsity": 0.5, "targets": []})
    assert "stages.0.magnitude.targets:" in message


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {"name": "r", "stages": [{"method": "wanda", "sparsity": 1.5}, {"method": "magnitude", "pattern": "abc"}]},
    )
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "2 invalid value(s)" in message
    assert "stages.0.wanda.sparsity" in message
    assert "stages.1.magnitude.pattern" in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"stages": [{"method": "wanda", "sparsity": 0.5}]}, "name: Field required"),
        ({"name": "r", "stages": []}, "stages:"),
        ({"name": "bad name!", "stages": [{"method": "wanda", "sparsity": 0.5}]}, "name:"),
        ({"name": "r", "stages": [{"method": "wanda", "sparsity": 0.5}], "extra": 1}, "extra: unknown key"),
    ],
)
def test_recipe_top_level_errors(tmp_path: Path, data: dict, expected: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError, match="invalid value") as info:
        load_recipe(path)
    assert expected in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"])
def test_recipe_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="a recipe is a mapping"):
        load_recipe(path)


def test_recipe_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_recipe_invalid_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(path)


# ------------------------------------------------------------------------------------------------------------
# params
# ------------------------------------------------------------------------------------------------------------


def test_params_defaults_when_file_missing(tmp_path: Path) -> None:
    params = load_params(tmp_path / "params.yaml")
    assert params == Params()
    assert params.eval.stride <= params.eval.window


def test_params_overrides_apply(tmp_path: Path) -> None:
    path = _write(tmp_path, {"data": {"seed": 3}}, "params.yaml")
    params = load_params(path, overrides={"data.seq_len": 64, "eval.window": 64, "eval.stride": 32})
    assert params.data.seed == 3
    assert params.data.seq_len == 64
    assert (params.eval.window, params.eval.stride) == (64, 32)


def test_params_stride_greater_than_window_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, {"eval": {"window": 64, "stride": 65}}, "params.yaml")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert "eval: stride (65) must be <= window (64)" in str(info.value)


def test_params_unknown_top_level_key_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, {"modle": "default"}, "params.yaml")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert "modle: unknown key" in str(info.value)


def test_params_unknown_nested_key_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, {"gate": {"max_perplexity_ratioo": 2.0}}, "params.yaml")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert "gate.max_perplexity_ratioo: unknown key" in str(info.value)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "hello\n", "3.5\n"])
def test_params_non_mapping_refused(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text, "params.yaml")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_params(path)


def test_params_empty_file_is_refused_and_a_partial_one_takes_the_code_defaults(tmp_path: Path) -> None:
    """The code's defaults are not the shipped file's (its gate is tuned to its recipe): an empty file, most likely
    a mistake, would silently change the gate; a file that sets something takes the code's defaults for the rest."""
    with pytest.raises(ConfigError, match="is empty"):
        load_params(_write(tmp_path, "", "params.yaml"))
    assert load_params(_write(tmp_path, "model: default\n", "params.yaml")) == Params()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"data.eval_fraction": 1.0}, "data.eval_fraction"),
        ({"compress.device": "tpu"}, "compress.device"),
        ({"export.opset": 9}, "export.opset"),
        ({"export.formats": ["onnx", "tflite"]}, "export.formats.1"),
        ({"export.formats": ["gguf", "gguf"]}, "export.formats"),
        ({"export.gguf_float_type": "q4_0"}, "export.gguf_float_type"),
        ({"tracking.registered_model": "has space"}, "tracking.registered_model"),
        ({"gate.min_sparsity": 1.0}, "gate.min_sparsity"),
    ],
)
def test_params_field_errors_name_the_field(tmp_path: Path, override: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_params(tmp_path / "absent.yaml", overrides=override)
    assert f"  {expected}: " in str(info.value)


def test_signed_scale_needs_a_symmetric_grid_and_a_fitted_one() -> None:
    for stage, expected in (
        ({"method": "rtn", "signed_scale": True}, "applies to symmetric grids"),
        ({"method": "qat", "symmetric": True, "signed_scale": True}, "not supported by qat"),
    ):
        with pytest.raises(ConfigError, match=expected):
            validate(Recipe, {"name": "r", "stages": [stage | {"targets": [".*_proj"]}]}, "r.yaml")
    recipe = validate(Recipe, {"name": "r", "stages": [{"method": "gptq", "symmetric": True, "signed_scale": True}]},
                      "r.yaml")  # fmt: skip
    assert recipe.stages[0].signed_scale


def test_export_formats_replace_the_onnx_switch(tmp_path: Path) -> None:
    assert load_params(tmp_path / "absent.yaml", overrides={"export.formats": ["gguf", "onnx"]}).export.gguf
    assert not load_params(tmp_path / "absent.yaml", overrides={"export.formats": []}).export.onnx
    with pytest.raises(ConfigError, match=r"export\.onnx was replaced by export\.formats"):
        load_params(tmp_path / "absent.yaml", overrides={"export.onnx": False})


def test_shipped_params_validate() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert (REPO_ROOT / params.recipe).is_file()


def test_recipes_are_found() -> None:
    assert len(RECIPES) >= 1


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    for stage in recipe.stages:
        if getattr(stage, "target_sparsity", None) is not None:  # None: structured removal (surgeon mlp/heads)
            assert 0.0 <= stage.target_sparsity < 1.0


def test_params_override_into_empty_section_is_a_config_error(tmp_path: Path) -> None:
    # `eval:` with nothing under it is YAML null; an override into it must give a ConfigError, not a TypeError.
    path = _write(tmp_path, "eval:\n", "params.yaml")
    with pytest.raises(ConfigError):
        load_params(path, overrides={"eval.window": 64})
