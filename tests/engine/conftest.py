"""Shared engine fixtures: the reference HF model and the native weights, fp32, loaded once per module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftserve.engine.model import NativeLlama


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def native_model(model_dir: Path) -> NativeLlama:
    return NativeLlama.from_dir(model_dir, torch.device("cpu"), torch.float32)


def hf_greedy(hf_model: torch.nn.Module, prompt_ids: list[int], max_new: int, eos_ids: frozenset[int]) -> list[int]:
    eos = sorted(eos_ids)
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
        )
    return out[0, len(prompt_ids) :].tolist()
