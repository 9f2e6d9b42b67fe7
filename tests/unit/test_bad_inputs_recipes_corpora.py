"""Bad llm-compressor recipes and corpora that used to be accepted with another meaning: given to the `llmpress`
command line as a user would, each is refused with exit status 2, one `error:` line naming the file, the key or
the line and what is allowed, no traceback, and nothing left behind; the valid form of each still passes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from flows.cli import main
from llmpress.config import load_recipe
from tests.unit.conftest import snapshot

REPO = Path(__file__).resolve().parents[2]

GPTQ = """\
quantization_stage:
  quantization_modifiers:
    GPTQModifier:
      {modifier}
      config_groups:
        group_0:
          targets: [Linear]
          weights: {{num_bits: 4, type: int, strategy: group, group_size: 128, {weights}}}
"""
SPARSEGPT = """\
sparsity_stage:
  {stage}
  sparsity_modifiers:
    SparseGPTModifier: {{{args}}}
"""


def gptq(weights: str = "symmetric: true", modifier: str = "block_size: 128") -> str:
    return GPTQ.format(weights=weights, modifier=modifier)


def sparsegpt(args: str = 'sparsity: 0.5, mask_structure: "2:4"', stage: str = "run_type: oneshot") -> str:
    return SPARSEGPT.format(args=args, stage=stage)


def text_lines(n: int = 300) -> list[str]:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "by", "an", "old", "mill"]
    return [" ".join(words[(i + j) % len(words)] for j in range(400)) for i in range(n)]


UNSET = object()


def jsonl(bad: object = UNSET) -> str:
    """A corpus long enough to pass; line 3 holds `bad` as its "text" when given."""
    docs: list[object] = list(text_lines())
    if bad is not UNSET:
        docs[2] = bad
    return "".join(json.dumps({"text": d}) + "\n" for d in docs)


def txt(bad: str | None = None) -> str:
    lines = text_lines()
    if bad is not None:
        lines[2] = bad
    return "\n".join(lines) + "\n"


# (name, recipe text, fragments the error line must contain)
BAD_RECIPES = [
    ("symmetric-string", gptq('symmetric: "false"'), ["group_0.weights.symmetric", "expected true or false"]),
    ("symmetric-yes-string", gptq('symmetric: "yes"'), ["weights.symmetric", "'yes'"]),
    ("symmetric-number", gptq("symmetric: 0"), ["weights.symmetric", "expected true or false"]),
    ("symmetric-yaml11-no", gptq("symmetric: no"), ["weights.symmetric", "'no'"]),  # a string in YAML 1.2
    ("dynamic-string", gptq('dynamic: "false"'), ["weights.dynamic", "expected true or false"]),
    ("actorder-banana", gptq("actorder: banana"), ["weights.actorder", "'banana'", "allowed: null, false, 'weight'"]),
    ("actorder-none-string", gptq('actorder: "None"'), ["weights.actorder", "'None'", "allowed:"]),
    ("actorder-number", gptq(modifier="actorder: 1"), ["GPTQModifier.actorder", "allowed:"]),
    ("actorder-list", gptq(modifier="actorder: [weight]"), ["GPTQModifier.actorder", "allowed:"]),
    ("actorder-group", gptq(modifier="actorder: group"), ["actorder 'group'", "not implemented", "'weight'"]),
    ("actorder-true", gptq("actorder: true"), ["actorder 'group'", "not implemented"]),
    (
        "actorder-conflict",
        gptq("actorder: weight", "actorder: null"),
        ["actorder null differs from a config group's actorder weight"],
    ),
    ("sparsity-vs-2of4", sparsegpt('sparsity: 0.9, mask_structure: "2:4"'), ["sparsity 0.9 contradicts", "0.5"]),
    ("sparsity-zero-vs-1of4", sparsegpt('sparsity: 0.0, mask_structure: "1:4"'), ["contradicts", "0.25"]),
    ("sparsity-list-vs-nm", sparsegpt('sparsity: [0.5], mask_structure: "2:4"'), ["contradicts", "0.5"]),
    ("sparsity-bool-vs-nm", sparsegpt('sparsity: true, mask_structure: "2:4"'), ["contradicts"]),
    ("stage-disabled", sparsegpt(stage="enabled: false"), ["sparsity_stage", "enabled: false"]),
    ("stage-enabled-string", sparsegpt(stage='enabled: "true"'), ["sparsity_stage.enabled", "expected true or"]),
    ("stage-unknown-key", sparsegpt(stage="exclude_default: true"), ["'exclude_default'", "understood:", "run_type"]),
    ("stage-bad-run-type", sparsegpt(stage="run_type: banana"), ["sparsity_stage.run_type", "'oneshot', 'train'"]),
    (
        "modifier-disabled",
        sparsegpt('sparsity: 0.5, mask_structure: "2:4", enabled: false'),
        ["SparseGPTModifier", "unsupported argument(s) 'enabled'", "understood: sparsity, mask_structure"],
    ),
    (
        "preserve-mask-string",
        sparsegpt('sparsity: 0.5, preserve_sparsity_mask: "false"'),
        ["SparseGPTModifier.preserve_sparsity_mask", "expected true or false"],
    ),
    (
        "weights-unknown-key",
        gptq("symmetric: true, enabled: false"),
        ["group_0.weights", "'enabled'", "understood: type, dynamic"],
    ),
]

BAD_CORPORA = [
    ("jsonl-text-null", "c.jsonl", jsonl(None), "c.jsonl:3: 'text' must be a string, got null"),
    ("jsonl-text-true", "c.jsonl", jsonl(True), "c.jsonl:3: 'text' must be a string, got true"),
    ("jsonl-text-number", "c.jsonl", jsonl(42), "c.jsonl:3: 'text' must be a string, got a number"),
    ("jsonl-text-list", "c.jsonl", jsonl(["the", "fox"]), "c.jsonl:3: 'text' must be a string, got an array"),
    ("jsonl-text-dict", "c.jsonl", jsonl({"a": "b"}), "c.jsonl:3: 'text' must be a string, got an object"),
    ("txt-control-chars", "c.txt", txt("\x00\x01\x02" * 400), "c.txt:3: NUL character"),
    ("txt-control-no-nul", "c.txt", txt("\x01\x02\x03" * 400), "c.txt:3: 1200 of 1200 characters are control"),
    ("txt-one-nul", "c.txt", txt("the fox\x00 jumps " * 50), "c.txt:3: NUL character (character 8)"),
    ("txt-some-control", "c.txt", txt("the fox\x07 jumps " * 50), "c.txt:3: 50 of 750 characters are control"),
    ("jsonl-escaped-nul", "c.jsonl", jsonl("the fox\u0000 jumps " * 50), "c.jsonl:3: NUL character"),
    ("txt-all-separators", "c.txt", txt("\x1c\x1d\x1e\x1f" * 100), "c.txt:3: 400 of 400 characters are control"),
]


def recipe_setup(text: str) -> Callable[[Path], list[str]]:
    def setup(project: Path) -> list[str]:
        (project / "bad.yaml").write_text(text)
        return ["check", str(project / "bad.yaml")]

    return setup


def corpus_setup(name: str, text: str) -> Callable[[Path], list[str]]:
    def setup(project: Path) -> list[str]:
        path = project / "inputs" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return ["run", "--data", str(path)]

    return setup


CASES = [(f"recipe-{n}", recipe_setup(t), f) for n, t, f in BAD_RECIPES] + [
    (f"corpus-{n}", corpus_setup(file, t), [f]) for n, file, t, f in BAD_CORPORA
]


@pytest.mark.parametrize(("name", "setup", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_leaves_nothing(
    project: Path, capsys: pytest.CaptureFixture[str], name: str, setup: Callable[[Path], list[str]], expected: list
) -> None:
    args = setup(project)
    before = snapshot(project)
    code = main(["--project", str(project), *args])
    out, err = capsys.readouterr()
    assert code == 2, f"{name}: exit {code}\n{out}\n{err}"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert all(fragment in errors[0] for fragment in expected), err
    assert "bad.yaml" in errors[0] or "inputs/c." in errors[0], err  # names the file
    assert "Traceback" not in err + out
    assert snapshot(project) == before, "the refusal left something behind"


# ---------------------------------------------------------------------------------------------------------------
# the valid form of each still passes
# ---------------------------------------------------------------------------------------------------------------


def check_ok(project: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    (project / "ok.yaml").write_text(text)
    code = main(["--project", str(project), "check", str(project / "ok.yaml")])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("value", ["true", "false", "True", "FALSE"])
def test_yaml_booleans_are_accepted(project: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    check_ok(project, capsys, gptq(f"symmetric: {value}"))
    symmetric = value.lower() == "true"
    assert load_recipe(project / "ok.yaml").stages[0].symmetric is symmetric


@pytest.mark.parametrize(
    ("modifier", "weights", "act_order"),
    [
        ("block_size: 128", "symmetric: true", True),  # llm-compressor's default, "static"
        ("actorder: static", "symmetric: true", True),
        ("actorder: Weight", "symmetric: true", True),
        ("actorder: null", "symmetric: true", False),
        ("block_size: 128", "actorder: false", True),  # false is null to compressed-tensors: the default applies
        ("block_size: 128", "actorder: weight", True),  # a config group's own ordering
        ("block_size: 128", "actorder: null", True),  # null is "unset": the modifier's default applies
        ("actorder: weight", "actorder: weight", True),
    ],
)
def test_llm_compressor_actorder_values_map_to_act_order(
    project: Path, capsys: pytest.CaptureFixture[str], modifier: str, weights: str, act_order: bool
) -> None:
    check_ok(project, capsys, gptq(weights, modifier))
    assert load_recipe(project / "ok.yaml").stages[0].act_order is act_order


@pytest.mark.parametrize(("args", "pattern"), [('sparsity: 0.5, mask_structure: "2:4"', "2:4"),
                                               ('mask_structure: "2:4"', "2:4"),
                                               ('sparsity: 0.25, mask_structure: "1:4"', "3:4"),
                                               ('sparsity: 0.33, mask_structure: "1:3"', "2:3")])  # fmt: skip
def test_sparsity_that_agrees_with_the_mask_is_accepted(
    project: Path, capsys: pytest.CaptureFixture[str], args: str, pattern: str
) -> None:
    check_ok(project, capsys, sparsegpt(args))
    assert load_recipe(project / "ok.yaml").stages[0].pattern == pattern


@pytest.mark.parametrize("stage", ["run_type: oneshot", "enabled: true", "group: prune", "args: {}"])
def test_understood_stage_keys_are_accepted(project: Path, capsys: pytest.CaptureFixture[str], stage: str) -> None:
    check_ok(project, capsys, sparsegpt(stage=stage))


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml")))
def test_shipped_recipes_still_load(path: str) -> None:
    load_recipe(REPO / path)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("ok.jsonl", jsonl("a form feed\x0c, tabs\tand newlines\n are fine in a long document " + "text " * 100)),
        ("ok.txt", txt("café — naïve “quotes” 日本語 emoji 🙂 and a tab\t " * 20)),
        ("crlf.txt", txt().replace("\n", "\r\n")),
    ],
)
def test_text_corpus_is_accepted(project: Path, name: str, text: str) -> None:
    from llmpress.config import load_params
    from llmpress.data import check_corpus

    path = project / name
    path.write_text(text, encoding="utf-8", newline="")
    check_corpus(str(path), load_params(project / "params.yaml").data)
