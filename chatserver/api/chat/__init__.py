"""The native chat API: /v1/query and /v1/sessions, and the chat turn /ws shares."""
