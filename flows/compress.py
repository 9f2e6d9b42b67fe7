"""The `compress` flow: versioned data -> base model -> compress -> evaluate -> export -> track, gate, register.

Run it with `llmpress run` (flows/cli.py), `python -m flows.compress`, or as a Prefect deployment
(entrypoint `flows/compress.py:compress`). Without PREFECT_API_URL, Prefect runs it in ephemeral mode.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import stopping
from llmpress import steps, tracking
from llmpress.config import export_recipe, load_params, load_recipe
from llmpress.lineage import code_version, content_key, lineage_tags, run_key
from llmpress.registration import Candidate
from llmpress.versioning import git_commit
from tasks.compress import compress_model
from tasks.credentials import BLOCK, load_secret_block
from tasks.data import version_data
from tasks.evaluate import evaluate_base, evaluate_bundle, evaluate_model, export_gguf, export_model, measure_speed
from tasks.model import resolve_model
from tasks.track import close_run, close_stopped_run, log_stage, open_run, register_and_gate


@flow(name="compress")
def compress(
    recipe: str | None = None,
    model: str | None = None,
    params_file: str = "params.yaml",
    project_dir: str = ".",
    overrides: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Compress `model` with `recipe` (defaults from params.yaml), evaluate, export, register and gate it.

    `parent_run_id` nests this run's MLflow run under another (a sweep's). Compute steps are cached by content
    (tasks/cache.py): a re-run with identical inputs reuses them, and registers nothing new."""
    logger = get_run_logger()
    if added := load_secret_block():
        logger.info("credentials from Prefect Secret block %s: %s", BLOCK, ", ".join(added))
    project = Path(project_dir).resolve()
    overrides = dict(overrides or {}) | {k: v for k, v in {"recipe": recipe, "model": model}.items() if v}
    params = load_params(project / params_file, overrides)
    recipe_path = str((project / params.recipe).resolve())
    # validate before any work: the recipe, and the quantization export.precision adds to it
    recipe_obj = export_recipe(load_recipe(recipe_path), params.export.precision, params.export.quantizer)
    info = steps.recipe_info(recipe_obj)
    tracking_uri = tracking.resolve_tracking_uri(params.tracking.tracking_uri, project)
    run_name = f"{info['name']}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    seconds: dict[str, float] = {}
    summary: dict[str, Any] = {"run_name": run_name, "tracking_uri": tracking_uri,
                               "registered_model": params.tracking.registered_model}  # fmt: skip

    def timed(name: str, fn, *args, **kwargs):
        summary["step"] = name  # what a stop message names
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            if "mlflow_run_id" not in summary and stopping.signal_of(exc) is not None:
                exc.llmpress_stopped = f" during step {name}, before an MLflow run was opened; nothing registered"
            raise
        seconds[name] = time.perf_counter() - start
        logger.info("step %s done in %.1fs", name, seconds[name])
        return result

    def stage(name: str, fn, *args, artifacts: dict[str, str] | None = None, **kwargs):
        """A step of the open run: timed, and logged as its nested run."""
        result = timed(name, fn, *args, **kwargs)
        log_stage(tracking_uri, run_id, name, result, seconds[name], artifacts=artifacts)
        return result

    data = timed("data", version_data, str(project))
    base = timed("resolve_model", resolve_model, params.model, str(project / "models"))
    lineage = lineage_tags(git_commit(project), data, base, info)
    key = content_key(lineage, source_version())
    # An identical re-run finds its version by this tag and registers nothing new.
    lineage["run_key"] = run_key(key, params.model_dump(mode="json"))
    out_root = project / "models" / "compressed" / f"{info['name']}-{lineage['run_key'][:12]}"
    tags = lineage | ({"mlflow.parentRunId": parent_run_id, "sweep.parent": parent_run_id} if parent_run_id else {})
    ok = stopped = False
    run_id = None
    summary["step"] = "open_run"
    try:
        with stopping.deferred():  # a stop while the run opens lands once its id is known, so it can be closed
            run_id = open_run(
                tracking_uri, params.tracking.experiment, str(project), run_name, tags=tags,
                params={"params": params.model_dump(mode="json"), "recipe": info["recipe"]},
            )  # fmt: skip
            summary |= {"mlflow_run_id": run_id, "lineage": lineage}
        log_stage(tracking_uri, run_id, "data", data, seconds["data"])

        held_out = steps.DataFile(path=data["eval"], md5=data["eval_version"])
        baseline = stage("baseline", evaluate_base, steps.BaselineJob(
            base_path=base["path"], base_sha256=base["sha256"], held_out=held_out, params=params.eval,
            baselines_dir=str(project / "models" / "baselines"),
        ))  # fmt: skip
        base_eval = steps.BaselineRef(path=baseline["path"], key=baseline["key"])

        hf = out_root / "hf"
        files = {"recipe": str(hf / "recipe.yaml"), "report": str(hf / "llmpress.json")}
        compressed = stage("compress", cached_output, compress_model, "path", steps.CompressJob(
            model_path=base["path"], recipe_path=recipe_path, out_dir=str(hf), lineage=lineage,
            calibration=steps.DataFile(path=data["calibration"], md5=data["calibration_version"]),
            data=params.data, add_bos=params.eval.add_bos, params=params.compress,
            precision=params.export.precision, quantizer=params.export.quantizer,
        ), content_key=key, artifacts=files)  # fmt: skip

        evaluation = stage("evaluate", evaluate_model, steps.EvaluateJob(
            model_path=compressed["path"], base_path=base["path"], baseline=base_eval, held_out=held_out,
            params=params.eval, layer_names=compressed["targeted_layers"], bundle_follows=params.export.onnx,
        ), content_key=key)  # fmt: skip
        metrics, base_metrics = evaluation["metrics"], evaluation["base"]

        if params.export.onnx:
            exported = stage("export", cached_output, export_model, "onnx_path", steps.ExportJob(
                model_path=compressed["path"], out_dir=str(out_root / "onnx"), eval_path=data["eval"],
                params=params.export, template_dir=str(project / "models" / "onnx-templates"),
            ), content_key=key)  # fmt: skip
            metrics |= {k: v for k, v in exported.items() if k.startswith(("onnx_", "bundle_"))}
            summary["onnx_path"] = exported["onnx_path"]
            # What ships, scored on its own in onnxruntime at its serving settings (cached with the export's key:
            # the graph file it rewrites is the export's).
            bundle = stage("bundle", evaluate_bundle, steps.BundleJob(
                onnx_path=exported["onnx_path"], model_path=compressed["path"], base_path=base["path"],
                baseline=base_eval, eval_path=data["eval"], params=params.eval, export=params.export,
            ), content_key=key)  # fmt: skip
            metrics |= bundle

        if params.export.gguf:  # the same model for llama.cpp, scored in llama.cpp (where it is installed)
            gguf = stage("gguf", cached_output, export_gguf, "gguf_path", steps.GgufJob(
                model_path=compressed["path"], out_dir=str(out_root / "gguf"), eval_path=data["eval"],
                export=params.export, params=params.eval,
            ), content_key=key)  # fmt: skip
            metrics |= {k: v for k, v in gguf.items() if k != "gguf_path"}
            summary["gguf_path"] = gguf["gguf_path"]

        if params.eval.speed.enabled:
            cost = stage("speed", measure_speed, steps.SpeedJob(
                model_path=compressed["path"], base_path=base["path"], eval_path=data["eval"],
                params=params.eval.speed, onnx_path=summary.get("onnx_path"),
            ), content_key=key)  # fmt: skip
            metrics |= cost["compressed"]
            base_metrics |= cost["base"]

        targets = {getattr(s, "target_sparsity", None) for s in recipe_obj.stages} - {None}
        candidate = Candidate(run_id, params.tracking.registered_model, compressed["path"], metrics, base_metrics,
                              lineage, next(iter(targets)) if len(targets) == 1 else None, evaluation["generations"],
                              summary.get("onnx_path"), summary.get("gguf_path"))  # fmt: skip
        verdict = timed("register_and_gate", register_and_gate, tracking_uri, candidate, params.gate)
        summary |= {
            "base": base_metrics,
            "generations": evaluation["generations"],
            "compressed": {k: v for k, v in metrics.items() if k != "sparsity_per_layer"},
            "compressed_path": compressed["path"],
            "compressed_layout": compressed.get("saved_layout", "unknown"),  # compressed-tensors | llmpress | plain
            "gate": verdict,
            "seconds": seconds,
        }
        ok = True
    except BaseException as exc:
        if (sig := stopping.signal_of(exc)) is not None and run_id is not None:
            stopped = True
            with stopping.finishing():
                summary["stopped"] = sig.name
                deleted = close_stopped_run(tracking_uri, run_id, params.tracking.registered_model, summary)
            taken_back = f", version {', '.join(deleted)} taken back" if deleted else ""
            exc.llmpress_stopped = (f" during step {summary['step']}; MLflow run {run_id} marked KILLED, nothing "
                                    f"registered{taken_back}")  # fmt: skip
        raise
    finally:
        if run_id is not None and not stopped:
            close_run(tracking_uri, run_id, ok, summary)
    return summary


def source_version() -> str:
    """sha256 of the source that runs: llmpress, tasks and flows (the content key's code part)."""
    import llmpress
    import tasks

    return code_version(*(Path(m.__file__).parent for m in (llmpress, tasks)), Path(__file__).parent)


def cached_output(task, path_key: str, *args, **kwargs) -> dict[str, Any]:
    """Run a content-cached task; a cached result whose files are gone (a cleaned models/ folder, another
    worker's disk) is computed again."""
    result = task(*args, **kwargs)
    if not Path(result[path_key]).exists():
        get_run_logger().info("cached %s output %s is gone; computing it again", task.name, result[path_key])
        result = task.with_options(refresh_cache=True)(*args, **kwargs)
    return result


if __name__ == "__main__":
    compress()
