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
the same model reads it back instead (measurement_cache.py).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from chatserver.models.loading import encode_with_model_tokenizer
from chatserver.workers.cpu_features import isa_limit
from chatserver.workers.kernels import Int8Kernels
from chatserver.workers.measurement_cache import cache_dir, model_fingerprint, write_atomically

log = logging.getLogger(__name__)

CALIBRATION_TEXT = Path(__file__).with_name("calibration_text.txt")
CALIBRATION_TOKENS = 512
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
            data = io.BytesIO()
            torch.save([m.cpu() for m in maxima], data)
            write_atomically(self.cache_file, data.getvalue())
        return maxima


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
