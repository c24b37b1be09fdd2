"""The text int8 runners calibrate on: where each layer's down_proj input has its outliers.

down_proj's inputs carry a few channels far wider than the rest, which
per-tensor int8 activations cannot represent together with the others. The
int8-avx2 runner moves that range into the weights (kernels.DownProjLinear),
and for that it needs each input channel's largest magnitude, measured by one
prefill of this text at load (LlamaRunner.down_input_maxima).

The text is its own, not the quality gate's probe (quality_text.txt), so the
gate judges the int8 kernels on text they were not calibrated on; it mixes
the kinds of input a chat server sees (dialogue, code, prose, a list).

The measurement (0.5-0.9 s of a worker's start on the 2-core AMD EPYC held
to AVX2, torch capability AVX512, VNNI avx512_vnni) is kept on disk, keyed by
everything it depends on (the text, the model's files by name, size and
modification time, the kernels, torch and the CPU's limit), so a restart of
the same model reads it back instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from chatserver.models.loading import encode_with_model_tokenizer
from chatserver.workers.cpu_features import isa_limit
from chatserver.workers.kernels import Int8Kernels

log = logging.getLogger(__name__)

CALIBRATION_TEXT = Path(__file__).with_name("calibration_text.txt")
CALIBRATION_TOKENS = 512
CACHE_DIR_ENV = "CHATSERVER_CACHE_DIR"
# Bump when what is measured changes meaning (cached files of the old one are then ignored).
MEASUREMENT_VERSION = 1


def calibration_ids(model_path: str) -> list[int]:
    """The calibration text's token ids with the model's own tokenizer."""
    ids = encode_with_model_tokenizer(model_path, CALIBRATION_TEXT.read_text())
    return ids[:CALIBRATION_TOKENS]


@dataclass(frozen=True)
class DownCalibration:
    """Where an int8 runner gets down_proj's input ranges: measured, or read back."""

    model_path: str
    cache_file: Path | None  # None: measure at every load

    def input_maxima(
        self, measure: Callable[[list[int]], list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        """The cached maxima, or `measure(calibration ids)`'s, then kept for next time."""
        if self.cache_file is not None and self.cache_file.is_file():
            try:
                maxima = torch.load(self.cache_file, weights_only=True)
                if isinstance(maxima, list) and all(isinstance(m, torch.Tensor) for m in maxima):
                    return maxima
            except Exception as exc:  # a torn or foreign file: measure again
                log.warning("calibration cache %s unreadable (%s); measuring", self.cache_file, exc)
        maxima = measure(calibration_ids(self.model_path))
        if self.cache_file is not None:
            self._store(self.cache_file, maxima)
        return maxima

    @staticmethod
    def _store(path: Path, maxima: list[torch.Tensor]) -> None:
        """Written whole or not at all (workers of one server may race to it)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
                torch.save([m.cpu() for m in maxima], tmp)
            os.replace(tmp.name, path)
        except OSError as exc:
            log.warning("calibration not cached at %s: %s", path, exc)


def cache_dir() -> Path:
    """$CHATSERVER_CACHE_DIR, else chatserver/calibration under $XDG_CACHE_HOME or ~/.cache.

    It also holds the quality gate's float32 reference (quality_gate.cached_reference).
    """
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chatserver" / "calibration"


def model_fingerprint(model_path: str) -> str:
    """The model's directory and its files by name, size and modification time: what a
    measurement at load is keyed by (hashing gigabytes of weights would cost more)."""
    model_dir = Path(model_path)
    parts = [str(model_dir.resolve())]
    for path in sorted(model_dir.iterdir()) if model_dir.is_dir() else ():
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin", ".model"):
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return ";".join(parts)


def cache_key(model_path: str, kernels: Int8Kernels) -> str:
    """A digest of everything the measured maxima depend on."""
    digest = hashlib.sha256(f"v{MEASUREMENT_VERSION};".encode())
    digest.update(CALIBRATION_TEXT.read_bytes())
    digest.update(model_fingerprint(model_path).encode())
    digest.update(f";{kernels};{torch.__version__};{isa_limit()}".encode())
    return digest.hexdigest()[:32]


def for_model(model_path: str, kernels: Int8Kernels) -> DownCalibration:
    """The calibration of this local model for these kernels, cached in cache_dir()."""
    return DownCalibration(model_path, cache_dir() / f"{cache_key(model_path, kernels)}.pt")
