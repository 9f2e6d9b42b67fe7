"""Reading recipes written for llm-compressor (github.com/vllm-project/llm-compressor) as llmpress recipes.

An llm-compressor recipe is YAML of stages holding groups of modifiers:

    sparsity_stage:
      sparsity_modifiers:
        SparseGPTModifier: {sparsity: 0.5, mask_structure: "2:4", targets: [Linear], ignore: [lm_head]}
    quantization_stage:
      quantization_modifiers:
        GPTQModifier:
          ignore: [lm_head]
          config_groups:
            group_0:
              weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 128}
              targets: [Linear]

The shapes accepted are the ones llm-compressor's own parser accepts: top-level `<name>_stage:` mappings, a
`stages:` mapping of stages, or modifiers straight at the top (`modifiers:` / `<group>_modifiers:`); a group of
modifiers is a mapping {ModifierName: {args}} or a list of such one-key mappings. `version`, `args` and `metadata`
are ignored; `run_type: train` stages are refused (llmpress runs one-shot methods and its own `distill`).

Modifiers, in order, become llmpress stages:

    SparseGPTModifier       -> sparsegpt (sparsity, mask_structure, block_size, dampening_frac, OWL profile)
    WandaPruningModifier    -> wanda     (sparsity, mask_structure, OWL profile)
    MagnitudePruningModifier-> magnitude (final_sparsity, mask_structure; the schedule is one-shot here)
    QuantizationModifier    -> rtn       (weights of each config group or the `scheme` preset)
    GPTQModifier            -> gptq      (same, plus block_size, dampening_frac, actorder)
    AWQModifier             -> awq       (its own scheme / config_groups, else those of the QuantizationModifier
                                          that follows it, which it then absorbs; n_grid -> grid)
    SmoothQuantModifier     -> smoothquant (smoothing_strength -> alpha) with the activation bits of the
                                          quantization modifier that must follow it: one W8A8 stage when
                                          that is a per-channel symmetric QuantizationModifier, else
                                          smoothquant (weight_bits null) then its rtn / gptq stages

Numbers that mean something different: llm-compressor's mask_structure "N:M" prunes N of every M weights (the
topk of the smallest scores in its SparseGPT and Wanda code), llmpress's pattern "N:M" keeps N; "2:4" is the same
either way, "1:4" becomes "3:4". `group_size: -1` or `strategy: channel` is one scale per output channel
(llmpress `group_size: null`). GPTQ's `actorder` defaults to "static" (on) for group quantization as in current
llm-compressor; "weight"/"static" is llmpress's act_order, "group"/"dynamic"/true is refused (see ACTORDER). Under
an N:M mask_structure llm-compressor ignores `sparsity`: one other than N/M is refused. Booleans must be YAML
booleans (a quoted "false" is refused, not read as true), and a disabled stage (`enabled: false`) is refused.
Scheme presets are those of compressed-tensors: W{2..7}A16 -> group 128 symmetric, W4A16_ASYM -> group 128
asymmetric, W8A16 -> 8 bits per channel symmetric (its long-standing definition; recent compressed-tensors releases
moved it to group 128), W8A8/INT8 -> 8-bit channel weights with 8-bit per-token dynamic activations.

Targets: llm-compressor matches a class name ("Linear": every linear layer) or "re:<regex>" with re.match
(a prefix match) against module names. llmpress stages only ever touch the linear layers of the decoder blocks,
so "Linear" becomes ".*", "re:X" becomes a full-match regex with the same meaning, an exact module name becomes
its escaped self, and `lm_head` (never touched by llmpress) is dropped from targets and ignores. Anything that
cannot be represented (float formats such as FP8/NVFP4, per-tensor scales, static activation quantization, KV
cache quantization, per-layer sparsity lists, unknown modifiers or keys) is refused with a ConfigError naming it,
rather than silently approximated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmpress.errors import ConfigError

SUPPORTED = ("SparseGPTModifier", "WandaPruningModifier", "MagnitudePruningModifier", "QuantizationModifier",
             "GPTQModifier", "AWQModifier", "SmoothQuantModifier")  # fmt: skip
QUANT_MODIFIERS = ("QuantizationModifier", "GPTQModifier")
IGNORED_TOP_LEVEL = ("version", "args", "metadata")
STAGE_KEYS = ("run_type", "group", "args", "enabled")  # besides '<group>_modifiers'; `args` only feed eval()
# Execution knobs (memory, offloading, pipeline bookkeeping) that do not change the result; accepted and unused.
RUNTIME_KEYS = ("group", "index", "start", "end", "update", "sequential_targets", "sequential_update",
                "offload_hessians", "offload_device", "calibration_function", "num_calibration_steps",
                "cache_chunk_size_batches", "log", "leave_enabled")  # fmt: skip
# compressed-tensors preset schemes llmpress can run: weights (bits, group_size, symmetric), activation bits
PRESETS: dict[str, tuple[tuple[int, int | None, bool], int | None]] = {
    **{f"W{b}A16": ((b, 128, True), None) for b in range(2, 8)},
    "W4A16_ASYM": ((4, 128, False), None),
    "W8A16": ((8, None, True), None),
    "W8A8": ((8, None, True), 8),
    "INT8": ((8, None, True), 8),
}


def is_llmcompressor(data: Any) -> bool:
    """True if `data` (a parsed YAML document) is shaped like an llm-compressor recipe, not an llmpress one."""
    if not isinstance(data, dict) or isinstance(data.get("stages"), list):
        return False
    return isinstance(data.get("stages"), dict) or any(
        isinstance(key, str) and (key.endswith("_stage") or key == "modifiers" or key.endswith("_modifiers"))
        for key in data
    )


def from_llmcompressor(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Convert an llm-compressor recipe into llmpress's recipe dict {"name", "description", "stages"}."""
    modifiers = _collect(data, source)
    if not modifiers:
        raise ConfigError(f"{source}: no modifiers found in this llm-compressor recipe")
    stages: list[dict[str, Any]] = []
    i = 0
    while i < len(modifiers):
        where, kind, args = modifiers[i]
        follower = modifiers[i + 1] if i + 1 < len(modifiers) else None
        if kind not in SUPPORTED:
            raise ConfigError(
                f"{where}: modifier {kind!r} is not implemented by llmpress; supported: {', '.join(SUPPORTED)}"
                + (". Training stages map to llmpress's own 'distill' stage (write it in llmpress form)"
                   if kind in ("ConstantPruningModifier", "OutputDistillationModifier") else "")
            )  # fmt: skip
        if kind in ("SparseGPTModifier", "WandaPruningModifier"):
            stages.append(_pruning(kind, args, where))
        elif kind == "MagnitudePruningModifier":
            stages.append(_magnitude(args, where))
        elif kind in QUANT_MODIFIERS:
            stages.extend(_quantization(kind, args, where))
        elif kind == "SmoothQuantModifier":
            stages.extend(_smoothquant(args, where, follower))
            i += 1  # the quantization modifier it absorbed
        elif kind == "AWQModifier":
            stage, absorbed = _awq(args, where, follower)
            stages.append(stage)
            i += absorbed
        i += 1
    names = ", ".join(kind for _, kind, _ in modifiers)
    description = f"Converted from the llm-compressor recipe {source} ({names})."
    return {"name": _recipe_name(source), "description": description, "stages": stages}


