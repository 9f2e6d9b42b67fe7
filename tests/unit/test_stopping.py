"""flows/stopping.py: how SIGTERM and SIGINT become one clean stop (the real runs: tests/integration)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.exceptions import TerminationSignal

from flows import stopping

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_becomes_stopped_and_the_handlers_come_back(sig: signal.Signals) -> None:
    before = {s: signal.getsignal(s) for s in stopping.SIGNALS}
    with pytest.raises(stopping.Stopped) as caught, stopping.handled():
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler interrupts this at once
    assert stopping.signal_of(caught.value) == sig
    assert {s: signal.getsignal(s) for s in stopping.SIGNALS} == before


def test_a_stop_during_a_deferred_step_lands_once_it_is_done() -> None:
    finished = []
    with pytest.raises(stopping.Stopped) as caught, stopping.handled():
        with stopping.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # not interrupted
            finished.append(True)
        finished.append(False)  # not reached: the stop is raised on leaving
    assert finished == [True] and caught.value.signum == signal.SIGTERM


def test_what_counts_as_a_stop() -> None:
    assert stopping.signal_of(TerminationSignal(signal.SIGTERM)) == signal.SIGTERM  # Prefect's, inside a flow
    assert stopping.signal_of(KeyboardInterrupt()) == signal.SIGINT
    assert stopping.signal_of(RuntimeError("x")) is None and stopping.signal_of(SystemExit(1)) is None


def test_the_flows_note_is_found_behind_the_exception_prefect_hands_on() -> None:
    inner = TerminationSignal(signal.SIGTERM)
    inner.llmpress_stopped = " during step export"
    try:
        try:
            raise inner
        except TerminationSignal:
            raise stopping.Stopped(signal.SIGTERM) from None  # `from None` keeps __context__
    except stopping.Stopped as outer:
        assert stopping.describe(outer) == " during step export"


def test_a_second_signal_during_the_clean_up_exits_at_once() -> None:
    script = (
        "import os, signal, time\n"
        "from flows import stopping\n"
        "with stopping.finishing():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "print('not reached')\n"
    )
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 20
    assert done.returncode == 128 + signal.SIGINT and "not reached" not in done.stdout
    assert done.stderr.strip().splitlines() == [
        "error: stopped again by SIGINT while cleaning up; exiting without finishing the clean-up"
    ]


def test_the_temporary_prefect_server_gets_a_process_group_of_its_own(tmp_path: Path) -> None:
    """Ctrl-C and `timeout` signal the CLI's whole group: the server must not be in it, or the stopped run could
    not record how it ended; and it must not outlive a CLI killed outright."""
    script = (
        "import os, sys, time\n"
        "from flows import prefect_api\n"
        "prefect_api._own_process_group()\n"
        "from prefect.server.api import server\n"
        "child = server.subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, os.getpgid(child.pid), os.getpgid(0), flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        child, child_group, parent_group = map(int, parent.stdout.readline().split())
        assert child_group == child != parent_group
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(child), "the server outlived the CLI"
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing
