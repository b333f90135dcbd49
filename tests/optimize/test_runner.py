"""``ftserve optimize``: recipes run their steps, gate on quality, and never overwrite a ready artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftserve.bench.adapters import make_random_adapters
from ftserve.config import ConfigError
from ftserve.engine.loader import HFTokenizer
from ftserve.engine.model import NativeLlama, read_state
from ftserve.engine.qlinear import Int8Linear
from ftserve.models import ModelStore
from ftserve.optimize.calibration import calibration_sequences
from ftserve.optimize.quantize import QuantizeError
from ftserve.optimize.recipe import QuantizeStep, Recipe, load_recipe
from ftserve.optimize.runner import GateFailed, quantize, run_recipe
from ftserve.train.formats import Example, write_jsonl
from ftserve.train.pipeline import split_data
from ftserve.train.replay import write_replay
from ftserve.train.settings import load_train_config
from ftserve.train.tasks import get_task

TEXT = (
    "Gardeners often say that good soil matters more than any single plant. Soil rich in organic matter holds "
    "water after rain, drains well enough that roots do not rot, and feeds the worms and fungi that keep it loose."
)


@pytest.fixture(scope="module")
def inputs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("optimize")
    make_random_adapters(model_dir, root / "adapters", ["tiny"], seed=2)
    (root / "text.txt").write_text(TEXT)
    write_jsonl(root / "heldout.jsonl", get_task("support-router").generate(3, seed=4))
    return root


def recipe(root: Path, name: str, steps: list[dict]) -> Recipe:
    return Recipe.model_validate({"name": name, "steps": steps, "output_dir": str(root / "out"), "dtype": "float32"})


def test_merge_int8_gate_export_writes_a_ready_native_artifact(inputs: Path, model_home: Path) -> None:
    steps = [
        {"step": "merge", "adapter": str(inputs / "adapters" / "tiny")},
        {"step": "quantize", "method": "int8"},
        {"step": "gate", "text": str(inputs / "text.txt"), "max_perplexity_increase": 0.5,
         "heldout": str(inputs / "heldout.jsonl"), "task": "support-router", "max_exact_match_drop": 1.0},
        {"step": "export", "format": "native"},
    ]  # fmt: skip
    manifest = run_recipe(recipe(inputs, "ok", steps), ModelStore(model_home))
    out = inputs / "out" / "ok"
    assert manifest["ready"] is True
    assert json.loads((out / "manifest.json").read_text()) == manifest
    gate = manifest["steps"][2]
    assert gate["passed"] and gate["measured"]["perplexity"] > 1 and gate["reference"]["exact_match"] is not None
    assert manifest["steps"][1]["size_mb"] < manifest["steps"][0]["size_mb"]
    assert str(inputs / "adapters" / "tiny") in manifest["inputs"]
    model = NativeLlama.from_dir(out / "native", torch.device("cpu"), torch.float32)
    assert isinstance(model.layers[0].qkv, Int8Linear) and isinstance(model.head, Int8Linear)
    quant = json.loads((out / "native" / "config.json").read_text())["quantization_config"]
    assert quant["method"] == "int8" and quant["lm_head"] == "int8"
    assert quant["modules_not_converted"] == ["model.embed_tokens"]


def test_a_dense_head_setting_keeps_the_head_dense(model_dir: Path) -> None:
    step = QuantizeStep(step="quantize", method="int4", group_size=64, head="dense")
    state, quant = quantize(step, read_state(model_dir), model_dir)
    assert "lm_head.qweight" not in state and quant["lm_head"] == "dense"
    assert "lm_head" in quant["modules_not_converted"]
    with pytest.raises(ValueError, match="head"):
        QuantizeStep(step="quantize", method="int4", group_size=64, head="int4")


def test_a_breached_gate_fails_and_leaves_the_ready_artifact_alone(inputs: Path, model_home: Path) -> None:
    ready = inputs / "out" / "strict"
    ready.mkdir(parents=True)
    (ready / "manifest.json").write_text('{"ready": true}')
    steps = [
        {"step": "quantize", "method": "int4", "group_size": 64},
        {"step": "gate", "text": str(inputs / "text.txt"), "max_perplexity_increase": 0.0},
        {"step": "export", "format": "native"},
    ]
    with pytest.raises(GateFailed, match="perplexity"):
        run_recipe(recipe(inputs, "strict", steps), ModelStore(model_home))
    assert json.loads((ready / "manifest.json").read_text()) == {"ready": True}
    rejected = json.loads((inputs / "out" / "strict.rejected" / "manifest.json").read_text())
    assert rejected["ready"] is False and rejected["steps"][1]["breaches"]


@pytest.mark.parametrize(
    ("step", "error", "match"),
    [
        ({"step": "quantize", "method": "int3"}, QuantizeError, "known: "),
        ({"step": "quantize", "method": "int4", "group_size": 128}, QuantizeError, "576"),
        ({"step": "merge", "adapter": "/nowhere"}, ValueError, "nowhere"),
        ({"step": "quantize", "method": "int8", "act_order": True}, QuantizeError, "act_order"),
        ({"step": "quantize", "method": "gptq", "group_size": 64}, ValueError, "calibration"),
        ({"step": "gate", "text": "/nowhere.txt"}, ValueError, "nowhere"),
    ],
)
def test_bad_steps_fail_before_any_heavy_work(
    inputs: Path, model_home: Path, step: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        run_recipe(recipe(inputs, "bad", [step]), ModelStore(model_home))
    assert not (inputs / "out" / "bad").exists()


def test_unknown_step_names_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nsteps:\n  - {step: distill}\n")
    with pytest.raises(ConfigError, match=r"merge.*quantize.*gate.*export"):
        load_recipe(path)


@pytest.fixture(scope="module")
def train_config(inputs: Path) -> Path:
    """A training config like the shipped ones: task data with a held-out split, and replay text."""
    write_jsonl(inputs / "train.jsonl", get_task("support-router").generate(40, seed=0))
    write_replay(inputs / "replay.jsonl", [TEXT, "A second replay text, about rivers and the sea."])
    path = inputs / "router.yaml"
    path.write_text(
        f"name: router\ntask: support-router\ndata: {{train: {inputs / 'train.jsonl'}, heldout_fraction: 0.2}}\n"
        f"replay: {{file: {inputs / 'replay.jsonl'}}}\n"
    )
    return path


def test_calibration_draws_from_the_train_split_and_the_replay_text(train_config: Path, model_dir: Path) -> None:
    tokenizer = HFTokenizer(model_dir)
    step = QuantizeStep(step="quantize", method="gptq", calibration=[train_config], calibration_items=6)
    seqs = calibration_sequences(step, tokenizer)
    heldout = split_data(load_train_config(train_config)).heldout
    replay_ids = tokenizer.encode(TEXT)
    assert len(seqs) == 6 and replay_ids in seqs  # half from each source
    prompts = [tokenizer.apply_chat_template(i.messages) for i in heldout if isinstance(i, Example)]
    assert not any(seq[: len(p)] == p for seq in seqs for p in prompts)  # never the held-out side


def test_gate_scores_a_quantized_base_with_an_unmerged_adapter_on_the_held_out_split(
    inputs: Path, train_config: Path, model_home: Path
) -> None:
    steps = [
        {"step": "quantize", "method": "int8"},
        {"step": "gate", "text": str(inputs / "text.txt"), "max_perplexity_increase": 0.5,
         "adapter": str(inputs / "adapters" / "tiny"), "heldout": str(inputs / "heldout.jsonl"),
         "heldout_split": str(train_config), "max_exact_match_drop": 1.0},
        {"step": "export", "format": "native"},
    ]  # fmt: skip
    manifest = run_recipe(recipe(inputs, "base-int8", steps), ModelStore(model_home))
    gate = manifest["steps"][1]
    split = split_data(load_train_config(train_config)).heldout
    assert gate["measured"]["items"] == 3 + len(split) and gate["reference"]["exact_match"] is not None
    assert str(inputs / "adapters" / "tiny") in manifest["inputs"]
    assert not any(k.startswith("model.layers") and k.endswith(".weight") and "proj" in k for k in read_state(
        inputs / "out" / "base-int8" / "native"))  # fmt: skip


def test_a_vllm_export_of_an_asymmetric_grid_is_refused_before_any_work(inputs: Path, model_home: Path) -> None:
    steps = [{"step": "quantize", "method": "int4", "group_size": 64}, {"step": "export", "format": "vllm"}]
    with pytest.raises(QuantizeError, match="sym: true"):
        run_recipe(recipe(inputs, "asym", steps), ModelStore(model_home))
    assert not (inputs / "out" / "asym").exists()
