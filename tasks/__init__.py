"""Prefect tasks: one unit of work each, thin wrappers over `llmpress.steps` passing paths and small dicts."""
