"""The method contract: what a compression method declares, and the registry the engine reads it from.

A method is one module of this package that ends by registering itself beside its stage's schema (the pydantic
class in `llmpress.config` whose `method` literal names it):

    register(Method(WandaStage, "layer", apply_, statistic="input_sq_norms"))

The engine (`engine.compress_`) looks methods up here by name and imports none of them; the package's
`__init__` imports every method module, so importing anything from `llmpress.compress` registers them all. The
list of methods is `llmpress.config.METHODS`, derived from the recipe schema's stage union; a test checks that
each has a registered method, a recipe in `recipes/`, a unit test and a README row.

Three kinds, by what a method needs to see at once:

    "layer"  one Linear layer: `apply(layer, stage, stats) -> dict` of details for the report. `stats` is a
             `calibration.LayerStats` holding `statistic` over the layer's calibration inputs (None: weights only),
             their sum with `input_sum`, and the weight from before this pass with `dense_weight`.
             `apply_shared(layers, stage, stats) -> {name: dict}` optionally takes layers that read one input
             (q/k/v, gate/up) together, as one matrix.
    "block"  a whole decoder block, for methods that move scales or channels between its layers (AWQ,
             SmoothQuant, structured pruning, activation-aware low-rank):
             `apply(block, prefix, stage, calib: BlockCalibration | None) -> list[dict]`.
    "model"  the whole model, between block passes (distillation, dropping blocks, embeddings):
             `apply(model, stage, ctx: ModelContext) -> list[dict]`.

`check(model, stage)`, where given, refuses settings the model cannot take (more blocks dropped than it has, more
heads removed than a group holds) before any layer changes: `engine.check_recipe` runs it, for `llmpress check
--model` and at the start of `compress_`.

The rows a block or model method returns are {"name", "layer" or "shape", details...}; `records.add_layer_records`
turns them into the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel
from torch import nn

from llmpress.errors import LlmpressError

Kind = Literal["layer", "block", "model"]
Statistic = Literal["input_sq_norms", "hessian"]


@dataclass(frozen=True)
class Method:
    schema: type[BaseModel]  # the stage's class in llmpress.config; its `method` literal is the method's name
    kind: Kind
    apply: Callable[..., Any]
    statistic: Statistic | None = None  # layer methods: what LayerStats accumulates for them
    input_sum: bool = False  # layer methods: also the sum of the inputs (E[x])
    dense_weight: bool = False  # layer methods: also the weight as it was before this pass changed the block
    apply_shared: Callable[..., dict[str, dict]] | None = None
    needs_data: Callable[[Any], bool] | None = None  # when the stage's settings decide; see `wants_data`
    check: Callable[[nn.Module, Any], None] | None = None  # refuses settings this model cannot take (LlmpressError)
    needs_teacher: bool = False  # model methods: `ctx.teacher()` is the model as it was before the recipe

    @property
    def name(self) -> str:
        return get_args(self.schema.model_fields["method"].annotation)[0]

    def wants_data(self, stage: Any) -> bool:
        """Whether `stage` needs calibration activations: a layer statistic, a block or model method, an OWL
        allocation - unless the method says otherwise for these settings (plain SVD, magnitude-scored channels)."""
        if self.needs_data is not None:
            return self.needs_data(stage)
        return self.statistic is not None or self.kind != "layer" or getattr(stage, "owl", None) is not None


@dataclass
class ModelContext:
    """What a model-level method may use: calibration ids, the device, and the teacher (the model before the
    recipe ran), built lazily."""

    calibration_ids: torch.Tensor | None
    device: torch.device
    batch_size: int
    teacher: Callable[[], nn.Module]
    progress: Callable[[str], None]

    def data(self, method: str) -> torch.Tensor:
        """The calibration ids, refused by `method`'s name when there are none."""
        if self.calibration_ids is None or self.calibration_ids.numel() == 0:
            raise LlmpressError(f"{method} needs calibration data (token windows), none was given")
        return self.calibration_ids

    def teacher_of(self, model: nn.Module, method: str) -> nn.Module:
        """The model before the recipe, refused by `method`'s name when there is none apart from `model`."""
        teacher = self.teacher()
        if teacher is None or teacher is model:
            raise LlmpressError(f"{method} needs a teacher model distinct from the student")
        return teacher


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.kind not in get_args(Kind):
        raise ValueError(f"{method.name}: kind {method.kind!r} is not one of {get_args(Kind)}")
    if method.statistic is not None and method.statistic not in get_args(Statistic):
        raise ValueError(f"{method.name}: statistic {method.statistic!r} is not one of {get_args(Statistic)}")
    if method.name in _REGISTRY and _REGISTRY[method.name] != method:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def method_for(stage: Any) -> Method:
    """The registered method of a recipe stage."""
    try:
        return _REGISTRY[stage.method]
    except KeyError:
        raise LookupError(f"no method registered for {stage.method!r}; registered: {sorted(_REGISTRY)}") from None


def registered() -> dict[str, Method]:
    return dict(_REGISTRY)
