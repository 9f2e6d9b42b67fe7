"""The `llmpress` command line: the front door to the flows.

    llmpress run [--recipe recipes/wanda-50.yaml] [--model SOURCE] [--data CORPUS] [--set KEY=VALUE ...]
    llmpress data                     reproduce and push the DVC data sets, print their versions
    llmpress resolve SOURCE           resolve a model source to a local folder, print its content hash
    llmpress check FILE ... [--model SOURCE]  validate recipes and params.yaml (and targets against a model)
    llmpress dequantize SRC DST       a compressed folder (packed ints, low-rank) -> a plain HF folder (--overwrite)
    llmpress gguf SRC DST.gguf        a model folder -> one GGUF file for llama.cpp, quantized codes kept
    llmpress promote NAME [VERSION]   publish an approved version's bundle to S3 and move alias production
    llmpress bundle verify PATH       check an edge bundle's files against its manifest
    llmpress bundle run PATH PROMPT   generate with an edge bundle (needs only onnxruntime and tokenizers)
    llmpress services up|down|status  Prefect, MLflow and S3 servers on 127.0.0.1 (infra/README.md)
    llmpress deploy                   work pools + prefect.yaml's deployments on the server in PREFECT_API_URL
    llmpress worker gpu|cpu           a process worker for that pool on this machine
    llmpress sweep --recipes A B ...  many compress runs, one MLflow run with the table and Pareto plot

A problem with the input prints one line starting with 'error:' and exits with status 2. SIGTERM or SIGINT
stops a run cleanly (flows/stopping.py): one 'error: stopped by ...' line, exit status 128 + the signal.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from flows import stopping
from flows.prefect_api import ensure_api, set_defaults

set_defaults()  # before Prefect is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llmpress.errors import ConfigError, LlmpressError  # noqa: E402


def _parse_set(items: list[str]) -> dict[str, Any]:
    from llmpress.loading import parse_yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set gate.max_perplexity_ratio=2.0")
        if key == "data" or key.startswith("data."):
            raise ConfigError(
                f"--set {key}: data settings are DVC parameters read from params.yaml by `dvc repro`; edit "
                "params.yaml (or use --data for the corpus) so the data version follows them"
            )
        out[key] = parse_yaml(value, f"--set {key}")
    return out


def _set_corpus(params_file: Path, corpus: str) -> None:
    """--data edits params.yaml (keeping its comments) so DVC sees the corpus, like `dvc exp run -S`."""
    from ruamel.yaml import YAML

    yaml = YAML()
    # keep the file as written but for the corpus line: nulls stay `null`, lists stay indented, no re-wrapping
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    yaml.width = 4096
    data = yaml.load(params_file.read_text()) if params_file.exists() else {}
    data = data or {}
    data.setdefault("data", {})
    if data["data"].get("corpus") != corpus:
        data["data"]["corpus"] = corpus
        with open(params_file, "w") as handle:
            yaml.dump(data, handle)
        print(f"params.yaml: data.corpus set to {corpus!r}")


def _corpus_path(corpus: str, project: Path) -> str:
    """--data as the user typed it (relative to where they are), as params.yaml must hold it (relative to the
    project folder, where DVC runs the data stages; absolute when outside it)."""
    path = Path(corpus).resolve()
    return path.relative_to(project).as_posix() if path.is_relative_to(project) else str(path)


def _in_project(corpus: str, project: Path) -> str:
    """params.yaml's data.corpus as DVC will read it: a relative path is relative to the project folder."""
    return corpus if corpus == "gensim-lee" or Path(corpus).is_absolute() else str(project / corpus)


def _check_recipe_on(model: Any, name: str, params: Any, recipe: Any) -> None:
    """A recipe and the context-bound settings against a model's layers and context (engine.check_recipe)."""
    from llmpress.compress.engine import check_recipe

    context = getattr(model.config, "max_position_embeddings", None)
    for field, tokens in (("data.seq_len", params.data.seq_len), ("eval.window", params.eval.window)):
        if context is not None and tokens > context:
            raise ConfigError(f"{field}={tokens} exceeds {name}'s context ({context} tokens)")
    check_recipe(model, recipe)
    from llmpress.export.gguf import check as check_gguf

    if "gguf" in params.export.formats:
        try:
            check_gguf(model)  # the family, and what llama.cpp's graph for it assumes, from the config alone
        except LlmpressError as exc:
            raise ConfigError(
                f"export.formats lists gguf, which {name} cannot be written as: {exc}; use --set export.formats=[onnx]"
            ) from None


