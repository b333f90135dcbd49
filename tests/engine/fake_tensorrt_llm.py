"""A stand-in for the ``tensorrt_llm`` package: the documented LLM API contract the backend relies on, minimally.

``LLM(model, **kwargs)`` records its keywords; ``generate_async(token_ids, sampling_params=..., lora_request=...,
streaming=True)`` returns a ``RequestOutput``-like object that is its own async iterator, updated in place, with
``outputs[0].token_ids`` cumulative and ``abort()``; config classes record their keywords. Installed into
``sys.modules`` by ``Library.install`` for one test.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Result:
    """A streaming RequestOutput: its own async iterator, updated in place, token ids cumulative. Each step
    appends the scripted tokens; the last step finishes with ``reason``. ``abort()`` makes the next update
    the library's cancelled finish."""

    def __init__(self, steps: list[list[int]], reason: str) -> None:
        self.outputs = [Completion()]
        self.finished = False
        self.aborts = 0
        self._steps, self._reason = list(steps), reason

    def abort(self) -> None:
        self.aborts += 1
        self._steps, self._reason = [[]], "cancelled"

    def __aiter__(self) -> Result:
        return self

    async def __anext__(self) -> Result:
        if self.finished:
            raise StopAsyncIteration
        self.outputs[0].token_ids.extend(self._steps.pop(0))
        if not self._steps:
            self.finished = True
            self.outputs[0].finish_reason = self._reason
        return self


class Recorded:
    """A config class of the library: keeps its keywords."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


@dataclass
class Call:
    prompt: list[int]
    sampling: Recorded
    lora: Any
    result: Result


class Library:
    """The stand-in package: what each test scripts and what the engine asked of it."""

    def __init__(self) -> None:
        self.script: list[tuple[list[list[int]], str]] = []  # (steps, finish reason) per request, in order
        self.fail_start: Exception | None = None
        self.llms: list[Any] = []
        self.calls: list[Call] = []

    def llm_class(self, runtime: str) -> type:
        library = self

        class LLM:
            def __init__(self, model: str, **kwargs: Any) -> None:
                if library.fail_start is not None:
                    raise library.fail_start
                self.runtime, self.model, self.kwargs, self.closed = runtime, model, kwargs, False
                library.llms.append(self)

            def generate_async(
                self, inputs: list[int], sampling_params: Recorded | None = None, lora_request: Any = None,
                streaming: bool = False,
            ) -> Result:  # fmt: skip
                assert streaming, "ftserve streams every request"
                result = Result(*library.script.pop(0))
                library.calls.append(Call(inputs, sampling_params, lora_request, result))  # type: ignore[arg-type]
                return result

            def shutdown(self) -> None:
                self.closed = True

        return LLM

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        @dataclass
        class LoRARequest:
            lora_name: str
            lora_int_id: int
            lora_path: str = ""

        def module(name: str, **attrs: Any) -> None:
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
            mod.__dict__.update(attrs)
            monkeypatch.setitem(sys.modules, name, mod)

        configs = {n: type(n, (Recorded,), {}) for n in ("KvCacheConfig", "NGramDecodingConfig", "LoraConfig")}
        module("tensorrt_llm", LLM=self.llm_class("pytorch"), SamplingParams=type("SamplingParams", (Recorded,), {}))
        module("tensorrt_llm._tensorrt_engine", LLM=self.llm_class("tensorrt"))
        module("tensorrt_llm.llmapi", KvCacheConfig=configs["KvCacheConfig"],
               NGramDecodingConfig=configs["NGramDecodingConfig"])  # fmt: skip
        module("tensorrt_llm.lora_manager", LoraConfig=configs["LoraConfig"])
        module("tensorrt_llm.executor")
        module("tensorrt_llm.executor.request", LoRARequest=LoRARequest)
