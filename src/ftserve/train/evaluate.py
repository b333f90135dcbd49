"""Held-out evaluation of an adapter against its base model (the same weights with the adapter off).

- exact match with the task's scorer, on answers generated greedily with the chat template;
- ROUGE-L F1 of the answers (``rouge-score``; ``evaluate.load`` would need the hub);
- perplexity on general text, base vs adapter (a forgetting check);
- preference accuracy on held-out pairs: how often log p(chosen) > log p(rejected).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import PeftModel
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ftserve.train.formats import Example, Item, PreferencePair
from ftserve.train.settings import EvalSettings
from ftserve.train.tasks import Task


@contextlib.contextmanager
def adapter_state(model: PeftModel, adapter: str | None) -> Iterator[None]:
    """Run with one named adapter active, or with adapters off (``None``: the base model)."""
    if adapter is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(adapter)
        yield


def _prompt_text(tokenizer: PreTrainedTokenizerBase, item: Item) -> str:
    return tokenizer.apply_chat_template(item.messages, tokenize=False, add_generation_prompt=True)


@torch.inference_mode()
def generate_answers(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, items: list[Item], settings: EvalSettings, desc: str
) -> list[str]:
    tokenizer.padding_side = "left"
    answers: list[str] = []
    for start in tqdm(range(0, len(items), settings.batch_size), desc=desc, unit="batch"):
        batch = [_prompt_text(tokenizer, item) for item in items[start : start + settings.batch_size]]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc, max_new_tokens=settings.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new = out[:, enc["input_ids"].shape[1] :]
        answers += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def rouge_l(predictions: list[str], references: list[str]) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores) / max(1, len(scores))


@torch.inference_mode()
def perplexity(model: PeftModel, tokenizer: PreTrainedTokenizerBase, text: str, window: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of the text."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window].unsqueeze(0)
        if chunk.shape[1] < 2:
            break
        loss = model(input_ids=chunk, labels=chunk).loss  # mean over chunk_len - 1 predictions
        total_nll += float(loss) * (chunk.shape[1] - 1)
        total_tokens += chunk.shape[1] - 1
    return math.exp(total_nll / max(1, total_tokens))


@torch.inference_mode()
def completion_logprob(model: PeftModel, tokenizer: PreTrainedTokenizerBase, item: Item, answer: str) -> float:
    """Sum of log-probs of the answer's tokens (and the end-of-turn token) after the chat prompt."""
    prompt = _prompt_text(tokenizer, item)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    picked = logprobs.gather(1, targets[:, None])[:, 0]
    return float(picked[len(prompt_ids) - 1 :].sum())


def preference_accuracy(model: PeftModel, tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair]) -> float:
    wins = sum(
        completion_logprob(model, tokenizer, p, p.chosen) > completion_logprob(model, tokenizer, p, p.rejected)
        for p in tqdm(pairs, desc="preference pairs", unit="pair")
    )
    return wins / max(1, len(pairs))


def score_split(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    items: list[Item],
    task: Task | None,
    settings: EvalSettings,
    label: str,
) -> dict[str, float]:
    """Exact match and ROUGE-L of generated answers; preference accuracy too when the items are pairs."""
    items = items[: settings.max_items]
    refs = [item.completion for item in items]
    preds = generate_answers(model, tokenizer, items, settings, desc=label)
    scorer = task.score if task else (lambda p, r: p.strip() == r.strip())
    out = {
        "items": float(len(items)),
        "exact_match": sum(scorer(p, r) for p, r in zip(preds, refs, strict=True)) / max(1, len(items)),
        "rouge_l": rouge_l(preds, refs),
    }
    pairs = [item for item in items if isinstance(item, PreferencePair)]
    if pairs:
        out["preference_accuracy"] = preference_accuracy(model, tokenizer, pairs)
    return out


def evaluate(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    variants: dict[str, str | None],
    splits: dict[str, list[Item]],
    general_text: Path | None,
    task: Task | None,
    settings: EvalSettings,
) -> dict[str, dict[str, float]]:
    """``{variant: {"<split>.<metric>": value, "general_perplexity": value}}``.

    ``variants`` maps a label to the adapter to run (``None`` = adapters off, i.e. the base model).
    """
    model.eval()
    text = general_text.read_text(encoding="utf-8") if general_text is not None else None
    results: dict[str, dict[str, float]] = {}
    for label, adapter in variants.items():
        metrics: dict[str, float] = {}
        with adapter_state(model, adapter):
            for split, items in splits.items():
                for key, value in score_split(model, tokenizer, items, task, settings, f"{label} {split}").items():
                    metrics[f"{split}.{key}"] = value
            if text is not None:
                metrics["general_perplexity"] = perplexity(model, tokenizer, text, settings.perplexity_window)
        results[label] = metrics
    return results


__all__ = ["Example", "evaluate", "perplexity", "preference_accuracy", "rouge_l"]
