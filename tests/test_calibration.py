"""workers/calibration.py: down_proj's input ranges, measured on the real model and kept on disk."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from chatserver.models.llama_weights import read_llama_weights
from chatserver.workers import calibration, cpu_features, measurement_cache
from chatserver.workers.calibration import DownCalibration
from chatserver.workers.precision import int8_kernels
from chatserver.workers.quality_gate import QUALITY_TEXT
from chatserver.workers.runner import LlamaRunner

AVX2_KERNELS = int8_kernels(cpu_features.detect(), "avx2")


@pytest.fixture(scope="module")
def float_runner(model_dir: Path) -> LlamaRunner:
    weights = read_llama_weights(model_dir, torch.float32)
    assert weights is not None
    return LlamaRunner(weights, 1024, slots=1)


def test_only_kernels_that_smooth_down_proj_calibrate() -> None:
    assert AVX2_KERNELS.smooths_down
    assert not int8_kernels(cpu_features.detect(), "vnni").smooths_down


def test_the_calibration_text_is_not_the_quality_gates_probe(model_dir: Path) -> None:
    """The gate judges the kernels on text they were not calibrated on."""
    ids = calibration.calibration_ids(str(model_dir))
    assert 256 <= len(ids) <= calibration.CALIBRATION_TOKENS
    probe_words = set(QUALITY_TEXT.read_text().split())
    words = calibration.CALIBRATION_TEXT.read_text().split()
    shared = [w for w in words if w in probe_words and len(w) > 6]
    assert len(shared) < len(words) / 20, shared


def test_measured_once_then_read_back(model_dir: Path, float_runner, tmp_path: Path) -> None:
    measured: list[list[torch.Tensor]] = []

    def measure(ids: list[int]) -> list[torch.Tensor]:
        measured.append(float_runner.down_input_maxima(ids))
        return measured[-1]

    cache_file = tmp_path / "cache" / "calibration.pt"
    first = DownCalibration(str(model_dir), cache_file).input_maxima(measure)
    assert cache_file.is_file() and len(measured) == 1
    assert len(first) == float_runner.num_layers
    assert all(m.shape == (float_runner.intermediate,) and bool((m > 0).all()) for m in first)
    again = DownCalibration(str(model_dir), cache_file).input_maxima(measure)
    assert len(measured) == 1  # read back, not measured
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # A torn file is measured again (and rewritten), never served.
    cache_file.write_bytes(b"not a tensor file")
    repaired = DownCalibration(str(model_dir), cache_file).input_maxima(measure)
    assert len(measured) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, repaired, strict=True))
    # Without a cache file it measures every time.
    DownCalibration(str(model_dir), None).input_maxima(measure)
    assert len(measured) == 3


def test_the_cache_key_follows_the_model_files_and_the_kernels(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    key = calibration.cache_key(str(model), AVX2_KERNELS)
    assert calibration.cache_key(str(model), AVX2_KERNELS) == key
    other = dataclasses.replace(AVX2_KERNELS, weight_max=31)
    assert calibration.cache_key(str(model), other) != key
    stat = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert calibration.cache_key(str(model), AVX2_KERNELS) != key


def test_the_cache_lives_where_chatserver_cache_dir_says(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(measurement_cache.CACHE_DIR_ENV, str(tmp_path))
    calib = calibration.for_model(str(model_dir), AVX2_KERNELS)
    assert calib.cache_file is not None and calib.cache_file.parent == tmp_path
    monkeypatch.delenv(measurement_cache.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert measurement_cache.cache_dir() == tmp_path / "xdg" / "chatserver" / "calibration"


def test_a_cached_calibration_builds_the_same_int8_runner(model_dir: Path, tmp_path: Path) -> None:
    """Read back or measured, the smoothed kernels compute the same logits."""
    weights = read_llama_weights(model_dir, torch.float32)
    calib = DownCalibration(str(model_dir), tmp_path / "c.pt")
    ids = calibration.calibration_ids(str(model_dir))[:40]
    logits = []
    for _ in range(2):
        runner = LlamaRunner(weights, 256, slots=1, int8=AVX2_KERNELS, calibration=calib)
        logits.append(runner.sequence_logits(ids))
    assert (tmp_path / "c.pt").is_file()
    assert torch.equal(logits[0], logits[1])
