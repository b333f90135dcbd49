"""Domain tasks: a data generator and a scorer per task, registered by name."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod

from ftserve.train.formats import Example, PreferencePair


class Task(ABC):
    """A task makes varied chat examples (and preference pairs) and scores an answer by exact match."""

    name: str

    @abstractmethod
    def example(self, rng: random.Random) -> Example:
        """One example; its ``group`` names the phrasing skeleton, so a split keeps skeletons apart."""

    def generate(self, n: int, seed: int) -> list[Example]:
        rng = random.Random(f"{self.name}:{seed}")
        return [self.example(rng) for _ in range(n)]

    def preferences(self, n: int, seed: int) -> list[PreferencePair]:
        rng = random.Random(f"{self.name}:pref:{seed}")
        pairs = []
        for _ in range(n):
            ex = self.example(rng)
            pairs.append(PreferencePair(ex.prompt, ex.completion, self.corrupt(ex.completion, rng), ex.group))
        return pairs

    @abstractmethod
    def corrupt(self, answer: str, rng: random.Random) -> str:
        """A plausible wrong answer (for DPO's rejected side)."""

    def score(self, prediction: str, reference: str) -> bool:
        return prediction.strip() == reference.strip()


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> Task:
    from ftserve.train.tasks import order_extract, support_router  # noqa: F401 - registers the tasks

    try:
        return TASKS[name]()
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def add_typos(text: str, rng: random.Random, rate: float) -> str:
    """Swap, drop or double a letter in some words (never in words with digits, '#' or '-')."""
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) < 4 or not word.isalpha() or rng.random() >= rate:
            continue
        j = rng.randrange(1, len(word) - 1)
        op = rng.choice(("swap", "drop", "double"))
        if op == "swap":
            word = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
        elif op == "drop":
            word = word[:j] + word[j + 1 :]
        else:
            word = word[:j] + word[j] + word[j:]
        words[i] = word
    return " ".join(words)
