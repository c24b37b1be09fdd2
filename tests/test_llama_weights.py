"""Weights read without transformers' modeling code must compute what transformers' model does.

Small random models written by transformers itself (save_pretrained, so
safetensors with its tensor names), one per rotary variant and bias layout
the reader handles; the runner built from either load must give identical
float32 logits. What the reader does not understand must come back None,
so that transformers loads it instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from chatserver.models.llama_weights import read_llama_weights
from chatserver.workers.runner import LlamaRunner

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=256,
)
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}


def write_model(directory: Path, config) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    return directory


def logits_both_ways(directory: Path, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    weights = read_llama_weights(directory, torch.float32)
    assert weights is not None, "the reader refused a model it handles"
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    native = LlamaRunner(weights, 128).sequence_logits(ids)
    through_transformers = LlamaRunner(model, 128).sequence_logits(ids)
    with torch.inference_mode():
        own_forward = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(native, own_forward, rtol=1e-4, atol=1e-4)
    return native, through_transformers


IDS = [5, 17, 250, 3, 99, 42, 7, 128, 64, 200] * 6  # past llama3's 32-position original context


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("tied", [True, False])
def test_llama_reads_as_transformers_loads_it(tmp_path: Path, rope: str, tied: bool) -> None:
    config = LlamaConfig(**TINY, rope_parameters=ROPES[rope], tie_word_embeddings=tied)
    native, reference = logits_both_ways(write_model(tmp_path, config), IDS)
    assert torch.equal(native, reference)


def test_qwen2_biases_are_read(tmp_path: Path) -> None:
    config = Qwen2Config(**TINY, tie_word_embeddings=True)
    directory = write_model(tmp_path, config)
    native, reference = logits_both_ways(directory, IDS)
    assert torch.equal(native, reference)
    weights = read_llama_weights(directory, torch.float32)
    assert weights is not None and weights.layers[0].qkv_bias is not None


def test_conversion_keeps_ties_and_the_original(tmp_path: Path) -> None:
    directory = write_model(tmp_path, LlamaConfig(**TINY, tie_word_embeddings=True))
    weights = read_llama_weights(directory, torch.float32)
    assert weights is not None and weights.lm_head is weights.embed
    half = weights.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.lm_head is half.embed
    assert half.layers[1].down.dtype == torch.bfloat16
    assert weights.dtype == torch.float32 and weights.layers[1].down.dtype == torch.float32


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_what_it_does_not_understand_is_left_to_transformers(tmp_path: Path) -> None:
    directory = write_model(tmp_path / "m", LlamaConfig(**TINY))
    assert read_llama_weights(directory, torch.float32) is not None
    assert read_llama_weights(tmp_path / "not-a-model", torch.float32) is None
    assert read_llama_weights("HuggingFaceTB/SmolLM2-135M-Instruct", torch.float32) is None

    edit_config(directory, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
    assert read_llama_weights(directory, torch.float32) is None  # a rotary variant not written out
    edit_config(directory, rope_parameters=ROPES["default"], model_type="gemma")
    assert read_llama_weights(directory, torch.float32) is None  # another architecture
    edit_config(directory, model_type="llama", mlp_bias=True)
    assert read_llama_weights(directory, torch.float32) is None

    # A tensor the runner would not use (an o_proj bias) means transformers loads it.
    edit_config(directory, mlp_bias=False)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(TINY["hidden_size"])
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    assert read_llama_weights(directory, torch.float32) is None


def test_sharded_checkpoints_are_read(tmp_path: Path) -> None:
    config = LlamaConfig(**TINY)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    native, reference = logits_both_ways(tmp_path, IDS[:12])
    assert torch.equal(native, reference)
