"""Random and mutated recipes, params files and bundle manifests thrown at the command line: whatever comes in,
`llmpress check` and `llmpress bundle verify` answer with exit 0, or exit 2 and one `error:` line; never a
traceback, never a hang (hypothesis's deadline fails any example slower than a few seconds)."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.cli import main

REPO = Path(__file__).resolve().parents[2]
SEEDS = [p.read_bytes() for p in sorted((REPO / "recipes").glob("*.yaml"))] + [(REPO / "params.yaml").read_bytes()]
MANIFEST = b'{"format": "llmpress-edge-bundle/1", "files": [{"path": "model.onnx", "bytes": 3, "sha256": "ab"}]}'
FUZZ = settings(max_examples=300, deadline=5000, suppress_health_check=[HealthCheck.too_slow], database=None)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12))  # fmt: skip
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                         max_leaves=30)  # fmt: skip
fragments = st.sampled_from([b"&a ", b"*a", b"<<: *a\n", b"[", b"]", b"{", b"}", b": ", b"\n  - ", b"2:4", b"\xff",
                             b"!!python/name:os.system", b"\x00", b"'", b'"', b"#", b"---\n", b"\t", b"yes", b"1e400",
                             b"method: "])  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A real file with a few bytes replaced, cut or inserted (YAML syntax and hostile fragments included)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "replace", "cut"]))
        piece = draw(st.one_of(fragments, st.binary(min_size=1, max_size=4)))
        if action == "insert":
            data[at:at] = piece
        elif action == "replace":
            data[at : at + len(piece)] = piece
        else:
            del data[at : at + draw(st.integers(1, 40))]
    return bytes(data)


def run_cli(args: list[str], project: Path) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(["--project", str(project), *args])
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue() + out.getvalue()


def assert_answered(code: int, text: str) -> None:
    assert "Traceback" not in text, text
    assert code in (0, 2), text
    if code == 2:
        assert len([line for line in text.splitlines() if line.startswith("error: ")]) == 1, text


def check_recipe_and_params(recipe: bytes, params: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "params.yaml").write_bytes(params)
        (project / "recipe.yaml").write_bytes(recipe)
        assert_answered(*run_cli(["check", str(project / "recipe.yaml")], project))


@FUZZ
@given(mutated(SEEDS))
def test_mutated_recipes_are_answered(recipe: bytes) -> None:
    check_recipe_and_params(recipe, (REPO / "params.yaml").read_bytes())


@FUZZ
@given(mutated(SEEDS))
def test_mutated_params_are_answered(params: bytes) -> None:
    check_recipe_and_params((REPO / "recipes" / "wanda-50.yaml").read_bytes(), params)


@FUZZ
@given(documents, documents)
def test_random_documents_are_answered(recipe: object, params: object) -> None:
    check_recipe_and_params(yaml.safe_dump(recipe).encode(), yaml.safe_dump(params).encode())


@FUZZ
@given(mutated([MANIFEST]))
def test_mutated_manifests_are_answered(manifest: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        (bundle / "manifest.json").write_bytes(manifest)
        (bundle / "model.onnx").write_bytes(b"abc")
        assert_answered(*run_cli(["bundle", "verify", str(bundle)], Path(tmp)))
