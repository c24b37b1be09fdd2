"""The quality gate: a worker proves the precision it is about to serve before it says ready.

Fast kernels differ by CPU, and a wrong one does not crash: it answers with
fluent-looking noise (int8 with full-range weights on an AVX2 CPU scored
perplexity 2819 against float32's 16). So every worker, before `WorkerReady`,
runs the candidate precision on a fixed probe (the first `PROBE_TOKENS` tokens
of quality_text.txt, teacher-forced) and compares it with float32 logits of
the same weights:

* perplexity ratio of the whole probe in one prefill (the many-row kernels)
  and of its first `DECODE_TOKENS` tokens fed one a step through the KV cache
  (the few-row kernels single-stream decoding runs), each at most
  `max_ppl_ratio` times float32's;
* top-1 agreement: the share of positions whose most likely next token is
  float32's, at least `min_top1`.

Cost: one float32 forward of the probe plus the candidate's prefill and
`DECODE_TOKENS` decode steps: 1.5-1.9 s for int8 with the default model on the
2-core AVX2 machine (worker logs of two server starts, and `DECODE_TOKENS=64` in
a gate timing run; float32 is the reference and is not gated),
and the float32 weights must fit beside the candidate's while loading (for a
large model on a GPU, twice its bf16 size; `--skip-quality-gate` skips it).
The float32 forward is needed once per model, torch and device: its scores
(`GateReference`, a few hundred numbers) are kept on disk beside the int8
calibration (`cached_reference`), so a restart runs only the candidate. That
forward took 0.46-0.68 s of a start for the default model on the 2-core AMD
EPYC (torch capability AVX512, VNNI avx512_vnni, and held to AVX2; timed in a
fresh interpreter, 2026-12-03).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from chatserver.models.llama_weights import LlamaWeights
from chatserver.workers.measurement_cache import cache_dir, model_fingerprint, write_atomically

QUALITY_TEXT = Path(__file__).with_name("quality_text.txt")
PROBE_TOKENS = 128
DECODE_TOKENS = 64
# Bump when GateReference's meaning changes (cached files of the old one are then ignored).
REFERENCE_VERSION = 2


@dataclass(frozen=True)
class GateBounds:
    max_ppl_ratio: float = 1.05
    min_top1: float = 0.85


@dataclass(frozen=True)
class GateResult:
    """What the gate measured for one candidate; crosses the process boundary in WorkerReady."""

    dtype: str
    kernels: str
    passed: bool
    ppl_ratio: float  # candidate / float32, whole probe in one prefill
    decode_ppl_ratio: float  # the same, one token a step
    top1_agreement: float
    seconds: float
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class QualityGateFailed(RuntimeError):
    """No candidate precision passed; the message names the measured figures."""


def probe_ids(tokenizer: Any) -> list[int]:
    """The probe's token ids from a transformers tokenizer."""
    return list(tokenizer(QUALITY_TEXT.read_text())["input_ids"][:PROBE_TOKENS])


def probe_from_files(model_path: str) -> list[int]:
    """The probe's token ids, tokenized by the worker itself (so the server can
    spawn it before loading its own tokenizer)."""
    from chatserver.models.loading import encode_with_model_tokenizer

    return encode_with_model_tokenizer(model_path, QUALITY_TEXT.read_text())[:PROBE_TOKENS]


@torch.inference_mode()
def reference_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """float32 logits of the probe, from float32 weights.

    Weights read without transformers (models/llama_weights.py) go through our
    own runner in float32, whose forward tests/test_runner.py holds to
    transformers'; a transformers model through its own forward.
    """
    if isinstance(model, LlamaWeights):
        from chatserver.workers.runner import LlamaRunner

        return LlamaRunner(model, len(ids), slots=1).sequence_logits(ids)
    return model(torch.tensor([ids], device=_device_of(model))).logits[0].float()


