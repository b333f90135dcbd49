"""Load a model folder for inference: device, dtype and CPU threads chosen once, here."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ftserve.config import EngineConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    # bf16 measured ~2x fp32 for batched decoding on this CPU and is native on recent GPUs.
    if name == "auto":
        return torch.bfloat16
    return _DTYPES[name]


def set_threads(num_threads: int | None) -> int:
    """One torch thread per core (oversubscribing the two cores here halves throughput)."""
    n = num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


class HFTokenizer:
    """The engine tokenizer: the model's own, with its chat template."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.eos_token_id: int | None = self._tok.eos_token_id
        self.vocab_size: int = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(str(text))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens))


def prepare_runtime(config: EngineConfig) -> tuple[torch.device, torch.dtype, int]:
    """Device, dtype and CPU threads for an engine, chosen once from its config."""
    device = pick_device(config.device)
    return device, pick_dtype(config.dtype, device), set_threads(config.num_threads)


def load_model(model_dir: Path, config: EngineConfig) -> tuple[torch.nn.Module, torch.device, torch.dtype]:
    from transformers import AutoModelForCausalLM

    device, dtype, threads = prepare_runtime(config)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    log.info("loaded %s on %s as %s (%d CPU threads)", model_dir.name, device, dtype, threads)
    return model, device, dtype


def eos_token_ids(model_dir: Path, tokenizer: HFTokenizer) -> frozenset[int]:
    """Every id that ends a sequence: the tokenizer's, the config's and the generation config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids.update([value] if isinstance(value, int) else (value or []))
    return frozenset(ids)
