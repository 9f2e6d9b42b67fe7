"""Where the time of `make run` goes: from nothing, and once more.

    python3 benchmarks/pipeline_time.py [--out benchmarks/results] [--other-recipe recipes/sparsegpt-50.yaml]
                                        [--allow-dirty] [--keep]

A newcomer's first `make run`, replayed: the committed tree is cloned into a new folder (no `.venv`, `models/`,
`data/`, MLflow database) and run with fresh state - a new, empty PREFECT_HOME, llmpress cache (the corpus wheel),
Hugging Face and matplotlib caches - so nothing an earlier run left in the home folder is used. pip's download
cache is the machine's own (the packages still install into a new virtualenv).

- fresh: `make setup`, `make fetch`, then the pipeline (`.venv/bin/llmpress run`, what `make run` runs after
  those two), each timed; with the pipeline's own step times (its summary line) and what is left of its wall time
  outside the steps (interpreter and imports, Prefect's database and temporary server, MLflow logging).
- second: `make run` once more, as a user would re-run it (the identical run is served from the cache).
- other_recipe (`--other-recipe`): the pipeline with another recipe on the same model and data, which recomputes
  compression and evaluation but reuses the base model's baseline and the traced ONNX graph.

Writes pipeline_time.json (keys `fresh.total_s`, `fresh.steps`, `second.total_s`, `second.steps`, ...) and
pipeline_time.md with the machine's details. Exits non-zero if any command fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_TIMES = re.compile(r"^step times: (.*)$", re.MULTILINE)
SUMMARY_HEADER = re.compile(r"^\s+base\s+compressed\s*$")


def clone(dest: Path, allow_dirty: bool) -> str:
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if dirty and not allow_dirty:
        sys.exit("the working tree has uncommitted changes: commit them, or pass --allow-dirty to time them too")
    subprocess.run(["git", "clone", "--quiet", "--local", "--no-hardlinks", str(REPO), str(dest)], check=True)
    if dirty:  # copy what git would commit now: tracked files as they are and untracked, not ignored ones
        files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        for name in files:
            if (REPO / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, dest / name)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=dest, capture_output=True, text=True).stdout.strip()
    return commit + ("+uncommitted" if dirty else "")


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, str]:
    start = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"\n$ {' '.join(cmd)}\n")
        handle.flush()
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        handle.write(done.stdout)
    seconds = time.perf_counter() - start
    print(f"  {' '.join(cmd)}: {seconds:.1f} s (exit {done.returncode})", flush=True)
    if done.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed (exit {done.returncode}); its output is in {log}")
    return seconds, done.stdout


def pipeline_steps(output: str, wall: float) -> dict[str, float]:
    """The pipeline's step times from its summary line, and the rest of its wall time."""
    found = STEP_TIMES.findall(output)
    if not found:
        sys.exit("the pipeline printed no 'step times:' line")
    steps = {name: float(value.rstrip("s")) for name, value in (p.rsplit(" ", 1) for p in found[-1].split(", "))}
    steps["outside_steps"] = round(wall - sum(steps.values()), 1)
    return steps