# ---------------------------------------------------------------------------------------------------------------
# recipe shapes
# ---------------------------------------------------------------------------------------------------------------


def _collect(data: dict[str, Any], source: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Every modifier in recipe order as (where, ModifierName, args)."""
    found: list[tuple[str, str, dict[str, Any]]] = []
    for key, value in data.items():
        if key in IGNORED_TOP_LEVEL:
            continue
        if key == "stages" and isinstance(value, dict):
            for name, stage in value.items():
                found.extend(_stage_modifiers(stage, f"{source}: stages.{name}"))
        elif isinstance(key, str) and key.endswith("_stage"):
            found.extend(_stage_modifiers(value, f"{source}: {key}"))
        elif key == "modifiers" or (isinstance(key, str) and key.endswith("_modifiers")):
            found.extend(_group_modifiers(value, f"{source}: {key}"))
        else:
            raise ConfigError(
                f"{source}: unknown top-level key {key!r} in an llm-compressor recipe (expected '<name>_stage', "
                "'stages', 'modifiers' or '<group>_modifiers')"
            )
    return found


def _stage_modifiers(stage: Any, where: str) -> list[tuple[str, str, dict[str, Any]]]:
    if not isinstance(stage, dict):
        raise ConfigError(f"{where}: a stage is a mapping of '<group>_modifiers' entries")
    run_type = stage.get("run_type", "oneshot")
    if run_type == "train":
        raise ConfigError(
            f"{where}: run_type 'train' (fine-tuning) is not converted; llmpress runs one-shot stages and recovers "
            "quality with its own 'distill' stage"
        )
    if run_type not in ("oneshot", None):
        raise ConfigError(f"{where}.run_type: {run_type!r} is not one of 'oneshot', 'train'")
    if not _flag(stage, "enabled", True, where):
        raise ConfigError(f"{where}: a disabled stage (enabled: false) is not converted; delete it from the recipe")
    found = []
    for key, value in stage.items():
        if key in STAGE_KEYS:
            continue
        if isinstance(key, str) and (key == "modifiers" or key.endswith("_modifiers")):
            found.extend(_group_modifiers(value, f"{where}.{key}"))
        else:
            raise ConfigError(
                f"{where}: unknown key {key!r} in a stage; understood: '<group>_modifiers', {', '.join(STAGE_KEYS)}"
            )
    return found


def _group_modifiers(group: Any, where: str) -> list[tuple[str, str, dict[str, Any]]]:
    items: list[tuple[Any, Any]] = []
    if isinstance(group, dict):
        items = list(group.items())
    elif isinstance(group, list) and all(isinstance(m, dict) and len(m) == 1 for m in group):
        items = [next(iter(m.items())) for m in group]
    else:
        raise ConfigError(f"{where}: modifiers are a mapping {{ModifierName: {{args}}}} or a list of such mappings")
    found = []
    for kind, args in items:
        args = {} if args is None else args
        if not isinstance(args, dict):
            raise ConfigError(f"{where}.{kind}: the arguments of a modifier are a mapping (got {args!r})")
        _refuse_eval(args, f"{where}.{kind}")
        found.append((f"{where}.{kind}", str(kind), dict(args)))
    return found


def _refuse_eval(value: Any, where: str) -> None:
    if isinstance(value, str) and value.strip().startswith("eval("):
        raise ConfigError(f"{where}: recipe variables ({value!r}) are not supported; write the value itself")
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else []:
        _refuse_eval(item, where)


def _recipe_name(source: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", Path(source).stem).lstrip("-_.")
    return name or "llmcompressor-recipe"


class _Args:
    """A modifier's arguments: take the known ones; whatever is left over at `done()` is an error."""

    def __init__(self, args: dict[str, Any], where: str, runtime: tuple[str, ...] = RUNTIME_KEYS) -> None:
        self.args, self.where, self.runtime = dict(args), where, runtime
        self.known: dict[str, None] = {}  # the keys asked for, in order: the understood ones
        for key in runtime:
            self.args.pop(key, None)

    def pop(self, key: str, default: Any = None) -> Any:
        self.known[key] = None
        return self.args.pop(key, default)

    def flag(self, key: str, default: bool) -> bool:
        self.known[key] = None
        return _flag(self.args, key, default, self.where, pop=True)

    def done(self) -> None:
        if self.args:
            raise ConfigError(
                f"{self.where}: unsupported argument(s) {', '.join(map(repr, self.args))}; understood: "
                + ", ".join([*self.known, *self.runtime])
            )


def _flag(args: dict[str, Any], key: str, default: bool, where: str, pop: bool = False) -> bool:
    """A YAML boolean; a string such as "false" is refused rather than read as bool("false") == True."""
    value = args.pop(key, default) if pop else args.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: expected true or false (a YAML boolean, unquoted), got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------------------------


def _is_lm_head(name: str) -> bool:
    return name in ("lm_head", "re:.*lm_head", "re:.*lm_head$", "re:lm_head")


def _regex(target: str, where: str, ignoring: bool) -> str | None:
    """One llm-compressor target as a full-match regex over module names; None: drop it."""
    if _is_lm_head(target):
        return None
    if target in ("Linear", "__ALL__", "__ALL_PRUNABLE__"):
        return None if ignoring else ".*"
    if target.startswith("re:"):
        # parameter names (magnitude pruning targets) -> module names
        pattern = re.sub(r"\\?\.weight\$?$", "", target[3:])
        pattern = pattern[: -len("weight")] if pattern.endswith(".*weight") else pattern
        if pattern.endswith("$"):
            return pattern[:-1]
        # re.match only anchors the start; keep that meaning under re.fullmatch
        return pattern if pattern.endswith(".*") else f"(?:{pattern}).*" if "|" in pattern else f"{pattern}.*"
    if re.fullmatch(r"[A-Z][A-Za-z0-9]*", target):  # a class name other than Linear
        if ignoring:
            return None  # e.g. LlamaRotaryEmbedding: never a linear layer of a block, nothing to ignore
        raise ConfigError(
            f"{where}: target class {target!r} is not supported; llmpress targets linear layers ('Linear') or "
            "module-name regexes ('re:...')"
        )
    return re.escape(target.removesuffix(".weight"))


def _targets(args: _Args, where: str, default: Any = ("Linear",)) -> dict[str, list[str]]:
    targets, ignore = args.pop("targets", list(default)), args.pop("ignore", [])
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    ignore = [ignore] if isinstance(ignore, str) else list(ignore or [])
    out = [r for t in targets if (r := _regex(str(t), where, ignoring=False)) is not None]
    if not out:
        raise ConfigError(f"{where}: targets {targets} select no linear layer of the decoder blocks")
    dropped = [_regex(str(t), where, ignoring=True) for t in ignore]
    return {"targets": list(dict.fromkeys(out)), "ignore": list(dict.fromkeys(r for r in dropped if r is not None))}


# ---------------------------------------------------------------------------------------------------------------
# pruning
# ---------------------------------------------------------------------------------------------------------------


def _sparsity_fields(args: _Args, where: str, sparsity: Any) -> dict[str, Any]:
    mask = str(args.pop("mask_structure", "0:0"))
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", mask)
    if not match:
        raise ConfigError(f"{where}: mask_structure must look like 'N:M' (got {mask!r})")
    pruned, m = int(match.group(1)), int(match.group(2))
    number = isinstance(sparsity, int | float) and not isinstance(sparsity, bool)
    if pruned == 0 and m == 0:
        if not number:
            raise ConfigError(
                f"{where}: sparsity must be one number (got {sparsity!r}); per-layer sparsity lists are not "
                "supported (llmpress's OWL profile sets per-layer sparsities from one target)"
            )
        return {"sparsity": float(sparsity)}
    if not 0 < pruned < m:
        raise ConfigError(f"{where}: mask_structure {mask!r} must prune 0 < N < M of every M weights")
    # llm-compressor's SparseGPT and Wanda ignore `sparsity` under an N:M mask (they prune N of every M), so a
    # sparsity other than N/M would be dropped without a word: it must be left out or agree (to 2 decimals).
    if sparsity is not None and not (number and abs(sparsity - pruned / m) <= 0.005):
        raise ConfigError(
            f"{where}: sparsity {sparsity!r} contradicts mask_structure {mask!r}, which prunes {pruned} of every "
            f"{m} weights (sparsity {pruned / m:g}); give sparsity {pruned / m:g} or leave it out"
        )
    return {"pattern": f"{m - pruned}:{m}"}  # llm-compressor prunes N of M, llmpress keeps N


def _pruning(kind: str, raw: dict[str, Any], where: str) -> dict[str, Any]:
    args = _Args(raw, where)
    method = "sparsegpt" if kind == "SparseGPTModifier" else "wanda"
    stage: dict[str, Any] = {"method": method, **_sparsity_fields(args, where, args.pop("sparsity"))}
    profile, owl_m, owl_lmbda = args.pop("sparsity_profile"), args.pop("owl_m"), args.pop("owl_lmbda")
    if profile is not None:
        if str(profile).lower() != "owl":
            raise ConfigError(f"{where}: sparsity_profile {profile!r} is not supported (only 'owl')")
        owl: dict[str, Any] = {}
        if owl_m is not None:
            owl["threshold"] = owl_m
        if owl_lmbda is not None:
            owl["lambda"] = owl_lmbda
        stage["owl"] = owl
    if method == "sparsegpt":
        if args.flag("preserve_sparsity_mask", False):
            raise ConfigError(f"{where}: preserve_sparsity_mask is not supported by llmpress's sparsegpt")
        block_size = args.pop("block_size")
        damp = args.pop("dampening_frac", args.pop("percdamp"))
        if block_size is not None:
            stage["block_size"] = block_size
        if damp is not None:
            stage["dampening"] = damp
    stage.update(_targets(args, where))
    args.done()
    return stage


def _magnitude(raw: dict[str, Any], where: str) -> dict[str, Any]:
    args = _Args(raw, where)
    for key in ("init_sparsity", "update_scheduler", "scheduler_args", "update_frequency"):
        args.pop(key)  # the gradual schedule collapses to one shot at final_sparsity
    if args.flag("apply_globally", False) or args.flag("global_sparsity", False):
        raise ConfigError(f"{where}: global magnitude pruning is not supported (llmpress prunes each layer)")
    stage = {"method": "magnitude", **_sparsity_fields(args, where, args.pop("final_sparsity", args.pop("sparsity")))}
    stage.update(_targets(args, where))
    args.done()
    return stage


# ---------------------------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------------------------


def _weights(raw: Any, where: str) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs for weights -> {bits, group_size, symmetric, actorder?}."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: weights must be a mapping of quantization arguments")
    args = _Args(raw, where, runtime=("observer", "observer_kwargs", "scale_dtype", "zp_dtype"))
    kind = str(args.pop("type", "int")).lower()
    if kind != "int":
        raise ConfigError(f"{where}: {kind} weights (FP8/FP4 formats) are not implemented; llmpress quantizes to int")
    if args.flag("dynamic", False):
        raise ConfigError(f"{where}: dynamic weight quantization is not supported")
    if args.pop("block_structure") is not None:
        raise ConfigError(f"{where}: block_structure (2-D block scales) is not supported; use group or channel")
    group_size = args.pop("group_size")
    strategy = args.pop("strategy")
    if strategy is None:
        strategy = "group" if group_size not in (None, -1) else "channel" if group_size == -1 else "tensor"
    strategy = str(strategy).lower()
    if strategy == "channel" or group_size == -1:
        group_size = None
    elif strategy == "group":
        if group_size is None:
            raise ConfigError(f"{where}: strategy 'group' needs a group_size")
    else:
        raise ConfigError(
            f"{where}: weight strategy {strategy!r} is not supported; llmpress uses 'group' (a scale per "
            "group_size inputs) or 'channel' (a scale per output channel)"
        )
    out = {"bits": args.pop("num_bits", 8), "group_size": group_size, "symmetric": args.flag("symmetric", True)}
    if "actorder" in args.args:
        out["actorder"] = _actorder(args.pop("actorder"), f"{where}.actorder")
        if out["actorder"] == "group" and strategy != "group":  # as compressed-tensors' QuantizationArgs
            raise ConfigError(f"{where}.actorder: 'group' activation ordering needs strategy 'group'")
    args.done()
    return out


