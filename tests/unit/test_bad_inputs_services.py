"""Bad inputs to `llmpress services`, given on the command line as a user would: each is refused with exit status 2
and one `error:` line naming the problem, no traceback, and the project folder unchanged. A state.json whose PIDs
now belong to other processes never gets those processes signalled. No server is started here."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flows.cli import main
from llmpress import services

REPO = Path(__file__).resolve().parents[2]
STATE = Path(".services") / "state.json"
KEYS = {"root": "/elsewhere", "access_key": "llmpress-0123", "secret_key": "planted-secret-Zq81"}
HELD: list[socket.socket] = []  # ports held open for the duration of a call


def state_file(data: str | bytes) -> Callable[[Path], None]:
    def setup(project: Path) -> None:
        (project / STATE).parent.mkdir()
        (project / STATE).write_bytes(data if isinstance(data, bytes) else data.encode())

    return setup


def state(**entries: object) -> Callable[[Path], None]:
    """A state.json with the usual keys and these service entries."""
    return state_file(json.dumps(KEYS | {"services": entries}))


def mlflow(**changes: object) -> dict[str, object]:
    entry = {"name": "mlflow", "pid": 4242, "port": 5000, "url": "http://127.0.0.1:5000", "log": "logs/mlflow.log"}
    return {key: value for key, value in (entry | changes).items() if value is not None}


BAD_STATES: list[tuple[str, Callable[[Path], None], str]] = [
    ("not-json", state_file("{bad"), "not valid JSON"),
    ("not-utf8", state_file(b'{"a": "\xff"}'), "not UTF-8"),
    ("not-object", state_file("[1, 2]"), "is a JSON object"),
    ("duplicate-key", state_file('{"access_key": "a", "access_key": "b"}'), "duplicate key"),
    ("only-a-pid", state_file('{"pid": 1}'), "unknown key(s) ['pid']"),
    ("no-keys", state_file('{"services": {}}'), "missing key(s) ['access_key', 'secret_key']"),
    ("services-not-object", state_file(json.dumps(KEYS | {"services": []})), "services: expected a dict"),
    ("entry-missing-fields", state(mlflow={"pid": 1}), "services.mlflow: missing key(s)"),
    ("entry-not-object", state(mlflow=[1]), "services.mlflow: expected an object"),
    ("unknown-service", state(redis=mlflow(name="redis")), "services.redis: unknown service"),
    ("name-mismatch", state(mlflow=mlflow(name="prefect")), "services.mlflow.name: expected 'mlflow'"),
    ("unknown-field", state(mlflow=mlflow(colour="red")), "unknown key(s) ['colour']"),
    ("pid-string", state(mlflow=mlflow(pid="4242")), "services.mlflow.pid: expected an int"),
    ("pid-bool", state(mlflow=mlflow(pid=True)), "services.mlflow.pid: expected an int"),
    ("pid-zero", state(mlflow=mlflow(pid=0)), "services.mlflow.pid: expected a process id"),
    ("pid-minus-one", state(mlflow=mlflow(pid=-1)), "services.mlflow.pid: expected a process id"),
    ("pid-huge", state(mlflow=mlflow(pid=2**40)), "services.mlflow.pid: expected a process id"),
    ("port-huge", state(mlflow=mlflow(port=70000)), "services.mlflow.port: expected 0 to 65535"),
    ("stop-signal-bogus", state(mlflow=mlflow(stop_signal=999)), "services.mlflow.stop_signal: not a signal"),
    ("state-is-folder", lambda p: (p / STATE).mkdir(parents=True), "not a file"),
]


def free_port() -> int:
    return services.free_weed_port()  # its S3 gRPC twin (port + 10000) is free too


def held_port() -> int:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    HELD.append(holder)
    return holder.getsockname()[1]


def a_file(project: Path) -> Path:
    (project / "a-file").write_text("keep me")
    return project / "a-file"


def two(first: str, second: str, port: int, other: int | None = None) -> list[str]:
    """`--only first second` with these ports for them."""
    return ["--only", first, second, f"--{first}-port", str(port), f"--{second}-port", str(other or port)]


BAD_UPS: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("dir-is-file", lambda p: ["--dir", str(a_file(p))], "exists and is not a folder"),
    ("dir-under-file", lambda p: ["--dir", str(a_file(p) / "sub")], "exists and is not a folder"),
    ("same-port-twice", lambda p: two("mlflow", "prefect", free_port()), "is wanted by mlflow too"),
    ("port-on-s3-grpc", lambda p: two("s3", "mlflow", port := free_port(), port + 10000), "wanted by s3 for gRPC"),
    ("second-port-taken", lambda p: two("mlflow", "prefect", free_port(), held_port()), "is taken"),
    ("s3-grpc-over-65535", lambda p: ["--only", "s3", "--s3-port", "60000"], "port 70000, wanted by s3 for gRPC"),
]


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}  # fmt: skip


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "params.yaml", project)
    monkeypatch.chdir(project)
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)

    def prefect_started() -> None:
        raise AssertionError("Prefect was started for an input that should have been refused first")

    def server_started(*args: object, **kwargs: object) -> int:
        raise AssertionError("a server was started for an input that should have been refused first")

    monkeypatch.setattr("flows.cli.ensure_api", prefect_started)
    monkeypatch.setattr(services, "_spawn", server_started)
    yield project
    while HELD:
        HELD.pop().close()


def cli(project: Path, *args: str) -> int:
    return main(["--project", str(project), "services", *args])


def assert_refused(project: Path, capsys: pytest.CaptureFixture[str], args: list[str], *expected: str) -> None:
    before = snapshot(project)
    code = cli(project, *args)
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\n{out}\n{err}"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(text in errors[0] for text in expected), err
    assert "Traceback" not in err + out and KEYS["secret_key"] not in err + out
    assert snapshot(project) == before, "the refusal left something behind"


@pytest.mark.parametrize("action", ["status", "down", "up"])
@pytest.mark.parametrize(("name", "setup", "expected"), BAD_STATES, ids=[c[0] for c in BAD_STATES])
def test_bad_state_file_is_refused(project: Path, capsys: pytest.CaptureFixture[str], action: str, name: str,
                                   setup: Callable[[Path], None], expected: str) -> None:  # fmt: skip
    setup(project)
    assert_refused(project, capsys, [action], str(project / STATE), expected)


@pytest.mark.parametrize(("name", "setup", "expected"), BAD_UPS, ids=[c[0] for c in BAD_UPS])
def test_bad_up_is_refused_before_starting(project: Path, capsys: pytest.CaptureFixture[str], name: str,
                                           setup: Callable[[Path], list[str]], expected: str) -> None:  # fmt: skip
    assert_refused(project, capsys, ["up", *setup(project)], expected)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """An unrelated process leading its own process group, as a server would: a stand-in for a reused PID."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("recorded", ["start-time", "old-state-file"])
