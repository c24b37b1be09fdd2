"""The OpenAI Responses API: /v1/responses over HTTP (JSON, SSE) and WebSocket mode."""
