"""Model resolution (default, local directory, hub id) and the generic runner."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatserver.models.loading import ModelNotFound, load_tokenizer, resolve_model
from chatserver.models.prompt import render
from chatserver.protocol.worker import GenerateRequest, SamplingParams, WorkerConfig
from chatserver.workers.core import WorkerCore
from chatserver.workers.runner import HFRunner


def test_default_and_local_directory_resolve_to_the_same_files(model_dir: Path):
    default = resolve_model("default", model_dir.parent, model_dir.name)
    local = resolve_model(str(model_dir), "/unused", "unused")
    assert default.local and local.local
    assert Path(default.path).resolve() == Path(local.path) == model_dir.resolve()
    assert local.model_id == model_dir.name


def test_bad_local_paths_are_clear_errors(tmp_path: Path, model_dir: Path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model(str(tmp_path / "missing"), tmp_path, "x")
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(str(tmp_path), tmp_path, "x")
    with pytest.raises(ModelNotFound, match="models fetch"):
        resolve_model("default", tmp_path, "absent")


def test_the_server_tokenizer_is_autotokenizers_without_its_imports(model_dir: Path, tmp_path):
    """load_tokenizer takes the class tokenizer_config.json names from transformers' top
    level (AutoTokenizer's module imports torch: README, "Server start"); it must be the
    tokenizer AutoTokenizer gives, and a name the top level lacks must still load."""
    auto = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "Héllo, 世界! 3.14 <tag>"}]
    text = messages[0]["content"] + " and more"

    def same_as_auto(tok) -> None:
        assert tok(text)["input_ids"] == auto(text)["input_ids"]
        assert render(tok, messages) == render(auto, messages)
        assert tok.eos_token_id == auto.eos_token_id

    ours = load_tokenizer(resolve_model(str(model_dir), "/unused", "unused"))
    assert type(ours) is type(auto)
    same_as_auto(ours)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for f in model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, renamed / f.name)
    config = json.loads((renamed / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "NoSuchTokenizerClass"
    (renamed / "tokenizer_config.json").write_text(json.dumps(config))
    same_as_auto(load_tokenizer(resolve_model(str(renamed), "/unused", "unused")))


def test_hub_id_without_a_hub_fails_fast_with_a_clear_message():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatserver",
            "serve",
            "--port",
            "0",
            "--model",
            "example-org/no-such-model",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "could not load 'example-org/no-such-model'" in result.stderr


def test_generic_runner_matches_generate(model_dir: Path):
    """Architectures we have no fast path for run through the stock forward."""
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = WorkerConfig(str(model_dir), "m", "cpu", "float32", 512, 4, 256, 2)
    core = WorkerCore(0, config, HFRunner(model, 512))
    prompts = [
        render(tokenizer, [{"role": "user", "content": q}]) for q in ("Say hello.", "Name a color.")
    ]
    for i, ids in enumerate(prompts):
        core.submit(GenerateRequest(i, ids, SamplingParams(max_tokens=12, stop_token_ids=(2,))))
    outputs: dict[int, list[int]] = {0: [], 1: []}
    while core.has_work:
        for seq_id, token in core.step().tokens:
            outputs[seq_id].append(token)
    for i, ids in enumerate(prompts):
        with torch.inference_mode():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        expected = ref[0, len(ids) :].tolist()
        if 2 in expected:  # generate pads after the end-of-turn token
            expected = expected[: expected.index(2) + 1]
        assert outputs[i] == expected
    assert not core.runner.caches  # finished sequences free their caches


def test_dtype_flag_accepts_every_documented_precision():
    from chatserver.config import DTYPES, Settings

    assert set(DTYPES) == {"auto", "float32", "bfloat16", "float16", "int8", "int4"}
    assert Settings.from_env(dtype="int8").dtype == "int8"
    result = subprocess.run(
        [sys.executable, "-m", "chatserver", "serve", "--dtype", "int2"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_boolean_flags_parse_from_flag_and_env(monkeypatch):
    import argparse

    from chatserver.config import Settings

    def parsed(*argv: str) -> Settings:
        parser = argparse.ArgumentParser()
        Settings.add_arguments(parser)
        return Settings.from_namespace(parser.parse_args(list(argv)))

    assert parsed().compile is False
    assert parsed("--compile").compile is True
    monkeypatch.setenv("CHATSERVER_COMPILE", "1")
    assert parsed().compile is True
    assert parsed("--no-compile").compile is False
    monkeypatch.setenv("CHATSERVER_COMPILE", "false")
    assert parsed().compile is False