def test_down_leaves_a_reused_pid_alone(project: Path, capsys: pytest.CaptureFixture[str], sleeper: subprocess.Popen,
                                        recorded: str) -> None:  # fmt: skip
    started = services._start_time(sleeper.pid)
    if started is None:
        pytest.skip("no /proc: the recorded PID is trusted there")
    # the server `up` started had this PID and an earlier start time; an old state file has no start time
    state(mlflow=mlflow(pid=sleeper.pid, started=started - 1 if recorded == "start-time" else None))(project)
    assert cli(project, "status") == 1
    assert "mlflow: down" in capsys.readouterr().out
    assert cli(project, "down") == 0
    assert "stale" in capsys.readouterr().out
    assert sleeper.poll() is None, "down signalled a process llmpress did not start"
    written = json.loads((project / STATE).read_text())
    assert written["services"] == {} and written["root"] == str(project / ".services")  # not the recorded root


@pytest.mark.parametrize("recorded", ["start-time", "old-state-file"])
def test_down_still_stops_its_own_server(project: Path, capsys: pytest.CaptureFixture[str], recorded: str) -> None:
    # argv[0] names the program, as a real server's command line does
    proc = subprocess.Popen(["/venv/bin/mlflow", "60"], executable=shutil.which("sleep"), start_new_session=True)
    try:
        started = services._start_time(proc.pid) if recorded == "start-time" else None
        state(mlflow=mlflow(pid=proc.pid, started=started))(project)
        assert cli(project, "down") == 0
        assert "mlflow: stopped" in capsys.readouterr().out
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait()
