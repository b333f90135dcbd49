"""What a backend that wraps another library hands the shell in ``engine/external.py``: its updates, the
adapters it is told about, and the helpers every such backend uses to import and start its library."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ftserve.engine.request import FinishReason

log = logging.getLogger(__name__)
T = TypeVar("T")

# A library's finish words; "stop" covers end of sequence and stop strings (ours decide those first anyway).
LIBRARY_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.ABORT,
    "cancelled": FinishReason.ABORT,
    "timeout": FinishReason.ABORT,
}


class BackendNotInstalledError(RuntimeError):
    """The configured backend's library is not importable here; the message says what to install."""


async def build_off_loop(build: Callable[[], T], shut_down: Callable[[T], object]) -> T:
    """Run a library's blocking engine construction (weights, profiling, warm-up: minutes) in a thread. If the
    start-up times out meanwhile, the thread still finishes: what it built is shut down then, not leaked."""
    built = asyncio.ensure_future(asyncio.to_thread(build))
    try:
        return await asyncio.shield(built)
    except asyncio.CancelledError:
        built.add_done_callback(lambda done: _shut_down_late(done, shut_down))
        raise


def _shut_down_late(done: asyncio.Future[T], shut_down: Callable[[T], object]) -> None:
    if not done.cancelled() and done.exception() is None:
        log.warning("an engine finished starting after its start-up timeout: shutting it down")
        shut_down(done.result())


def require_module(module: str, backend: str, install: str) -> None:
    """Fail at configuration time, naming what to install, when ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise BackendNotInstalledError(
            f"engine.backend {backend!r} needs the {module!r} package, which is not installed: {install}"
        )


@dataclass
class ExternalAdapter:
    """An adapter as this shell tracks it; ``lora_id`` is the integer id the library knows it by."""

    name: str
    path: Path
    version: str
    rank: int
    lora_id: int
    pinned: bool = False
    added: bool = False  # handed to the library (False until the library has started)


@dataclass(frozen=True)
class BackendUpdate:
    """What the library reported for one request since its previous update."""

    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # the library's own words: "stop", "length", "abort", ...
    num_cached_tokens: int | None = None  # prompt tokens the library found in its prefix cache
