"""Compression methods and the block-by-block engine that applies a recipe: `compress_(model, recipe, ids)`.

Importing the package registers every method (`methods.register`, at the end of each method's module); the engine
finds them by name in that registry and imports none of them.
"""

from llmpress.compress import (  # noqa: F401 - imported to register
    awq,
    distill,
    drop_blocks,
    dsnot,
    embeddings,
    gptq,
    llm_pruner,
    lowrank,
    magnitude,
    qat,
    rtn,
    smoothquant,
    sparsegpt,
    structured,
    wanda,
)
from llmpress.compress.engine import compress_
from llmpress.compress.records import CompressionReport
from llmpress.compress.targets import find_decoder_blocks

__all__ = ["CompressionReport", "compress_", "find_decoder_blocks"]
