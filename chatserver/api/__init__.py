"""HTTP, WebSocket and OpenAI handlers: transport only (parse, call, write)."""
