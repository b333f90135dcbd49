"""Random LoRA adapters for benchmarks: real PEFT folders whose weights change the model's outputs.

Trained adapters would measure the same thing (cost depends on rank and target modules, not on what was
learned), and random ones need no data and no training time.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

RANKS = (4, 8, 16)  # cycled over the adapters, so a batch mixes ranks
BASE_TARGETS = ("q_proj", "v_proj")
B_STD = 0.02  # lora_B starts at zero in PEFT (a no-op); small random values make each adapter matter


class AdapterMakerError(RuntimeError):
    """Adapters cannot be made (PEFT missing, or the base model has no matching modules)."""


def adapter_spec(index: int) -> tuple[int, tuple[str, ...]]:
    """Rank and target modules of the index-th adapter: ranks cycle 4/8/16; every third adds o_proj."""
    rank = RANKS[index % len(RANKS)]
    targets = (*BASE_TARGETS, "o_proj") if index % 3 == 2 else BASE_TARGETS
    return rank, targets


def make_random_adapters(base_dir: Path, out_dir: Path, names: Sequence[str], seed: int = 0) -> dict[str, Path]:
    """Write one PEFT LoRA adapter folder per name under ``out_dir``; returns name → folder.

    Each folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's
    ``save_pretrained``) and a ``card.json`` saying the weights are random. Deterministic for a seed.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise AdapterMakerError("random adapters need PEFT: pip install peft") from exc
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    folders: dict[str, Path] = {}
    for index, name in enumerate(names):
        rank, targets = adapter_spec(index)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets), task_type="CAUSAL_LM"
        )
        try:
            peft_model = get_peft_model(base, config)
        except ValueError as exc:  # PEFT names the modules it could not find
            raise AdapterMakerError(f"cannot put LoRA on {list(targets)} of {base_dir}: {exc}") from exc
        _randomize(peft_model, torch.Generator().manual_seed(seed * 1000 + index))
        folder = out_dir / name
        peft_model.save_pretrained(str(folder), safe_serialization=True)
        card = {"name": name, "base_model": str(base_dir), "rank": rank, "targets": list(targets), "random": True}
        (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        folders[name] = folder
        base = peft_model.unload()  # strip the LoRA layers (no merge) before the next adapter
    log.info("made %d random adapters in %s", len(folders), out_dir)
    return folders


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """A ~ N(0, 1/in_features) keeps A·x at the scale of x; B ~ N(0, B_STD²) makes the update non-zero."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]), generator=generator)
            elif ".lora_B." in name:
                param.normal_(0.0, B_STD, generator=generator)
