"""The train / held-out split is deterministic and never puts one group on both sides."""

from __future__ import annotations

import pytest

from ftserve.train.formats import DataError, Example
from ftserve.train.split import group_key, split_items


def items(n: int, groups: int) -> list[Example]:
    return [Example((("user", f"prompt {i}"),), "a", f"g{i % groups}") for i in range(n)]


def test_groups_never_straddle_the_split_and_rerun_is_identical() -> None:
    data = items(600, 40)
    train, heldout = split_items(data, 0.25, seed=3)
    assert {group_key(i) for i in train}.isdisjoint({group_key(i) for i in heldout})
    assert len(train) + len(heldout) == 600 and heldout
    assert split_items(data, 0.25, seed=3) == (train, heldout)
    assert split_items(data, 0.25, seed=4) != (train, heldout)


def test_ungrouped_copies_of_a_prompt_land_together() -> None:
    data = [Example((("user", f"Prompt {i % 50}"),), "a") for i in range(200)]
    data += [Example((("user", f"  prompt {i % 50} "),), "b") for i in range(50)]  # same after normalizing
    train, heldout = split_items(data, 0.3, seed=0)
    assert {group_key(i) for i in train}.isdisjoint({group_key(i) for i in heldout})


def test_a_split_that_leaves_a_side_empty_is_an_error() -> None:
    with pytest.raises(DataError, match="held-out"):
        split_items(items(10, 1), 0.5, seed=0)  # one group: everything on one side
