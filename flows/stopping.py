"""Stopping a run with SIGTERM or SIGINT (a scheduler's time limit, `timeout`, a container stop, Ctrl-C).

The signal becomes an exception in the main thread - Prefect's own `TerminationSignal` for SIGTERM while a flow
runs, `Stopped` everywhere else - so the run unwinds like any error: every `finally` and context manager removes
its temporary and half-written folders, Prefect records the flow and task runs as crashed (cancelled when Prefect
itself asked for the stop), and the flow marks its MLflow run KILLED and takes back a registration it had begun
(`llmpress.tracking.end_stopped_run`). The command line then says in one line what was stopped and exits with
128 + the signal's number, as a shell does.

A second signal during that clean-up exits at once, saying so: whoever sends it wants out now.

Ctrl-C and `timeout` signal the whole process group; Prefect's temporary server runs in a group of its own
(`flows/prefect_api.py`) so that it outlives the run long enough to record how it ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """A stop signal reached this process (a KeyboardInterrupt, so `except Exception` never swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, _frame: Any) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Within: SIGTERM and SIGINT raise `Stopped` in the main thread (elsewhere nothing changes: only the main
    thread may set handlers). The previous handlers come back on leaving."""
    with _handlers(_raise_stopped):
        yield


@contextlib.contextmanager
def _handlers(handler: Any) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def signal_of(exc: BaseException) -> signal.Signals | None:
    """The stop signal `exc` stands for, or None when it is not a stop."""
    if isinstance(exc, Stopped):
        return signal.Signals(exc.signum)
    prefect_exceptions = sys.modules.get("prefect.exceptions")  # a TerminationSignal means Prefect is loaded
    if prefect_exceptions and isinstance(exc, prefect_exceptions.TerminationSignal):
        return signal.Signals(exc.signal)
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    return None


def _exit_now(signum: int, _frame: Any) -> None:
    name = signal.Signals(signum).name
    os.write(2, f"error: stopped again by {name} while cleaning up; exiting without finishing the clean-up\n".encode())
    os._exit(128 + signum)


@contextlib.contextmanager
def finishing() -> Iterator[None]:
    """Clean-up after a stop: a further stop signal exits at once instead of interrupting it half-way."""
    with _handlers(_exit_now):
        yield


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A short step that must not be cut in half (opening the MLflow run: cut, it would leave a run no one can
    find to close): a stop signal during it is raised as `Stopped` once it is done; a second one exits at once."""
    received: list[int] = []

    def remember(signum: int, frame: Any) -> None:
        if received:
            _exit_now(signum, frame)
        received.append(signum)

    with _handlers(remember):
        yield
    if received:
        raise Stopped(received[0])


def describe(exc: BaseException) -> str:
    """What the flow recorded on a stop exception (its step, its MLflow run), for the command line's one line.
    Prefect hands the signal on to the handler it replaced, so the exception that reaches the command line may be
    a new one whose context is the flow's."""
    seen: BaseException | None = exc
    while seen is not None:
        if hasattr(seen, "llmpress_stopped"):
            return seen.llmpress_stopped
        seen = seen.__context__
    return ""
