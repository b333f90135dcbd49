"""The compiled paged-attention kernel: when it is used, how it fails, and that it never reads out of bounds."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.utils.cpp_extension

from ftserve.engine import kernels
from ftserve.engine.kernels import paged_attention_kernel

CPU = torch.device("cpu")


def test_torch_choice_and_other_devices_take_the_torch_path() -> None:
    assert paged_attention_kernel("torch", CPU) is None
    assert paged_attention_kernel("auto", torch.device("meta")) is None


def test_a_kernel_that_cannot_be_built_leaves_the_torch_path_with_the_reason_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_compiler(**_: object) -> None:
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="ftserve.engine.kernels"):
        assert kernels._compile() is None
    assert "c++: command not found" in caplog.text


def test_the_kernel_refuses_block_ids_and_lengths_outside_the_cache() -> None:
    kernel = paged_attention_kernel("auto", CPU)
    assert kernel is not None
    k = v = torch.zeros(3, 8 * 4, 16)  # 8 blocks of 4 slots
    q = torch.zeros(1, 9, 16)
    one = torch.zeros(1, dtype=torch.long)
    good_table = torch.tensor([[1, 2]])
    assert kernel(q, k, v, good_table, one, torch.tensor([8]), 4, 0.25).shape == q.shape
    with pytest.raises(RuntimeError, match="block id out of range"):
        kernel(q, k, v, torch.tensor([[1, 8]]), one, torch.tensor([8]), 4, 0.25)
    with pytest.raises(RuntimeError, match="length out of range"):
        kernel(q, k, v, good_table, one, torch.tensor([9]), 4, 0.25)
    with pytest.raises(RuntimeError, match="row out of range"):
        kernel(q, k, v, good_table, torch.ones(1, dtype=torch.long), torch.tensor([8]), 4, 0.25)
