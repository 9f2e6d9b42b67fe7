"""Compression methods and the block-by-block engine that applies a recipe: `compress_(model, recipe, ids)`."""

from llmpress.compress.engine import CompressionReport, compress_, find_decoder_blocks

__all__ = ["CompressionReport", "compress_", "find_decoder_blocks"]