def summary(output: str) -> str:
    """The table and lines the pipeline ends with (from its 'base  compressed' header to the MLflow UI hint)."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if SUMMARY_HEADER.match(line)), None)
    if start is None:
        return ""
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("open the MLflow UI")), len(lines) - 1)
    return "\n".join(lines[start : end + 1])


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "date": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = re.search(r"model name\s*:\s*(.*)", cpuinfo.read_text())
        info["cpu"] = model.group(1).strip() if model else platform.processor()
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        total = re.search(r"MemTotal:\s*(\d+) kB", meminfo.read_text())
        info["memory_gib"] = round(int(total.group(1)) / 2**20, 1) if total else None
    return info


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_time.json").write_text(json.dumps(result, indent=2) + "\n")
    m, fresh, second = result["machine"], result["fresh"], result["second"]
    lines = [
        "# `make run`: where the time goes", "",
        f"{m.get('cpu', '?')}, {m['cpus']} CPUs, {m.get('memory_gib', '?')} GiB, Python {m['python']}, "
        f"{m['date']}, commit {result['commit']}. Fresh state: new clone, new PREFECT_HOME and caches (pip's "
        "download cache warm). `python3 benchmarks/pipeline_time.py` rewrites this file.", "",
        f"**From nothing: {fresh['total_s']:.0f} s** (setup {fresh['steps']['setup']:.0f} s, fetch "
        f"{fresh['steps']['fetch']:.0f} s, pipeline {fresh['steps']['pipeline']:.0f} s). "
        f"**Again: {second['total_s']:.0f} s.**", "",
        "| step | fresh (s) | again (s) |" + (" other recipe (s) |" if "other_recipe" in result else ""),
        "| --- | ---: | ---: |" + (" ---: |" if "other_recipe" in result else ""),
    ]  # fmt: skip
    other = result.get("other_recipe", {}).get("steps", {})
    names = list(dict.fromkeys([*fresh["steps"], *second["steps"], *other]))
    for name in names:
        cells = [fresh["steps"].get(name), second["steps"].get(name)] + ([other.get(name)] if other else [])
        lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    if other:
        lines += ["", f"Other recipe: `{result['other_recipe']['recipe']}`, {result['other_recipe']['total_s']:.0f} s "
                  "(baseline and traced graph reused)."]  # fmt: skip
    if fresh.get("summary"):
        lines += ["", "The fresh run's summary, as printed:", "", "```", fresh["summary"], "```"]
    (out / "pipeline_time.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--other-recipe", help="also time a run with this recipe after the two (reuse of the caches)")
    parser.add_argument("--allow-dirty", action="store_true", help="time uncommitted changes too")
    parser.add_argument("--keep", action="store_true", help="keep the clone and its state (printed)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llmpress-pipeline-time-"))
    checkout, state = root / "llmpress", root / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "LLMPRESS_", "VIRTUAL_ENV"))}
    env |= {"PREFECT_HOME": str(state / "prefect"), "LLMPRESS_CACHE": str(state / "llmpress"),
            "HF_HOME": str(state / "huggingface"), "MPLCONFIGDIR": str(state / "matplotlib")}  # fmt: skip
    log = root / "output.log"
    try:
        commit = clone(checkout, args.allow_dirty)
        print(f"fresh clone of {commit} in {checkout}; output in {log}", flush=True)
        fresh: dict[str, float] = {}
        fresh["setup"], _ = timed(["make", "setup"], checkout, env, log)
        fresh["fetch"], _ = timed(["make", "fetch"], checkout, env, log)
        fresh["pipeline"], output = timed([".venv/bin/llmpress", "run"], checkout, env, log)
        fresh |= pipeline_steps(output, fresh["pipeline"])
        fresh_summary = summary(output)
        second_wall, output = timed(["make", "run"], checkout, env, log)
        second = {"make_run": second_wall} | pipeline_steps(output, 0.0)
        second.pop("outside_steps")
        result = {
            "machine": machine(),
            "commit": commit,
            "fresh": {
                "total_s": round(fresh["setup"] + fresh["fetch"] + fresh["pipeline"], 1),
                "steps": fresh,
                "summary": fresh_summary,
            },
            "second": {"total_s": round(second_wall, 1), "steps": second},
        }
        if args.other_recipe:
            wall, output = timed([".venv/bin/llmpress", "run", "--recipe", args.other_recipe], checkout, env, log)
            result["other_recipe"] = {"recipe": args.other_recipe, "total_s": round(wall, 1),
                                      "steps": {"pipeline": wall} | pipeline_steps(output, wall)}  # fmt: skip
        write(result, args.out)
        print(json.dumps({k: result[k]["total_s"] for k in ("fresh", "second")}))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
