"""Code lines of the compression core and the orchestration layer at several commits (issue 18: "lines of code go
down, not up").

A code line is a line holding a Python token other than a comment, a docstring or a bare string statement; blank
lines do not count. Files are read from git (`git show REV:PATH`), so any commit can be measured from any checkout.

    python benchmarks/code_lines.py [REV ...]      # default: 41cc806 (before the redesign), 6a32ffc, e7e842f, HEAD

writes benchmarks/results/code_lines.{json,md}.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# The method files issue 19 added: new features, counted apart.
NEW_METHODS = (
    "llmpress/compress/llm_pruner.py",
    "llmpress/compress/qat.py",
    "llmpress/compress/surgeon.py",
    "llmpress/compress/surgeon_structured.py",
)
SETS = {
    "compression core (llmpress/compress, without llm_pruner, qat and surgeon*)": ("llmpress/compress/",),
    "orchestration (steps, registration, lineage, tasks, flows/compress.py)": (
        "llmpress/steps/",
        "llmpress/steps.py",
        "llmpress/registration.py",
        "llmpress/lineage.py",
        "tasks/",
        "flows/compress.py",
    ),
}
SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def code_lines(source: str) -> int:
    """Lines holding a token other than a comment or a string statement (docstrings)."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    lines: set[int] = set()
    statement_start = True
    for i, token in enumerate(tokens):
        if token.type in SKIP:
            statement_start = statement_start or token.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
            continue
        following = tokens[i + 1].type if i + 1 < len(tokens) else tokenize.ENDMARKER
        if token.type == tokenize.STRING and statement_start and following in (tokenize.NEWLINE, tokenize.ENDMARKER):
            statement_start = False
            continue
        lines.update(range(token.start[0], token.end[0] + 1))
        statement_start = False
    return len(lines)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


def count(rev: str) -> dict[str, int]:
    files = [f for f in git("ls-tree", "-r", "--name-only", rev).splitlines() if f.endswith(".py")]
    totals = {}
    for name, prefixes in SETS.items():
        chosen = [f for f in files if f.startswith(prefixes) and f not in NEW_METHODS]
        totals[name] = sum(code_lines(git("show", f"{rev}:{f}")) for f in chosen)
    totals["together"] = sum(totals.values())
    return totals


def main(revs: list[str]) -> None:
    rows = {rev: {"commit": git("rev-parse", "--short", rev).strip(), **count(rev)} for rev in revs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "code_lines.json").write_text(json.dumps(rows, indent=2) + "\n")
    names = [*SETS, "together"]
    table = ["| revision | commit | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    table += [f"| {rev} | {r['commit']} | " + " | ".join(str(r[n]) for n in names) + " |" for rev, r in rows.items()]
    text = "# Code lines (benchmarks/code_lines.py)\n\n" + __doc__.split("\n\n")[1] + "\n\n" + "\n".join(table) + "\n"
    (RESULTS / "code_lines.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:] or ["41cc806", "6a32ffc", "e7e842f", "HEAD"])
