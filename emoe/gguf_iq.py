"""llama.cpp's i-quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) and ternary TQ1_0/TQ2_0,
dequantised with torch ops on whatever device the packed bytes are on.

Each function is a port of gguf-py's numpy `dequantize_blocks` (llama.cpp's reference) that stops before the
last product: it returns each group's scale (per 32 values, or 16) and the group's values, integers from a small
table (IQ_TABLES: the grids' values with their signs; IQ1's shifted by ±1/8 and doubled three times), whose
product is gguf-py's float32 arithmetic (the factors differ from its by signs and powers of two only), so the
results are bit-identical to it. A RAM tier holds these types as codebook forms of those integers
(forms.codebook_form). The lattice grids and sign tables are gguf-py's own, decoded once by it and kept per
device.
"""
from __future__ import annotations

import gguf
import gguf.quants
import torch

from .gguf_blocks import _half as fp16_at

IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ3_S, IQ2_S, IQ1_M, TQ1_0, TQ2_0 = 16, 17, 18, 19, 21, 22, 29, 34, 35
IQ_TYPES: tuple[int, ...] = (IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ3_S, IQ2_S, IQ1_M, TQ1_0, TQ2_0)
DELTA = 0.125  # IQ1_S/IQ1_M's grid shift (gguf-py's IQ1_S.delta)
_IQ2, _IQ1 = (-43, -25, -8, 8, 25, 43), (-9, -7, -1, 1, 7, 9)  # IQ1's values ×8: ±1 ± 1/8, ±1/8
# the integers each type's values come from (grid values with their signs), at most 16: a codebook's entries
IQ_TABLES: dict[int, tuple[int, ...]] = {
    IQ2_XXS: _IQ2, IQ2_XS: _IQ2, IQ2_S: _IQ2, IQ3_XXS: (-62, -52, -44, -36, -28, -20, -12, -4, 4, 12, 20, 28, 36, 44, 52, 62),
    IQ3_S: tuple(range(-15, 16, 2)), IQ1_S: _IQ1, IQ1_M: _IQ1, TQ1_0: (-1, 0, 1), TQ2_0: (-1, 0, 1, 2)}  # (TQ2_0: a 2-bit field less 1)

_TABLES: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _tables(qtype: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grid [entries, width] float32, ±1 per bit of every byte [256, 8], ±1 per IQ2_XXS ksigns entry [128, 8]).
    TQ1_0's "grid" is its powers of 3 (uint8), which need to wrap as its bytes do."""
    key = (qtype, device)
    if key not in _TABLES:
        if qtype == TQ1_0:
            grid = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8)
        elif qtype == TQ2_0:
            grid = torch.zeros(0)
        else:
            cls = getattr(gguf.quants, gguf.GGMLQuantizationType(qtype).name)
            cls.init_grid()
            grid = torch.from_numpy(cls.grid.reshape(cls.grid_shape).copy())
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        signs = torch.where(bits == 0, 1.0, -1.0).to(torch.float32)
        ksigns = signs[torch.frombuffer(bytearray(gguf.quants.IQ2_XXS.ksigns), dtype=torch.uint8).long()]
        _TABLES[key] = (grid.to(device), signs.to(device), ksigns.to(device))
    return _TABLES[key]


