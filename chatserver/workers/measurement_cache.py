"""What workers measure at load, kept on disk so the next start of the same model reads it.

Two measurements use it: the int8-avx2 down_proj calibration (calibration.py)
and the quality gate's float32 reference (quality_gate.cached_reference). Each
keys its files by what the measurement depends on; `model_fingerprint` is the
model's part of that key.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "CHATSERVER_CACHE_DIR"


def cache_dir() -> Path:
    """$CHATSERVER_CACHE_DIR, else chatserver/calibration under $XDG_CACHE_HOME or ~/.cache."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chatserver" / "calibration"


def model_fingerprint(model_path: str) -> str:
    """The model's directory and its files by name, size and modification time (hashing
    gigabytes of weights at every start would cost more than it saves)."""
    model_dir = Path(model_path)
    parts = [str(model_dir.resolve())]
    for path in sorted(model_dir.iterdir()) if model_dir.is_dir() else ():
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin", ".model"):
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return ";".join(parts)


def write_atomically(path: Path, data: bytes) -> None:
    """Written whole or not at all (a server's workers may race to one file); a
    cache that cannot be written only costs the next start the measurement."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)
    except OSError as exc:
        log.warning("not cached at %s: %s", path, exc)
