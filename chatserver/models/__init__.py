"""Model loading (GGUF, local directory, hub id), prompts and sampling."""
