"""The MLflow pyfunc that every registered llmpress model version is logged with (MLflow "models from code").

The model version's artifacts hold the plain Hugging Face folder under `artifacts/hf_model`, so a reviewer or an
engineer can fetch it with `mlflow.artifacts.download_artifacts("models:/NAME@champion")` and load it with stock
transformers; `mlflow.pyfunc.load_model("models:/NAME@champion").predict(["prompt", ...])` generates greedily.
This file only needs mlflow, torch, transformers and compressed-tensors (for compressed-tensors folders); a folder
in llmpress's own layout needs llmpress, and says so. It is loaded on machines where llmpress is not installed, so
the model is logged with `llmpress/layer_shapes.py` beside it (`code_paths`), the loading path of models whose
blocks have different widths (plain `from_pretrained` for the others).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class CompressedCausalLM(PythonModel):
    def load_context(self, context) -> None:
        from transformers import AutoTokenizer

        try:
            from llmpress.layer_shapes import load_causal_lm
        except ImportError:  # without llmpress: the copy logged beside this file (code_paths)
            from layer_shapes import load_causal_lm

        folder = context.artifacts["hf_model"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        self.model = _load(folder, load_causal_lm)

    def predict(self, context, model_input, params=None) -> list[str]:
        import torch

        prompts = model_input if isinstance(model_input, list) else list(model_input.iloc[:, 0])
        max_new_tokens = int((params or {}).get("max_new_tokens", 32))
        outputs = []
        for prompt in prompts:
            ids = self.tokenizer(str(prompt), return_tensors="pt")
            with torch.no_grad():
                generated = self.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
            outputs.append(self.tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
        return outputs


def _load(folder: str, load_causal_lm):
    """Plain and compressed-tensors folders load with stock transformers (compressed-tensors decompresses packed
    layers itself); a folder in llmpress's own layout needs llmpress, and without it this says so instead of
    letting transformers fill the packed layers with random weights."""
    import json
    from pathlib import Path

    manifest = Path(folder) / "llmpress_compression.json"
    layout = json.loads(manifest.read_text()).get("format") if manifest.is_file() else None
    if layout == "llmpress-compressed/1":
        try:
            from llmpress.compress.storage import load_compressed
        except ImportError:
            raise RuntimeError(
                f"{folder} is in llmpress's own compressed layout (packed codes, factorised or bitmask layers): "
                "install llmpress to load it, or write a plain folder with `llmpress dequantize`"
            ) from None
        return load_compressed(folder).eval()
    config = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config")
    if layout is not None and config is not None:
        # compressed-tensors: symmetric grids load on transformers' default route, asymmetric ones only through
        # its dequantize route (README, "compressed HF folder")
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        groups = config.get("config_groups", {}).values()
        asymmetric = any(not (g.get("weights") or {}).get("symmetric", True) for g in groups)
        extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asymmetric else {}
        return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, **extra).eval()
    return load_causal_lm(folder)


mlflow.models.set_model(CompressedCausalLM())
