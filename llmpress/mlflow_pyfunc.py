"""The MLflow pyfunc that every registered llmpress model version is logged with (MLflow "models from code").

The model version's artifacts hold the plain Hugging Face folder under `artifacts/hf_model`, so a reviewer or an
engineer can fetch it with `mlflow.artifacts.download_artifacts("models:/NAME@champion")` and load it with stock
transformers; `mlflow.pyfunc.load_model("models:/NAME@champion").predict(["prompt", ...])` generates greedily.
This file only needs mlflow, torch and transformers: it is loaded on machines where llmpress is not installed, so
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
        self.model = load_causal_lm(folder)

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


mlflow.models.set_model(CompressedCausalLM())
