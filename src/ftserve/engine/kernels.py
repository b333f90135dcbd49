"""Compiled CPU kernels of the native engine, built on first use and cached.

``paged_attention.cpp`` (beside this file) is compiled with torch's JIT C++ extension builder (g++ and ninja)
into torch's extension folder (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), keyed by
the source, the flags and this CPU's instruction sets, so a later start loads it in milliseconds and a
changed source or another CPU builds anew. Built for the machine it runs on (``-march=native``).

When it cannot be built (no compiler, a torch without headers) the engine logs why and keeps torch's
gather-and-matmul attention, which computes the same thing; ``engine.attention_kernel: torch`` asks for
that path outright.
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

SOURCE = Path(__file__).with_name("paged_attention.cpp")
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


def paged_attention_kernel(choice: str, device: torch.device) -> PagedAttention | None:
    """The compiled kernel for ``engine.attention_kernel`` on ``device``; None means torch's path."""
    if choice == "torch" or device.type != "cpu":
        return None
    return _build()


@functools.cache
def _build() -> PagedAttention | None:
    """Once per process: a second extension registering the same operators would abort."""
    return _compile()


def _compile() -> PagedAttention | None:
    try:
        import ninja  # the builder runs the ninja binary this package ships, which need not be on PATH
        from torch.utils.cpp_extension import load

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
        started = time.perf_counter()
        load(
            name=f"ftserve_paged_attention_{_cpu_key()}",
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # any failure to build keeps the torch path; the engine still serves
        log.warning("paged-attention kernel not built, attention gathers KV in torch instead: %s", exc)
        return None
    op: PagedAttention = torch.ops.ftserve.paged_attention
    log.info("paged-attention kernel ready (%.1f s)", time.perf_counter() - started)
    return op


def _cpu_key() -> str:
    """What ``-march=native`` compiles for: the machine and its CPU flags (a build is not reused elsewhere)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]
