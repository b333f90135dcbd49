"""Compiled CPU kernels of the native engine, built on first use and cached.

- ``paged_attention.cpp``: attention of decode rows and short chunks, reading the paged KV cache in place;
- ``rows_linear.cpp``: the dense projections, each output reduced in one fixed order whatever the row count,
  so a token's result does not depend on the batch it shares a forward with (what keeps greedy speculative
  decoding and continuous batching token-for-token equal to decoding one sequence alone);
- ``draft_layers.cpp``: an INT8 speculative draft's decode pass, every layer in one call (in Python a pass
  costs ~5 ms of small operations, too much beside the target's step for drafts to pay).

All three (beside this file) are compiled into one extension with torch's JIT C++ extension builder (g++ and ninja)
into torch's extension folder (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), keyed by
the source, the flags and this CPU's instruction sets, so a later start loads it in milliseconds and a
changed source or another CPU builds anew. Built for the machine it runs on (``-march=native``).

When it cannot be built (no compiler, a torch without headers) the engine logs why and keeps torch's
gather-and-matmul attention, ``F.linear`` and the draft's Python forward, which compute the same thing up
to rounding; ``engine.attention_kernel: torch`` and ``engine.linear_kernel: torch`` (which also keeps the
draft's passes in Python) ask for those paths outright.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from pathlib import Path
from typing import Protocol

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("paged_attention.cpp", "rows_linear.cpp", "draft_layers.cpp")]
# -fopenmp: at::parallel_for is inline OpenMP, serial without it; the extension then needs libgomp.so.1, which
# resolves to the copy torch already loaded (one thread pool). omp simd vectorizes the dots without fast-math.
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


class PagedAttention(Protocol):
    """``torch.ops.ftserve.paged_attention``: q [T, H, D] over one layer's paged cache → [T, H, D]."""

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        tables: torch.Tensor,
        rows: torch.Tensor,
        lens: torch.Tensor,
        block_size: int,
        scale: float,
    ) -> torch.Tensor: ...


class RowsLinear(Protocol):
    """``torch.ops.ftserve.rows_linear``: x [M, K] @ w [N, K].T → [M, N], row-invariant (see the source)."""

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor: ...


class DraftLayers(Protocol):
    """``torch.ops.ftserve.draft_layers``: an INT8 draft's layers for one token row per sequence (see the
    source for the arguments)."""

    def __call__(
        self,
        h: torch.Tensor,
        weights: list[torch.Tensor],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        tables: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        heads: int,
        kv_heads: int,
        block_size: int,
        eps: float,
    ) -> torch.Tensor: ...


def runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the compiled kernels take tensors of ``dtype`` on ``device``: on CPU, float32 or bfloat16."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)


def paged_attention_kernel(choice: str, device: torch.device) -> PagedAttention | None:
    """The compiled kernel for ``engine.attention_kernel`` on ``device``; None means torch's path."""
    if not _wanted(choice, device):
        return None
    op: PagedAttention = torch.ops.ftserve.paged_attention
    return op


def rows_linear_kernel(choice: str, device: torch.device) -> RowsLinear | None:
    """The compiled projection kernel for ``engine.linear_kernel`` on ``device``; None means ``F.linear``."""
    if not _wanted(choice, device):
        return None
    op: RowsLinear = torch.ops.ftserve.rows_linear
    return op


def draft_layers_kernel(choice: str, device: torch.device) -> DraftLayers | None:
    """The compiled draft pass for ``engine.linear_kernel`` on ``device``; None means the Python forward."""
    if not _wanted(choice, device):
        return None
    op: DraftLayers = torch.ops.ftserve.draft_layers
    return op


def _wanted(choice: str, device: torch.device) -> bool:
    """A kernel setting asks for the compiled path on a CPU, and the extension is built (or builds now)."""
    return choice != "torch" and device.type == "cpu" and _build()


@functools.cache
def _build() -> bool:
    """Once per process: a second extension registering the same operators would abort."""
    return _compile()


def _compile() -> bool:
    try:
        import ninja  # the builder runs the ninja binary this package ships, which need not be on PATH
        from torch.utils.cpp_extension import load

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
        started = time.perf_counter()
        load(
            name=f"ftserve_kernels_{_cpu_key()}",
            sources=[str(source) for source in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # any failure to build keeps the torch path; the engine still serves
        log.warning("CPU kernels not built, the engine uses torch's attention and F.linear instead: %s", exc)
        return False
    took = time.perf_counter() - started
    log.info("CPU kernels ready: paged attention, row-invariant linear, draft layers (%.1f s)", took)
    return True


def _cpu_key() -> str:
    """What ``-march=native`` compiles for: the machine and its CPU flags (a build is not reused elsewhere)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]
