"""Fold a LoRA adapter into the base weights: W' = W + scaling · B · A for every adapted projection.

The merged folder is a plain Hugging Face model (config, tokenizer, safetensors) that any engine loads
without LoRA support; it serves one adapter only, at the base model's speed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ftserve.engine.lora import load_peft_adapter
from ftserve.engine.model import ModelShape
from ftserve.train.formats import DataError

MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")  # fmt: skip
MAX_MERGE_RANK = 1024


def check_adapter(what: str, adapter: Path) -> None:
    """Refuse, before any heavy work, an adapter folder without safetensors weights."""
    if not (adapter / "adapter_model.safetensors").is_file():
        raise DataError(f"{what}: adapter {str(adapter)!r} has no adapter_model.safetensors")


def merge_adapter(state: dict[str, torch.Tensor], model_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """A new state dict with the adapter folded in (fp32 accumulation, stored in the weights' dtype)."""
    shape = ModelShape.from_dir(model_dir)
    adapter = load_peft_adapter(adapter_dir.name, adapter_dir, shape, MAX_MERGE_RANK)
    merged = dict(state)
    for (layer, target), (a, b) in adapter.weights.items():
        kind = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        key = f"model.layers.{layer}.{kind}.{target}.weight"
        w = state[key]
        merged[key] = (w.float() + adapter.scaling * (b.float() @ a.float())).to(w.dtype)
    return merged


def write_model(out: Path, model_dir: Path, state: dict[str, torch.Tensor], extra_config: dict | None = None) -> None:
    """An HF-layout folder: the base's config (plus ``extra_config``), tokenizer files and one safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(extra_config or {})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Tied weights are stored once (safetensors refuses shared storage); the config's tie flag restores them.
    state = {
        k: v.contiguous() for k, v in state.items() if not (config.get("tie_word_embeddings") and k == "lm_head.weight")
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
