"""Test-session environment: Prefect's home (ephemeral server database) in a temporary folder, no telemetry."""

from __future__ import annotations

import os
import tempfile

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="llmpress-prefect-")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_API_DATABASE_TIMEOUT", "60")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("PREFECT_API_URL", None)  # always ephemeral here; the server tests start their own
