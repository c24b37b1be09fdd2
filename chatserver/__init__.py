"""chatserver: an async chat server for real language models, in pure Python."""

__version__ = "0.1.0"
