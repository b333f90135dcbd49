"""Linear layers the native engine runs: dense, or weight-only INT8 / INT4 with torch's packed CPU kernels.

Checkpoint layout of a quantized linear ``<name>`` (written by ``ftserve optimize``, config
``quantization_config.quant_method == "ftserve"``):

- INT8, per output channel, symmetric: ``<name>.qweight`` int8 [N, K], ``<name>.scales`` [N];
  W ≈ qweight * scales[:, None].
- INT4, per group of ``group_size`` input columns, asymmetric: ``<name>.qweight`` uint8 [N, K/2] (two
  values per byte, low nibble first), ``<name>.scales`` and ``<name>.zeros`` [N, K/group_size];
  W ≈ (q - 8) * scale + zero (the convention of torch's ``_weight_int4pack_mm_for_cpu``).

Rows are output channels, so the q/k/v (and gate/up) projections fuse by concatenating along rows. On CPU
the matmul runs in ``aten._weight_int8pack_mm`` / ``aten._weight_int4pack_mm_for_cpu`` on the packed
weight; elsewhere the weight is dequantized once at load, which is correct but gives up the memory saving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ftserve.engine.kernels import RowsLinear, runs_on

INT4_GROUP_SIZES = (32, 64, 128, 256)
LINEAR_KEYS = ("weight", "qweight", "scales", "zeros")  # tensors a linear may be stored as


class QuantFormatError(ValueError):
    """A quantized checkpoint does not fit the layout above."""


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 → uint8 [N, K/2], low nibble = even column."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.int32, device=packed.device)
    out[:, 0::2] = (packed & 0x0F).to(torch.int32)
    out[:, 1::2] = (packed >> 4).to(torch.int32)
    return out


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales.float()[:, None]


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(qweight)
    n, k = q.shape
    groups = scales.shape[1]
    q = q.view(n, groups, k // groups).float()
    return ((q - 8) * scales.float()[..., None] + zeros.float()[..., None]).view(n, k)


class Linear:
    """``y = x @ W.T`` for one (possibly fused) projection."""

    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def matmul_rows(self, rows: int) -> int:
        """The row count a call with ``rows`` token rows runs its matmul with (what its time follows)."""
        return rows

    def use_kernel(self, kernel: RowsLinear | None) -> None:
        """Run through the row-invariant kernel (engine/kernels.py) where it applies; quantized weights don't."""


SMALL_PADS = {1: 2, 3: 4, 7: 8}  # row counts up to 8 that dense_linear pads, to what (see there)