def _half(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of each block, as float32 [blocks, 1]."""
    return fp16_at(b, at).float()[:, None]


def _uint(b: torch.Tensor, width: int) -> torch.Tensor:
    """Little-endian unsigned ints of `width` bytes [blocks, n*width] → int64 [blocks, n] (torch's uint16/32
    lack shifts on some devices, and int32 would sign the top bit IQ2_XXS/IQ3_XXS keep their scales in)."""
    x = b.reshape(b.shape[0], -1, width).long()
    return sum(x[..., i] << (8 * i) for i in range(width))


def _fields(x: torch.Tensor, step: int, count: int, mask: int) -> torch.Tensor:
    """The `count` bit fields `step` bits apart of each element of x, lowest first: [..., n] → [..., n*count]."""
    shifts = torch.arange(0, step * count, step, dtype=x.dtype, device=x.device)
    return ((x.unsqueeze(-1) >> shifts) & mask).flatten(-2)


def _xxs(b: torch.Tensor, idx: torch.Tensor, aux: torch.Tensor, factor: float, grid, ksigns) -> tuple:
    """IQ2_XXS / IQ3_XXS, per 32 values: grid indices (8 values in all) and a u32 of four 7-bit sign indices
    with a 4-bit scale on top; fp16 d leads the block."""
    n = b.shape[0]
    db = _half(b, 0) * (0.5 + (aux >> 28).float()) * factor
    s = ksigns[_fields(aux, 7, 4, 0x7F)].reshape(n, 8, 32)
    return db.reshape(n, 8), grid[idx.long()].reshape(n, 8, 32) * s


def _iq2_xxs(b: torch.Tensor, grid, signs, ksigns) -> tuple:
    """66 bytes: fp16 d, then 8 × (4 grid indices of 8 values, the u32)."""
    q = b[:, 2:].reshape(b.shape[0], 8, 8)
    return _xxs(b, q[..., :4], _uint(q[..., 4:], 4).reshape(b.shape[0], 8), 0.25, grid, ksigns)


def _iq2_xs(b: torch.Tensor, grid, signs, ksigns) -> tuple:
    """74 bytes: fp16 d, 32 u16 (9-bit grid index, 7-bit sign index), 16 4-bit scales (one per 16 values)."""
    n = b.shape[0]
    qs = _uint(b[:, 2:66], 2)
    db = _half(b, 0) * (0.5 + _fields(b[:, 66:74], 4, 2, 0x0F).float()) * 0.25
    return db.reshape(n, 16), (grid[qs & 511] * ksigns[qs >> 9]).reshape(n, 16, 16)


def _iq2_s(b: torch.Tensor, grid, signs, ksigns) -> tuple:
    """82 bytes: fp16 d, 32 grid index low bytes, 32 bytes of sign bits, 8 bytes of 2-bit index tops,
    16 4-bit scales."""
    n = b.shape[0]
    db = _half(b, 0) * (0.5 + _fields(b[:, 74:82], 4, 2, 0x0F).float()) * 0.25
    idx = b[:, 2:34].long() | (_fields(b[:, 66:74], 2, 4, 3).long() << 8)
    return db.reshape(n, 16), (grid[idx] * signs[b[:, 34:66].long()]).reshape(n, 16, 16)


def _iq3_xxs(b: torch.Tensor, grid, signs, ksigns) -> tuple:
    """98 bytes: fp16 d, 64 grid indices (4 values each), the 8 u32s."""
    return _xxs(b, b[:, 2:66], _uint(b[:, 66:98], 4), 0.5, grid, ksigns)


def _iq3_s(b: torch.Tensor, grid, signs, ksigns) -> tuple:
    """110 bytes: fp16 d, 64 grid index low bytes, 8 bytes of index top bits, 32 bytes of sign bits,
    8 4-bit scales (one per 32 values)."""
    n = b.shape[0]
    db = _half(b, 0) * (1 + 2 * _fields(b[:, 106:110], 4, 2, 0x0F))
    idx = b[:, 2:66].long() | (_fields(b[:, 66:74], 1, 8, 1).long() << 8)
    return db.reshape(n, 8), grid[idx].reshape(n, 8, 32) * signs[b[:, 74:106].long()].reshape(n, 8, 32)


def _iq1_s(b: torch.Tensor, grid, signs, ksigns) -> tuple:
    """50 bytes: fp16 d, 32 grid index low bytes, 8 u16 (four 3-bit index tops, 3-bit scale, delta sign)."""
    n = b.shape[0]
    qh = _uint(b[:, 34:50], 2)
    dl = _half(b, 0) * (2 * ((qh >> 12) & 7) + 1)
    delta = torch.where((qh & 0x8000) == 0, DELTA, -DELTA).float()
    idx = b[:, 2:34].long() | (_fields(qh, 3, 4, 7) << 8)
    g = grid[idx].reshape(n, 8, 32)
    return dl.reshape(n, 8) / 8, (g + delta.reshape(n, 8, 1)) * 8  # (exact: powers of two)


def _iq1_m(b: torch.Tensor, grid, signs, ksigns) -> tuple:
    """56 bytes: 32 grid index low bytes, 16 bytes of nibbles (3-bit index top, delta sign), 4 u16 each of
    four 3-bit scales and, in its top nibble, a quarter of the fp16 d (lowest nibble first)."""
    n = b.shape[0]
    sc = _uint(b[:, 48:56], 2)
    bits = sum((sc[:, i] >> 12) << (4 * i) for i in range(4))
    d = torch.stack((bits & 0xFF, bits >> 8), -1).to(torch.uint8).view(torch.float16).float()
    dl = d * (2 * _fields(sc, 3, 4, 7) + 1)
    nib = _fields(b[:, 32:48], 4, 2, 0x0F)
    delta = torch.where((nib & 8) == 0, DELTA, -DELTA).float()
    g = grid[b[:, :32].long() | ((nib & 7).long() << 8)].reshape(n, 16, 2, 8)
    return dl.reshape(n, 16) / 8, ((g + delta.reshape(n, 16, 2, 1)) * 8).reshape(n, 16, 16)


def _tq1_0(b: torch.Tensor, pow3, signs, ksigns) -> tuple:
    """54 bytes: 48 bytes of 5 base-3 digits each (as fixed-point fractions of 243), 4 bytes of 4 more, fp16 d."""
    n = b.shape[0]
    # uint8 products wrap, as numpy's do: multiplying by 3^k shifts digit k to the top of the fraction
    q = torch.cat((
        (b[:, None, :32] * pow3[:, None]).reshape(n, -1),
        (b[:, None, 32:48] * pow3[:, None]).reshape(n, -1),
        (b[:, None, 48:52] * pow3[:4, None]).reshape(n, -1),
    ), -1)
    return _half(b, 52), (((q.long() * 3) >> 8) - 1).float().reshape(n, 1, 256)


def _tq2_0(b: torch.Tensor, grid, signs, ksigns) -> tuple:
    """66 bytes: 64 bytes of four 2-bit values (+1) each, 32 apart, then fp16 d."""
    n = b.shape[0]
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=b.device)
    q = (b[:, :64].reshape(n, 2, 1, 32) >> shifts[:, None]) & 3
    return _half(b, 64), (q.reshape(n, -1).float() - 1).reshape(n, 1, 256)


_DEQUANT = {IQ2_XXS: _iq2_xxs, IQ2_XS: _iq2_xs, IQ2_S: _iq2_s, IQ3_XXS: _iq3_xxs, IQ3_S: _iq3_s,
            IQ1_S: _iq1_s, IQ1_M: _iq1_m, TQ1_0: _tq1_0, TQ2_0: _tq2_0}


def _blocks(t: torch.Tensor, qtype: int) -> tuple:
    """(each group's scale [blocks, groups], its values [blocks, groups, group size]) of a matrix's blocks."""
    if qtype not in _DEQUANT:
        raise NotImplementedError(f"gguf_iq does not dequantise ggml type {qtype}")
    type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)][1]
    if t.dtype != torch.uint8 or t.dim() != 2 or t.shape[1] % type_size:
        raise ValueError(f"expected uint8 [rows, n*{type_size}] for ggml type {qtype}, got {t.dtype} {tuple(t.shape)}")
    return _DEQUANT[qtype](t.contiguous().reshape(-1, type_size), *_tables(qtype, t.device))


def iq_dequantize(t: torch.Tensor, qtype: int) -> torch.Tensor:
    """One GGUF matrix's packed rows, uint8 [rows, bytes_per_row] on any device -> float32 [rows, cols] on t's device."""
    scale, q = _blocks(t, qtype)
    return (scale[..., None] * q).reshape(t.shape[0], -1)


def iq_parts(t: torch.Tensor, qtype: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(values [rows, cols] int8, from IQ_TABLES[qtype]; scale per group [rows, cols / group] float32; group: 32,
    or 16 for IQ2_XS, IQ2_S and IQ1_M) of one matrix, whose products are iq_dequantize's values. TQ1_0/TQ2_0's
    one scale per 256 is given per 32."""
    scale, q = _blocks(t, qtype)
    rows, group = t.shape[0], min(q.shape[-1], 32)
    scale = scale.repeat_interleave(q.shape[-1] // group, -1) if q.shape[-1] > group else scale
    return q.to(torch.int8).reshape(rows, -1), scale.reshape(rows, -1), group
