"""The `sweep` flow: many recipes (and models) as separate compress runs, gathered in one MLflow run with a Pareto plot.

    llmpress sweep --recipes recipes/wanda-50.yaml recipes/gptq-w4g128.yaml [--models default ...]
                   [--deployment compress/compress] [--cost weights_bytes|decode_latency]

With `deployment` (the `sweep` deployment in prefect.yaml sets `compress/compress`), each (model, recipe) pair is a
flow run of that deployment, created all at once (`run_deployment(timeout=0)`) so the `gpu` pool's workers take
them in parallel, then awaited. Without one, the pairs run here one after the other as subflows. Either way each
compress run is nested under the sweep's MLflow run (tag `sweep.parent`), and the sweep reads their results back
from MLflow, so it needs nothing from the workers' disks: a table (`sweep.md`, `sweep.json`) and a plot of
perplexity against size or latency with the Pareto front (`plots/pareto.png`).
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import stopping
from llmpress import sweep as pareto
from llmpress import tracking
from llmpress.config import load_params, load_recipe
from llmpress.errors import ConfigError
from tasks.track import close_run, close_stopped_run, open_run


@flow(name="sweep")
def sweep(
    recipes: list[str],
    models: list[str] | None = None,
    deployment: str | None = None,
    cost: str = "weights_bytes",
    params_file: str = "params.yaml",
    project_dir: str = ".",
    overrides: dict[str, Any] | None = None,
    timeout_s: float = 24 * 3600,
) -> dict[str, Any]:
    """Compress every model with every recipe, then tabulate and plot the results with their Pareto front."""
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    if not recipes:
        raise ConfigError("sweep: `recipes` is empty; give at least one recipe file")
    if cost not in pareto.COSTS:
        raise ConfigError(f"sweep: cost {cost!r} is not one of {sorted(pareto.COSTS)}")
    params = load_params(project / params_file, overrides)
    for recipe in recipes:  # every recipe valid before any work starts
        load_recipe(project / recipe)
    models = models or [params.model]
    pairs = [(m, r) for m in models for r in recipes]
    tracking_uri = tracking.resolve_tracking_uri(params.tracking.tracking_uri, project)
    name = f"sweep-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    parent = open_run(tracking_uri, params.tracking.experiment, str(project), name, tags={"sweep": "true"},
                      params={"recipes": ",".join(recipes), "models": ",".join(models), "cost": cost,
                              "deployment": deployment or "in-process"})  # fmt: skip
    ok = stopped = False
    try:
        if deployment:
            states = _fan_out(deployment, pairs, params_file, project_dir, overrides, parent, timeout_s)
        else:
            states = _in_process(pairs, params_file, project_dir, overrides, parent)
        for (model, recipe), state in zip(pairs, states, strict=True):
            logger.info("%s / %s: %s", model, recipe, state)
        results = _gather(tracking_uri, parent)
        summary = _summarise(tracking_uri, parent, results, pairs, states, cost, name)
        ok = True
    except BaseException as exc:
        if (sig := stopping.signal_of(exc)) is not None:  # its own runs, in-process, were stopped the same way
            with stopping.finishing():
                close_stopped_run(tracking_uri, parent, params.tracking.registered_model,
                                  {"sweep": name, "stopped": sig.name})  # fmt: skip
            exc.llmpress_stopped = stopping.describe(exc) + f"; sweep MLflow run {parent} marked KILLED"
            stopped = True
        raise
    finally:
        if not stopped:
            close_run(tracking_uri, parent, ok, {"sweep": name} if not ok else summary)
    logger.info("sweep %s: %d of %d runs gave a result; Pareto front: %s", name, len(summary["points"]), len(pairs),
                ", ".join(p["label"] for p in summary["points"] if p["on_front"]))  # fmt: skip
    return summary


def _fan_out(deployment: str, pairs: list[tuple[str, str]], params_file: str, project_dir: str,
             overrides: dict[str, Any] | None, parent: str, timeout_s: float) -> list[str]:  # fmt: skip
    """One flow run of `deployment` per pair, all created before any is awaited; their final state names."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    runs = [
        run_deployment(
            deployment,
            parameters={
                "recipe": recipe,
                "model": model,
                "params_file": params_file,
                "project_dir": project_dir,
                "overrides": overrides or {},
                "parent_run_id": parent,
            },
            timeout=0,
            flow_run_name=f"{Path(recipe).stem}-{model.replace('/', '-')}",
        )
        for model, recipe in pairs
    ]
    deadline, states = time.monotonic() + timeout_s, {}
    with get_client(sync_client=True) as client:
        while len(states) < len(runs) and time.monotonic() < deadline:
            for run in runs:
                if run.id not in states:
                    state = client.read_flow_run(run.id).state
                    if state is not None and state.is_final():
                        states[run.id] = state.name
            if len(states) < len(runs):
                time.sleep(5)
    return [states.get(run.id, "TimedOut") for run in runs]


def _in_process(pairs: list[tuple[str, str]], params_file: str, project_dir: str, overrides: dict[str, Any] | None,
                parent: str) -> list[str]:  # fmt: skip
    from flows.compress import compress

    states = []
    for model, recipe in pairs:
        state = compress(recipe=recipe, model=model, params_file=params_file, project_dir=project_dir,
                         overrides=overrides, parent_run_id=parent, return_state=True)  # fmt: skip
        states.append(state.name)
    return states


def _gather(tracking_uri: str, parent: str) -> list[dict[str, Any]]:
    """Every compress run nested under the sweep's run, with its metrics and verdict (from MLflow)."""
    c = tracking.client(tracking_uri)
    experiment = c.get_run(parent).info.experiment_id
    runs = c.search_runs([experiment], f"tags.`sweep.parent` = '{parent}'", max_results=10000)
    out = []
    for run in runs:
        params = run.data.params
        label = f"{params.get('params.model', '?')} / {run.data.tags.get('recipe', '?')}"
        passed = run.data.metrics.get("gate_passed")
        out.append({"label": label, "metrics": run.data.metrics, "run_id": run.info.run_id,
                    "gate_passed": None if passed is None else bool(passed),
                    "version": run.data.tags.get("registered_version"), "status": run.info.status})  # fmt: skip
    return out


def _summarise(tracking_uri: str, parent: str, results: list[dict[str, Any]], pairs: list[tuple[str, str]],
               states: list[str], cost: str, name: str) -> dict[str, Any]:  # fmt: skip
    c = tracking.client(tracking_uri)
    points = pareto.points_from_runs(results, cost)
    failed = [f"{m} / {r} ({s})" for (m, r), s in zip(pairs, states, strict=True) if s != "Completed"]
    rows = [vars(p) for p in points]
    tracking.log_metrics(c, parent, {"runs": len(pairs), "results": len(points),
                                     "pareto_points": sum(p.on_front for p in points)})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        table = pareto.table(points, cost, failed)
        (Path(tmp) / "sweep.md").write_text(f"# {name}\n\n{table}")
        (Path(tmp) / "sweep.json").write_text(json.dumps({"cost": cost, "points": rows, "failed": failed}, indent=2))
        c.log_artifact(parent, str(Path(tmp) / "sweep.md"))
        c.log_artifact(parent, str(Path(tmp) / "sweep.json"))
        if points:
            c.log_artifact(parent, str(pareto.plot(points, Path(tmp) / "pareto.png", cost, name)), "plots")
        c.set_tag(parent, "mlflow.note.content", f"# {name}\n\n{table}")
    return {"name": name, "mlflow_run_id": parent, "points": rows, "failed": failed}


if __name__ == "__main__":
    sweep([])
