"""Shared fixtures: a real server on a loopback port, the real model, a real Redis."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatserver.workers import cpu_features

# `make test CPU_ISA=avx2`: the whole suite computes as on an AVX2-only CPU, in
# this process and in every server and worker it starts (README, Precision).
# Set before anything imports torch, which reads the switches once.
_TEST_ISA = os.environ.get("CHATSERVER_TEST_CPU_ISA", "native")
if _TEST_ISA != "native":
    assert "torch" not in sys.modules, "torch was imported before the CPU ISA was set"
    os.environ.update(cpu_features.isa_env(_TEST_ISA))

# The suite's servers keep what they measure at load (workers/measurement_cache.py:
# the int8 calibration, the gate's reference) in a directory of their own,
# measured once and read back by the rest, not in ~/.cache.
_CACHE_DIR = None
if not os.environ.get("CHATSERVER_CACHE_DIR"):
    _CACHE_DIR = tempfile.mkdtemp(prefix="chatserver-test-cache-")
    os.environ["CHATSERVER_CACHE_DIR"] = _CACHE_DIR

from tests.serverproc import EXACT_FLAGS, ServerProcess  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def pytest_sessionstart(session: pytest.Session) -> None:
    if not (MODEL_DIR / "config.json").exists():
        raise pytest.UsageError(
            f"{MODEL_DIR} is missing: run `make install` (or `chatserver models fetch`) first"
        )


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return MODEL_DIR


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis `make test` made sure of; tests that need Redis use a real one."""
    return os.environ.get("CHATSERVER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """The default configuration (engine auto, in-process session store), shared by tests."""
    proc = ServerProcess("--log-level", "warning").wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def server_url(server: ServerProcess) -> str:
    return server.url


@pytest.fixture(scope="session")
def exact_server() -> Iterator[ServerProcess]:
    """For tests that compare greedy texts (the default kernels are not invariant to
    how a prompt is split into cached and computed parts; README Precision). Shared by
    the Responses API's, openai-agents' and langchain's tests."""
    proc = ServerProcess(*EXACT_FLAGS, "--log-level", "warning").wait_ready()
    yield proc
    proc.stop()
