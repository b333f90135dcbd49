"""Replace a published folder (an adapter, an optimized model) so readers never see a half-written one."""

from __future__ import annotations

import shutil
from pathlib import Path


def swap_dir(source: Path, target: Path, copy: bool = False) -> None:
    """Put ``source`` at ``target``: the old folder is moved aside first and removed only after the swap.

    With ``copy`` the source stays where it is (it is copied beside the target first, so the final step is
    still a rename on the target's file system).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    incoming = target.with_name(f".{target.name}.incoming")
    old = target.with_name(f".{target.name}.previous")
    for leftover in (incoming, old):
        shutil.rmtree(leftover, ignore_errors=True)
    if copy:
        shutil.copytree(source, incoming)
    else:
        source.rename(incoming)
    if target.exists():
        target.rename(old)
    incoming.rename(target)
    shutil.rmtree(old, ignore_errors=True)
