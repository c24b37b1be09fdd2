"""Start and stop a ``chatserver serve`` subprocess for a benchmark, and read its CPU use.

The benchmarks that compare server configurations start each server themselves on a free
loopback port, wait for ``/readyz`` to answer 200, and stop it with SIGTERM (SIGKILL if
it has not exited in time). CPU use is read from ``/proc/<pid>/stat`` of the server and
all its descendants (the worker processes), so it is Linux only.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOG_DIR = Path(__file__).resolve().parent / "results" / "tmp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchedServer:
    """``with LaunchedServer(["--engine", "thread"]) as srv: ... srv.url, srv.pid``."""

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        port: int | None = None,
        ready_timeout: float = 300.0,
        stop_timeout: float = 30.0,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd  # another checkout: `-m chatserver` imports the one in cwd first
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = _log_path(self.port)
        self.command = [
            sys.executable,
            "-m",
            "chatserver",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def start(self) -> LaunchedServer:
        return self.spawn().wait_ready()

    def spawn(self) -> LaunchedServer:
        """Start the process without waiting for it to be ready."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
            )
        return self

    def wait_ready(self) -> LaunchedServer:
        """Wait for /readyz 200; on failure the process is stopped and the log shown."""
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} before it was ready "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(
            f"server not ready after {self.ready_timeout:.0f}s (log {self.log_path}):\n"
            f"{self.log_tail()}"
        )

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> LaunchedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerFailed(Exception):
    """A benchmark's own server did not start (the message says why, with its log)."""


@contextmanager
def target_server(
    url: str | None, flags: Sequence[str], ready_timeout: float, pid: int | None = None
) -> Iterator[tuple[str, int | None, LaunchedServer | None]]:
    """The server a benchmark drives, as (url, pid, the server if it started one).

    With `url`, that running server (and its `pid`, when given); else one
    started with `flags` for the block and stopped after it. Raises
    ServerFailed when it does not start.
    """
    if url is not None:
        yield url, pid, None
        return
    server = LaunchedServer(flags, ready_timeout=ready_timeout)
    print(f"starting: {shlex.join(server.command)}", file=sys.stderr, flush=True)
    try:
        server.start()
    except (RuntimeError, TimeoutError) as e:
        server.stop()
        raise ServerFailed(str(e)) from e
    try:
        yield server.url, server.pid, server
    finally:
        server.stop()


def _log_path(port: int) -> Path:
    try:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        directory = LOG_DIR
    except OSError:
        directory = Path(tempfile.gettempdir())
    return directory / f"server-{port}-{int(time.time())}.log"


# --- CPU use from /proc ----------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_stat(text: str) -> tuple[int, float]:
    """(ppid, utime + stime in seconds) from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may contain spaces, so fields are
    counted from the last ``)``: state is field 3, ppid 4, utime 14, stime 15.
    """
    rest = text[text.rindex(")") + 2 :].split()
    ppid = int(rest[1])
    ticks = int(rest[11]) + int(rest[12])
    return ppid, ticks / CLOCK_TICKS


def _all_stats() -> dict[int, tuple[int, float]]:
    stats = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stats[int(entry.name)] = parse_stat(f.read())
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile, or not ours to read
    return stats


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds used so far by ``pid`` and each of its live descendants."""
    stats = _all_stats()
    if pid not in stats:
        raise ProcessLookupError(f"no process {pid}")
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(p)
    tree, todo = {}, [pid]
    while todo:
        p = todo.pop()
        tree[p] = stats[p][1]
        todo.extend(children.get(p, ()))
    return tree


def measure_idle_cpu(pid: int, seconds: float = 10.0) -> dict[str, Any]:
    """CPU use of ``pid`` and its descendants over ``seconds``, as % of one core.

    Processes that appear during the window count in full; ones that exit are not seen.
    Blocks the calling thread: run it with no traffic to the server.
    """
    before = tree_cpu_seconds(pid)
    start = time.monotonic()
    time.sleep(seconds)
    after = tree_cpu_seconds(pid)
    elapsed = time.monotonic() - start
    used = sum(t - before.get(p, 0.0) for p, t in after.items())
    return {
        "pid": pid,
        "processes": len(after),
        "seconds": elapsed,
        "cpu_seconds": used,
        "percent_of_one_core": 100.0 * used / elapsed,
    }
