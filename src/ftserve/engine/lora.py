"""Multi-LoRA: PEFT adapters loaded by name, kept in compute slots with LRU eviction, applied batched.

Every target projection keeps its adapters stacked: ``A[slot]`` is [in, R] and ``B[slot]`` is [R, out]
with R the largest rank allowed (smaller ranks are zero-padded, and the LoRA scaling is folded into B);
slot 0 is all zeros, the base model. One batch mixes rows of many adapters and base rows: each packed
token carries its slot, and the delta ``x · A[slot] · B[slot]`` is computed for all tokens at once (a
single pair of dense matmuls over the adapters present, masked per token: the batching idea of Punica's
SGMV/BGMV kernels, expressed with plain matmuls). Adapters not in a slot stay in CPU memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ftserve.engine.batch import ForwardBatch, LoraBatch
from ftserve.engine.kernels import RowsLinear, runs_on
from ftserve.engine.model import ModelShape
from ftserve.engine.qlinear import kernel_linear

log = logging.getLogger(__name__)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterError(ValueError):
    """An adapter cannot be loaded; the message says why. Nothing was changed."""


def target_dims(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target projection."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def resolve_adapter_dir(name: str, allowed: list[Path]) -> Path:
    """The folder of adapter ``name`` inside one of the allowed folders; never a path outside them."""
    if not NAME_PATTERN.match(name) or ".." in name:
        raise AdapterError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' or '-' (no paths)")
    for root in allowed:
        root = root.resolve()
        candidate = (root / name).resolve()
        if candidate.parent == root and candidate.is_dir():
            return candidate
    raise AdapterError(f"adapter {name!r} not found in the allowed folders {[str(p) for p in allowed]}")


def discover_adapters(allowed: list[Path]) -> list[str]:
    """Names of the adapter folders (with an adapter_config.json) directly inside the allowed folders."""
    names = {
        p.name
        for root in allowed
        if root.is_dir()
        for p in root.iterdir()
        if (p / "adapter_config.json").is_file() and NAME_PATTERN.match(p.name)
    }
    return sorted(names)


@dataclass
class LoraAdapter:
    name: str
    path: Path
    version: str  # content hash of the weights: a reload with new weights is a new version
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, target) -> (A [r,in], B [out,r])
    targets: frozenset[str] = frozenset()  # projections it changes

    @property
    def offloaded(self) -> bool:
        """Weights dropped from CPU memory (kept on disk at ``path``); reloaded on next use."""
        return not self.weights

    @property
    def namespace(self) -> str:
        """Prefix-cache namespace: KV computed under this adapter version is only reused by it."""
        return f"{self.name}@{self.version}"


def load_peft_adapter(name: str, path: Path, shape: ModelShape, max_rank: int) -> LoraAdapter:
    """Read and check a PEFT LoRA folder (safetensors only) against the base model's shapes."""
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not weights_file.is_file():
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f"; found {pickles}: pickle weights are refused, convert them to safetensors" if pickles else ""
        raise AdapterError(f"adapter {name!r} has no adapter_model.safetensors{hint}")
    if not config_file.is_file():
        raise AdapterError(f"adapter {name!r} has no adapter_config.json")
    cfg = json.loads(config_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r} is {cfg.get('peft_type')}, not LORA")
    for unsupported in ("use_dora", "modules_to_save"):
        if cfg.get(unsupported):
            raise AdapterError(f"adapter {name!r} uses {unsupported}, which the native engine does not support")
    rank = int(cfg["r"])
    if rank > max_rank:
        raise AdapterError(f"adapter {name!r} has rank {rank}; the engine allows up to {max_rank} (max_lora_rank)")
    alpha = float(cfg.get("lora_alpha", rank))
    scaling = alpha / (rank**0.5) if cfg.get("use_rslora") else alpha / rank
    dims = target_dims(shape)
    key = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_file), framework="pt") as fh:
        for k in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
            m = key.search(k)
            if m is None:
                raise AdapterError(f"adapter {name!r} has a tensor the engine cannot place: {k}")
            layer, target, ab = int(m.group(1)), m.group(2), m.group(3)
            if target not in dims or layer >= shape.num_layers:
                raise AdapterError(f"adapter {name!r} targets {target} of layer {layer}, absent from the base model")
            parts.setdefault((layer, target), {})[ab] = fh.get_tensor(k).float()
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, target), ab in parts.items():
        a, b = ab.get("A"), ab.get("B")
        fan_in, fan_out = dims[target]
        if a is None or b is None or a.shape != (rank, fan_in) or b.shape != (fan_out, rank):
            got = (None if a is None else tuple(a.shape), None if b is None else tuple(b.shape))
            raise AdapterError(
                f"adapter {name!r} {target} of layer {layer}: shapes {got} do not fit the base model "
                f"(want A {(rank, fan_in)}, B {(fan_out, rank)})"
            )
        weights[(layer, target)] = (a, b)
    if not weights:
        raise AdapterError(f"adapter {name!r} holds no LoRA weights")
    version = hashlib.sha256(weights_file.read_bytes()).hexdigest()[:16]
    targets = frozenset(t for (_, t) in weights)
    return LoraAdapter(name, path, version, rank, scaling, weights, targets)


