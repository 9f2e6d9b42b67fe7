"""`genai_config.json`: what onnxruntime-genai needs beside the KV-cache graph to load and run it.

onnxruntime-genai (PyPI `onnxruntime-genai`; C, C++, C#, Java, Python, iOS and Android) runs a decoder graph
through a JSON description of its inputs, outputs and cache. The graph llmpress exports (`llmpress.export.onnx`)
already uses the names genai expects (input_ids, attention_mask, position_ids, past_key_values.%d.key/value in,
logits and present.%d.key/value out) and a cache that grows by concatenation, so `past_present_share_buffer` is
false. Everything that describes the graph (layers, KV heads, head size, which inputs exist) is read from the
graph itself; what only the model knows (hidden size, heads, vocabulary, context, special tokens) from its
config.json and generation_config.json. Search defaults are greedy, as the bundle's own runner is.

With it an edge bundle runs in either runtime: `python run.py "prompt"` (numpy + onnxruntime + tokenizers) or
`onnxruntime_genai.Model(bundle)`; `tests/unit/test_bundle.py` checks they generate the same tokens.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

FILE = "genai_config.json"
# onnxruntime-genai's decoder-only LLM types; a family it does not list runs as "llama" (the graph holds the
# model's own arithmetic: the type only picks genai's decoder-only pipeline).
LLM_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "phi", "phi3", "smollm3"}


def genai_config(graph_path: str | Path, model_config: dict[str, Any],
                 generation: dict[str, Any]) -> dict[str, Any] | None:  # fmt: skip
    """The genai_config.json of the KV-cache graph at `graph_path` for the model described by `model_config`
    (config.json) and `generation` (generation_config.json, may be empty); None for a model without an
    end-of-sequence token, which genai cannot run. ValueError when the graph is not llmpress's KV-cache layout."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name for o in graph.output}
    layers = sorted(int(m.group(1)) for name in inputs if (m := re.fullmatch(r"past_key_values\.(\d+)\.key", name)))
    if not layers or layers != list(range(len(layers))) or "input_ids" not in inputs or "logits" not in outputs:
        raise ValueError(f"{graph_path} is not a KV-cache decoder graph (input_ids, past_key_values.N.key, logits)")
    dims = inputs["past_key_values.0.key"].type.tensor_type.shape.dim  # [batch, kv_heads, past, head_dim]
    kv_heads, head_size = dims[1].dim_value, dims[3].dim_value
    if kv_heads <= 0 or head_size <= 0:
        raise ValueError(f"{graph_path}: the cache's KV heads and head size are not fixed in the graph")
    eos = generation.get("eos_token_id", model_config.get("eos_token_id"))
    bos = generation.get("bos_token_id", model_config.get("bos_token_id"))
    pad = generation.get("pad_token_id", model_config.get("pad_token_id"))
    first_eos = eos[0] if isinstance(eos, list) and eos else eos
    if not isinstance(first_eos, int):
        return None
    context = model_config.get("max_position_embeddings") or model_config.get("n_positions") or 2048
    model_type = model_config.get("model_type", "llama")
    decoder_inputs = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key",
                      "past_value_names": "past_key_values.%d.value"}  # fmt: skip
    decoder_inputs |= {name: name for name in ("attention_mask", "position_ids") if name in inputs}
    return {
        "model": {
            "type": model_type if model_type in LLM_TYPES else "llama",
            "bos_token_id": bos if isinstance(bos, int) else 0,
            "eos_token_id": eos,
            "pad_token_id": pad if isinstance(pad, int) else first_eos,
            "context_length": int(context),
            "vocab_size": int(model_config.get("vocab_size", 0)),
            "decoder": {
                "filename": Path(graph_path).name,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": head_size,
                "hidden_size": int(model_config.get("hidden_size", 0)),
                "num_attention_heads": int(model_config.get("num_attention_heads", kv_heads)),
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": len(layers),
                "inputs": decoder_inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": int(context),
            "min_length": 0,
            "past_present_share_buffer": False,  # the graph concatenates past and new keys, it has no fixed buffer
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
