"""Evaluation: perplexity under a pinned protocol, measured sparsity, bytes on disk."""
