"""Calibration data for quantizers that need it (GPTQ): token sequences from the adapter's training set."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from ftserve.engine.loader import HFTokenizer
from ftserve.optimize.recipe import QuantizeStep
from ftserve.train.formats import DataError, Example, load_jsonl
from ftserve.train.pipeline import split_of
from ftserve.train.replay import load_replay
from ftserve.train.settings import load_train_config


def _calibration_sources(path: Path, tokenizer: HFTokenizer) -> list[list[list[int]]]:
    """Token id sequences of one calibration entry, as one or more sources to draw from evenly.

    A training config (``adapters/<name>.yaml``) gives its train split (never the held-out side the gate
    scores) and its replay text; a JSONL file gives replay text as is or task examples through the chat
    template.
    """
    if path.suffix in (".yaml", ".yml"):
        config = load_train_config(path)
        sources = [_encode_examples(split_of(path).train, tokenizer)]
        if config.replay is not None:
            sources.append([tokenizer.encode(text) for text in load_replay(config.replay.file)])
        return sources
    first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()), "{}")
    if set(json.loads(first)) == {"text"}:
        return [[tokenizer.encode(text) for text in load_replay(path)]]
    return [_encode_examples(load_jsonl(path), tokenizer)]


def _encode_examples(items: list, tokenizer: HFTokenizer) -> list[list[int]]:
    examples = [i for i in items if isinstance(i, Example)]
    return [tokenizer.apply_chat_template(i.messages) + tokenizer.encode(i.completion) for i in examples]


def calibration_sequences(step: QuantizeStep, tokenizer: HFTokenizer) -> list[list[int]]:
    """``calibration_items`` sequences taken in turn from the sources, each read at an even stride (a short
    source gives what it has and the others fill in)."""
    sources = [(path, src) for path in step.calibration for src in _calibration_sources(path, tokenizer)]
    per_source = -(-step.calibration_items // len(sources))
    picks = []
    for path, found in sources:
        if not found:
            raise DataError(f"quantize {step.method}: {path} has no usable calibration records")
        picks.append([ids[: step.calibration_max_tokens] for ids in found[:: max(1, len(found) // per_source)]])
    in_turn = [seq for group in itertools.zip_longest(*picks) for seq in group if seq is not None]
    return in_turn[: step.calibration_items]