def padded_rows(rows: int) -> int:
    """The row count dense_linear runs ``rows`` token rows as on CPU in float32 (see there)."""
    if rows <= 8:
        return SMALL_PADS.get(rows, rows)
    return -(-rows // 8) * 8


def runs_in_panels(weight: torch.Tensor) -> bool:
    """Whether dense_linear runs ``weight`` through MKL with padded rows (CPU, float32)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for a dense [N, K] weight.

    On CPU in float32 it runs as ``weight @ x.T``: the weight becomes MKL's first operand and the few token
    rows its narrow second one. Measured on this AVX2 EPYC (2 threads, 30 layers of SmolLM2-135M's
    projections, weights streamed from memory): 1 row 29 ms → 19 ms (padded to 2 rows, since a single row
    takes MKL's slower matrix-vector path), 5 rows 47 → 26 ms, 16 rows 55 → 40 ms, 256 rows 356 → 322 ms.

    MKL's cost is not monotonic in the row count: it computes rows in panels of 8, and a partial panel is
    slow. Over the same 30 layers: 2 and 4 rows 21-22 ms, 3 rows 27; 7 rows 40, 8 rows 36; 9 rows 44, 13 rows
    77, 15 rows 95, 16 rows 43; 23 rows 93, 24 rows 64; 31 rows 109, 32 rows 60. So :func:`padded_rows` pads
    1, 3 and 7 rows to 2, 4 and 8, and more than 8 rows to a multiple of 8 (a whole decode step of 13-15
    sequences then takes 0.65-0.74 of its time). Up to 4 rows a row's result does not depend on which
    other rows share the call; beyond, it may differ in the last bit, as with ``F.linear``. Elsewhere (bf16,
    GPUs) ``F.linear`` is the fast path.
    """
    if not runs_in_panels(weight):
        return F.linear(x, weight)
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    rows = flat.shape[0]
    padded = padded_rows(rows)
    if padded > rows:
        flat = torch.cat((flat, flat[-1:].expand(padded - rows, -1)))
    out = torch.mm(weight, flat.t()).t()[:rows].contiguous()
    return out.view(*shape[:-1], weight.shape[0])


def kernel_linear(kernel: RowsLinear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` through the row-invariant kernel: a row's result is the same whatever shares the call."""
    shape = x.shape
    out = kernel(x.reshape(-1, shape[-1]).contiguous(), weight)
    return out.view(*shape[:-1], weight.shape[0])


def kernel_applies(weight: torch.Tensor) -> bool:
    """Whether the row-invariant kernel can run ``weight``: on CPU, float32 or bfloat16, contiguous."""
    return runs_on(weight.device, weight.dtype) and weight.is_contiguous()


@dataclass
class DenseLinear(Linear):
    weight: torch.Tensor  # [N, K]
    kernel: RowsLinear | None = None

    def __post_init__(self) -> None:
        self.out_features = self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.dtype == self.weight.dtype:
            return kernel_linear(self.kernel, x, self.weight)
        return dense_linear(x, self.weight)

    def matmul_rows(self, rows: int) -> int:
        if self.kernel is None and runs_in_panels(self.weight):
            return padded_rows(rows)
        return rows

    def use_kernel(self, kernel: RowsLinear | None) -> None:
        self.kernel = kernel if kernel_applies(self.weight) else None


class Int8Linear(Linear):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        if qweight.dtype != torch.int8 or scales.shape != (qweight.shape[0],):
            raise QuantFormatError(f"int8 weight {tuple(qweight.shape)} {qweight.dtype} / scales {tuple(scales.shape)}")
        self.out_features = qweight.shape[0]
        self.qweight = qweight.contiguous()
        self.scales = scales.to(dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).contiguous(), self.qweight, self.scales)
        return y.view(*shape[:-1], self.out_features)


class Int4Linear(Linear):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> None:
        n, half_k = qweight.shape
        k, groups = half_k * 2, scales.shape[1]
        if qweight.dtype != torch.uint8 or scales.shape != zeros.shape or scales.shape[0] != n or k % groups:
            raise QuantFormatError(
                f"int4 weight {tuple(qweight.shape)} {qweight.dtype} / scales {tuple(scales.shape)} / "
                f"zeros {tuple(zeros.shape)}"
            )
        self.group_size = k // groups
        if self.group_size not in INT4_GROUP_SIZES:
            raise QuantFormatError(f"int4 group size {self.group_size} not in {INT4_GROUP_SIZES}")
        self.out_features = n
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(qweight), 1)
        # [K/group, N, 2]: the kernel's layout of per-group (scale, zero) pairs.
        self.scales_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).to(dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_zeros)
        return y.view(*shape[:-1], self.out_features)


def concat_rows(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Fuse projections that share an input: every tensor of the layout has output channels as rows."""
    return {key: torch.cat([p[key] for p in parts], dim=0) for key in parts[0]}


def build_linear(parts: list[dict[str, torch.Tensor]], device: torch.device, dtype: torch.dtype) -> Linear:
    """One fused projection from per-projection tensors: ``{"weight"}`` or ``{"qweight", "scales"[, "zeros"]}``."""
    kinds = {frozenset(p) for p in parts}
    if len(kinds) != 1:
        raise QuantFormatError(f"projections fused together are stored differently: {sorted(map(sorted, kinds))}")
    fused = concat_rows(parts)
    if "weight" in fused:
        return DenseLinear(fused["weight"].to(device=device, dtype=dtype).contiguous())
    if "zeros" in fused:
        if device.type == "cpu":
            return Int4Linear(fused["qweight"], fused["scales"], fused["zeros"], dtype)
        dense = dequantize_int4(fused["qweight"], fused["scales"], fused["zeros"])
    else:
        if device.type == "cpu":
            return Int8Linear(fused["qweight"], fused["scales"], dtype)
        dense = dequantize_int8(fused["qweight"], fused["scales"])
    return DenseLinear(dense.to(device=device, dtype=dtype).contiguous())