def _device_of(model: Any) -> torch.device:
    """Where the weights `reference_logits` takes (ours or a transformers model) live."""
    return model.device if isinstance(model, LlamaWeights) else next(model.parameters()).device


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return F.cross_entropy(logits.float(), targets).item()


@dataclass(frozen=True)
class GateReference:
    """All the gate needs of float32's logits on the probe: small enough to keep on disk."""

    nll: float  # mean negative log-likelihood of the whole probe
    decode_nll: float  # the same over its first DECODE_TOKENS targets
    top1: tuple[int, ...]  # float32's most likely next token at each position

    @classmethod
    def from_logits(cls, logits: torch.Tensor, ids: list[int]) -> GateReference:
        targets = torch.tensor(ids[1:], device=logits.device)
        return cls(
            nll=_nll(logits[:-1], targets),
            decode_nll=_nll(logits[:DECODE_TOKENS], targets[:DECODE_TOKENS]),
            top1=tuple(logits.argmax(-1).tolist()),
        )


def cached_reference(model: Any, model_path: str, ids: list[int]) -> GateReference:
    """float32's GateReference for this model's probe: read from cache_dir(), or
    computed (`reference_logits`) and kept there for the next start."""
    digest = hashlib.sha256(f"v{REFERENCE_VERSION};{json.dumps(ids)};".encode())
    digest.update(
        f"{model_fingerprint(model_path)};{torch.__version__};{_device_of(model)}".encode()
    )
    path = cache_dir() / f"gate-reference-{digest.hexdigest()[:32]}.json"
    try:
        cached = json.loads(path.read_text())
        reference = GateReference(cached["nll"], cached["decode_nll"], tuple(cached["top1"]))
        if len(reference.top1) == len(ids):
            return reference
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or a torn or foreign file: compute it
    reference = GateReference.from_logits(reference_logits(model, ids), ids)
    write_atomically(path, json.dumps(asdict(reference)).encode())
    return reference


def check(
    runner: Any,
    reference: GateReference,
    ids: list[int],
    dtype: str,
    kernels: str,
    bounds: GateBounds,
) -> GateResult:
    """Run the candidate runner on the probe and judge it against the float32 reference."""
    started = time.monotonic()
    prefill = runner.sequence_logits(ids)
    device = prefill.device
    targets = torch.tensor(ids[1:], device=device)
    decode_ids = ids[: DECODE_TOKENS + 1]
    decode = runner.sequence_logits(decode_ids[:-1], chunk=1).to(device)
    finite = bool(torch.isfinite(prefill).all() and torch.isfinite(decode).all())
    if finite:
        ppl_ratio = math.exp(_nll(prefill[:-1], targets) - reference.nll)
        decode_ratio = math.exp(_nll(decode, targets[:DECODE_TOKENS]) - reference.decode_nll)
        want = torch.tensor(reference.top1, device=device)
        agree = torch.cat([prefill.argmax(-1) == want, decode.argmax(-1) == want[:DECODE_TOKENS]])
        top1 = agree.float().mean().item()
    else:
        ppl_ratio = decode_ratio = math.inf
        top1 = 0.0
    problems = []
    if not finite:
        problems.append("non-finite logits")
    if ppl_ratio > bounds.max_ppl_ratio:
        problems.append(f"perplexity {ppl_ratio:.3f}x float32 > {bounds.max_ppl_ratio}")
    if decode_ratio > bounds.max_ppl_ratio:
        problems.append(f"decode perplexity {decode_ratio:.3f}x float32 > {bounds.max_ppl_ratio}")
    if top1 < bounds.min_top1:
        problems.append(f"top-1 agreement {top1:.3f} < {bounds.min_top1}")
    return GateResult(
        dtype=dtype,
        kernels=kernels,
        passed=not problems,
        ppl_ratio=round(ppl_ratio, 4),
        decode_ppl_ratio=round(decode_ratio, 4),
        top1_agreement=round(top1, 4),
        seconds=round(time.monotonic() - started, 2),
        reason="; ".join(problems),
    )
