"""The baseline every engine figure is compared with: Hugging Face ``generate`` on the same weights.

All requests of a scenario go in one left-padded batch (the way people serve with plain transformers),
greedy, with ``min_new_tokens == max_new_tokens`` so every row makes exactly the tokens the engine makes.
Rows of a batch advance in lock-step, so they share one TTFT (start → first step done), and TPOT figures
are percentiles over the batch's step intervals. ``adapters8`` runs PEFT's mixed-adapter batch
(``generate(..., adapter_names=[one per row])``). HF has no prefix cache: scenarios with identical requests
(``prefix-on`` / ``prefix-off``) are measured once, and the second row says it reuses the first.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ftserve.bench.measure import Measurement
from ftserve.bench.workloads import WARMUP_MESSAGES, Scenario
from ftserve.config import EngineConfig
from ftserve.engine.loader import HFTokenizer, eos_token_ids, load_model

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class StepTimer(StoppingCriteria):
    """Records when each decoding step is done; never stops generation.

    ``generate`` calls its stopping criteria once per step, right after the step's tokens are appended.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        if self.device.type == "cuda":  # kernels run ahead of the host: time finished work only
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, padded on the left so every row's next token lands in the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


class HFGenerate:
    """Loads the model once (same dtype and device as the engine) and measures scenarios on it."""

    name = "hf-generate"

    def __init__(self, model_dir: Path, config: EngineConfig) -> None:
        self.model_dir = model_dir
        self.config = config
        self.model, self.device, self.dtype = load_model(model_dir, config)
        self.tokenizer = HFTokenizer(model_dir)
        self.pad_id = _pad_id(self.model, model_dir, self.tokenizer)
        self._peft: tuple[tuple[str, ...], torch.nn.Module] | None = None  # adapters loaded, and the model
        self._measured: dict[str, tuple[str, Measurement]] = {}  # workload key → (scenario, measurement)

    def warm_up(self) -> None:
        self.generate(self.model, [self.tokenizer.apply_chat_template(WARMUP_MESSAGES)], 4)

    def measured_as(self, scenario: Scenario) -> str | None:
        """The scenario whose measurement ``run`` returns for ``scenario``'s requests, if one was taken."""
        entry = self._measured.get(scenario.workload_key())
        return entry[0] if entry else None

    def run(self, scenario: Scenario, adapter_dirs: Mapping[str, Path]) -> Measurement:
        """Measure ``scenario`` (once per distinct set of requests; see the module docstring)."""
        key = scenario.workload_key()
        if key in self._measured:
            return self._measured[key][1]
        prompts = [self.tokenizer.apply_chat_template(r.messages) for r in scenario.requests]
        if scenario.adapters:
            model = self._peft_model(scenario.adapters, adapter_dirs)
            names = [r.adapter or BASE_ADAPTER for r in scenario.requests]
            measurement = self.generate(model, prompts, scenario.max_new_tokens, names)
        else:
            measurement = self.generate(self.model, prompts, scenario.max_new_tokens)
        self._measured[key] = (scenario.name, measurement)
        return measurement

    def generate(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        adapter_names: list[str] | None = None,
    ) -> Measurement:
        """One batched greedy ``generate`` of exactly ``max_new_tokens`` per row, timed per step."""
        input_ids, attention_mask = left_pad(prompts, self.pad_id, self.device)
        timer = StepTimer(self.device)
        extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(  # type: ignore[operator]
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,  # suppresses EOS until the last token: every row is full length
                do_sample=False,
                pad_token_id=self.pad_id,
                stopping_criteria=StoppingCriteriaList([timer]),
                **extra,
            )
        end = time.perf_counter()
        new_tokens = int(out.shape[1] - input_ids.shape[1])
        if new_tokens != max_new_tokens or len(timer.times) != new_tokens:
            log.warning("generate made %d tokens in %d steps; asked %d", new_tokens, len(timer.times), max_new_tokens)
        ttft = timer.times[0] - start if timer.times else end - start
        return Measurement(
            output_tokens=new_tokens * len(prompts),
            wall_s=end - start,
            ttft_s=[ttft] * len(prompts),
            tpot_s=np.diff(np.asarray(timer.times)).tolist(),
        )

    def _peft_model(self, names: Sequence[str], adapter_dirs: Mapping[str, Path]) -> torch.nn.Module:
        """A PEFT model holding every adapter in ``names``, built once per set and warmed up."""
        if self._peft is not None and self._peft[0] == tuple(names):
            return self._peft[1]
        from peft import PeftModel

        self._peft = None
        gc.collect()
        base, _, _ = load_model(self.model_dir, self.config)  # a fresh copy: PEFT wraps its base in place
        model = PeftModel.from_pretrained(base, str(adapter_dirs[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
        model.eval()
        log.info("PEFT baseline holds %d adapters: %s", len(names), ", ".join(names))
        prompt = self.tokenizer.apply_chat_template(WARMUP_MESSAGES)
        self.generate(model, [prompt] * len(names), 4, list(names))  # warm-up of the mixed-batch path
        self._peft = (tuple(names), model)
        return model

    def close(self) -> None:
        self._peft = None
        del self.model
        gc.collect()


def _pad_id(model: torch.nn.Module, model_dir: Path, tokenizer: HFTokenizer) -> int:
    """The generation config's pad id, else the model config's, else the smallest EOS id."""
    for source in (getattr(model, "generation_config", None), model.config):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    eos = eos_token_ids(model_dir, tokenizer)
    if not eos:
        raise ValueError("the model has neither a pad token nor an EOS token to pad batches with")
    return min(eos)