# compressed-tensors' ActivationOrdering (as QuantizationArgs reads it: a boolean, null or a case-insensitive name)
# and what each is in llmpress. "weight" (alias "static"): a group's grid is fitted on its columns in their own
# order, then columns are quantized in order of decreasing Hessian diagonal: exactly llmpress's gptq act_order.
# "group" (alias "dynamic"; `true` means "group"): the groups themselves are formed in activation order and stored
# with a g_idx permutation, which llmpress's packed format cannot hold: refused rather than approximated.
ACTORDER = {False: None, None: None, "weight": "weight", "static": "weight", True: "group", "group": "group",
            "dynamic": "group"}  # fmt: skip


def _actorder(value: Any, where: str) -> str | None:
    """An actorder value as None, "weight" or "group"; anything llm-compressor would not accept is refused."""
    key = value.lower() if isinstance(value, str) else value
    if not (key is None or isinstance(key, str | bool)) or key not in ACTORDER:
        raise ConfigError(
            f"{where}: {value!r} is not an activation ordering; allowed: null, false, 'weight', 'static' "
            "(llmpress's act_order), true, 'group', 'dynamic' (not implemented)"
        )
    return ACTORDER[key]


def _activations(raw: Any, where: str) -> int | None:
    """Input-activation args -> bits, if llmpress can run them (int, per-token, dynamic, symmetric)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: input_activations must be a mapping of quantization arguments")
    args = _Args(raw, where, runtime=("observer", "observer_kwargs", "scale_dtype", "zp_dtype"))
    kind, strategy = str(args.pop("type", "int")).lower(), str(args.pop("strategy", "token")).lower()
    dynamic, symmetric = args.flag("dynamic", False), args.flag("symmetric", True)
    if kind != "int" or strategy != "token" or dynamic is not True or not symmetric:
        raise ConfigError(
            f"{where}: activation quantization {kind}/{strategy}/dynamic={dynamic}/symmetric={symmetric} is not "
            "supported; llmpress runs int, per-token, dynamic, symmetric activations (SmoothQuant W8A8)"
        )
    bits = args.pop("num_bits", 8)
    args.done()
    return bits


def _schemes(args: _Args, where: str) -> list[tuple[dict[str, Any], int | None, dict[str, list[str]]]]:
    """The quantization groups of a modifier: (weights, activation bits, targets) each."""
    if args.pop("kv_cache_scheme") is not None:
        raise ConfigError(f"{where}: kv_cache_scheme (KV cache quantization) is not supported by llmpress")
    scheme, groups = args.pop("scheme"), args.pop("config_groups")
    if (scheme is None) == (groups is None):
        raise ConfigError(f"{where}: give exactly one of 'scheme' (e.g. W4A16) or 'config_groups'")
    out = []
    if scheme is not None:
        if isinstance(scheme, str):
            scheme = {scheme: args.pop("targets", ["Linear"])}
        if not isinstance(scheme, dict):
            raise ConfigError(f"{where}: scheme must be a preset name or {{PRESET: [targets]}} (got {scheme!r})")
        ignore = args.pop("ignore", [])
        for name, targets in scheme.items():
            preset = PRESETS.get(str(name).upper())
            if preset is None:
                raise ConfigError(
                    f"{where}: scheme {name!r} is not supported; supported presets: {', '.join(PRESETS)} "
                    "(float formats such as FP8 or NVFP4 are not implemented)"
                )
            (bits, group_size, symmetric), act_bits = preset
            weights = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
            out.append((weights, act_bits, _targets(_Args({"targets": targets, "ignore": ignore}, where), where)))
        return out
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{where}: config_groups must be a mapping of named groups")
    ignore = args.pop("ignore", [])
    args.pop("targets")  # modifier-level targets only apply to `scheme`
    for name, group in groups.items():
        g_where = f"{where}.config_groups.{name}"
        if not isinstance(group, dict):
            raise ConfigError(f"{g_where}: a config group is a mapping with targets and weights")
        g = _Args(group, g_where, runtime=("format",))
        if g.pop("output_activations") is not None:
            raise ConfigError(f"{g_where}: output_activations quantization is not supported")
        if g.args.get("weights") is None:
            raise ConfigError(f"{g_where}: a config group without weights quantization has nothing llmpress runs")
        weights = _weights(g.pop("weights"), f"{g_where}.weights")
        act_bits = _activations(g.pop("input_activations"), f"{g_where}.input_activations")
        targets = _targets(_Args({"targets": g.pop("targets", ["Linear"]), "ignore": ignore}, g_where), g_where)
        g.done()
        out.append((weights, act_bits, targets))
    return out


def _quant_stages(kind: str, raw: dict[str, Any], where: str) -> list[tuple[dict[str, Any], int | None]]:
    """A QuantizationModifier (-> rtn) or GPTQModifier (-> gptq) as stages, each with its activation bits."""
    args = _Args(raw, where)
    extra: dict[str, Any] = {}
    actorder, given = "weight", False  # llm-compressor's default ("static") for GPTQ group quantization
    if kind == "GPTQModifier":
        block_size, damp = args.pop("block_size"), args.pop("dampening_frac", args.pop("percdamp"))
        if block_size is not None:
            extra["block_size"] = block_size
        if damp is not None:
            extra["dampening"] = damp
        given = "actorder" in args.args
        actorder = _actorder(args.pop("actorder", "static"), f"{where}.actorder")
    out = []
    for weights, act_bits, targets in _schemes(args, where):
        order = weights.pop("actorder", None)
        stage = {"method": "gptq" if kind == "GPTQModifier" else "rtn", **weights, **extra, **targets}
        if kind == "GPTQModifier":
            # as GPTQModifier.resolve_quantization_config: the ordering only applies to group quantization; its
            # default yields to a config group's own, a value given on the modifier must agree with it
            if given and order is not None and order != actorder:
                raise ConfigError(
                    f"{where}: actorder {actorder or 'null'} differs from a config group's actorder {order}; "
                    "give it in one place"
                )
            order = actorder if given else order or actorder
            if weights["group_size"] is not None and order == "group":
                raise ConfigError(
                    f"{where}: actorder 'group' (groups formed in activation order, stored with a g_idx) is not "
                    "implemented; use 'weight' (alias 'static', llmpress's act_order) or null"
                )
            stage["act_order"] = weights["group_size"] is not None and order == "weight"
        out.append((stage, act_bits))
    args.done()
    return out


def _quantization(kind: str, raw: dict[str, Any], where: str) -> list[dict[str, Any]]:
    stages = []
    for stage, act_bits in _quant_stages(kind, raw, where):
        if act_bits is not None:
            raise ConfigError(
                f"{where}: activation quantization (W{stage['bits']}A{act_bits}) needs smoothing in llmpress: "
                "put a SmoothQuantModifier right before this modifier (the two become one 'smoothquant' stage)"
            )
        stages.append(stage)
    return stages


def _smoothquant(raw: dict[str, Any], where: str, follower: Any) -> list[dict[str, Any]]:
    """SmoothQuant plus the quantization modifier after it: one W8A8 `smoothquant` stage when llmpress's own
    per-channel symmetric RTN weights are what was asked, else smoothing (+ activations) then rtn/gptq stages."""
    args = _Args(raw, where)
    alpha = args.pop("smoothing_strength", 0.5)
    args.pop("mappings")  # llmpress smooths the Llama pairs: norm -> q/k/v and norm -> gate/up
    sq_ignore = _targets(_Args({"ignore": args.pop("ignore", [])}, where), where)["ignore"]
    args.done()
    if follower is None or follower[1] not in QUANT_MODIFIERS:
        raise ConfigError(
            f"{where}: SmoothQuantModifier must be followed by the QuantizationModifier or GPTQModifier (e.g. W8A8) "
            "that quantizes what it smooths"
        )
    f_where, f_kind, f_args = follower
    quant = _quant_stages(f_kind, f_args, f_where)
    act_bits = {bits for _, bits in quant}
    if len(act_bits) != 1:
        raise ConfigError(f"{f_where}: after SmoothQuant, every config group needs the same input_activations")
    stages = [stage for stage, _ in quant]
    smooth = {"method": "smoothquant", "alpha": alpha, "weight_bits": None, "activation_bits": act_bits.pop(),
              "targets": list(dict.fromkeys(t for s in stages for t in s["targets"])),
              "ignore": list(dict.fromkeys(stages[0]["ignore"] + sq_ignore))}  # fmt: skip
    q = stages[0] if len(stages) == 1 else None
    if f_kind == "QuantizationModifier" and q is not None and q["group_size"] is None and q["symmetric"]:
        return [{**smooth, "weight_bits": q["bits"]}]  # exactly the smoothquant stage's own weight grid
    return [smooth, *stages]


def _awq(raw: dict[str, Any], where: str, follower: Any) -> tuple[dict[str, Any], int]:
    args = _Args(raw, where)
    for key in ("mappings", "duo_scaling"):
        args.pop(key)  # llmpress's awq searches its scales on the Llama block pairs itself
    grid = args.pop("n_grid")
    legacy = {k: v for k in ("num_bits", "group_size", "symmetric") if (v := args.pop(k)) is not None}
    absorbed = 0
    if legacy:  # the older AWQModifier carried its own bits
        group_size = legacy.get("group_size", 128)
        group_size = None if group_size == -1 else group_size
        stage = {"method": "awq", "bits": legacy.get("num_bits", 4), "group_size": group_size,
                 "symmetric": _flag(legacy, "symmetric", False, where), **_targets(args, where)}  # fmt: skip
    elif args.args.get("scheme") is not None or args.args.get("config_groups") is not None:
        stage = _single_weight_stage(_quantization("QuantizationModifier", args.args, where), where)
        args.args.clear()
    else:
        if follower is None or follower[1] != "QuantizationModifier":
            raise ConfigError(
                f"{where}: AWQModifier needs quantization settings: its own scheme/config_groups or a "
                "QuantizationModifier right after it (AWQ then GPTQ is not supported: llmpress's awq rounds to "
                "nearest after scaling)"
            )
        stage = _single_weight_stage(_quantization("QuantizationModifier", follower[2], follower[0]), follower[0])
        absorbed = 1
    args.done()
    stage["method"] = "awq"
    if grid is not None:
        stage["grid"] = grid
    return stage, absorbed


def _single_weight_stage(stages: list[dict[str, Any]], where: str) -> dict[str, Any]:
    if len(stages) != 1:
        raise ConfigError(f"{where}: AWQ takes one weight quantization group in llmpress (got {len(stages)})")
    return dict(stages[0])
