"""`--device auto` without torch in the server: the answer, and that the server never loads it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from chatserver.workers.devices import resolve_device, torch_gpu_build
from tests.test_engine import worker_pids

PROBE = """
import json, sys
from chatserver.workers.devices import resolve_device, torch_gpu_build
gpu_build = torch_gpu_build()
device = resolve_device("auto")
print(json.dumps({"gpu_build": gpu_build, "device": device, "torch": "torch" in sys.modules}))
"""


def test_the_build_is_read_as_torch_reports_it() -> None:
    assert torch_gpu_build() == (torch.version.cuda is not None or torch.version.hip is not None)
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"


def test_auto_on_a_build_without_gpus_imports_no_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    seen = json.loads(out.stdout)
    assert seen["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    if not seen["gpu_build"]:  # the pinned CPU wheel: the answer needed no import
        assert seen["torch"] is False


def maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_the_server_process_leaves_torch_to_its_workers(server) -> None:
    """Importing torch in the server held every start back by 1.5 s (workers/devices.py);
    the server's own work (HTTP, tokenizer, sessions) never needs it."""
    assert server.proc is not None
    workers = worker_pids(server.proc.pid)
    assert workers and all(maps_torch(pid) for pid in workers), "a worker without torch"
    if not torch_gpu_build():
        assert not maps_torch(server.proc.pid)
