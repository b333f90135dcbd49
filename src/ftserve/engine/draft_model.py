"""The draft-model drafter: a model sharing the tokenizer proposes tokens greedily, batched.

Its KV cache, by default, is the target's own. A quantized copy of the served model (or its first layers)
has the target's KV layout, and its keys and values for the context differ from the target's only by
quantization noise, so the draft reads the target's KV for every verified token and computes only the
positions it drafts, writing their KV into the sequence's slots past the verified tokens: slots the
scheduler reserved for this step, which the verifying forward overwrites before anything reads them. So a
draft needs no KV memory and never recomputes a prompt (catching up on a 100-token prompt costs this
int8 draft about 12 of its decode passes here).

A draft with another KV layout (a different model from ``draft_model``) keeps a cache of its own, laid out
like the target's (same number and size of blocks) and read through the target's block tables. Then it
tracks how far its cache is valid for each sequence (tokens it computed, minus drafts the target
rejected), and the first draft pass of a step catches up on the rest (the whole prompt the first time).

On CPU, an INT8 draft's plain passes (one token per sequence) run in one compiled call
(``draft_pass.CompiledPass``, ``draft_layers.cpp``): in Python a pass costs ~5 ms of small operations besides
the projections, too much against the target's ~20 ms step for drafts to pay.

The draft runs on the base weights, never the request's adapter: one draft serves every adapter, its cost
does not grow with adapter count, and exactness does not depend on it (the target, with the adapter,
verifies every token). Acceptance is reported per adapter, so an adapter the base drafts badly shows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

from ftserve.config import SpeculativeConfig
from ftserve.engine.draft_pass import CompiledPass
from ftserve.engine.kernels import RowsLinear, draft_layers_kernel
from ftserve.engine.loader import is_quantized, pick_dtype
from ftserve.engine.model import KVCache, ModelShape, NativeLlama, read_state
from ftserve.engine.runner import Piece, pack
from ftserve.engine.scheduler import Sequence

log = logging.getLogger(__name__)


class DraftLoadError(RuntimeError):
    """The draft model cannot be used with this target (missing, other tokenizer, bad settings)."""


@dataclass
class _Written:
    valid: int  # leading tokens of the sequence whose draft KV is right
    drafts: list[int]  # drafted tokens whose KV was written after those (right only if the target accepts them)


class DraftModel:
    def __init__(
        self, model: NativeLlama, num_layers: int | None = None, name: str = "draft model", share_kv: bool = True
    ) -> None:
        if num_layers is not None and not 1 <= num_layers <= model.shape.num_layers:
            raise DraftLoadError(f"draft_layers must be 1..{model.shape.num_layers}, got {num_layers}")
        self.model = model
        self.num_layers = num_layers
        self.name = name
        self.share_kv = share_kv  # use the target's KV cache when the layouts allow it
        self.cache: KVCache | None = None
        self.shared = False  # the draft reads (and scribbles past) the target's own KV cache
        self._written: dict[int, _Written] = {}
        self.passes: list[tuple[int, float]] = []  # (rows, seconds) of each plain drafting pass of the last propose()
        self.compiled: CompiledPass | None = None  # plain passes of an INT8 draft in one compiled call

    def bind(self, target_cache: KVCache, target_shape: ModelShape, linear: RowsLinear | None = None) -> None:
        """Give the draft its KV cache: the target's own when the KV layouts match (see the module docstring),
        else one of its own laid out like the target's, whose block tables it reads; and the target's choice
        of projection kernel (``linear``)."""
        self.model.use_linear_kernel(linear)
        op = draft_layers_kernel("auto", self.model.device) if linear is not None else None  # kernels in use
        self.compiled = CompiledPass.build(op, self.model, self.num_layers)
        mine = self.model.shape
        layers = self.num_layers or mine.num_layers
        same_layout = (mine.num_kv_heads, mine.head_dim) == (target_shape.num_kv_heads, target_shape.head_dim)
        self.shared = self.share_kv and same_layout and layers <= target_shape.num_layers
        if self.shared:
            self.cache = target_cache
        else:
            self.cache = KVCache(
                mine,
                target_cache.num_blocks,
                target_cache.block_size,
                self.model.dtype,
                self.model.device,
                target_cache.kernel,
            )

    def forget(self, seq_id: int) -> None:
        """The sequence finished or lost its blocks (preemption): its draft KV is gone."""
        self._written.pop(seq_id, None)

    def propose(self, wants: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Greedy drafts, ``k`` tokens for each (sequence, k): k batched forwards of one token per sequence,
        the first also catching up on tokens the draft has not seen."""
        cache = self.cache
        if cache is None:
            raise RuntimeError("draft model used before bind()")
        drafts: list[list[int]] = [[] for _ in wants]
        self.passes = []
        for step in range(max(k for _, k in wants)):
            active = [i for i, (_, k) in enumerate(wants) if k > step]
            pieces = [self._piece(wants[i][0], drafts[i]) for i in active]
            batch = pack(pieces, cache.block_size, self.model.device)
            started = time.perf_counter()
            if self.compiled is not None and self.compiled.applies(batch, cache):
                logits = self.compiled(batch, cache)
            else:
                logits = self.model.forward(batch, cache, None, self.num_layers)
            if max(batch.query_lens) <= 2:  # a plain drafting pass, not a catch-up on many tokens
                self.passes.append((sum(batch.query_lens), time.perf_counter() - started))
            for i, token in zip(active, logits.argmax(dim=-1).tolist(), strict=True):
                drafts[i].append(token)
        if not self.shared:  # its own KV now stands for every known token and every draft but the last
            for (seq, _), draft in zip(wants, drafts, strict=True):
                self._written[seq.seq_id] = _Written(len(seq.token_ids), draft[:-1])
        return drafts

    def _piece(self, seq: Sequence, draft: list[int]) -> Piece:
        if draft:  # later passes: feed the previous draft back in
            return Piece([draft[-1]], len(seq.token_ids) + len(draft) - 1, seq.block_table, 1)
        # Shared with the target: its KV stands for every computed token, nothing to catch up on. Otherwise from
        # where the draft's own KV stops, and at least the last token (its logits give the first draft).
        start = seq.num_computed if self.shared else min(self._valid(seq), len(seq.token_ids) - 1)
        return Piece(seq.token_ids[start:], start, seq.block_table, 1)

    def _valid(self, seq: Sequence) -> int:
        written = self._written.get(seq.seq_id)
        if written is None:
            return 0
        return written.valid + _common_prefix(written.drafts, seq.token_ids[written.valid :])


