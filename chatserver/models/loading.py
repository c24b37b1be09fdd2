"""Resolve `--model` and load tokenizer and weights, the same way for every engine.

`--model` is `default` (the converted SmolLM2 under models/), a local Hugging
Face model directory, or a hub id (needs a reachable hub; otherwise a clear
error says so instead of a stack of HTTP retries).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


class ModelNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSource:
    model_id: str  # the name clients see (OpenAI "model")
    path: str  # directory or hub id handed to from_pretrained
    local: bool


def resolve_model(spec: str, models_dir: str | Path, default_name: str) -> ModelSource:
    models_dir = Path(models_dir)
    if spec in ("", "default"):
        path = models_dir / default_name
        if not (path / "config.json").exists():
            raise ModelNotFound(
                f"default model not found at {path}: run `chatserver models fetch` (make install does)"
            )
        return ModelSource(default_name, str(path), True)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{path} is not a Hugging Face model directory (no config.json)")
        return ModelSource(path.resolve().name, str(path.resolve()), True)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelNotFound(f"model directory {spec} does not exist")
    return ModelSource(spec, spec, False)


def _hub_error(source: ModelSource, exc: Exception) -> ModelNotFound:
    return ModelNotFound(
        f"could not load '{source.path}' from the Hugging Face hub ({type(exc).__name__}): "
        "the hub may be unreachable from this machine; pass a local model directory instead"
    )


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout).close()
        return True
    except OSError:
        return False


def _offline_unless_reachable(source: ModelSource) -> None:
    """For a hub id, use the local hub cache only when the hub does not answer,
    instead of a minute of retries."""
    from huggingface_hub import constants

    if not source.local and not constants.HF_HUB_OFFLINE and not _hub_reachable(constants.ENDPOINT):
        # The constant is read at import time, so set it as well as the variable
        # that worker processes inherit.
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True


def load_tokenizer(source: ModelSource) -> Any:
    _offline_unless_reachable(source)
    try:
        named = _named_tokenizer_class(source)
        if named is not None:
            return named.from_pretrained(source.path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source.path)
    except OSError as exc:
        if source.local:
            raise
        raise _hub_error(source, exc) from exc


def encode_with_model_tokenizer(model_path: str, text: str) -> list[int]:
    """`text`'s token ids with the tokenizer of the local model at `model_path`.

    Read with the `tokenizers` library from tokenizer.json where there is one
    (the same Rust tokenizer a transformers fast tokenizer wraps, without
    transformers' import), so a worker can tokenize its own fixed texts; a
    model without tokenizer.json goes through transformers.
    """
    path = Path(model_path) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        return list(Tokenizer.from_file(str(path)).encode(text).ids)
    tokenizer = load_tokenizer(ModelSource(model_path, model_path, True))
    return list(tokenizer(text)["input_ids"])


def _named_tokenizer_class(source: ModelSource) -> Any:
    """The tokenizer class a local directory's tokenizer_config.json names, or None.

    Taken from transformers' top level, which imports only that class's module.
    `AutoTokenizer` (and `tokenizer_class_from_name`, which lives beside it)
    first imports the config classes, and with them torch and transformers'
    modeling code, on every server start for a tokenizer that needs only its
    own files: loading the default model's tokenizer in a fresh interpreter took
    3.57 s that way and 0.97 s this way, torch never imported (ad-hoc timing
    on the 2-core AMD EPYC, torch capability AVX512, VNNI avx512_vnni; README,
    "Server start"). A name the top level lacks goes through the resolver.
    """
    config = Path(source.path) / "tokenizer_config.json"
    if not source.local or not config.is_file():
        return None
    try:
        settings = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    name = settings.get("tokenizer_class") if isinstance(settings, dict) else None
    if not isinstance(name, str) or "auto_map" in settings:
        return None  # no class named, or remote code: AutoTokenizer knows the rules
    import transformers

    try:
        named = getattr(transformers, name, None)
    except ImportError:  # its module needs a package this install lacks
        named = None
    if isinstance(named, type) and hasattr(named, "from_pretrained"):
        return named
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    return tokenizer_class_from_name(name)


def model_config(source: ModelSource) -> dict[str, Any]:
    """The model's config.json as a dict, without importing its config class.

    A local directory's is read as JSON: the engine reads it before spawning
    workers, and importing transformers there would delay them.
    """
    local = Path(source.path) / "config.json"
    if source.local and local.is_file():
        return json.loads(local.read_text())
    from transformers import PreTrainedConfig

    _offline_unless_reachable(source)
    try:
        config, _ = PreTrainedConfig.get_config_dict(source.path)
    except OSError as exc:
        if source.local:
            raise
        raise _hub_error(source, exc) from exc
    return config


def load_model(source: ModelSource, dtype: Any, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    except OSError as exc:
        if source.local:
            raise
        raise _hub_error(source, exc) from exc
    model.eval()
    model.requires_grad_(False)
    return model.to(torch.device(device))
