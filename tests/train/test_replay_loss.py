"""The replay losses on a tiny random Llama: KL to the base is zero for an untrained adapter, positive after."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from ftserve.train.sft import CompletionTrainer


def trainer(tmp_path: Path, objective: str) -> CompletionTrainer:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False)
    replay = [[1, 5, 9, 13, 2], [7, 3, 3, 8], [4, 4, 4, 4, 4, 4]]
    return CompletionTrainer(model=model, args=args, replay=replay, replay_batch=2, replay_objective=objective)


def test_kl_replay_is_zero_for_an_untrained_adapter_and_grows_when_it_moves(tmp_path: Path) -> None:
    t = trainer(tmp_path, "kl")
    assert float(t._replay_loss(t.model)) == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at zero
    with torch.no_grad():
        for name, param in t.model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param))
    assert float(t._replay_loss(t.model)) > 1e-4


def test_nll_replay_is_the_language_modelling_loss(tmp_path: Path) -> None:
    t = trainer(tmp_path, "nll")
    loss = t._replay_loss(t.model)
    assert loss.requires_grad and 0 < float(loss) < 10  # log(97) ≈ 4.6 for a random model
