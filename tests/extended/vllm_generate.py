"""vLLM's side of ``make test-extended``, run under vLLM's interpreter (it pins its own torch).

``python vllm_generate.py generate MODEL_DIR CONVERSATIONS.json OUT.json``: greedy chat completions with
vLLM's offline API; OUT gets ``{"quantization": <what vLLM loaded>, "texts": [...]}``.

``python vllm_generate.py layout MODEL_DIR OUT.safetensors``: read a GPTQ folder the way vLLM does: its
``quantization_config`` through vLLM's own ``AutoGPTQConfig`` (which refuses what vLLM cannot serve) and
every quantized linear unpacked with vLLM's ``unpack_quantized_values_into_int32`` and its weight type's
bias; OUT gets the dense weights [N, K] vLLM computes with, for the caller to compare with its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def generate(model: str, conversations_file: str, out_file: str) -> None:
    from vllm import LLM, SamplingParams

    conversations = json.loads(Path(conversations_file).read_text())
    llm = LLM(model=model, dtype="bfloat16", max_model_len=512, seed=0)
    outputs = llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=48))
    config = llm.llm_engine.vllm_config.model_config
    result = {"quantization": config.quantization, "texts": [o.outputs[0].text for o in outputs]}
    Path(out_file).write_text(json.dumps(result, indent=2) + "\n")


def layout(model: str, out_file: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32

    folder = Path(model)
    config = AutoGPTQConfig.from_config(json.loads((folder / "config.json").read_text())["quantization_config"])
    tensors = load_file(str(folder / "model.safetensors"))
    dense = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        base = key.removesuffix(".qweight")
        q = unpack_quantized_values_into_int32(tensors[key], config.quant_type, 0)  # [K, N]
        g_idx = tensors[f"{base}.g_idx"].long()
        w = (q - config.quant_type.bias).float() * tensors[f"{base}.scales"].float()[g_idx]
        dense[f"{base}.weight"] = w.T.contiguous()
    save_file(dense, out_file, metadata={"quant_type": str(config.quant_type), "group_size": str(config.group_size)})
    print(json.dumps({"linears": len(dense), "quant_type": str(config.quant_type)}))
    assert torch.isfinite(torch.stack([w.abs().max() for w in dense.values()])).all()


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"generate": generate, "layout": layout}[command](*args)
