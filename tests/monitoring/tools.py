"""Where the tests find Debian's ``prometheus`` and ``promtool``: ``$FTSERVE_PROMETHEUS_BIN`` (a folder), the
copy ``make prometheus`` unpacks under ``.tools/``, or ``PATH``. Missing tools fail the test that needs them,
saying how to get them, rather than skipping it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"


def prometheus_tool(name: str) -> Path:
    folders = [os.environ.get("FTSERVE_PROMETHEUS_BIN"), str(ROOT / ".tools" / "prometheus" / "usr" / "bin")]
    for folder in filter(None, folders):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: run `make prometheus` (unpacks Debian's prometheus into .tools/)")
    return Path(found)
