"""LoRA SFT with transformers' ``Trainer``: loss on the completion only, logits only where it is taken.

Each example is rendered with the base model's chat template: the prompt (with the generation prompt) and
the full conversation; the completion is what the conversation adds after the prompt, ending with the
template's end-of-turn token, so the model learns to stop. Batches are padded on the left, so every
completion ends at the last position: the LM head then runs over the last ``k`` positions only
(``logits_to_keep``), where ``k`` covers the longest completion in the batch. On a 49k-token vocabulary
that skips most of the head's work and its fp32 softmax over prompt tokens that carry no loss. Position ids
are derived from the attention mask, so left padding does not shift the positions the model sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer

from ftserve.train.formats import Example, Item

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    completion_len: int  # the last `completion_len` ids are the answer the loss is taken on


def encode_example(tokenizer: PreTrainedTokenizerBase, item: Item, max_length: int) -> Encoded:
    if not isinstance(item, Example):
        raise TypeError("SFT needs supervised examples (Alpaca or chat records), got preference pairs")
    messages = item.messages
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": item.completion}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside the full conversation")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :].rstrip("\n"), add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[-max_length:]  # keep the answer whole; trim the prompt's start if needed
    return Encoded(ids, min(len(answer_ids), len(ids) - 1))


class CompletionDataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer: PreTrainedTokenizerBase, items: list[Item], max_length: int) -> None:
        self.rows = [encode_example(tokenizer, item, max_length) for item in items]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> Encoded:
        return self.rows[idx]


class LeftPadCollator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[Encoded]) -> dict[str, torch.Tensor]:
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            ids[i, width - n :] = torch.tensor(r.input_ids)
            mask[i, width - n :] = 1
            labels[i, width - r.completion_len :] = ids[i, width - r.completion_len :]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_right(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Plain language-modelling batch: right padding, labels ignored on padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}


class CompletionTrainer(Trainer):
    """``Trainer`` whose loss is token-mean cross-entropy over completion tokens, computed from the tail.

    With ``replay`` (token ids of base-model text, see ``replay.py``), each step also takes the LM loss
    of ``replay_batch`` of those sequences, weighted by ``replay_weight``: loss = task + w · replay.
    The replay rows of a step depend only on the step number, so a resumed run sees the same ones.
    """

    def __init__(
        self,
        *args: object,
        replay: list[list[int]] | None = None,
        replay_weight: float = 1.0,
        replay_batch: int = 4,
        pad_id: int = 0,
        seed: int = 0,
        replay_objective: str = "nll",
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.replay_objective = replay_objective
        self.replay = replay or []
        self.replay_weight = replay_weight
        self.replay_batch = replay_batch
        self.pad_id = pad_id
        self._order = torch.randperm(len(self.replay), generator=torch.Generator().manual_seed(seed)).tolist()

    def _replay_loss(self, model: nn.Module) -> torch.Tensor:
        n, step = len(self._order), self.state.global_step
        rows = [self.replay[self._order[(step * self.replay_batch + j) % n]] for j in range(self.replay_batch)]
        batch = {k: v.to(self.args.device) for k, v in pad_right(rows, self.pad_id).items()}
        if self.replay_objective == "nll":
            return model(**batch, use_cache=False).loss
        # KL(base || adapter) at every real position: the base's whole next-token distribution is the target
        # (the adapter switched off gives it), a lower-variance anchor than the one sampled token.
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        with torch.no_grad(), model.disable_adapter():
            ref = torch.log_softmax(model(**inputs).logits.float(), dim=-1)
        cur = torch.log_softmax(model(**inputs).logits.float(), dim=-1)
        kl = (ref.exp() * (ref - cur)).sum(-1)
        mask = batch["attention_mask"].float()
        return (kl * mask).sum() / mask.sum()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, object]:
        labels = inputs["labels"]
        mask = inputs["attention_mask"]
        # Logits at position t predict token t+1: the last k logits cover every completion of length < k.
        answer = labels != IGNORE
        k = int(answer.sum(dim=1).max()) + 1
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            logits_to_keep=k,
            use_cache=False,
        )
        logits = out.logits[:, :-1].float()
        targets = labels[:, -(k - 1) :]
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else answer.sum()
        loss = nll / torch.as_tensor(count).clamp(min=1)
        if self.replay and model.training:
            loss = loss + self.replay_weight * self._replay_loss(model)
        return (loss, out) if return_outputs else loss
