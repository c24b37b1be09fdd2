"""Run a real `chatserver serve` in a subprocess on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A chatserver subprocess; `url` is its base URL once `wait_ready()` returns."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = REPO / ".pytest-logs" / f"server-{self.port}-{int(time.time() * 1000)}.log"
        self.log_path.parent.mkdir(exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "chatserver", "serve", "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


async def generations(server: ServerProcess) -> int:
    """Generations under way on the server, as /readyz counts them."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/readyz") as r:
            return (await r.json())["generations"]


async def wait_no_generations(server: ServerProcess, within: float = 5.0) -> None:
    """The server cancels a reply whose client left: nothing stays running."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not await generations(server):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"a generation still runs {within}s after its client left")
