"""Real Prefect servers and served processes for the integration tests and the event benchmark: start on a free
local port, wait until healthy, stop by process group."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    """Stop ``proc``'s process group with ``sig`` (SIGKILL after 30 s)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_serve(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``python -m deployments.serve ARGS`` in its own process group, its output (and its flow runs') in ``log``.

    Never a pipe nobody reads: once 64 KiB of log lines fill it, the runner and its flow-run processes block on
    their next log line, and a run stops before it records its state.
    """
    with log.open("wb") as out:  # the child holds its own descriptor
        return subprocess.Popen([sys.executable, "-m", "deployments.serve", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def tail(log: Path, n: int = 4000) -> str:
    """The last ``n`` characters of ``log`` (for an assertion's message)."""
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


@contextmanager
def prefect_server(home: Path, timeout: float = 180) -> Iterator[str]:
    """A real ``prefect server start`` on a free local port; yields its API URL; stopped afterwards."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"prefect server did not become healthy in {timeout} s")
        yield url
    finally:
        stop(proc, signal.SIGTERM)


def prefect_env(url: str, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a process that talks to the server at ``url`` (small projection, no progress bars)."""
    fixed = {"PREFECT_API_URL": url, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1", "DDA_INDEXING__PROGRESS": "false"}
    return {**os.environ, **fixed, "DDA_PROJECTION__K_IN": "4", "DDA_PROJECTION__K_OUT": "4", **extra}


def wait_for(predicate: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Poll ``predicate`` every 0.25 s until it holds (True), ``timeout`` passes or ``proc`` exits (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.25)
    return False


def trigger_ready(url: str, event: str) -> bool:
    """Whether the server at ``url`` holds an automation (a deployment trigger) expecting ``event``."""
    request = urllib.request.Request(f"{url}/automations/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            automations = json.loads(r.read())
    except OSError:
        return False
    return any(event in a.get("trigger", {}).get("expect", []) for a in automations)


def serving(url: str, deployment: str, data_dir: Path) -> bool:
    """Whether the server at ``url`` holds ``deployment`` ("flow/deployment") as served for ``data_dir``: its default
    settings name that folder. On a server shared with earlier tests, a trigger left by their served process
    answers the event before this one has registered, with their settings: wait for this one."""
    try:
        with urllib.request.urlopen(f"{url}/deployments/name/{deployment}", timeout=5) as r:
            parameters = json.loads(r.read()).get("parameters") or {}
    except (OSError, ValueError):
        return False
    return (parameters.get("settings") or {}).get("data_dir") == str(data_dir)


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (read from /proc; empty where /proc is not there)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _flow_name(url: str, flow_id: str | None) -> str:
    try:
        with urllib.request.urlopen(f"{url}/flows/{flow_id}", timeout=5) as r:
            return str(json.loads(r.read()).get("name"))
    except (OSError, ValueError):
        return f"flow {flow_id}"


def diagnose(proc: subprocess.Popen, log: Path, url: str) -> str:
    """What a stuck event test needs to be understood, for its assertion message: the server's flow runs with their
    state history, the settings the served process was given (``PREFECT_*``/``DDA_*``), then every Python
    process below ``proc`` made to print its threads' stacks (``PYTHONFAULTHANDLER`` in its environment: SIGABRT
    dumps them into ``log``), then the log's tail."""
    lines = []
    request = urllib.request.Request(f"{url}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            runs = json.loads(r.read())
        for run in sorted(runs, key=lambda x: x.get("start_time") or ""):
            state = run.get("state") or {}
            lines.append(f"flow run {run.get('name')} of {_flow_name(url, run.get('flow_id'))} "
                         f"(deployment {run.get('deployment_id')}) {run.get('state_type')} "
                         f"start={run.get('start_time')} end={run.get('end_time')} "
                         f"parameters={json.dumps(run.get('parameters'))[:300]} "
                         f"message={state.get('message')!r}")  # fmt: skip
    except (OSError, ValueError) as e:
        lines.append(f"flow runs unreadable: {e}")
    env = Path(f"/proc/{proc.pid}/environ")
    if env.exists():
        pairs = [p for p in env.read_bytes().decode(errors="replace").split("\0") if p.startswith(("PREFECT_", "DDA_"))]
        lines.append("served with: " + " ".join(sorted(pairs)))
    for pid in _descendants(proc.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
            lines.append(f"process {pid}: {cmd}")
            os.kill(pid, signal.SIGABRT)
        except OSError:
            continue
    time.sleep(3)
    return "\n".join(lines) + "\n--- log ---\n" + tail(log, 12000)
