"""drop_blocks: being written this session (placeholder so the engine imports)."""

KIND = "model"
NEEDS = None
