"""Replay text against forgetting: the base model's own continuations of general openings.

An adapter trained only on short structured answers drifts on everything else (general-text perplexity
rose ~30% in a run without replay). Mixing a small language-modelling loss on text the *base model*
wrote keeps the adapter close to the base distribution where the task does not need it to move: the
negative log-likelihood of base samples is, in expectation, the cross-entropy to the base model's own
next-token distribution (KL to the base plus a constant). The samples are generated once, seeded, and
shipped as JSONL (``{"text": ...}``); the held-out general text used for the perplexity check is never
part of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ftserve.train.formats import DataError

OPENINGS = (
    "The history of", "In the morning, the", "Scientists have found that", "A good way to learn", "The city of",
    "Many people believe", "When the weather turns cold,", "The main reason", "Music has always", "In a small village,",
    "The ocean covers", "Good teachers often", "The first computers", "A healthy breakfast", "Trees grow",
    "The museum opened", "Travelling by train", "Most languages", "The recipe calls for", "Every year, farmers",
    "The team decided", "Children learn", "The moon", "An old map showed", "Writing a letter", "The market was",
    "Sleep is important because", "The river", "Football is", "The library", "Mountains are formed", "Coffee",
    "The painter", "During the war,", "A simple experiment", "The newspaper reported", "Birds migrate",
    "The company announced", "Learning to swim", "The village festival", "Electric cars", "The desert at night",
    "Ancient Rome", "The best advice", "A short walk", "The island", "Volcanoes", "The orchestra", "Honey bees",
    "The bridge was built", "Photography", "The garden", "Chess is", "The storm", "Bread", "The teacher asked",
    "Recycling", "The train station", "Our solar system", "The old lighthouse",
)  # fmt: skip


@torch.inference_mode()
def generate_replay(model_dir: Path, n: int, seed: int, max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """``n`` sampled continuations (temperature 1, top-p 0.95) of the openings, in bf16 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    torch.manual_seed(seed)
    prompts = [OPENINGS[i % len(OPENINGS)] for i in range(n)]
    texts: list[str] = []
    for start in tqdm(range(0, n, batch_size), desc="replay", unit="batch"):
        batch = prompts[start : start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        out = model.generate(
            **enc, do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [f"{p} {t.strip()}" for p, t in zip(prompts, texts, strict=True) if t.strip()]


def write_replay(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")


def load_replay(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: no such replay file")
    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{lineno}: expected a JSON object with a 'text' string") from None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{lineno}: 'text' must be a non-empty string")
        texts.append(text)
    if not texts:
        raise DataError(f"{path}: no records")
    return texts
