"""Decoder blocks of different widths: how a model whose blocks lost different numbers of heads or MLP channels is
saved and loaded.

A stock transformers config has one `intermediate_size` and one `num_attention_heads` for every block. A method
that allocates structures across the whole model (the structured LLM Surgeon) leaves each block its own widths.
`record_(model)` compares the model with the one its config builds and writes what differs into the config, so
`save_pretrained` puts it in config.json beside the stock fields:

    "llmpress_module_shapes": {
        "model.layers.3.mlp.gate_proj": {"out_features": 1229},
        "model.layers.3.mlp.down_proj": {"in_features": 1229},
        "model.layers.3.mlp": {"intermediate_size": 1229},
        "model.layers.3.self_attn.q_proj": {"out_features": 384},
        "model.layers.3.self_attn": {"num_key_value_groups": 2}, ...}

`load_causal_lm(folder)` is the loading path: the stock model built from the config (weights not initialised), the
recorded linears rebuilt at their sizes and the recorded settings set, then the safetensors loaded strictly. A
folder without the key is loaded by plain `from_pretrained`; stock `from_pretrained` on a folder with it refuses
with a size mismatch instead of loading something wrong. ONNX export and the edge bundle trace the loaded model
and need nothing more.

Only torch, transformers and safetensors are imported here: the MLflow pyfunc ships this file to machines without
llmpress.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

KEY = "llmpress_module_shapes"
# Plain integer settings that modules read at run time and that structured pruning changes per block.
SETTINGS = ("num_key_value_groups", "num_heads", "intermediate_size", "head_dim")


def _stock_skeleton(config: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _shape_of(module: nn.Module) -> dict[str, int]:
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features}
    return {k: v for k in SETTINGS if isinstance(v := getattr(module, k, None), int) and not isinstance(v, bool)}


def differences(model: nn.Module) -> dict[str, dict[str, int]]:
    """Every linear whose sizes and every module whose settings differ from the model its config builds."""
    stock = dict(_stock_skeleton(model.config).named_modules())
    found: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        if name not in stock or not name:
            continue
        mine, theirs = _shape_of(module), _shape_of(stock[name])
        if changed := {k: v for k, v in mine.items() if theirs.get(k) != v}:
            found[name] = changed
    return found


def record_(model: nn.Module) -> dict[str, dict[str, int]]:
    """Write the model's per-module sizes into its config (removed when it matches its config); returns them."""
    config = model.config
    if hasattr(config, KEY):
        delattr(config, KEY)  # the comparison is against the stock shapes
    found = differences(model)
    if found:
        setattr(config, KEY, found)
    return found


def resize_(model: nn.Module, shapes: dict[str, dict[str, int]]) -> nn.Module:
    """Rebuild the named linears at their recorded sizes (uninitialised, same dtype, device and bias) and set the
    recorded settings; raises ValueError for a name the model does not have."""
    for name, changes in shapes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{KEY}: the model has no module {name!r}") from None
        if isinstance(module, nn.Linear):
            size = {**_shape_of(module), **changes}
            new = nn.Linear(size["in_features"], size["out_features"], bias=module.bias is not None,
                            device=module.weight.device, dtype=module.weight.dtype)  # fmt: skip
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        else:
            for key, value in changes.items():
                if key not in SETTINGS:
                    raise ValueError(f"{KEY}: {name}.{key} is not a setting this loader sets ({', '.join(SETTINGS)})")
                setattr(module, key, int(value))
    return model


def shapes_of(config: Any) -> dict[str, dict[str, int]]:
    return dict(getattr(config, KEY, None) or {})


def build(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model the config describes, its per-module sizes applied, weights not initialised (to be loaded)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return resize_(model, shapes_of(config))


def load_causal_lm(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM from a plain HF folder (safetensors, stock classes), per-module sizes included; in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if not shapes_of(config):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=False).eval()  # fmt: skip
    model = build(config, dtype)
    shards = sorted(Path(folder).glob("*.safetensors"))
    state = {k: v.to(dtype) for shard in shards for k, v in load_file(shard).items()}
    return load_weights_(model, state, folder).eval()


def load_weights_(model: nn.Module, state: dict[str, torch.Tensor], folder: str | Path) -> nn.Module:
    """Load `state` into `model`, every parameter accounted for (a tied head may be absent: it is tied after);
    ValueError naming what is missing or unexpected."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{folder}: weights do not match the config (missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")  # fmt: skip
    if tied:
        model.tie_weights()
    return model
