"""LoRA SFT (transformers' Trainer, see ``sft.py``) and DPO (TRL), resumable from checkpoints.

SFT trains on prompt/completion pairs rendered with the base model's chat template, with the loss on the
completion only. DPO starts from an SFT adapter and trains it on
(prompt, chosen, rejected); with ``ref_model=None`` TRL keeps a frozen copy of that SFT adapter (adapter
name "ref") on the same base weights and takes the reference log-probs with it, so no second copy of the
model is held. (The reference is the SFT policy, the usual DPO setup; with the adapter turned off the
reference would be the base model, which never produces the task format.)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_utils import get_last_checkpoint

from ftserve.train.formats import Item, PreferencePair
from ftserve.train.settings import OptimSettings, TrainConfig

log = logging.getLogger("ftserve.train")


def set_threads(num_threads: int | None) -> None:
    torch.set_num_threads(num_threads or max(1, len(os.sched_getaffinity(0))))


def load_base(model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """fp32 weights (autocast gives bf16 compute); the tokenizer pads on the left for batched generation."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, tokenizer


def dpo_dataset(items: list[Item]) -> Dataset:
    rows = []
    for item in items:
        if not isinstance(item, PreferencePair):
            raise TypeError("DPO needs preference records (prompt, chosen, rejected)")
        rows.append(
            {
                "prompt": item.messages,
                "chosen": [{"role": "assistant", "content": item.chosen}],
                "rejected": [{"role": "assistant", "content": item.rejected}],
            }
        )
    return Dataset.from_list(rows)


def _common_args(optim: OptimSettings, checkpoints: Path) -> dict:
    return {
        "output_dir": str(checkpoints),
        "max_steps": optim.max_steps,
        "per_device_train_batch_size": optim.batch_size,
        "gradient_accumulation_steps": optim.grad_accum,
        "learning_rate": optim.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": round(optim.warmup_ratio * optim.max_steps),
        "max_length": optim.max_length,
        "bf16": optim.dtype == "bfloat16",
        "use_cpu": not torch.cuda.is_available(),
        "seed": optim.seed,
        "data_seed": optim.seed,
        "save_strategy": "steps",
        "save_steps": optim.save_steps,
        "save_total_limit": 2,
        "logging_steps": optim.logging_steps,
        "report_to": [],
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
    }


def _resume_point(checkpoints: Path, resume: bool) -> str | None:
    if not resume or not checkpoints.is_dir():
        return None
    last = get_last_checkpoint(str(checkpoints))
    if last:
        log.info("resuming from %s", last)
    return last


def train_sft(config: TrainConfig, model_dir: Path, items: list[Item], out: Path, resume: bool) -> dict:
    from transformers import TrainingArguments

    from ftserve.train.sft import CompletionDataset, CompletionTrainer, LeftPadCollator

    model, tokenizer = load_base(model_dir)
    lora = config.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    checkpoints = config.run_dir / "checkpoints"
    common = _common_args(config.optim, checkpoints)
    max_length = common.pop("max_length")
    args = TrainingArguments(**common, remove_unused_columns=False)
    replay_ids, replay_kwargs = None, {}
    if config.replay is not None:
        from ftserve.train.replay import load_replay

        texts = load_replay(config.replay.file)
        replay_ids = [tokenizer(t, add_special_tokens=False)["input_ids"][: config.replay.max_length] for t in texts]
        replay_kwargs = {
            "replay_weight": config.replay.weight,
            "replay_batch": config.replay.batch_size,
            "replay_objective": config.replay.objective,
        }
    trainer = CompletionTrainer(
        model=get_peft_model(model, peft_config),
        args=args,
        train_dataset=CompletionDataset(tokenizer, items, max_length),
        data_collator=LeftPadCollator(tokenizer.pad_token_id),
        replay=replay_ids,
        pad_id=tokenizer.pad_token_id,
        seed=config.optim.seed,
        **replay_kwargs,
    )
    return _train(trainer, checkpoints, resume, out, config.base)


def _train(trainer: Any, checkpoints: Path, resume: bool, out: Path, base_ref: str) -> dict:
    start = _resume_point(checkpoints, resume)
    result = trainer.train(resume_from_checkpoint=start)
    _save_adapter(trainer.model, out, base_ref)
    return {"train_loss": result.training_loss, "steps": result.global_step, "resumed_from": start and Path(start).name}


def train_dpo(config: TrainConfig, model_dir: Path, items: list[Item], out: Path, resume: bool) -> dict:
    from trl import DPOConfig, DPOTrainer

    if config.dpo is None:  # the settings validator guarantees it; typed narrowing
        raise ValueError("method dpo needs a dpo section")
    model, tokenizer = load_base(model_dir)
    model = PeftModel.from_pretrained(model, str(config.dpo.from_adapter), is_trainable=True)
    checkpoints = config.run_dir / "checkpoints"
    args = DPOConfig(**_common_args(config.optim, checkpoints), beta=config.dpo.beta)
    trainer = DPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=dpo_dataset(items), processing_class=tokenizer
    )
    return _train(trainer, checkpoints, resume, out, config.base)


def _save_adapter(model: PeftModel, out: Path, base_ref: str) -> None:
    """safetensors only; the config names the base by its store reference, not a local path."""
    model.save_pretrained(str(out), safe_serialization=True, selected_adapters=["default"])  # not TRL's "ref"
    cfg_file = out / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = base_ref
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for stray in out.glob("README.md"):
        stray.unlink()
