"""An exported graph is a template plus weights; the template is traced once per architecture.

Tracing a model into its KV-cache ONNX graph (`llmpress.export.onnx`) costs about 2 s per decoder block on 2 CPU
cores - 65 s for SmolLM2's 30 blocks - and gives the same graph for every model of one architecture and shape:
pruning and weight quantization change values, not structure. So every export is written in two parts:

- the **template**: the traced graph with each weight initializer bound to the parameter or buffer it holds
  (`Binding`: its name, and whether the graph holds it transposed) and its data left out; constants the trace
  made (shapes, masks) stay in the graph;
- the **weights**: `write_export` fills each bound initializer from the model into `model.onnx.data` (aligned, so
  onnxruntime can map it) and writes the graph beside it.

Templates are kept in a cache folder under `template_key`: the model's class, config (paths and versions aside),
its module tree (every module's type and plain settings), every parameter and buffer's name, shape and dtype, the
opset, the versions of torch, transformers, onnx, onnx-ir and onnxscript, and the source of the export code. A
model the key cannot describe - forward hooks (W8A8's activation rounding), tensors held outside its parameters
and buffers - is traced every time (`cacheable`). A traced export and a cached one write their weights through
the same code, and the pipeline checks every export against PyTorch (`check_parity`) either way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from llmpress.files import atomic_folder
from llmpress.hashing import data_hash, sha256_file

log = logging.getLogger(__name__)

GRAPH, DATA = "model.onnx", "model.onnx.data"
TEMPLATE, BINDINGS = "template.onnx", "bindings.json"
ALIGN = 1 << 16  # onnxruntime maps external data at offsets aligned to the allocation granularity
CONFIG_NOISE = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}
MODULE_NOISE = {"name_or_path", "training"}  # where the weights came from; the mode (the export sets eval)
VERSIONED = ("torch", "transformers", "onnx", "onnx-ir", "onnxscript")


@dataclass(frozen=True)
class Binding:
    source: str  # parameter or buffer name, as `state` (below) names it
    transpose: bool = False


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` under every name it has (a tied weight under each of its names)."""
    found = dict(module.named_buffers(remove_duplicate=False))
    found.update(module.named_parameters(remove_duplicate=False))
    return found


def cacheable(model: nn.Module) -> bool:
    """Whether `template_key` describes everything the graph depends on: no forward hooks, and no tensor held by a
    module outside its parameters and buffers (the tracer would bake it in as a constant)."""
    for module in model.modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return False
        if any(isinstance(v, torch.Tensor) for v in vars(module).values()):
            return False
    return True


def template_key(model: nn.Module, opset: int) -> str:
    config = model.config.to_dict() if hasattr(model, "config") else {}
    plain = (bool, int, float, str, type(None))

    def settings(module: nn.Module) -> dict[str, Any]:
        return {k: v for k, v in sorted(vars(module).items())
                if not k.startswith("_") and k not in MODULE_NOISE and isinstance(v, plain)}  # fmt: skip

    def package(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    code = [sha256_file(Path(__file__).with_name(name)) for name in ("onnx.py", "template.py")]
    return data_hash({
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": {k: v for k, v in config.items() if k not in CONFIG_NOISE},
        "attention": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "modules": [[name, type(m).__qualname__, settings(m)] for name, m in model.named_modules()],
        "tensors": [[name, list(t.shape), str(t.dtype)] for name, t in sorted(state(model).items())],
        "opset": opset,
        "versions": {name: package(name) for name in VERSIONED},
        "code": code,
    })  # fmt: skip


def strip_bound(model: onnx.ModelProto, bindings: dict[str, Binding]) -> onnx.ModelProto:
    """The template: `model` with the bound initializers' data removed (dims and types kept)."""
    for init in model.graph.initializer:
        if init.name in bindings:
            init.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                init.ClearField(field)
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
    return model


def save_template(folder: Path, key: str, template: onnx.ModelProto, bindings: dict[str, Binding]) -> None:
    with atomic_folder(folder) as tmp:
        onnx.save(template, tmp / TEMPLATE)
        (tmp / BINDINGS).write_text(json.dumps({"key": key, "bindings": {k: asdict(b) for k, b in bindings.items()}}))


def load_template(folder: Path, key: str) -> tuple[onnx.ModelProto, dict[str, Binding]] | None:
    try:
        saved = json.loads((folder / BINDINGS).read_text())
        if saved.get("key") != key:
            return None
        template = onnx.load(str(folder / TEMPLATE))
    except Exception:  # missing, or damaged (a bad protobuf, bad JSON): trace again
        return None
    return template, {k: Binding(**b) for k, b in saved["bindings"].items()}


def write_export(template: onnx.ModelProto, bindings: dict[str, Binding], model: nn.Module, out_dir: Path) -> Path:
    """Fill the template's bound initializers from `model` into `out_dir/model.onnx.data`; write the graph. The
    quantized linears of `model` become MatMulNBits nodes holding their integer codes (`llmpress.export.packed`)."""
    from llmpress.export.packed import pack_matmuls

    graph = onnx.ModelProto()
    graph.CopyFrom(template)
    tensors = state(model)
    packed = pack_matmuls(graph, {name: (b.source, b.transpose) for name, b in bindings.items()}, model)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / DATA, "wb") as data:
        for init in graph.graph.initializer:
            binding = bindings.get(init.name)
            if init.name in packed:
                raw = np.ascontiguousarray(packed[init.name]).reshape(-1).view(np.uint8)
            elif binding is not None:
                tensor = tensors[binding.source].detach()
                tensor = (tensor.T if binding.transpose else tensor).contiguous().cpu()
                expected = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
                if list(tensor.shape) != list(init.dims) or tensor.element_size() != expected.itemsize:
                    raise ValueError(f"{binding.source} does not fit the graph's {init.name} ({list(init.dims)})")
                raw = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else np.zeros(0, np.uint8)
            else:
                continue
            size = raw.size
            offset = -(-data.tell() // ALIGN) * ALIGN if size >= ALIGN else data.tell()
            data.write(b"\0" * (offset - data.tell()))
            data.write(memoryview(raw))
            init.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", DATA), ("offset", str(offset)), ("length", str(size))):
                entry = init.external_data.add()
                entry.key, entry.value = k, v
    onnx.save(graph, out_dir / GRAPH)
    return out_dir / GRAPH
