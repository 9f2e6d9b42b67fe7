"""The Prefect API the CLI's flows talk to, made ready before any flow starts.

Without PREFECT_API_URL, Prefect starts a temporary local server (ephemeral mode) on first use, whose first start
creates and migrates a SQLite database under PREFECT_HOME. On a fresh machine with 2 busy cores that migration
alone outlasts Prefect's default start-up wait (20 s) and the run dies with a traceback. So, before a flow:

1. the database is created and migrated here, in this process, with a line saying so the first time;
2. the temporary server is started with a start-up wait that fits a slow machine
   (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, default 180 s here); the flows then reuse that server;
3. with PREFECT_API_URL set, that server must answer its health check.

Any failure is one `PrefectUnavailable` error naming what failed and what to do.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmpress.errors import LlmpressError

log = logging.getLogger("llmpress.prefect")

STARTUP_TIMEOUT_S = 180


class PrefectUnavailable(LlmpressError):
    """Prefect's API could not be reached or started."""


def set_defaults() -> None:
    """Environment defaults for Prefect, set before it is imported (its settings read the environment once)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(STARTUP_TIMEOUT_S))
    # SQLite under a saturated CPU: give the ephemeral server's queries more patience than its 10 s default.
    os.environ.setdefault("PREFECT_API_DATABASE_TIMEOUT", "60")
    # Forward the library's log lines (progress of every long step) to Prefect's logs and console.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "llmpress")


def ensure_api() -> str:
    """Return the API URL the flows will use, after making sure it answers (see the module docstring)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        _check_server(url)
        return url
    return start_ephemeral()


def _check_server(url: str) -> None:
    import httpx

    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=15)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise PrefectUnavailable(
            f"the Prefect server at PREFECT_API_URL={url} does not answer ({type(exc).__name__}: {exc}); start it "
            "(`llmpress services up` or `prefect server start`), or unset PREFECT_API_URL to run with a temporary "
            "local server"
        ) from None


def database_path() -> Path | None:
    """The ephemeral server's SQLite file, or None for another database."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = PREFECT_API_DATABASE_CONNECTION_URL.value() or ""
    prefix = "sqlite+aiosqlite:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) else None


def migrate_database() -> float:
    """Create and migrate the ephemeral server's database (a no-op check once it is at the newest revision);
    returns the seconds it took."""
    import asyncio

    from prefect.server.database import provide_database_interface

    path = database_path()
    if path is not None and not path.exists():
        log.info("Prefect: creating its local database %s (first run only, ~10-30 s)", path)
    start = time.perf_counter()
    try:
        asyncio.run(provide_database_interface().create_db())
    except Exception as exc:  # any driver, file or migration error: one line, with what to do
        where = f" {path}" if path else ""
        raise PrefectUnavailable(
            f"Prefect's database{where} could not be created or migrated ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); check that PREFECT_HOME is writable and has free "
            "space, or point PREFECT_API_URL at a running Prefect server"
        ) from None
    return time.perf_counter() - start


def start_ephemeral(timeout: float | None = None) -> str:
    """Migrate the database, then start Prefect's temporary server (reused by every flow of this process)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    migrate_database()
    wait = timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    _own_process_group()
    server = SubprocessASGIServer()
    start = time.perf_counter()
    try:
        server.start(timeout=int(wait))
    except Exception as exc:
        server.stop()  # a server still starting would otherwise outlive the refusal
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise PrefectUnavailable(
            f"Prefect's temporary local server did not start within {wait:.0f} s ({reason}); on a slow or busy "
            "machine raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or run a server "
            "(`llmpress services up` or `prefect server start`) and set PREFECT_API_URL"
        ) from None
    log.info("Prefect: temporary server at %s ready in %.1f s", server.api_url, time.perf_counter() - start)
    return server.api_url


class _OwnGroupSubprocess:
    """The `subprocess` module as Prefect's server module sees it, except that Popen starts a new session.

    Ctrl-C and `timeout` signal the CLI's whole process group. In that group the temporary server would stop at
    once, and the run being stopped could no longer record that its flow run crashed (flows/stopping.py). In a
    session of its own it stops when the CLI exits (Prefect's atexit hook), and on Linux when the CLI dies
    without one (parent-death signal), so it never outlives the run."""

    def __getattr__(self, name: str) -> object:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: object, **kwargs: object) -> subprocess.Popen:
        return subprocess.Popen(*args, start_new_session=True, preexec_fn=_die_with_parent(), **kwargs)


def _die_with_parent():
    """A pre-exec hook asking Linux to send SIGTERM to the child when this process dies; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the hook runs between fork and exec
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return hook


def _own_process_group() -> None:
    from prefect.server.api import server as server_module

    server_module.subprocess = _OwnGroupSubprocess()