class LoraManager:
    """Registered adapters (CPU), a fixed number of compute slots (device), LRU eviction and pinning."""

    def __init__(
        self,
        shape: ModelShape,
        max_loras: int,
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
        max_cpu_loras: int = 64,
        kernel: RowsLinear | None = None,
    ):
        """``kernel``: the row-invariant matmul (engine/kernels.py) the deltas run through, as the base does."""
        self.shape = shape
        self.kernel = kernel if runs_on(device, dtype) else None
        self.max_cpu_loras = max_cpu_loras
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.registered: dict[str, LoraAdapter] = {}
        self.pinned: set[str] = set()  # never evicted from a slot while an unpinned one can go instead
        self._recent: OrderedDict[str, None] = OrderedDict()  # registered names, least recently used first
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # resident adapters, least recently used first
        self._free_slots = list(range(max_loras, 0, -1))
        self._dtype = dtype
        self._generation = 0  # bumped whenever a slot's weights change: invalidates the concatenated cache
        self._stack_key: tuple[object, ...] | None = None
        self._stack: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._a: dict[tuple[int, str], torch.Tensor] = {}
        self._b: dict[tuple[int, str], torch.Tensor] = {}
        for layer in range(shape.num_layers):
            for target, (fan_in, fan_out) in target_dims(shape).items():
                self._a[(layer, target)] = torch.zeros(max_loras + 1, fan_in, max_rank, device=device, dtype=dtype)
                self._b[(layer, target)] = torch.zeros(max_loras + 1, max_rank, fan_out, device=device, dtype=dtype)

    # -- registry --------------------------------------------------------------------------------------

    def register(self, adapter: LoraAdapter) -> None:
        old = self.registered.get(adapter.name)
        if old is not None and old.version != adapter.version and adapter.name in self._slot_of:
            self._evict(adapter.name)  # a new version must not be served from the old slot
        self.registered[adapter.name] = adapter
        self._use(adapter.name)

    def unregister(self, name: str) -> None:
        if name in self._slot_of:
            self._evict(name)
        self.registered.pop(name, None)
        self._recent.pop(name, None)
        self.pinned.discard(name)

    def pin(self, name: str, pinned: bool = True) -> None:
        if name not in self.registered:
            raise KeyError(name)
        (self.pinned.add if pinned else self.pinned.discard)(name)

    def residency(self, name: str) -> str:
        """device (in a compute slot), cpu (weights in memory), or disk (weights reloaded on next use)."""
        if name in self._slot_of:
            return "device"
        adapter = self.registered.get(name)
        return "cpu" if adapter is not None and not adapter.offloaded else "disk"

    def _use(self, name: str) -> None:
        """Mark as recently used; drop the CPU weights of the least recently used idle adapters past the cap."""
        self._recent[name] = None
        self._recent.move_to_end(name)
        in_memory = [n for n in self._recent if not self.registered[n].offloaded]
        for victim in in_memory[: max(0, len(in_memory) - self.max_cpu_loras)]:
            if victim not in self._slot_of and victim not in self.pinned and victim != name:
                self.registered[victim].weights = {}
                log.info("adapter %s offloaded to disk (%s)", victim, self.registered[victim].path)

    # -- compute slots ---------------------------------------------------------------------------------

    def acquire(self, names: set[str]) -> dict[str, int]:
        """Slots for every adapter of a batch, loading evicted ones (least recently used, unpinned first)."""
        if len(names) > self.max_loras:
            raise RuntimeError(f"a batch needs {len(names)} adapters but only {self.max_loras} slots exist")
        for name in names:
            if name in self._slot_of:
                self._slot_of.move_to_end(name)
                continue
            if not self._free_slots:
                victims = [n for n in self._slot_of if n not in names and n not in self.pinned]
                victims = victims or [n for n in self._slot_of if n not in names]
                self._evict(victims[0])
            adapter = self.registered[name]
            if adapter.offloaded:  # normally reloaded before the request is queued; this is the fallback
                adapter = load_peft_adapter(name, adapter.path, self.shape, self.max_rank)
                self.registered[name] = adapter
            self._load_slot(adapter, self._free_slots.pop())
        for name in names:
            self._use(name)
        return {name: self._slot_of[name] for name in names}

    def _load_slot(self, adapter: LoraAdapter, slot: int) -> None:
        for key in self._a:
            self._a[key][slot].zero_()
            self._b[key][slot].zero_()
        for key, (a, b) in adapter.weights.items():
            r = a.shape[0]
            self._a[key][slot, :, :r] = a.t().to(self._a[key].dtype)
            self._b[key][slot, :r, :] = (b.t() * adapter.scaling).to(self._b[key].dtype)
        self._slot_of[adapter.name] = slot
        self._generation += 1

    def _evict(self, name: str) -> None:
        self._free_slots.append(self._slot_of.pop(name))
        self._generation += 1

    # -- the delta, called from the model's forward ----------------------------------------------------

    def batch(self, token_slots: torch.Tensor, names: set[str]) -> LoraBatch:
        """The LoRA part of a forward batch: per-token slots, and what the adapters present need."""
        adapters = [self.registered[n] for n in names]
        targets = frozenset(t for a in adapters for t in a.targets)
        active = sorted({self._slot_of[n] for n in names})
        rank = max(a.rank for a in adapters)
        # One-hot over the active slots, repeated per rank column: row t keeps only its adapter's columns.
        onehot = (token_slots.unsqueeze(1) == torch.tensor(active, device=token_slots.device)).to(self._dtype)
        return LoraBatch(active, rank, targets, onehot.repeat_interleave(rank, dim=1))

    def add(self, layer: int, target: str, x: torch.Tensor, out: torch.Tensor, lora: LoraBatch) -> None:
        """out[t] += x[t] · A[slot_t] · B[slot_t] for every packed token t (base rows add nothing).

        The adapters of the batch are concatenated along the rank dimension (S adapters x r columns), so
        the delta is two dense matmuls with a mask in between: ``((x · A_cat) * mask) · B_cat``, where
        the mask keeps, for each token, only the columns of its own adapter. No per-token gathers of
        weights, and the concatenated weights are reused for as long as the set of adapters is unchanged.
        """
        a_cat, b_cat = self._stacked(layer, target, lora)
        if self.kernel is not None:  # the stacks are stored transposed, as the kernel's [N, K] weights
            out += kernel_linear(self.kernel, kernel_linear(self.kernel, x, a_cat) * lora.mask, b_cat)
            return
        out += torch.mm(torch.mm(x, a_cat) * lora.mask, b_cat)

    def _stacked(self, layer: int, target: str, lora: LoraBatch) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(lora.active_slots), lora.rank, self._generation)
        if self._stack_key != key:
            self._stack_key, self._stack = key, {}
        cached = self._stack.get((layer, target))
        if cached is None:
            slots, r = lora.active_slots, lora.rank
            a = self._a[(layer, target)][slots, :, :r]  # [S, in, r]
            b = self._b[(layer, target)][slots, :r, :]  # [S, r, out]
            # [in, S r] and [S r, out]
            a_cat, b_cat = a.permute(1, 0, 2).reshape(a.shape[1], -1), b.reshape(-1, b.shape[-1])
            if self.kernel is not None:
                a_cat, b_cat = a_cat.t(), b_cat.t()
            cached = (a_cat.contiguous(), b_cat.contiguous())
            self._stack[(layer, target)] = cached
        return cached

    def apply(self, layer: int, targets: tuple[str, ...], x: torch.Tensor, fused: torch.Tensor,
              batch: ForwardBatch) -> None:  # fmt: skip
        """Add each target's delta to its slice of a (possibly fused: qkv, gate_up) projection output."""
        lora = batch.lora
        if lora is None:
            return
        start = 0
        for target in targets:
            width = self._b[(layer, target)].shape[-1]
            if target in lora.targets:
                self.add(layer, target, x, fused[:, start : start + width], lora)
            start += width
