"""``engine.dtype: auto``: the fastest correct dtype for the device, the CPU and the checkpoint."""

from __future__ import annotations

import pytest
import torch

from ftserve.engine import loader
from ftserve.engine.loader import pick_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("native_bf16", "device", "quantized", "expected"),
    [
        (False, CPU, False, torch.float32),  # AVX2-only CPU: bf16 matmuls are emulated, ~4x slower
        (True, CPU, False, torch.bfloat16),
        (False, CPU, True, torch.bfloat16),  # packed INT8/INT4 kernels want bf16 activations
        (False, CUDA, False, torch.bfloat16),
    ],
)
def test_auto_dtype(
    monkeypatch: pytest.MonkeyPatch, native_bf16: bool, device: torch.device, quantized: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native_bf16)
    assert pick_dtype("auto", device, quantized) == expected


def test_an_explicit_dtype_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: False)
    assert pick_dtype("bfloat16", CPU) == torch.bfloat16 and pick_dtype("float32", CPU, quantized=True) == torch.float32
