"""A Llama-family checkpoint's tensors, read from its safetensors without transformers' modeling code.

The worker's own runner (workers/runner.py) needs the weights and the rotary
frequencies, not an `nn.Module`. Building the module costs each worker start
its import (modeling code, `torch.distributed.tensor`, ...) and an
initialisation. On the 2-core AMD EPYC (torch capability AVX2, no VNNI),
importing AutoModelForCausalLM took 1.7-2.0 s and from_pretrained another 3.1 s;
safetensors' load_file took 0.02-0.14 s for the same file (two runs of
an ad-hoc timing script, 2026-12-02). `python -m load_tests.startup` times
the whole start.

`read_llama_weights` returns None for anything it does not understand: another
architecture, a rotary variant not written out below, a `.bin` checkpoint, or
a tensor it would not use (an o_proj bias, say). Then transformers loads the
model as before, so nothing that worked stops working; it only starts slower.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

# model_type -> the runner computes it exactly (silu MLP, RMSNorm, full attention).
NATIVE_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Qwen2 always has q/k/v biases; Llama only with attention_bias.
LAYER_TENSORS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
QKV_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")


@dataclass(frozen=True)
class LlamaShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float


@dataclass
class LlamaLayer:
    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    qkv_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


@dataclass
class LlamaWeights:
    """Everything LlamaRunner reads, whether from safetensors or from a transformers model."""

    shape: LlamaShape
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list[LlamaLayer]
    # positions -> (cos, sin), each [positions, head_dim] float32, as the model defines them.
    rotary: Callable[[int], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def to(self, dtype: torch.dtype) -> LlamaWeights:
        """A copy in `dtype` (norm weights included, as `model.to(dtype)` converts them)."""

        def conv(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype)

        tied = self.lm_head is self.embed
        embed = conv(self.embed)
        layers = [
            replace(
                layer,
                **{
                    f.name: conv(getattr(layer, f.name))
                    for f in fields(layer)
                    if f.name != "qkv_bias"
                },
                qkv_bias=None if layer.qkv_bias is None else tuple(conv(b) for b in layer.qkv_bias),  # type: ignore[arg-type]
            )
            for layer in self.layers
        ]
        return replace(
            self,
            embed=embed,
            final_norm=conv(self.final_norm),
            lm_head=embed if tied else conv(self.lm_head),
            layers=layers,
        )

    @classmethod
    def from_model(cls, model: Any) -> LlamaWeights:
        """The weights of a loaded transformers Llama-family model (tests, random models)."""
        cfg, inner = model.config, model.model
        num_heads = cfg.num_attention_heads
        shape = LlamaShape(
            num_layers=cfg.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads,
            rms_norm_eps=cfg.rms_norm_eps,
        )
        layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            bias = None
            if attn.q_proj.bias is not None:
                bias = (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)
            layers.append(
                LlamaLayer(
                    layer.input_layernorm.weight,
                    attn.q_proj.weight,
                    attn.k_proj.weight,
                    attn.v_proj.weight,
                    attn.o_proj.weight,
                    layer.post_attention_layernorm.weight,
                    mlp.gate_proj.weight,
                    mlp.up_proj.weight,
                    mlp.down_proj.weight,
                    bias,
                )
            )

        def rotary(positions: int) -> tuple[torch.Tensor, torch.Tensor]:
            # The model's own rotary module: every variant it knows comes out as it defines it.
            device = inner.embed_tokens.weight.device
            probe = torch.zeros(1, 1, shape.head_dim, device=device, dtype=torch.float32)
            cos, sin = inner.rotary_emb(probe, torch.arange(positions, device=device)[None])
            return cos[0].float(), sin[0].float()

        return cls(
            shape,
            inner.embed_tokens.weight,
            inner.norm.weight,
            model.lm_head.weight,
            layers,
            rotary,
        )


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes `rope_parameters`; older configs `rope_theta` and `rope_scaling`."""
    if isinstance(config.get("rope_parameters"), dict):
        params = dict(config["rope_parameters"])
    else:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def rope_inv_freq(config: dict[str, Any], head_dim: int) -> torch.Tensor | None:
    """Inverse frequencies as transformers' `ROPE_INIT_FUNCTIONS` computes them, or None
    for a variant written out nowhere here (dynamic, yarn, longrope: transformers loads those).
    """
    params = _rope_parameters(config)
    if params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        return None
    rope_type = params["rope_type"]
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_context = float(
            params.get("original_max_position_embeddings")
            or config["original_max_position_embeddings"]
        )
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return None


def rotary_tables(inv_freq: torch.Tensor) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """cos and sin per position, computed the way transformers' rotary module does (float32)."""

    def tables(positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        # An outer product by matmul, as transformers computes it (one product a cell).
        freqs = (inv_freq[:, None] @ torch.arange(positions, dtype=torch.float32)[None, :]).T
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    return tables


def _checkpoint_files(directory: Path) -> list[Path] | None:
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    return None


def read_llama_weights(
    directory: str | Path, dtype: torch.dtype, device: str = "cpu"
) -> LlamaWeights | None:
    """The checkpoint in `directory` as LlamaWeights in `dtype` on `device`, or None
    (see the module doc; also for a hub id, which is no directory).
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        return None
    config = json.loads((directory / "config.json").read_text())
    model_type = config.get("model_type", "")
    if (
        model_type not in NATIVE_MODEL_TYPES
        or config.get("hidden_act", "silu") != "silu"
        or config.get("sliding_window") is not None
        and (model_type == "mistral" or config.get("use_sliding_window"))
        or config.get("mlp_bias", False)
    ):
        return None
    files = _checkpoint_files(directory)
    num_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
    inv_freq = rope_inv_freq(config, head_dim)
    if files is None or inv_freq is None:
        return None
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_file(str(path)))

    def take(name: str) -> torch.Tensor:
        return tensors.pop(name).to(device=device, dtype=dtype)

    shape = LlamaShape(
        num_layers=config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
    )
    try:
        layers = []
        for i in range(shape.num_layers):
            prefix = f"model.layers.{i}."
            bias = None
            if prefix + QKV_BIASES[0] in tensors:
                bias = tuple(take(prefix + name) for name in QKV_BIASES)
            layers.append(LlamaLayer(*(take(prefix + name) for name in LAYER_TENSORS), bias))  # type: ignore[arg-type]
        embed = take("model.embed_tokens.weight")
        final_norm = take("model.norm.weight")
        # transformers' Llama, Mistral and Qwen2 configs default to untied.
        if config.get("tie_word_embeddings", False):
            tensors.pop("lm_head.weight", None)
            lm_head = embed
        else:
            lm_head = take("lm_head.weight")
    except KeyError:
        return None
    leftovers = [name for name in tensors if not name.endswith("rotary_emb.inv_freq")]
    if leftovers:
        return None  # something the runner would silently ignore
    return LlamaWeights(shape, embed, final_norm, lm_head, layers, rotary_tables(inv_freq))
