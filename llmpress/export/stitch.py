"""The graph of a deep model, traced with two decoder blocks and stitched to all of them.

Tracing a model for ONNX costs about 2 s per decoder block on 2 CPU cores (symbolic shape reasoning over every
op), and a model's blocks are usually copies of one another with their own weights. So `shallow` traces the model
with its first two blocks only, and `stitch` copies the second block's nodes for blocks 2..N-1: each copy reads the
previous copy's residual stream, its own weights (`...layers.{i}.` initializers) and its own cache inputs
(`past_key_values.{i}.*`), and writes its own `present.{i}.*`; what the blocks share (masks, rotary tables,
constants) stays shared. SmolLM2's 30 blocks: ~10 s instead of ~65 s.

Guards, any of which sends the caller back to tracing every block:
- `uniform`: every block has the same module structure (types, shapes, plain settings, layer index aside) and
  `config.layer_types`, if the config has it, names one kind of block;
- `stitch` finds exactly one value that is not a constant flowing from block 0 into block 1 (the residual
  stream) and exactly one leaving block 1 for the rest of the graph;
- the caller checks the written graph against the PyTorch model on a short prefill (`llmpress.export.onnx`):
  a block whose behaviour depends on its index in a way its structure does not show (a layer without rotary
  embedding, say) fails there, not in a user's run.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import re
from collections.abc import Iterator

import onnx
from torch import nn

from llmpress.errors import LlmpressError
from llmpress.export.template import Binding

SCOPES = "pkg.torch.onnx.name_scopes"  # the exporter's record of which module each node came from


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    from llmpress.compress.targets import find_decoder_blocks

    return find_decoder_blocks(model)


def uniform(model: nn.Module) -> bool:
    """Whether every decoder block has the same structure (see the module docstring)."""
    try:
        _, blocks = decoder_blocks(model)
    except LlmpressError:  # no block list found
        return False
    kinds = getattr(model.config, "layer_types", None)
    if kinds is not None and len(set(kinds)) > 1:
        return False

    def signature(block: nn.Module) -> list:
        out = []
        for name, module in block.named_modules():
            plain = {k: v for k, v in vars(module).items() if not k.startswith("_") and k not in ("layer_idx",)
                     and isinstance(v, bool | int | float | str | type(None))}  # fmt: skip
            shapes = [(n, tuple(t.shape), str(t.dtype)) for n, t in module.named_parameters(recurse=False)]
            out.append((name, type(module).__qualname__, sorted(plain.items()), shapes))
        return out

    first = signature(blocks[0])
    return len(blocks) > 2 and all(signature(b) == first for b in blocks[1:])


@contextlib.contextmanager
def shallow(model: nn.Module, depth: int = 2) -> Iterator[nn.Module]:
    """The model with only its first `depth` decoder blocks (its own modules, nothing copied), restored after."""
    name, blocks = decoder_blocks(model)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    attribute = name.rsplit(".", 1)[-1]
    config = model.config
    saved = {"num_hidden_layers": config.num_hidden_layers, "layer_types": getattr(config, "layer_types", None)}
    setattr(parent, attribute, nn.ModuleList(list(blocks)[:depth]))
    config.num_hidden_layers = depth
    if saved["layer_types"] is not None:
        config.layer_types = saved["layer_types"][:depth]
    try:
        yield model
    finally:
        setattr(parent, attribute, blocks)
        config.num_hidden_layers = saved["num_hidden_layers"]
        if saved["layer_types"] is not None:
            config.layer_types = saved["layer_types"]


class StitchError(Exception):
    """The two-block graph does not have the shape stitching needs; trace every block instead."""


def _block_of(node: onnx.NodeProto, prefix: str) -> int | None:
    for prop in node.metadata_props:
        if prop.key == SCOPES:
            for scope in ast.literal_eval(prop.value):
                match = re.fullmatch(rf"{re.escape(prefix)}\.(\d+)", scope)
                if match:
                    return int(match.group(1))
    return None


def stitch(graph: onnx.ModelProto, bindings: dict[str, Binding], blocks_name: str, depth: int
           ) -> tuple[onnx.ModelProto, dict[str, Binding]]:  # fmt: skip
    """Extend the two-block graph (template and bindings of `llmpress.export.template`) to `depth` blocks.

    `blocks_name` is the blocks' module path in the causal LM (`model.layers`); the exporter's scopes and
    initializer names carry the wrapper's `model.` in front of it."""
    g = graph.graph
    prefix = f"model.{blocks_name}"
    where = [_block_of(n, prefix) for n in g.node]
    if set(where) - {None} != {0, 1}:
        raise StitchError(f"expected nodes of blocks 0 and 1, found blocks {sorted(set(where) - {None})}")
    block1 = [n for n, b in zip(g.node, where, strict=True) if b == 1]
    producer = {out: (n, b) for n, b in zip(g.node, where, strict=True) for out in n.output}
    made_in_1 = {out for n in block1 for out in n.output}

    from_block0 = {v for n in block1 for v in n.input if v in producer and producer[v][1] == 0
                   and producer[v][0].op_type != "Constant"}  # fmt: skip
    if len(from_block0) != 1:
        raise StitchError(f"{len(from_block0)} values flow from block 0 into block 1, not one residual stream")
    (stream_in,) = from_block0
    outputs = {o.name for o in g.output}
    past_in = {f"past_key_values.1.{kind}" for kind in ("key", "value")}
    present_out = {f"present.1.{kind}" for kind in ("key", "value")}
    consumed_outside = {v for n, b in zip(g.node, where, strict=True) if b != 1 for v in n.input if v in made_in_1}
    leaving = (consumed_outside | (made_in_1 & outputs)) - present_out
    if len(leaving) != 1 or not present_out <= made_in_1:
        raise StitchError("block 1 does not hand exactly one value to the rest of the graph besides its cache")
    (stream_out,) = leaving
    own = re.compile(rf"{re.escape(prefix)}\.1\.")

    def rename(value: str, i: int) -> str:
        if value in present_out:
            return value.replace("present.1.", f"present.{i}.")
        if value in past_in:
            return value.replace("past_key_values.1.", f"past_key_values.{i}.")
        if own.match(value):
            return own.sub(f"{prefix}.{i}.", value, count=1)
        return f"{value}__block{i}"

    initializers = {init.name: init for init in g.initializer}
    inputs = {i.name: i for i in g.input}
    copies: list[onnx.NodeProto] = []
    new_inits, new_inputs, new_outputs, new_bindings = [], [], [], dict(bindings)
    previous_out = stream_out
    for i in range(2, depth):
        for node in block1:
            clone = copy.deepcopy(node)
            clone.name = f"{node.name}__block{i}"
            for k, value in enumerate(node.input):
                if value == stream_in:
                    clone.input[k] = previous_out
                elif value in made_in_1 or value in past_in or own.match(value):
                    clone.input[k] = rename(value, i)
            for k, value in enumerate(node.output):
                clone.output[k] = rename(value, i)
            copies.append(clone)
        previous_out = rename(stream_out, i)
        for name in sorted({v for n in block1 for v in n.input if own.match(v) and v in initializers}):
            init = copy.deepcopy(initializers[name])
            init.name = rename(name, i)
            new_inits.append(init)
            if name in bindings:
                b = bindings[name]
                new_bindings[init.name] = Binding(rename(f"model.{b.source}", i).removeprefix("model."), b.transpose)
        for name in sorted(past_in):
            value_info = copy.deepcopy(inputs[name])
            value_info.name = rename(name, i)
            new_inputs.append(value_info)
        for out in g.output:
            if out.name in present_out:
                value_info = copy.deepcopy(out)
                value_info.name = rename(out.name, i)
                new_outputs.append(value_info)
    # The rest of the graph reads the last block's residual stream.
    rest = [n for n, b in zip(g.node, where, strict=True) if b is None]
    for node in rest:
        for k, value in enumerate(node.input):
            if value == stream_out:
                node.input[k] = previous_out
    ordered = _topological([n for n, b in zip(g.node, where, strict=True) if b is not None] + copies + rest,
                           {i.name for i in g.input} | set(initializers) | {v.name for v in new_inputs}
                           | {v.name for v in new_inits})  # fmt: skip
    del g.node[:]
    g.node.extend(ordered)
    g.initializer.extend(new_inits)
    g.input.extend(new_inputs)
    logits_and_presents = sorted(list(g.output) + new_outputs, key=_output_order)
    del g.output[:]
    g.output.extend(logits_and_presents)
    del g.value_info[:]  # shapes of the copies' values are not recorded; onnxruntime infers them
    return graph, new_bindings


def _output_order(value: onnx.ValueInfoProto) -> tuple:
    match = re.fullmatch(r"present\.(\d+)\.(key|value)", value.name)
    return (1, int(match.group(1)), match.group(2) == "value") if match else (0, 0, False)


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """`nodes` in an order where each node comes after the producers of its inputs, otherwise as given."""
    ready = set(available) | {""}
    pending, ordered = list(nodes), []
    while pending:
        waiting = []
        for node in pending:
            if all(v in ready for v in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise StitchError(f"the stitched graph has a cycle or a missing input at {waiting[0].name}")
        pending = waiting
    return ordered