def _check_against_model(params: Any, recipe: Any, project: Path) -> None:
    """Before a run: the recipe against the model's skeleton (modules and shapes, no weights), where the model is
    on this machine already - what would otherwise fail after Prefect and a model load."""
    from llmpress.sources import local_folder, model_skeleton

    folder = local_folder(params.model, project / "models")
    skeleton = model_skeleton(folder) if folder is not None else None
    if skeleton is not None:
        _check_recipe_on(skeleton, params.model, params, recipe)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _three_places(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _one_place(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_summary(s: dict[str, Any]) -> None:
    base, comp, gate = s["base"], s["compressed"], s["gate"]
    rows = [
        ("perplexity", f"{base['perplexity']:.3f}", f"{comp['perplexity']:.3f}"),
        ("KL to base (nats/token)", "0", f"{comp['kl_to_base']:.4f}"),
        ("top-1 agreement with base", "1", f"{comp['top1_agreement']:.4f}"),
    ]  # fmt: skip
    if "cloze_accuracy" in comp:  # else measured on the bundle (rows below)
        rows.append((f"cloze accuracy ({comp['cloze_examples']} examples)", f"{base['cloze_accuracy']:.3f}",
                     f"{comp['cloze_accuracy']:.3f}"))  # fmt: skip
    if "repeated_ngram_rate" in comp:
        rows.append(("repeated n-grams, greedy (share)", _three_places(base.get("repeated_ngram_rate")),
                     _three_places(comp["repeated_ngram_rate"])))  # fmt: skip
    rows += [
        ("sparsity (targeted layers)", "-", f"{comp.get('sparsity', 0):.4f}"),
        ("size on disk", _fmt_bytes(base["bytes_on_disk"]), _fmt_bytes(comp["bytes_on_disk"])),
    ]
    if "torch_b1_prefill_ms" in base:  # speed: base in PyTorch, compressed in the runtime that serves it
        from llmpress.evaluate.speed import served

        runtime = "ONNX Runtime" if comp.get("runtime") == "ort" else "PyTorch"
        rows.append(("runtime measured", "PyTorch", runtime))
        batches = sorted(int(m.group(1)) for k in base if (m := re.fullmatch(r"torch_b(\d+)_decode_tokens_per_s", k)))
        for key, label, spec in (
            ("b1_prefill_ms", "prefill, batch 1 (ms)", "{:.0f}"),
            *((f"b{b}_decode_tokens_per_s", f"decode, batch {b} (tok/s)", "{:.1f}") for b in batches),
            ("peak_rss_mb", "peak memory generating (MB)", "{:.0f}"),
        ):
            value, base_value = served(comp, key), base.get(f"torch_{key}")
            rows.append((label, "-" if base_value is None else spec.format(base_value),
                         "-" if value is None else spec.format(value)))  # fmt: skip
        if "decode_speedup_b1" in comp:
            rows.append(("decode speed-up over base, batch 1", "1", f"{comp['decode_speedup_b1']:.2f}x"))
    if "onnx_max_abs_diff" in comp:
        rows.append(("ONNX max |logit diff|", "-", f"{comp['onnx_max_abs_diff']:.2e}"))
    if "onnx_noise_max_abs_diff" in comp:
        rows.append(("PyTorch 1-ulp noise floor, max", "-", f"{comp['onnx_noise_max_abs_diff']:.2e}"))
    if "bundle_perplexity" in comp:  # what ships, scored on its own in onnxruntime
        rows += [
            (f"bundle ({comp.get('bundle_precision', '?')}): perplexity", f"{base['perplexity']:.3f}",
             f"{comp['bundle_perplexity']:.3f}"),
            ("bundle: KL to base", "0", f"{comp['bundle_kl_to_base']:.4f}"),
            ("bundle: top-1 agreement with base", "1", f"{comp['bundle_top1_agreement']:.4f}"),
            (f"bundle: cloze accuracy ({comp['bundle_cloze_examples']} examples)", f"{base['cloze_accuracy']:.3f}",
             f"{comp['bundle_cloze_accuracy']:.3f}"),
            ("bundle: size (graph + weights)", _fmt_bytes(base["weights_bytes"]), _fmt_bytes(comp["bundle_bytes"])),
            ("bundle: greedy = PyTorch compressed", "-", "yes" if comp.get("bundle_greedy_identical") else "no"),
            ("bundle: repeated n-grams, greedy", _three_places(base.get("repeated_ngram_rate")),
             _three_places(comp.get("bundle_repeated_ngram_rate"))),
        ]  # fmt: skip
    if "gguf_bytes" in comp:  # the GGUF, scored in llama.cpp
        kinds = "+".join(sorted(k for k in comp.get("gguf_details", {}).get("block_types", {}) if k != "F32"))
        rows.append((f"gguf ({kinds}): size", "-", _fmt_bytes(comp["gguf_bytes"])))
        if comp.get("gguf_scored"):
            rows.append(("gguf: perplexity in llama.cpp", f"{base['perplexity']:.3f}",
                         f"{comp['gguf_perplexity']:.3f}"))  # fmt: skip
            if "gguf_b1_decode_tokens_per_s" in comp:
                rows.append(("gguf: decode, batch 1 (tok/s)", _one_place(base.get("torch_b1_decode_tokens_per_s")),
                             f"{comp['gguf_b1_decode_tokens_per_s']:.1f}"))  # fmt: skip
        else:
            rows.append(("gguf: not scored (no llama-cpp-python)", "-", "-"))
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'':{width}}  {'base':>14}  {'compressed':>14}")
    for name, b, c in rows:
        print(f"{name:{width}}  {b:>14}  {c:>14}")
    print()
    verdict = "PASS" if gate["passed"] else "FAIL"
    print(f"gate: {verdict}" + ("" if gate["passed"] else " - " + "; ".join(gate["failures"])))
    if gate.get("reused"):
        print(f"registered: nothing new; an identical earlier run is {s['registered_model']} version {gate['version']}"
              " (same model, data, recipe, code and settings; its steps came from the cache)")  # fmt: skip
    else:
        kept = f"); champion stays at {gate['champion'] or 'none'}"
        print(f"registered: {s['registered_model']} version {gate['version']} (alias candidate"
              + (", champion)" if gate["passed"] else kept))  # fmt: skip
    print(f"MLflow run: {s['mlflow_run_id']} ({s['run_name']})")
    print("step times: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["seconds"].items()))
    uri = s["tracking_uri"]
    print(f"open the MLflow UI: mlflow ui --backend-store-uri {uri} --port 5000  (then http://127.0.0.1:5000)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmpress", description="Compress LLMs for edge devices.")
    parser.add_argument("--project", default=".", help="project folder holding params.yaml and dvc.yaml")
    parser.add_argument("--params", default="params.yaml", help="params file, relative to the project folder")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the compress flow")
    run.add_argument("--recipe", help="recipe YAML (default: params.yaml 'recipe')")
    run.add_argument("--model", help="model source: default, HF folder, .gguf, s3://bucket/prefix, hub id")
    run.add_argument("--data", help="corpus: gensim-lee or a .txt/.jsonl path (written to params.yaml)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params.yaml key")
    run.add_argument("--no-export", action="store_true", help="export nothing (export.formats: [])")
    sub.add_parser("data", help="dvc repro + dvc push; print the data versions")
    resolve = sub.add_parser("resolve", help="resolve a model source")
    resolve.add_argument("source")
    resolve.add_argument("--unsafe-load-pickled-weights", action="store_true",
                         help="convert a folder of pickled .bin/.pt weights to safetensors (torch.load with "
                         "weights_only=True); never done otherwise")  # fmt: skip
    check = sub.add_parser("check", help="validate recipe files and params.yaml")
    check.add_argument("files", nargs="*")
    check.add_argument("--model", help="also check each recipe's targets and data.seq_len against this model")
    deq = sub.add_parser("dequantize", help="compressed folder -> plain Hugging Face folder (float weights)")
    deq.add_argument("src")
    deq.add_argument("dst")
    deq.add_argument("--overwrite", action="store_true", help="replace DST if it is a model folder llmpress wrote")
    gg = sub.add_parser("gguf", help="model folder -> GGUF file for llama.cpp (Q4_1/Q4_0/Q8_0 codes kept exactly)")
    gg.add_argument("src")
    gg.add_argument("dst", help="the .gguf file to write")
    gg.add_argument("--float-type", choices=["f32", "f16", "q8_0", "q4_1"], default="f16",
                    help="weights llmpress did not quantize (default f16; q8_0/q4_1 re-rounds them)")  # fmt: skip
    gg.add_argument("--fallback", choices=["q8_0", "q4_1"], default="q8_0",
                    help="block type for quantized layouts GGUF has no exact type for")  # fmt: skip
    gg.add_argument("--overwrite", action="store_true")
    prom = sub.add_parser("promote", help="publish an approved version's edge bundle to S3, move alias production")
    prom.add_argument("model", help="registered model name")
    prom.add_argument("version", nargs="?", default="champion", help="version number or alias (default: champion)")
    prom.add_argument("--s3", help="s3://bucket/prefix (default: params.yaml tracking.bundle_s3_prefix)")
    bundle = sub.add_parser("bundle", help="check or run an edge bundle (needs only onnxruntime and tokenizers)")
    bundle_sub = bundle.add_subparsers(dest="bundle_command", required=True)
    verify = bundle_sub.add_parser("verify", help="check every file's sha256 and size against manifest.json")
    verify.add_argument("path")
    bundle_run = bundle_sub.add_parser("run", help="verify, then generate a continuation of PROMPT")
    bundle_run.add_argument("path")
    bundle_run.add_argument("prompt")
    bundle_run.add_argument("--max-new-tokens", type=int, default=64)
    bundle_run.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    bundle_run.add_argument("--top-k", type=int)
    bundle_run.add_argument("--top-p", type=float)
    bundle_run.add_argument("--seed", type=int)
    services = sub.add_parser("services", help="start/stop/inspect Prefect, MLflow and S3 servers on 127.0.0.1")
    services.add_argument("action", choices=["up", "down", "status"])
    services.add_argument("--dir", default=".services", help="state, logs, data and env.sh (default .services)")
    for name, port in (("s3", 8333), ("mlflow", 5000), ("prefect", 4200)):
        services.add_argument(f"--{name}-port", type=int, default=port, help=f"0: any free port (default {port})")
    services.add_argument("--only", nargs="+", choices=["s3", "mlflow", "prefect"], help="start only these")
    dep = sub.add_parser("deploy", help="create work pools and prefect.yaml's deployments on PREFECT_API_URL")
    dep.add_argument("--gpus", type=int, help="GPUs per gpu-pool worker (default: this machine's, at least 1)")
    dep.add_argument("--git-url", help="repository workers clone (default: origin, else this checkout)")
    dep.add_argument("--pool-type", default="process", choices=["process", "kubernetes"])
    work = sub.add_parser("worker", help="run a Prefect process worker for a pool on this machine")
    work.add_argument("pool", choices=["gpu", "cpu"])
    sw = sub.add_parser("sweep", help="compress with many recipes (and models); Pareto plot in one MLflow run")
    sw.add_argument("--recipes", nargs="+", required=True)
    sw.add_argument("--models", nargs="+", help="model sources (default: params.yaml model)")
    sw.add_argument("--deployment", help="fan out as runs of this deployment, e.g. compress/compress")
    sw.add_argument("--cost", default="weights_bytes", choices=["weights_bytes", "decode_latency"])
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params.yaml key")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("llmpress").setLevel(logging.DEBUG if args.verbose else logging.INFO)

    project = Path(args.project).resolve()
    with stopping.handled():
        return _command(args, project)


def _command(args: argparse.Namespace, project: Path) -> int:
    try:
        if not project.is_dir():
            raise LlmpressError(f"--project {args.project}: no such folder")
        if args.command not in ("bundle", "services"):  # the commands that read URIs from the environment
            from llmpress.config import check_environment

            check_environment()
        if args.command in ("run", "check", "sweep", "promote") and not (project / args.params).is_file():
            raise LlmpressError(f"--params {args.params}: no such file in {project} (the defaults are not guessed)")
        return COMMANDS[args.command](args, project)
    except LlmpressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:  # a stop signal (flows/stopping.py); anything else keeps its traceback
        if (sig := stopping.signal_of(exc)) is None:
            raise
        print(f"error: stopped by {sig.name}{stopping.describe(exc) or ''}", file=sys.stderr)
        return 128 + sig


def _run(args: argparse.Namespace, project: Path) -> int:
    """`llmpress run`: everything validated first (nothing written, no server), then the compress flow."""
    overrides = _parse_set(args.set)
    if args.no_export:
        overrides["export.formats"] = []
    # Validate everything before anything is written or Prefect starts: a typo costs a second, not a
    # server start-up, and a refused run leaves params.yaml as it was.
    from llmpress.config import export_recipe, load_params, load_recipe
    from llmpress.sources import check_source

    source = {"model": args.model} if args.model else {}
    corpus = {"data.corpus": args.data} if args.data else {}
    if args.data and args.data != "gensim-lee":
        args.data = _corpus_path(args.data, project)
        corpus = {"data.corpus": args.data}
    params = load_params(project / args.params, overrides | source | corpus)
    from llmpress.data import check_corpus
    from llmpress.versioning import check_project

    check_corpus(_in_project(params.data.corpus, project), params.data)
    recipe = load_recipe(project / (args.recipe or params.recipe))
    recipe = export_recipe(recipe, params.export.precision, params.export.quantizer)
    check_source(params.model)
    _check_against_model(params, recipe, project)
    check_project(project)
    if args.data:
        _set_corpus(project / args.params, args.data)
    ensure_api()
    from flows.compress import compress

    summary = compress(recipe=args.recipe, model=args.model, params_file=args.params,
                       project_dir=str(project), overrides=overrides)  # fmt: skip
    print_summary(summary)
    return 0


def _data(args: argparse.Namespace, project: Path) -> int:
    """`llmpress data`: dvc repro + push, the data versions."""
    from llmpress.versioning import reproduce

    for path, md5 in reproduce(project).items():
        print(f"{path}: {md5}")
    return 0


def _resolve(args: argparse.Namespace, project: Path) -> int:
    """`llmpress resolve SOURCE`: the local folder and content hash of a model source."""
    from llmpress.sources import resolve as resolve_source

    source = args.source
    if args.unsafe_load_pickled_weights:
        from llmpress.sources import convert_pickled_folder

        source = str(convert_pickled_folder(args.source, project / "models"))
        print(f"warning: converted pickled weights of {args.source} to {source}", file=sys.stderr)
    resolved = resolve_source(source, project / "models")
    print(f"{resolved.path}\nsha256 {resolved.sha256}")
    return 0


def _check(args: argparse.Namespace, project: Path) -> int:
    """`llmpress check FILE ... [--model M]`: params, recipes, and with a model its layers and context."""
    from llmpress.config import export_recipe, load_params, load_recipe

    params = load_params(project / args.params)
    if not (project / params.recipe).is_file():
        raise ConfigError(f"{args.params}: recipe: {params.recipe} is not a file in {project}")
    from llmpress.data import check_corpus

    check_corpus(_in_project(params.data.corpus, project), params.data)
    print(f"{args.params}: ok")
    recipes = {file: load_recipe(file) for file in args.files}
    for recipe in recipes.values():  # with the quantization params.yaml's export.precision adds
        export_recipe(recipe, params.export.precision, params.export.quantizer)
    model = None
    if args.model:  # targets and context length against a real model's layers (weights not needed)
        from llmpress.sources import load_model
        from llmpress.sources import resolve as resolve_source

        model = load_model(resolve_source(args.model, project / "models").path)
    for file, recipe in recipes.items():
        if model is not None:
            _check_recipe_on(model, args.model, params, recipe)
        print(f"{file}: ok ({recipe.name}, {len(recipe.stages)} stage(s))")
    return 0


def _promote(args: argparse.Namespace, project: Path) -> int:
    """`llmpress promote NAME [VERSION]`: refusals before Prefect, then the promote flow."""
    # Refused before Prefect starts: no or a bad S3 destination, an unknown model, version or alias, a
    # version that failed the gate or has no approval. The flow checks again (deployments run it too).
    from llmpress import promote as promotion
    from llmpress import tracking
    from llmpress.config import load_params

    params = load_params(project / args.params)
    promotion.destination(args.s3, params.tracking.bundle_s3_prefix)
    uri = tracking.resolve_tracking_uri(params.tracking.tracking_uri, project)
    promotion.check_request(uri, args.model, args.version)
    ensure_api()
    from flows.promote import promote

    record = promote(args.model, args.version, args.s3, args.params, str(project))
    published = record["published"]
    print(f"{args.model} v{record['version']} is production (was {record['production_before'] or 'none'}); "
          f"bundle at {published['uri']} ({published['uploaded']} files uploaded, "
          f"{published['already_there']} already there)")  # fmt: skip
    return 0


def _bundle(args: argparse.Namespace, project: Path) -> int:
    """`llmpress bundle verify|run`: an edge bundle, with only onnxruntime and tokenizers."""
    from llmpress import bundle as edge_bundle

    if args.bundle_command == "verify":
        manifest = edge_bundle.verify_bundle(args.path)
        size = sum(f["bytes"] for f in manifest["files"])
        model = manifest.get("model", {})
        print(f"{args.path}: ok ({len(manifest['files'])} files, {_fmt_bytes(size)}, "
              f"{model.get('precision', '?')}, opset {model.get('opset', '?')})")  # fmt: skip
    else:
        if not args.prompt.strip():
            raise LlmpressError("bundle run: the prompt is empty")
        if args.max_new_tokens < 1:
            raise LlmpressError(f"bundle run: --max-new-tokens must be >= 1, got {args.max_new_tokens}")
        print(edge_bundle.run(args.path, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                              args.top_p, args.seed))  # fmt: skip
    return 0


def _services(args: argparse.Namespace, project: Path) -> int:
    """`llmpress services up|down|status`."""
    from llmpress import services as svc

    root = (project / args.dir) if not Path(args.dir).is_absolute() else Path(args.dir)
    if args.action == "up":
        ports = {"s3": args.s3_port, "mlflow": args.mlflow_port, "prefect": args.prefect_port}
        for name, port in ports.items():
            if not 0 <= port <= 65535:
                raise LlmpressError(f"--{name}-port {port}: a port is 0 (any free one) to 65535")
        svc.up(root, ports, tuple(args.only or svc.SERVICES))
        print(f"environment for clients: source {root / 'env.sh'}")
    elif args.action == "down":
        svc.down(root)
    else:
        found = svc.status(root)
        for name, info in found.items():
            state = "healthy" if info["healthy"] else ("running, not healthy" if info["running"] else "down")
            print(f"{name}: {state} (pid {info['pid']}) {info['url']}  log {info['log']}")
        if not found:
            print(f"no services recorded in {root}")
        return 0 if found and all(i["healthy"] for i in found.values()) else 1
    return 0


def _deploy(args: argparse.Namespace, project: Path) -> int:
    """`llmpress deploy`: work pools and prefect.yaml's deployments."""
    from flows.deploy import deploy

    deploy(project, args.gpus, args.git_url, args.pool_type)
    return 0


def _worker(args: argparse.Namespace, project: Path) -> int:
    """`llmpress worker gpu|cpu`: becomes a Prefect process worker (exec)."""
    from flows.deploy import worker_command

    cmd, env = worker_command(args.pool)
    os.execve(cmd[0], cmd, env)
    return 0


def _sweep(args: argparse.Namespace, project: Path) -> int:
    """`llmpress sweep`: every recipe and model checked first, then the sweep flow."""
    from llmpress.config import export_recipe, load_params, load_recipe

    overrides = _parse_set(args.set)
    params = load_params(project / args.params, overrides)
    from llmpress.sources import check_source

    for model in args.models or [params.model]:  # each as params' own model field is checked
        check_source(load_params(project / args.params, overrides | {"model": model}).model)
    for recipe in args.recipes:
        export_recipe(load_recipe(project / recipe), params.export.precision, params.export.quantizer)
    ensure_api()
    from flows.sweep import sweep

    result = sweep(args.recipes, args.models, args.deployment, args.cost, args.params, str(project),
                   overrides)  # fmt: skip
    print(f"sweep {result['name']}: MLflow run {result['mlflow_run_id']}")
    for p in sorted(result["points"], key=lambda p: p["cost"]):
        print(f"  {p['label']:40s} cost {p['cost']:10.2f}  perplexity {p['perplexity']:9.3f}"
              + ("  <- Pareto front" if p["on_front"] else ""))  # fmt: skip
    for failed in result["failed"]:
        print(f"  no result: {failed}")
    return 0


def _dequantize(args: argparse.Namespace, project: Path) -> int:
    """`llmpress dequantize SRC DST`."""
    from llmpress.steps import dequantize

    print(dequantize(args.src, args.dst, args.overwrite))
    return 0


def _gguf(args: argparse.Namespace, project: Path) -> int:
    """`llmpress gguf SRC DST.gguf`."""
    from llmpress.steps import to_gguf

    report = to_gguf(args.src, args.dst, args.float_type, args.fallback, args.overwrite)
    print(f"{report['path']}: {report['bytes']} bytes, block types {report['block_types']}; {report['exact']} "
          f"tensors hold the method's codes exactly, {report['near_exact']} up to fp16 rounding of the offset, "
          f"{len(report['requantized'])} re-rounded")  # fmt: skip
    return 0


COMMANDS = {
    "run": _run,
    "data": _data,
    "resolve": _resolve,
    "check": _check,
    "promote": _promote,
    "bundle": _bundle,
    "services": _services,
    "deploy": _deploy,
    "worker": _worker,
    "sweep": _sweep,
    "dequantize": _dequantize,
    "gguf": _gguf,
}


if __name__ == "__main__":
    raise SystemExit(main())