def _common_prefix(a: Seq[int], b: Seq[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def load_draft(spec: SpeculativeConfig, target_dir: Path, target: NativeLlama) -> DraftModel:
    """The draft for ``spec``: the folder ``draft_model``, or a copy of the target quantized now
    (``draft_quantize``; ``none`` shares the target's weights: with ``draft_layers``, a self-draft)."""
    if spec.draft_model is not None:
        folder = Path(spec.draft_model)
        if not (folder / "config.json").is_file():
            raise DraftLoadError(f"draft model folder {folder} has no config.json")
        _check_tokenizer(folder, target_dir, target.shape)
        dtype = pick_dtype("auto", target.device, is_quantized(folder))
        model = NativeLlama.from_dir(folder, target.device, dtype)
        name = folder.name
    elif spec.draft_quantize == "none":
        model, name = target, f"{target_dir.name} (its own weights)"
    else:
        model, name = (
            _quantized_copy(target_dir, target, spec.draft_quantize),
            f"{target_dir.name} {spec.draft_quantize}",
        )
    if spec.draft_layers is not None:
        name += f", first {spec.draft_layers} layers"
    return DraftModel(model, spec.draft_layers, name)


def _quantized_copy(target_dir: Path, target: NativeLlama, method: str) -> NativeLlama:
    # The optimize stage's quantize step (round to nearest: seconds), imported only when a draft is made.
    from ftserve.optimize.recipe import QuantizeStep
    from ftserve.optimize.runner import quantize

    # The head too, in INT8 (3.1 -> 2.0 ms of a ~25 ms draft step here).
    step = QuantizeStep(step="quantize", method=method, head="int8")
    state, _ = quantize(step, read_state(target_dir), target_dir)
    # torch's packed INT8/INT4 CPU kernels want bf16 activations (see loader.pick_dtype).
    return NativeLlama(target.shape, state, target.device, pick_dtype("auto", target.device, quantized=True))


def _check_tokenizer(folder: Path, target_dir: Path, shape: ModelShape) -> None:
    """Drafted ids must mean the same tokens to the target: same vocabulary size and tokenizer file."""
    draft_shape = ModelShape.from_dir(folder)
    if draft_shape.vocab_size != shape.vocab_size:
        raise DraftLoadError(f"draft vocabulary {draft_shape.vocab_size} != target's {shape.vocab_size}")
    mine, theirs = folder / "tokenizer.json", target_dir / "tokenizer.json"
    if mine.is_file() and theirs.is_file() and mine.read_bytes() != theirs.read_bytes():
        raise DraftLoadError(f"{folder} has another tokenizer than {target_dir}")
