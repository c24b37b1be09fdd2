"""Shared fixtures: a real server on a loopback port, the real model, a real Redis."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serverproc import ServerProcess

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"


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
    """float32, for tests that compare greedy texts (int8 and bf16 are not invariant to
    how a prompt is split into cached and computed parts; README Precision). Shared by
    the Responses API's and openai-agents' tests."""
    proc = ServerProcess("--dtype", "float32", "--log-level", "warning").wait_ready()
    yield proc
    proc.stop()
