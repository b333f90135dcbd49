"""The native engine: continuous batching, paged KV with prefix caching, one batched forward per step."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from ftserve.config import EngineConfig
from ftserve.engine.base import LoopEngine, RequestState, Results
from ftserve.engine.batch import SchedulerOutput
from ftserve.engine.block_manager import BlockManager
from ftserve.engine.draft_model import DraftModel, load_draft
from ftserve.engine.kernels import paged_attention_kernel, rows_linear_kernel
from ftserve.engine.loader import HFTokenizer, eos_token_ids, prepare_runtime
from ftserve.engine.lora import AdapterError, LoraAdapter, LoraManager, load_peft_adapter
from ftserve.engine.model import KVCache, NativeLlama
from ftserve.engine.protocol import AdapterInfo, EngineStats, register_engine
from ftserve.engine.request import AdapterNotFoundError, GenerationOutput, GenerationRequest
from ftserve.engine.runner import build_batch
from ftserve.engine.sampler import sample_token
from ftserve.engine.scheduler import Scheduler, Sequence
from ftserve.engine.speculative import verify
from ftserve.engine.speculator import Speculator

log = logging.getLogger(__name__)


class NativeEngine(LoopEngine):
    def __init__(
        self,
        model: NativeLlama,
        tokenizer: HFTokenizer,
        eos_ids: frozenset[int],
        config: EngineConfig,
        draft: DraftModel | None = None,
    ):
        max_len = min(config.max_model_len, model.shape.max_position)
        super().__init__(tokenizer, eos_ids, max_len)
        self.model = model
        self.config = config
        capacity = config.kv_cache_tokens or config.max_num_seqs * max_len
        num_blocks = max(-(-capacity // config.block_size), -(-max_len // config.block_size))
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        kernel = paged_attention_kernel(config.attention_kernel, model.device)
        self.cache = KVCache(model.shape, num_blocks, config.block_size, model.dtype, model.device, kernel)
        linear = rows_linear_kernel(config.linear_kernel, model.device)
        model.use_linear_kernel(linear)
        if draft is not None:
            draft.bind(self.cache, model.shape, linear)
        self.speculator = Speculator(config.speculative, max_len, draft, model.matmul_rows)
        self.scheduler = Scheduler(
            self.blocks, config.max_num_seqs, config.max_num_batched_tokens, config.max_loras, self.speculator
        )
        self.loras = LoraManager(
            model.shape,
            config.max_loras,
            config.max_lora_rank,
            model.device,
            model.dtype,
            config.max_cpu_loras,
            linear,
        )
        self._seqs: dict[int, Sequence] = {}
        self._draining: set[str] = set()  # adapters being unloaded once their requests finish
        log.info(
            "native engine: %d KV blocks of %d tokens (%.0f MiB), prefix caching %s",
            num_blocks,
            config.block_size,
            (self.cache.k.numel() + self.cache.v.numel()) * self.cache.k.element_size() / 2**20,
            "on" if config.enable_prefix_caching else "off",
        )

    @classmethod
    def from_dir(cls, model_dir: Path, config: EngineConfig) -> NativeEngine:
        device, dtype, threads = prepare_runtime(config, model_dir)
        model = NativeLlama.from_dir(model_dir, device, dtype)
        tokenizer = HFTokenizer(model_dir)
        eos = eos_token_ids(model_dir, tokenizer)
        log.info("loaded %s on %s as %s (%d CPU threads)", model_dir.name, device, dtype, threads)
        return cls(model, tokenizer, eos, config, _draft_or_none(config, model_dir, model))

    def adapters(self) -> list[str]:
        return sorted(set(self.loras.registered) - self._draining)

    def adapter_info(self) -> list[AdapterInfo]:
        in_flight = Counter(seq.request.adapter for seq in self._seqs.values())
        return [
            AdapterInfo(
                name=a.name,
                path=str(a.path),
                version=a.version,
                rank=a.rank,
                residency=self.loras.residency(a.name),
                pinned=a.name in self.loras.pinned,
                in_flight=in_flight[a.name],
                draining=a.name in self._draining,
            )
            for a in sorted(self.loras.registered.values(), key=lambda a: a.name)
        ]

    async def unload_adapter(self, name: str) -> int:
        """Refuse new requests for ``name`` now; drop it once its requests in flight have finished."""
        self._check_registered(name)
        in_flight = self._in_flight(name)
        if in_flight:
            self._draining.add(name)
            log.info("adapter %s unloading after its %d requests in flight", name, in_flight)
        else:
            self._unregister(name)
        return in_flight

    def pin_adapter(self, name: str, pinned: bool = True) -> None:
        self._check_registered(name)
        self.loras.pin(name, pinned)

    def _check_registered(self, name: str) -> None:
        if name not in self.loras.registered or name in self._draining:
            raise AdapterNotFoundError(f"adapter {name!r} not found; loaded adapters: {self.adapters() or 'none'}")

    def _in_flight(self, name: str) -> int:
        """Requests waiting or running on adapter ``name``."""
        return sum(1 for seq in self._seqs.values() if seq.request.adapter == name)

    def _unregister(self, name: str) -> None:
        self._draining.discard(name)
        self.loras.unregister(name)
        log.info("adapter %s unloaded", name)

    async def load_adapter(self, name: str, path: Path) -> LoraAdapter:
        """Load a PEFT adapter folder (already resolved inside the allowed folders) under ``name``.

        Reading and checking run off the loop, so running requests keep decoding; the adapter reaches a
        compute slot at the first step that needs it. A failed load changes nothing.
        """
        if name in self._draining:
            raise AdapterError(f"adapter {name!r} is being unloaded; load it again once it is gone")
        shape, max_rank = self.model.shape, self.config.max_lora_rank
        adapter = await asyncio.to_thread(load_peft_adapter, name, path, shape, max_rank)
        self.loras.register(adapter)
        log.info("adapter %s loaded from %s (rank %d, version %s)", name, path, adapter.rank, adapter.version)
        return adapter

    async def _prepare(self, request: GenerationRequest) -> None:
        """Bring an adapter whose weights were offloaded back into memory without stalling the loop."""
        adapter = self.loras.registered.get(request.adapter or "")
        if adapter is not None and adapter.offloaded and adapter.name not in self._draining:
            await self.load_adapter(adapter.name, adapter.path)

    def stats(self) -> EngineStats:
        running, waiting = self.scheduler.running, self.scheduler.waiting
        blocks: Counter[str | None] = Counter()
        for seq in running:
            blocks[seq.request.adapter] += len(seq.block_table)
        return EngineStats(
            num_running=len(running),
            num_waiting=len(waiting),
            running_by_adapter=dict(Counter(seq.request.adapter for seq in running)),
            waiting_by_adapter=dict(Counter(seq.request.adapter for seq in waiting)),
            kv_usage_by_adapter={name: n / self.blocks.num_blocks for name, n in blocks.items()},
        )

    def _step_tokens(self, plan: SchedulerOutput) -> dict[str | None, int]:
        tokens: Counter[str | None] = Counter()
        for chunk in plan.chunks:
            seq = self._seqs.get(chunk.seq_id)
            if seq is not None:
                tokens[seq.request.adapter] += chunk.num_tokens
        return dict(tokens)

    # -- LoopEngine hooks ------------------------------------------------------------------------------

    def _validate(self, request: GenerationRequest) -> None:
        if request.adapter is not None:
            self._check_registered(request.adapter)
        self._check_queue(len(self.scheduler.running), len(self.scheduler.waiting), self.config)

    def _enqueue(self, state: RequestState) -> None:
        seq = Sequence(state.request, state.detok, state.generator, outputs=state.outputs)
        if state.request.adapter is not None:
            seq.namespace = self.loras.registered[state.request.adapter].namespace
        self._seqs[seq.seq_id] = seq
        self.scheduler.add(seq)

    def _states(self) -> Iterable[RequestState]:
        return list(self._seqs.values())

    def _plan(self) -> SchedulerOutput | None:
        self._drop_aborted()
        out = self.scheduler.schedule()
        for seq_id in out.preempted:
            self.speculator.forget(seq_id)  # its blocks, and the draft KV in them, are gone
        return out if out.chunks else None

    def _execute(self, plan: SchedulerOutput) -> Results:
        batch, sampling = build_batch(plan, self._seqs, self.config.block_size, self.model.device)
        try:
            names = {a for c in plan.chunks if (a := self._seqs[c.seq_id].request.adapter) is not None}
            if names:
                slots = self.loras.acquire(names)
                per_token = [
                    slots.get(self._seqs[c.seq_id].request.adapter or "", 0)
                    for c in plan.chunks
                    for _ in range(c.num_tokens)
                ]
                token_slots = torch.tensor(per_token, dtype=torch.long, device=self.model.device)
                batch.lora = self.loras.batch(token_slots, names)
            started = time.perf_counter()
            logits = self.model.forward(batch, self.cache, self.loras if names else None)
            decode = all(c.num_tokens - c.num_draft == 1 for c in plan.chunks)
            self.speculator.forward_took(time.perf_counter() - started, plan.num_tokens if decode else None)
        except Exception as exc:  # a broken step fails the requests in it, never the engine
            return [(self._seqs[c.seq_id], self.failed(self._seqs[c.seq_id], exc)) for c in plan.chunks]
        for chunk in plan.chunks:
            seq = self._seqs[chunk.seq_id]
            seq.num_computed += chunk.num_tokens - chunk.num_draft  # drafted tokens count once verified
            self.blocks.commit(seq.block_table, seq.token_ids, seq.num_computed, seq.namespace)
        greedy = logits.argmax(dim=-1).tolist()
        results: Results = []
        row = 0
        for seq in sampling:
            rows = 1 + len(seq.draft)
            try:
                tokens = self._next_tokens(seq, logits[row : row + rows], greedy[row : row + rows])
                results.append((seq, self._accept_tokens(seq, tokens)))
            except Exception as exc:
                results.append((seq, self.failed(seq, exc)))
            row += rows
        return results

    def _next_tokens(self, seq: Sequence, logits: torch.Tensor, greedy: list[int]) -> list[int]:
        """The step's new tokens for one sequence: one sampled, or a verified draft plus one."""
        params = seq.request.params
        if not seq.draft:
            return [greedy[0] if params.greedy else sample_token(logits[0], params, seq.generator)]
        verdict = verify(logits, seq.draft, params, seq.generator, greedy)
        seq.num_computed += verdict.accepted  # accepted drafts are the real tokens: their KV stands
        self.speculator.verified(seq, len(seq.draft), verdict.accepted)
        seq.draft = []
        self.blocks.trim(seq.block_table, len(seq.token_ids) + len(verdict.tokens))  # KV rollback
        return verdict.tokens

    def _accept_tokens(self, seq: Sequence, tokens: list[int]) -> GenerationOutput:
        """Accept tokens in order into one output, stopping at the first that ends the request."""
        merged: GenerationOutput | None = None
        for token in tokens:
            seq.token_ids.append(token)
            out = self.accept(seq, token)
            merged = out if merged is None else merged.followed_by(out)
            if out.finished:
                break
        if merged is None:
            raise RuntimeError("no token to accept")
        return merged

    def _release(self, state: RequestState) -> None:
        if isinstance(state, Sequence):
            self.scheduler.remove(state)
            self.speculator.finished(state)
            self._seqs.pop(state.seq_id, None)
            name = state.request.adapter
            if name in self._draining and not self._in_flight(name):
                self._unregister(name)  # the last request of an adapter being unloaded has finished


def _draft_or_none(config: EngineConfig, model_dir: Path, model: NativeLlama) -> DraftModel | None:
    """The configured draft model; one that fails to load turns draft-model speculation off, with the reason."""
    spec = config.speculative
    if spec.drafter != "draft-model":
        return None
    try:
        draft = load_draft(spec, model_dir, model)
    except Exception as exc:
        log.warning("draft model not loaded, speculation by draft model is off: %s", exc)
        return None
    log.info("draft model: %s (%s)", draft.name, draft.model.dtype)
    return draft


@register_engine("native")
def _build(model_dir: Path, config: EngineConfig) -> NativeEngine:
    return NativeEngine.from_dir(model_dir, config)
