"""owl: being written this session (placeholder so the engine imports)."""

KIND = "layer"
NEEDS = None
