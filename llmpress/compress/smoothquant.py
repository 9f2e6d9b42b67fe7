"""smoothquant: being written this session (placeholder so the engine imports)."""

KIND = "block"
NEEDS = None
