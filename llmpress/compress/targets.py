"""Which layers a stage touches: the decoder blocks of a model, and the Linear layers of a block whose full names
match a stage's `targets` and none of its `ignore` (re.fullmatch)."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from llmpress.config import Recipe
from llmpress.errors import LlmpressError


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the longest ModuleList whose length is config.num_hidden_layers."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers)
    ]
    if not candidates:
        raise LlmpressError(f"could not find the decoder blocks of {type(model).__name__} (no ModuleList of blocks)")
    return max(candidates, key=lambda item: len(item[1]))


def matches(name: str, stage: Any) -> bool:
    """True if `name` matches one of the stage's target regexes and none of its ignores (re.fullmatch)."""
    return any(re.fullmatch(p, name) for p in stage.targets) and not any(re.fullmatch(p, name) for p in stage.ignore)


def targeted_linears(block: nn.Module, prefix: str, stage: Any) -> dict[str, nn.Linear]:
    """Linear layers of `block` whose full name matches the stage's targets and no ignore."""
    return {
        f"{prefix}.{name}": module
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear) and matches(f"{prefix}.{name}", stage)
    }


def check_targets(model: nn.Module, recipe: Recipe) -> None:
    """Fail before any work if a layer stage's targets match nothing, or an N:M pattern's M does not divide the
    input size of a layer it targets (the groups of M would not tile the row)."""
    blocks_name, blocks = find_decoder_blocks(model)
    for i, stage in enumerate(recipe.stages):
        if not hasattr(stage, "targets"):
            continue
        n_m = getattr(stage, "n_m", None)
        for j, block in enumerate(blocks) if n_m else ():
            for name, layer in targeted_linears(block, f"{blocks_name}.{j}", stage).items():
                if layer.in_features % n_m[1]:
                    raise LlmpressError(f"recipe {recipe.name!r} stage {i} ({stage.method}): pattern "
                                        f"{stage.pattern!r} needs every targeted layer's input size to be a multiple "
                                        f"of {n_m[1]}; {name} has {layer.in_features} inputs")  # fmt: skip
        if not any(targeted_linears(b, f"{blocks_name}.{j}", stage) for j, b in enumerate(blocks)):
            examples = [f"{blocks_name}.0.{n}" for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)][:4]
            raise LlmpressError(
                f"recipe {recipe.name!r} stage {i} ({stage.method}): targets {stage.targets} "
                f"(ignore {stage.ignore}) match no Linear layer in {blocks_name}.*; "
                f"example layer names: {', '.join(examples)}"
            )
