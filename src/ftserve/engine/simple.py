"""The reference engine: requests interleaved token by token, each with its own Hugging Face KV cache.

Every step runs one transformers forward per running request (no batching across requests). Slow but
simple; the native engine is checked against it and against ``generate``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import torch

from ftserve.config import EngineConfig
from ftserve.engine.base import LoopEngine, RequestState, Results
from ftserve.engine.loader import HFTokenizer, eos_token_ids, load_model
from ftserve.engine.lora import AdapterError
from ftserve.engine.protocol import EngineStats, register_engine
from ftserve.engine.request import AdapterNotFoundError, GenerationRequest
from ftserve.engine.sampler import sample_token


class SimpleEngine(LoopEngine):
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: HFTokenizer,
        eos_ids: frozenset[int],
        config: EngineConfig,
        device: torch.device,
    ) -> None:
        context = int(getattr(model.config, "max_position_embeddings", 1 << 20))
        super().__init__(tokenizer, eos_ids, min(config.max_model_len, context))
        self.model = model
        self.config = config
        self.device = device
        self._waiting: deque[RequestState] = deque()
        self._running: list[RequestState] = []
        self._caches: dict[int, object] = {}  # id(state) -> the model's KV cache object for that request

    @classmethod
    def from_dir(cls, model_dir: Path, config: EngineConfig) -> SimpleEngine:
        model, device, _ = load_model(model_dir, config)
        tokenizer = HFTokenizer(model_dir)
        return cls(model, tokenizer, eos_token_ids(model_dir, tokenizer), config, device)

    async def load_adapter(self, name: str, path: Path) -> object:
        raise AdapterError("the simple engine serves the base model only; use engine.backend: native")

    def stats(self) -> EngineStats:
        running, waiting = len(self._running), len(self._waiting)
        by_base = {None: running} if running else {}
        return EngineStats(
            running, waiting, running_by_adapter=by_base, waiting_by_adapter={None: waiting} if waiting else {}
        )

    def _step_tokens(self, plan: list[RequestState]) -> dict[str | None, int]:
        return {None: sum(len(s.generated[-1:] or s.request.prompt_token_ids) for s in plan)}

    def _validate(self, request: GenerationRequest) -> None:
        if request.adapter is not None:
            raise AdapterNotFoundError(f"adapter {request.adapter!r} not found; loaded adapters: none")
        self._check_queue(len(self._running), len(self._waiting), self.config)

    def _enqueue(self, state: RequestState) -> None:
        self._waiting.append(state)

    def _states(self) -> Iterable[RequestState]:
        return [*self._running, *self._waiting]

    def _plan(self) -> list[RequestState] | None:
        self._drop_aborted()
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            state = self._waiting.popleft()
            state.scheduled_at = time.monotonic()
            self._running.append(state)
        return list(self._running) or None

    def _execute(self, plan: list[RequestState]) -> Results:
        results = []
        with torch.inference_mode():
            for state in plan:
                if state.aborted:
                    continue
                try:
                    results.append((state, self._advance(state)))
                except Exception as exc:
                    results.append((state, self.failed(state, exc)))
        return results

    def _advance(self, state: RequestState):  # type: ignore[no-untyped-def]
        pending = state.generated[-1:] or state.request.prompt_token_ids
        ids = torch.tensor([pending], device=self.device)
        result = self.model(input_ids=ids, past_key_values=self._caches.get(id(state)), use_cache=True)
        self._caches[id(state)] = result.past_key_values
        token = sample_token(result.logits[0, -1], state.request.params, state.generator)
        return self.accept(state, token)

    def _release(self, state: RequestState) -> None:
        self._caches.pop(id(state), None)
        if state in self._running:
            self._running.remove(state)
        if state in self._waiting:
            self._waiting.remove(state)


@register_engine("simple")
def _build(model_dir: Path, config: EngineConfig) -> SimpleEngine:
    return SimpleEngine.from_dir(model_dir, config)
