"""``ftserve train adapters/<name>.yaml``: check → data → train → evaluate → card → publish → track.

Everything that can be wrong with the config (missing data, unknown base or task, a missing SFT adapter for
DPO, a dataset that filters down to nothing) fails before any training compute. The adapter is written to
``<work_dir>/<name>/staging`` and only moved over ``adapters/<name>`` once it is complete, with its card, so
an interrupted run leaves the previously shipped adapter as it was (rerun with ``--resume`` to continue
from the last checkpoint).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ftserve.atomic import swap_dir
from ftserve.models import ModelStore, sha256_file
from ftserve.train.filters import FilterReport, apply_filters
from ftserve.train.formats import DataError, Item, load_jsonl, sha256_of, write_jsonl
from ftserve.train.settings import TrainConfig, load_train_config
from ftserve.train.split import group_key, split_items
from ftserve.train.tasks import Task, get_task

log = logging.getLogger("ftserve.train")


@dataclass
class PreparedData:
    train: list[Item]
    heldout: list[Item]
    extra: dict[str, list[Item]] = field(default_factory=dict)
    report: FilterReport = field(default_factory=FilterReport)
    files: dict[str, str] = field(default_factory=dict)  # input path -> sha256

    @property
    def sha256(self) -> str:
        joined = "\n".join(f"{p}={h}" for p, h in sorted(self.files.items()))
        return hashlib.sha256(joined.encode()).hexdigest()


def preflight(config: TrainConfig, store: ModelStore) -> tuple[Path, Task | None]:
    """Check inputs exist and fit; return the base model folder and the task. No training compute."""
    data = config.data
    replay = config.replay.file if config.replay else None
    for path in [data.train, data.heldout, *data.extra_heldout, data.general_text, replay]:
        if path is not None and not path.is_file():
            raise DataError(f"training config {config.name!r}: data file {str(path)!r} does not exist")
    task = None
    if config.task:
        try:
            task = get_task(config.task)
        except KeyError as exc:
            raise DataError(f"training config {config.name!r}: {exc.args[0]}") from None
    if config.dpo is not None:
        src = config.dpo.from_adapter
        if not (src / "adapter_config.json").is_file() or not (src / "adapter_model.safetensors").is_file():
            raise DataError(f"DPO needs the SFT adapter {str(src)!r} (config + safetensors weights); train it first")
        src_base = json.loads((src / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if src_base not in (None, config.base):
            raise DataError(f"SFT adapter {str(src)!r} was trained on {src_base!r}, not on {config.base!r}")
    return store.pull(config.base), task  # an unknown base raises here, before anything heavy


def split_data(config: TrainConfig) -> PreparedData:
    """Load, filter and split (a pure function of the files and the config); fail clearly when nothing is left.

    The optimize stage's quality gate calls this too, to score exactly the held-out split the adapter was
    evaluated on.
    """
    data = config.data
    items = load_jsonl(data.train)
    kinds = {type(item).__name__ for item in items}
    want = "PreferencePair" if config.method == "dpo" else "Example"
    if kinds != {want}:
        raise DataError(f"{data.train}: method {config.method} needs {want} records, found {sorted(kinds)}")
    kept, report = apply_filters(items, config.filters)
    if not kept:
        raise DataError(f"{data.train}: no items left after filtering ({report.summary()})")
    files = {str(data.train): sha256_of(data.train)}
    if data.heldout is not None:
        heldout, _ = apply_filters(load_jsonl(data.heldout), config.filters)
        seen = {group_key(item) for item in kept}
        overlap = [item for item in heldout if group_key(item) in seen]
        if overlap:
            log.warning("dropping %d held-out items whose group is also in train", len(overlap))
        train, heldout = kept, [item for item in heldout if group_key(item) not in seen]
        files[str(data.heldout)] = sha256_of(data.heldout)
    else:
        train, heldout = split_items(kept, data.heldout_fraction, data.seed)
    extra = {}
    for path in data.extra_heldout:
        extra[path.stem] = load_jsonl(path)
        files[str(path)] = sha256_of(path)
    if data.general_text is not None:
        files[str(data.general_text)] = sha256_of(data.general_text)
    if config.replay is not None:
        files[str(config.replay.file)] = sha256_of(config.replay.file)
    return PreparedData(train, heldout, extra, report, files)


def split_of(config_path: Path) -> PreparedData:
    """``split_data`` of a training config file, computed once per process while the file is unchanged
    (the optimize stage reads the same split for GPTQ calibration and for the quality gate)."""
    return _split_cached(config_path.resolve(), config_path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _split_cached(config_path: Path, mtime_ns: int) -> PreparedData:
    return split_data(load_train_config(config_path))


def prepare_data(config: TrainConfig) -> PreparedData:
    """:func:`split_data`, with the splits written under the run folder (their hashes go on the card)."""
    data = split_data(config)
    split_dir = config.run_dir / "data"
    data.files["split/train"] = write_jsonl(split_dir / "train.jsonl", data.train)
    data.files["split/heldout"] = write_jsonl(split_dir / "heldout.jsonl", data.heldout)
    log.info("data: %s; %d train / %d held-out", data.report.summary(), len(data.train), len(data.heldout))
    return data


def _base_identity(config: TrainConfig, model_dir: Path) -> dict[str, Any]:
    marker = model_dir / "ftserve-model.json"
    info = json.loads(marker.read_text()) if marker.is_file() else {}
    weights = sorted(model_dir.glob("*.safetensors"))
    return {
        "ref": config.base,
        "source": info.get("source", str(model_dir)),
        "gguf_sha256": info.get("gguf_sha256"),
        "weights_sha256": sha256_file(weights[0]) if len(weights) == 1 else None,
    }


def build_card(
    config: TrainConfig, model_dir: Path, data: PreparedData, training: dict, metrics: dict, timings: dict
) -> dict[str, Any]:
    return {
        "name": config.name,
        "method": config.method,
        "task": config.task,
        "base": _base_identity(config, model_dir),
        "data": {
            "sha256": data.sha256,
            "files": data.files,
            "train_items": len(data.train),
            "heldout_items": len(data.heldout),
            "filter_report": data.report.to_json(),
        },
        "hyperparameters": {
            "lora": config.lora.model_dump(mode="json"),
            "optim": config.optim.model_dump(mode="json"),
            **({"dpo": config.dpo.model_dump(mode="json")} if config.dpo else {}),
            **({"replay": config.replay.model_dump(mode="json")} if config.replay else {}),
        },
        "training": training,
        "metrics": metrics,
        "time_s": {k: round(v, 1) for k, v in timings.items()},
        "versions": {pkg: version(pkg) for pkg in ("torch", "transformers", "peft", "trl")},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_card(folder: Path, card: dict) -> None:
    tmp = folder / ".card.json.tmp"
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(folder / "card.json")


def publish(staging: Path, target: Path) -> None:
    """Swap the finished adapter in; the staging folder stays for ``--resume`` and inspection."""
    swap_dir(staging, target, copy=True)


def _evaluate(config: TrainConfig, model_dir: Path, adapter: Path, data: PreparedData, task: Task | None) -> dict:
    import torch
    from peft import PeftModel

    from ftserve.train.evaluate import evaluate
    from ftserve.train.trainers import load_base

    base, tokenizer = load_base(model_dir)
    model = PeftModel.from_pretrained(base, str(adapter), adapter_name="adapter")
    variants: dict[str, str | None] = {"base": None}
    if config.dpo is not None:  # DPO is judged against the SFT adapter it started from, too
        model.load_adapter(str(config.dpo.from_adapter), adapter_name="sft")
        variants["sft"] = "sft"
    variants["adapter"] = "adapter"
    splits = {"heldout": data.heldout, **data.extra}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.optim.dtype == "bfloat16"):
        return evaluate(model, tokenizer, variants, splits, config.data.general_text, task, config.eval)


def run_training(config: TrainConfig, store: ModelStore, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate and publish one adapter; returns its card."""
    from ftserve.train.tracking import log_run
    from ftserve.train.trainers import set_threads, train_dpo, train_sft

    started = time.monotonic()
    model_dir, task = preflight(config, store)
    data = prepare_data(config)
    timings = {"data": time.monotonic() - started}
    set_threads(config.optim.num_threads)
    staging = config.run_dir / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    trainer = train_dpo if config.method == "dpo" else train_sft
    t0 = time.monotonic()
    training = trainer(config, model_dir, data.train, staging, resume)
    timings["train"] = time.monotonic() - t0
    t0 = time.monotonic()
    metrics = _evaluate(config, model_dir, staging, data, task)
    timings["eval"] = time.monotonic() - t0
    timings["total"] = time.monotonic() - started
    card = build_card(config, model_dir, data, training, metrics, timings)
    write_card(staging, card)
    publish(staging, config.adapter_dir)
    tracked = log_run(config.mlflow, card, config.adapter_dir)
    if tracked:
        card["mlflow"] = tracked
        write_card(config.adapter_dir, card)
    log.info("published %s (%.0fs): %s", config.adapter_dir, timings["total"], json.dumps(metrics))
    return card
