"""``ftserve optimize``: recipes run their steps, gate on quality, and never overwrite a ready artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftserve.bench.adapters import make_random_adapters
from ftserve.config import ConfigError
from ftserve.engine.model import NativeLlama
from ftserve.engine.qlinear import Int8Linear
from ftserve.models import ModelStore
from ftserve.optimize.quantize import QuantizeError
from ftserve.optimize.recipe import Recipe, load_recipe
from ftserve.optimize.runner import GateFailed, run_recipe
from ftserve.train.formats import write_jsonl
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
    assert isinstance(model.layers[0].qkv, Int8Linear)
    config = json.loads((out / "native" / "config.json").read_text())
    assert config["quantization_config"]["method"] == "int8"


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
