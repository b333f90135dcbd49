"""Train / held-out split that never leaks.

Items are assigned by a stable hash of their group (the record's ``group`` field when it has one, otherwise
its normalized prompt), so every item of a group, and every copy of a prompt, lands on the same side. The
split is a pure function of the data and the seed: rerunning it gives the same sides.
"""

from __future__ import annotations

import hashlib

from ftserve.train.filters import normalize
from ftserve.train.formats import DataError, Item


def group_key(item: Item) -> str:
    return item.group if item.group else normalize(item.prompt_text)


def _unit(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_items(items: list[Item], heldout_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Return (train, heldout); raises when either side would be empty."""
    train: list[Item] = []
    heldout: list[Item] = []
    for item in items:
        (heldout if _unit(group_key(item), seed) < heldout_fraction else train).append(item)
    if not train or (heldout_fraction > 0 and not heldout):
        raise DataError(
            f"split of {len(items)} items at held-out fraction {heldout_fraction} left "
            f"{len(train)} train / {len(heldout)} held-out; use more data or another fraction"
        )
    leaked = {group_key(i) for i in train} & {group_key(i) for i in heldout}
    if leaked:  # cannot happen with hashing by group; checked because a leak would void the evaluation
        raise DataError(f"split leaked {len(leaked)} groups into both sides")
    return train, heldout
