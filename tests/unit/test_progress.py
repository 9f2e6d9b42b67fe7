"""Progress of long steps: rate-limited log lines with the elapsed time (which Prefect's logs receive), a bar."""

from __future__ import annotations

import logging
import os

import pytest

from flows.prefect_api import set_defaults
from llmpress.progress import Progress, phase


def test_progress_logs_first_last_and_rate_limited_lines(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="llmpress.progress"), Progress("evaluate: cloze", "example") as p:
        for done in range(1, 101):
            p(done, 100)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("evaluate: cloze 1/100 examples, ") and "s elapsed" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("evaluate: cloze 100/100 examples, ") and "left" not in lines[-1]
    assert len(lines) == 2  # a quick loop: the first and the last update, not one line per example


def test_progress_logs_every_interval(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="llmpress.progress"), Progress("x", "window", every=0.0) as p:
        for done in range(1, 6):
            p(done, 5)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [f"x {i}/5 windows" for i in range(1, 6)]


def test_phase_logs_start_and_seconds(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="llmpress.progress"), phase("export: tracing"):
        pass
    assert caplog.records[0].getMessage() == "export: tracing ..."
    assert caplog.records[1].getMessage().startswith("export: tracing done in ")


def test_cli_forwards_library_logs_to_prefect(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PREFECT_LOGGING_EXTRA_LOGGERS", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    set_defaults()
    assert os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] == "llmpress"  # the progress lines reach Prefect's logs
    assert int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 120  # a first start on 2 cores
