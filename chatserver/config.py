"""Settings: the one source of truth for configuration.

Every field is a CLI flag of ``chatserver serve`` and a ``CHATSERVER_<NAME>``
environment variable (flag > env > default). Defaults work on a laptop.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from chatserver.protocol.worker import CPU_ISA_CHOICES, INT8_KERNEL_CHOICES

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_DIR = Path(os.environ.get("CHATSERVER_MODELS_DIR", REPO_ROOT / "models"))
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

ENGINES = ("auto", "gpu", "pool", "ray", "thread", "inline")
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "int4")
LOG_FORMATS = ("text", "json")


_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_memory(text: str, total: int, auto_fraction: float = 0.25) -> int:
    """Bytes from '4GiB', '512MiB', '2e9', a fraction of `total` ('0.25'), or 'auto'."""
    value = text.strip().lower()
    if value == "auto":
        return int(total * auto_fraction)
    match = re.fullmatch(r"([0-9.e+]+)\s*([kmgt]i?)?b?", value)
    if match is None:
        raise ValueError(f"not a memory size: {text!r} (say 4GiB, 512MiB, 2e9 or 0.25)")
    amount, unit = float(match.group(1)), match.group(2) or ""
    if not unit and amount <= 1.0:
        return int(total * amount)
    return int(amount * _UNITS[unit])


def _env_name(name: str) -> str:
    return "CHATSERVER_" + name.upper()


@dataclass
class Settings:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=8080, metadata={"help": "TCP port (0 picks a free one)"})
    model: str = field(
        default="default",
        metadata={"help": "'default', a local Hugging Face model directory, or a hub id"},
    )
    models_dir: str = field(
        default=str(DEFAULT_MODELS_DIR), metadata={"help": "where converted models live"}
    )
    engine: str = field(
        default="auto",
        metadata={
            "help": "where inference runs: auto (gpu worker on CUDA, else the measured best "
            "CPU setup), gpu (one batching worker process per device), pool (CPU worker "
            "processes), ray (workers as Ray actors, local or on a cluster: --ray-*), "
            "thread / inline (demonstrations only)",
            "choices": ENGINES,
        },
    )
    workers: int = field(
        default=0, metadata={"help": "worker processes for --engine pool (0: fit the cores)"}
    )
    ray_address: str = field(
        default="",
        metadata={
            "help": "--engine ray: the Ray cluster to join, its head's address (host:6379) or "
            "auto (the cluster `ray start` joined this machine to); empty: start a local "
            "Ray instance for this server. Not Ray Client (ray://host:10001): it cannot "
            "run the streaming actor calls the workers report through"
        },
    )
    ray_share: str = field(
        default="",
        metadata={
            "help": "--engine ray with --ray-address: share the cluster's workers with every "
            "instance passing the same NAME (letters, digits, . _ -): worker i is the "
            "detached actor chatserver-share-NAME-worker-i, created by the first instance "
            "and attached by the others (same --model, --dtype, --max-context), each with "
            "its own output stream and sequences; a stopping or vanished instance (10 s "
            "lease) detaches, the workers stay. Empty: this instance's own workers"
        },
    )
    ray_workers: int = field(default=1, metadata={"help": "--engine ray: worker actors"})
    ray_cpus_per_worker: float = field(
        default=0.0,
        metadata={
            "help": "--engine ray: CPUs each worker actor reserves (its torch threads); "
            "0: this machine's cores / --ray-workers"
        },
    )
    ray_gpus_per_worker: float = field(
        default=0.0,
        metadata={
            "help": "--engine ray: GPUs each worker actor reserves (0.5: two share one); "
            "0: CPU actors"
        },
    )
    device: str = field(
        default="auto", metadata={"help": "torch device for workers: auto, cpu, cuda, cuda:N"}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "weights: auto (the fastest precision for this device and CPU that "
            "passes the quality gate: int4, then int8, then bfloat16 "
            "where the CPU has native bf16, then float32; bfloat16 on CUDA; see README "
            "Precision), float32, bfloat16, float16, int8, int4 (4-bit weights in C "
            "kernels built here with gcc for steps of a few rows, int8 for wider ones; "
            "int8 and int4 CPU only, bfloat16 on CUDA). An explicit dtype that fails "
            "the quality gate stops the server",
            "choices": DTYPES,
        },
    )
    int8_kernels: str = field(
        default="auto",
        metadata={
            "help": "int8 kernel variant: auto (from the CPU's features), vnni (full-range "
            "int8 weights; needs VNNI, noise without it), avx2 (7-bit weights, any x86 CPU)",
            "choices": INT8_KERNEL_CHOICES,
        },
    )
    cpu_isa: str = field(
        default="native",
        metadata={
            "help": "instructions the workers' kernels may use: native (all this CPU has), "
            "avx2 (compute as an AVX2-only CPU does: its kernels and int8 precision, this "
            "CPU's speed; for testing the AVX2 paths, see README Precision)",
            "choices": CPU_ISA_CHOICES,
        },
    )
    batch_invariant: bool = field(
        default=False,
        metadata={
            "help": "CPU: compute every step in the int4 C kernels, a few rows a call, so a "
            "reply's bits do not depend on what shares its batch, on the prefix cache, or "
            "on the x86 CPU (greedy replies reproducible); slower at many streams and in "
            "prefill (README Precision). Needs --dtype auto or int4 and gcc"
        },
    )
    skip_quality_gate: bool = field(
        default=False,
        metadata={
            "help": "serve the chosen precision without checking it against float32 first "
            "(saves ~1 s per worker start; see README Precision)"
        },
    )
    quality_max_ppl_ratio: float = field(
        default=1.05,
        metadata={
            "help": "quality gate: highest probe perplexity allowed, as a multiple of float32's"
        },
    )
    quality_min_top1: float = field(
        default=0.85,
        metadata={
            "help": "quality gate: lowest share of probe positions whose top token is float32's"
        },
    )
    max_batch: int = field(
        default=64, metadata={"help": "most sequences one worker decodes together (1: no batching)"}
    )
    max_running: int = field(
        default=0,
        metadata={
            "help": "most sequences one worker decodes at once (0: --max-batch); admitted "
            "requests beyond the running slots wait in the queue"
        },
    )
    max_queue: int = field(
        default=-1,
        metadata={
            "help": "requests that may wait for a running slot, across workers (-1: twice the "
            "running slots); beyond it requests get 503 server_busy with Retry-After"
        },
    )
    request_timeout: float = field(
        default=300.0,
        metadata={
            "help": "seconds a request may spend queued and generating before it is stopped "
            "and the client told request_timeout (0: no limit)"
        },
    )
    worker_stall_timeout: float = field(
        default=30.0,
        metadata={
            "help": "seconds a worker with work may go without finishing a step before it "
            "is killed and restarted (its clients get worker_failed); 0: never"
        },
    )
    worker_restart_delay: float = field(
        default=1.0,
        metadata={
            "help": "seconds before restarting a worker that died more than twice within a "
            "minute; doubles with each further death, up to 30 s"
        },
    )
    shutdown_timeout: float = field(
        default=10.0,
        metadata={
            "help": "seconds the whole shutdown may take (WebSockets closed together, running "
            "replies given up to half of it to finish); a second SIGTERM exits at once"
        },
    )
    keepalive_interval: float = field(
        default=15.0,
        metadata={
            "help": "seconds of silence after which a streaming (SSE) reply gets a keep-alive "
            "comment, so proxies keep a queued request's connection open"
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the worker's norm/projection/MLP pieces (off: measured "
            "slower on CPU, see README Precision; untested on CUDA)"
        },
    )
    max_context: int = field(
        default=4096, metadata={"help": "context length cap in tokens (model's own if smaller)"}
    )
    kv_cache_memory: str = field(
        default="auto",
        metadata={
            "help": "KV cache budget of all workers together: bytes (4GiB, 512MiB, 2e9), a "
            "fraction of RAM (CPU) or of GPU memory (0.25), or auto (a quarter of RAM on CPU, "
            "0.4 of each GPU's memory); fixed at start, it bounds the slots (running "
            "sequences plus retained conversation prefixes)"
        },
    )
    prefix_cache: bool = field(
        default=True,
        metadata={
            "help": "keep finished sequences' keys/values and reuse the longest cached prefix "
            "of a new prompt (a session's history, a shared system prompt)"
        },
    )
    prefill_chunk: int = field(
        default=256,
        metadata={
            "help": "most prompt tokens prefilled in one step, so running streams never stall"
        },
    )
    threads_per_worker: int = field(
        default=0, metadata={"help": "torch threads in each worker (0: cores / workers)"}
    )
    redis_url: str = field(
        default="", metadata={"help": "redis:// URL for sessions; empty: in-process store"}
    )
    redis_prefix: str = field(
        default="chatserver:",
        metadata={
            "help": "prefix of every Redis key (sessions, rate limits), so that several "
            "deployments can share one Redis"
        },
    )
    redis_timeout: float = field(
        default=2.0,
        metadata={
            "help": "seconds a Redis command (or connection) may take before the session "
            "store counts as unavailable: a stalled Redis fails requests, never hangs them"
        },
    )
    session_ttl: int = field(
        default=86400, metadata={"help": "seconds a session lives after its last use"}
    )
    max_history_messages: int = field(
        default=200,
        metadata={
            "help": "messages a session keeps at most; a turn that would pass it drops the "
            "oldest turns down to three quarters of it (0: no cap)"
        },
    )
    system_prompt: str = field(
        default="You are a helpful assistant.",
        metadata={"help": "system prompt put first in every session's prompt"},
    )
    default_max_tokens: int = field(
        default=256, metadata={"help": "max_tokens when a request gives none"}
    )
    max_body_bytes: int = field(
        default=1 << 20, metadata={"help": "largest HTTP request body accepted"}
    )
    max_frame_bytes: int = field(
        default=64 << 10, metadata={"help": "largest WebSocket text frame accepted"}
    )
    ws_rate: float = field(
        default=20.0, metadata={"help": "messages per second accepted on one WebSocket"}
    )
    ws_queue: int = field(
        default=16, metadata={"help": "chat messages queued on one WebSocket before refusing"}
    )
    ws_heartbeat: float = field(
        default=30.0, metadata={"help": "seconds between WebSocket keepalive pings"}
    )
    ws_resume_grace: float = field(
        default=0.0,
        metadata={
            "help": "seconds a /ws reply keeps generating after its socket closes, for the "
            "client to resume it from another socket (any server on --redis-url); a reply "
            "nobody resumes within it is cancelled. 0: a closed socket cancels its reply at once"
        },
    )
    live_ttl: float = field(
        default=300.0,
        metadata={
            "help": "seconds a session's live channel (its replies' frames, for other sockets "
            "on the session and for resume) is kept after its last frame"
        },
    )
    rate_limit: int = field(
        default=0,
        metadata={
            "help": "requests per minute one client (its address) may make; over it: 429 "
            "rate_limited. Shared by all servers on --redis-url. 0: no limit"
        },
    )
    token_rate_limit: int = field(
        default=0,
        metadata={
            "help": "generated tokens per minute one client may spend; a client over it "
            "is refused (429 rate_limited) until it is back under. 0: no limit"
        },
    )
    cors_origin: str = field(
        default="",
        metadata={
            "help": "comma-separated web origins (scheme://host[:port]) whose pages may use "
            "this server from a browser; the server's own origin always may"
        },
    )
    api_key: list[str] = field(
        default_factory=list,
        repr=False,  # keys stay out of logs and tracebacks
        metadata={
            "help": "an API key clients must send (repeat the flag for several; the env var "
            "takes them comma-separated); with any key set, every route but the page, "
            "/healthz, /readyz and /metrics needs one (README Authentication)",
            "repeatable": True,
        },
    )
    api_keys_file: str = field(
        default="",
        metadata={
            "help": "file of API keys, one a line, optionally 'name:key'; re-read on SIGHUP. "
            "Keys are required once this is set, even while the file lists none"
        },
    )
    metrics_auth: bool = field(
        default=False, metadata={"help": "/metrics needs an API key too (when keys are set)"}
    )
    tokenizer_threads: int = field(
        default=4, metadata={"help": "threads for tokenizing, templating and detokenizing"}
    )
    log_level: str = field(default="info", metadata={"help": "debug, info, warning, error"})
    log_format: str = field(
        default="text",
        metadata={
            "help": "server log lines as text, or json (one object a line: time, level, "
            "logger, message, request_id)",
            "choices": LOG_FORMATS,
        },
    )

    def kv_cache_budget(self, device_bytes: int, workers: int, gpu: bool = False) -> int:
        """Bytes of KV cache for each of `workers` sharing a device of `device_bytes`."""
        auto = 0.4 if gpu else 0.25  # a GPU worker's device holds little besides
        return parse_memory(self.kv_cache_memory, device_bytes, auto) // max(1, workers)

    def check_ray(self) -> None:
        """Refuse Ray settings that cannot work, at startup, saying why (ValueError)."""
        if self.ray_address.startswith("ray://"):
            raise ValueError(
                f"--ray-address {self.ray_address}: Ray Client (ray://) is not supported: it "
                "does not run streaming actor methods (num_returns='streaming'), which the "
                "workers report their steps through; give the head's GCS address (host:6379) "
                "and run the server on a cluster node, or one that reaches every node"
            )
        if self.ray_share and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.ray_share):
            raise ValueError(
                f"--ray-share {self.ray_share!r}: use 1 to 64 letters, digits, '.', '_' or '-'"
            )
        if self.ray_share and not self.ray_address:
            raise ValueError(
                "--ray-share needs --ray-address: without it each instance starts a Ray "
                "of its own, with nothing to share"
            )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one --flag per field; the env var is the default, so flags win."""
        for f in dataclasses.fields(cls):
            env = _env_name(f.name)
            flag = "--" + f.name.replace("_", "-")
            typ = f.type if isinstance(f.type, type) else eval(f.type)  # noqa: S307
            raw = os.environ.get(env)
            if f.metadata.get("repeatable"):
                # Flags replace the env var's list rather than add to it (from_namespace).
                parser.add_argument(
                    flag,
                    action="append",
                    default=None,
                    dest=f.name,
                    help=f"{f.metadata.get('help', '')} [env {env}, default none]",
                )
                continue
            if typ is bool:
                default = f.default if raw is None else raw.lower() in ("1", "true", "yes", "on")
            else:
                default = f.default if raw is None else typ(raw)
            kwargs: dict = {
                "type": typ,
                "default": default,
                "dest": f.name,
                "help": f"{f.metadata.get('help', '')} [env {env}, default {f.default!r}]",
            }
            if typ is bool:
                del kwargs["type"]
                kwargs["action"] = argparse.BooleanOptionalAction
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            parser.add_argument(flag, **kwargs)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> Settings:
        values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            if f.metadata.get("repeatable") and values[f.name] is None:
                raw = os.environ.get(_env_name(f.name), "")
                values[f.name] = [item.strip() for item in raw.split(",") if item.strip()]
        return cls(**values)

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Settings from CHATSERVER_* variables, then keyword overrides (used by tests)."""
        parser = argparse.ArgumentParser()
        cls.add_arguments(parser)
        settings = cls.from_namespace(parser.parse_args([]))
        return dataclasses.replace(settings, **overrides)
