"""What `--device auto` means on this machine, answered without importing torch where it can be.

The server resolves the device before it spawns its workers, and importing
torch to ask `torch.cuda.is_available()` held every start back by the import
(about 1.5 s on the 2-core AMD EPYC, torch capability AVX512, VNNI
avx512_vnni; `python -X importtime` of a `chatserver serve` start). A torch
built without CUDA or ROCm (the CPU wheel this project pins) can never see a
GPU, and says so in the plain `torch/version.py` it ships; only a GPU build
is asked at run time.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path


def torch_gpu_build() -> bool:
    """True unless torch's version.py says it was built without CUDA and without ROCm."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return False  # no torch here: nothing can run on a GPU
    try:
        tree = ast.parse((Path(spec.origin).parent / "version.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return True  # unreadable: let torch itself answer
    built: dict[str, object] = {}
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id in ("cuda", "hip"):
            value = getattr(node, "value", None)
            built[target.id] = value.value if isinstance(value, ast.Constant) else "?"
    if set(built) != {"cuda", "hip"}:
        return True  # a layout we do not know: let torch answer
    return any(v is not None for v in built.values())


def resolve_device(device: str) -> str:
    """`auto` -> "cuda" when a GPU is usable, else "cpu"; any other name as given."""
    if device != "auto":
        return device
    if not torch_gpu_build():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
