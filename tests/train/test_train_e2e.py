"""A short real training run (a few steps on the bundled model): SFT, resume, DPO, card, MLflow, serving fit.

It does not retrain the shipped adapters; it checks that the pipeline produces every file and figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ftserve.engine.lora import load_peft_adapter
from ftserve.engine.model import ModelShape
from ftserve.models import ModelStore
from ftserve.train.formats import write_jsonl
from ftserve.train.pipeline import run_training
from ftserve.train.replay import write_replay
from ftserve.train.settings import TrainConfig
from ftserve.train.tasks import get_task

pytestmark = pytest.mark.train

GENERAL = (
    "The river that runs through the old town is narrow in summer and wide in spring, when snow melts in the "
    "hills and the water rises almost to the stone arches of the bridge. Children throw sticks from one side."
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    task = get_task("support-router")
    write_jsonl(root / "sft.jsonl", task.generate(40, seed=0))
    write_jsonl(root / "prefs.jsonl", task.preferences(24, seed=0))
    write_jsonl(root / "extra.jsonl", task.generate(3, seed=9))
    (root / "general.txt").write_text(GENERAL)
    write_replay(root / "replay.jsonl", [GENERAL[:80], GENERAL[80:], "Bread is one of the oldest prepared foods."])
    return root


def config(root: Path, name: str, **extra: object) -> TrainConfig:
    raw = {
        "name": name,
        "task": "support-router",
        "data": {
            "train": str(root / "sft.jsonl"),
            "heldout_fraction": 0.2,
            "extra_heldout": [str(root / "extra.jsonl")],
            "general_text": str(root / "general.txt"),
        },
        "lora": {"r": 4, "alpha": 8},
        "replay": {"file": str(root / "replay.jsonl"), "batch_size": 2, "max_length": 24},
        "optim": {"max_steps": 2, "batch_size": 2, "save_steps": 1, "max_length": 160, "logging_steps": 1},
        "eval": {"max_items": 3, "max_new_tokens": 4, "batch_size": 3, "perplexity_window": 32},
        "mlflow": {
            "enabled": True,
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "artifact_root": str(root / "mlflow-artifacts"),
            "registered_model": f"ftserve-{name}",
            "alias": "candidate",
        },
        "output_dir": str(root / "adapters"),
        "work_dir": str(root / "runs"),
        **extra,
    }
    return TrainConfig.model_validate(raw)


@pytest.fixture(scope="module")
def sft_card(workspace: Path, model_home: Path) -> dict:
    return run_training(config(workspace, "router"), ModelStore(model_home))


def test_sft_publishes_safetensors_adapter_with_card(sft_card: dict, workspace: Path, model_dir: Path) -> None:
    folder = workspace / "adapters" / "router"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "card.json"]
    assert json.loads((folder / "card.json").read_text()) == sft_card
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "smollm2-135m-instruct"
    assert sft_card["training"]["steps"] == 2
    assert sft_card["base"]["weights_sha256"] and sft_card["base"]["gguf_sha256"]
    assert len(sft_card["data"]["sha256"]) == 64
    assert sft_card["data"]["train_items"] + sft_card["data"]["heldout_items"] == 40
    assert sft_card["hyperparameters"]["lora"]["r"] == 4
    assert sft_card["hyperparameters"]["replay"]["batch_size"] == 2
    assert str(workspace / "replay.jsonl") in sft_card["data"]["files"]
    assert sft_card["time_s"]["train"] > 0
    for variant in ("base", "adapter"):
        metrics = sft_card["metrics"][variant]
        assert 0.0 <= metrics["heldout.exact_match"] <= 1.0
        assert 0.0 <= metrics["extra.rouge_l"] <= 1.0
        assert metrics["general_perplexity"] > 1.0
    # The adapter fits the native engine that serves it.
    shape = ModelShape.from_dir(model_dir)
    adapter = load_peft_adapter("router", folder, shape, max_rank=8)
    assert adapter.rank == 4


def test_sft_run_is_registered_in_mlflow_with_its_alias(sft_card: dict, workspace: Path) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    version = client.get_model_version_by_alias("ftserve-router", "candidate")
    assert str(version.version) == sft_card["mlflow"]["version"]
    run = client.get_run(sft_card["mlflow"]["run_id"])
    assert run.data.params["lora.r"] == "4"
    assert "adapter.heldout.exact_match" in run.data.metrics
    assert list((workspace / "mlflow-artifacts").rglob("adapter/adapter_model.safetensors"))


def test_resume_continues_from_the_last_checkpoint(sft_card: dict, workspace: Path, model_home: Path) -> None:
    cfg = config(workspace, "router", optim={"max_steps": 3, "batch_size": 2, "save_steps": 1, "max_length": 160})
    card = run_training(cfg, ModelStore(model_home), resume=True)
    assert card["training"]["resumed_from"] == "checkpoint-2"
    assert card["training"]["steps"] == 3


def test_dpo_refines_the_sft_adapter_and_reports_preference_accuracy(
    sft_card: dict, workspace: Path, model_home: Path
) -> None:
    cfg = config(
        workspace,
        "router-dpo",
        method="dpo",
        dpo={"from_adapter": str(workspace / "adapters" / "router"), "beta": 0.1},
        replay=None,
    )
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": workspace / "prefs.jsonl"})})
    card = run_training(cfg, ModelStore(model_home))
    assert card["method"] == "dpo" and card["training"]["steps"] == 2
    assert set(card["metrics"]) == {"base", "sft", "adapter"}
    for metrics in card["metrics"].values():
        assert 0.0 <= metrics["heldout.preference_accuracy"] <= 1.0
    assert (workspace / "adapters" / "router-dpo" / "adapter_model.safetensors").is_file()
