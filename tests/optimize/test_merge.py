"""Merging an adapter gives the same logits as the base model with the adapter applied by PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ftserve.bench.adapters import make_random_adapters
from ftserve.engine.model import read_state
from ftserve.optimize.merge import merge_adapter, write_model

# fp32 on CPU: the merged matmul and PEFT's separate low-rank path differ only by summation order.
ATOL = 2e-4


@pytest.fixture(scope="module")
def adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    return make_random_adapters(model_dir, root, ["merge-me"], seed=5)["merge-me"]


def test_merged_logits_equal_base_plus_adapter(model_dir: Path, adapter: Path, tmp_path: Path) -> None:
    merged_dir = tmp_path / "merged"
    write_model(merged_dir, model_dir, merge_adapter(read_state(model_dir), model_dir, adapter))
    ids = torch.tensor([[1, 504, 3458, 282, 4132, 30, 2, 17, 9001, 42, 1030, 7]])
    with torch.inference_mode():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        plain = base(input_ids=ids).logits
        with_adapter = PeftModel.from_pretrained(base, str(adapter))(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)(input_ids=ids).logits
    assert (with_adapter - plain).abs().max() > 100 * ATOL  # the adapter changes the logits visibly
    torch.testing.assert_close(merged, with_adapter, atol=ATOL, rtol=0)
