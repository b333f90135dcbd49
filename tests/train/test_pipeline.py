"""The training pipeline refuses bad configs and data before any training compute, and publishes atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftserve.config import ConfigError
from ftserve.models import ModelStore, ModelStoreError
from ftserve.train import pipeline
from ftserve.train.formats import DataError, write_jsonl
from ftserve.train.replay import load_replay
from ftserve.train.settings import TrainConfig, load_train_config
from ftserve.train.tasks import get_task


def make_config(tmp_path: Path, **overrides: object) -> TrainConfig:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, get_task("support-router").generate(40, seed=0))
    raw: dict = {
        "name": "t",
        "task": "support-router",
        "data": {"train": str(data), "heldout_fraction": 0.2},
        "output_dir": str(tmp_path / "adapters"),
        "work_dir": str(tmp_path / "runs"),
    }
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return TrainConfig.model_validate(raw)


class NoPull(ModelStore):
    """A store that must not be asked to pull (the checks before it must fail first)."""

    def pull(self, ref: str = "") -> Path:
        raise AssertionError("pull reached")


def test_missing_data_file_fails_before_the_model_is_touched(tmp_path: Path) -> None:
    config = make_config(tmp_path, **{"data.general_text": str(tmp_path / "absent.txt")})
    with pytest.raises(DataError, match=r"absent\.txt"):
        pipeline.preflight(config, NoPull(tmp_path / "home"))


def test_unknown_task_and_unknown_base_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown task"):
        pipeline.preflight(make_config(tmp_path, task="nope"), NoPull(tmp_path / "home"))
    with pytest.raises(ModelStoreError, match="unknown model reference"):
        pipeline.preflight(make_config(tmp_path, base="no-such-model"), ModelStore(tmp_path / "home"))


def test_dpo_without_its_sft_adapter_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, method="dpo", **{"dpo.from_adapter": str(tmp_path / "adapters" / "sft")})
    with pytest.raises(DataError, match="train it first"):
        pipeline.preflight(config, NoPull(tmp_path / "home"))


def test_dpo_config_needs_its_section(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dpo"):
        make_config(tmp_path, method="dpo")


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: ../escape\ndata: {train: x.jsonl}\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml.*name"):
        load_train_config(bad)


def test_data_empty_after_filtering_reports_the_counts(tmp_path: Path) -> None:
    config = make_config(tmp_path, **{"filters.min_chars": 3000, "filters.max_chars": 4000})
    with pytest.raises(DataError, match=r"no items left after filtering \(40 in, 0 kept; dropped: too_short 40"):
        pipeline.prepare_data(config)


def test_wrong_record_kind_for_the_method_is_refused(tmp_path: Path) -> None:
    prefs = tmp_path / "prefs.jsonl"
    write_jsonl(prefs, get_task("support-router").preferences(20, seed=0))
    with pytest.raises(DataError, match="needs Example records"):
        pipeline.prepare_data(make_config(tmp_path, **{"data.train": str(prefs)}))


def test_prepared_splits_are_written_and_hashed(tmp_path: Path) -> None:
    data = pipeline.prepare_data(make_config(tmp_path))
    assert len(data.train) + len(data.heldout) == 40
    assert (tmp_path / "runs" / "t" / "data" / "heldout.jsonl").is_file()
    assert len(data.sha256) == 64 and "split/train" in data.files


def test_publish_replaces_the_old_adapter_whole(tmp_path: Path) -> None:
    target = tmp_path / "adapters" / "a"
    target.mkdir(parents=True)
    (target / "old-only.txt").write_text("old")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "card.json").write_text(json.dumps({"v": 2}))
    pipeline.publish(staging, target)
    assert sorted(p.name for p in target.iterdir()) == ["card.json"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["a"]  # no leftovers beside it


def test_interrupted_training_leaves_the_shipped_adapter_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path)
    shipped = config.adapter_dir
    shipped.mkdir(parents=True)
    (shipped / "card.json").write_text('{"shipped": true}')

    def interrupted(*args: object, **kwargs: object) -> dict:
        (config.run_dir / "staging").mkdir(parents=True)
        (config.run_dir / "staging" / "adapter_config.json").write_text("{}")  # half-written output
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "preflight", lambda config, store: (tmp_path, None))
    monkeypatch.setattr("ftserve.train.trainers.train_sft", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_training(config, ModelStore(tmp_path / "home"))
    assert [p.name for p in shipped.iterdir()] == ["card.json"]
    assert json.loads((shipped / "card.json").read_text()) == {"shipped": True}


def test_replay_is_for_sft_only_and_its_file_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SFT only"):
        make_config(tmp_path, method="dpo", **{"dpo.from_adapter": "x", "replay.file": "r.jsonl"})
    config = make_config(tmp_path, **{"replay.file": str(tmp_path / "missing-replay.jsonl")})
    with pytest.raises(DataError, match="missing-replay"):
        pipeline.preflight(config, NoPull(tmp_path / "home"))


def test_malformed_replay_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "replay.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    with pytest.raises(DataError, match=r"replay\.jsonl:2"):
        load_replay(path)
