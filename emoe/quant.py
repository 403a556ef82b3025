"""Low-bit shadow copies of experts: group-wise symmetric int8 / int4 quantisation (pure functions).

The fast tier can hold a small quantised copy of every expert it does not hold at full precision, so a
token routed to a missing expert runs an approximation of *that* expert instead of being rerouted to a
different one (HOBBIT-style mixed precision, arXiv 2411.01433). Scales are per `group` consecutive
input columns (fp16), which keeps int4 error near int8's on the wide rows of expert matrices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (4, 8)


@dataclass(frozen=True, slots=True)
class QTensor:
    data: torch.Tensor    # int8 values (bits 8) or two int4 values per uint8 (bits 4)
    scale: torch.Tensor   # fp16 [rows, cols // group]
    shape: tuple[int, int]
    bits: int
    group: int

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def group_size(cols: int, group: int) -> int:
    """The requested group if it divides the row, else one scale per row."""
    return group if cols % group == 0 else cols


def qbytes(shape: tuple[int, int], bits: int, group: int) -> int:
    """Bytes a QTensor of this shape occupies (what the cache budgets before quantising anything)."""
    rows, cols = shape
    return rows * cols * bits // 8 + rows * (cols // group_size(cols, group)) * 2


def quantize(w: torch.Tensor, bits: int = 4, group: int = 32) -> QTensor:
    if bits not in BITS:
        raise ValueError(f"shadow precision must be one of {BITS} bits, got {bits}")
    if w.dim() != 2 or w.shape[1] % 2:
        raise ValueError(f"expects a 2-D matrix with an even number of columns, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    g = group_size(cols, group)
    qmax = 2 ** (bits - 1) - 1
    x = w.float().reshape(rows, cols // g, g)
    scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12).half()
    q = torch.round(x / scale.float()).clamp_(-qmax, qmax).to(torch.int8).reshape(rows, cols)
    if bits == 4:  # offset to 0..14 and pack two per byte
        u = (q + 8).to(torch.uint8)
        q = u[:, 0::2] | (u[:, 1::2] << 4)
    return QTensor(q.contiguous(), scale.reshape(rows, cols // g).contiguous(), (rows, cols), bits, g)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = q.shape
    if q.bits == 4:  # unpack into one preallocated buffer: fewer passes than stack + reshape on CPU
        v = torch.empty(rows, cols // 2, 2, dtype=torch.uint8, device=q.data.device)
        v[..., 0] = q.data & 0x0F
        v[..., 1] = q.data >> 4
        x = v.view(rows, cols // q.group, q.group).to(dtype).sub_(8)
    else:
        x = q.data.view(rows, cols // q.group, q.group).to(dtype)
    return x.mul_(q.scale.to(dtype)[..., None]).view(rows, cols)
