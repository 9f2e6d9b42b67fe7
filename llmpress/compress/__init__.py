"""Compression methods and the block-by-block engine that applies a recipe: `compress_(model, recipe, ids)`.

Importing the package imports every module in it, and so registers every method (`methods.register`, at the end
of each method's module); the engine finds them by name in that registry and imports none of them.
"""

import importlib
import pkgutil

from llmpress.compress.engine import compress_
from llmpress.compress.records import CompressionReport
from llmpress.compress.targets import find_decoder_blocks

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module

__all__ = ["CompressionReport", "compress_", "find_decoder_blocks"]
