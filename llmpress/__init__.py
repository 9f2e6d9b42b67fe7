"""llmpress: compress large language models for edge devices.

The library layer: algorithms, evaluation, export and tracking helpers as plain functions over torch modules,
tensors and paths. It never imports Prefect; `tasks/` and `flows/` build the pipeline on top of it.
"""

__version__ = "0.1.0"
