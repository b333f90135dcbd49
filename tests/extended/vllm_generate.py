"""Greedy chat completions from a model folder with vLLM's offline API, as JSON; run under vLLM's interpreter.

``python vllm_generate.py MODEL_DIR CONVERSATIONS.json OUT.json``: CONVERSATIONS is a list of chat message
lists; OUT gets ``{"quantization": <what vLLM loaded>, "texts": [...]}``. ``make test-extended`` runs it
with ``.venv-vllm/bin/python`` (vLLM pins its own torch, so it cannot import ftserve's environment).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    from vllm import LLM, SamplingParams

    model, conversations_file, out_file = sys.argv[1:4]
    conversations = json.loads(Path(conversations_file).read_text())
    llm = LLM(model=model, dtype="bfloat16", max_model_len=512, seed=0)
    outputs = llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=48))
    config = llm.llm_engine.vllm_config.model_config
    result = {"quantization": config.quantization, "texts": [o.outputs[0].text for o in outputs]}
    Path(out_file).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
