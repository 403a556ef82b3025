"""The byte layouts of kernel forms (quant.KTensor), pure functions on tensors.

Nibble planes are PyTorch's CPU int4 kernel's: per block of 64 rows, byte [k, j] holds row j's nibble low and row
j+32's high. What only ckernel.c's AVX2 routines read (a 5- or 6-bit form's upper bits, an int8 plane) is laid out
in the order those routines unpack a nibble plane's 4 k at a time (unpack_k4), so that they load it as it is.
"""
from __future__ import annotations

import torch


def _kpack(u: torch.Tensor) -> torch.Tensor:
    rows, cols = u.shape
    b = u.view(rows // 64, 2, 32, cols).transpose(2, 3)  # [block, lo/hi, k, j]
    return (b[:, 0] | (b[:, 1] << 4)).reshape(rows, cols // 2).contiguous()


def _kunpack(p: torch.Tensor) -> torch.Tensor:
    rows, half = p.shape
    b = p.view(rows // 64, 2 * half, 32)
    return torch.stack((b & 0x0F, b >> 4), 1).transpose(2, 3).reshape(rows, 2 * half)


# The upper bits of a 5- or 6-bit form (values 0..1 or 0..3 [rows, cols]) in the order ckernel.c's AVX2 routines
# unpack the nibbles (unpack_k4): per block of 64 rows and step of 4 k, vector i (0..7) of the unpacked values
# holds rows 32·(i // 4) + 16·L + 4·(i % 4) + m at byte 16·L + 4·m + t (k = 4·step + t). One load and a shift
# and mask per vector then put the bits in place: with 2 bits, byte n of the step's vector h (0, 1) holds
# vector 4h + q's byte n at bits 2q..2q+1; with 1 bit, byte n holds vector i's at bit i. [rows, cols·hbits / 8],
# blocks of 64 rows in order (stacking rows is a cat).
def _hview(rows: int, cols: int) -> tuple[int, ...]:
    return rows // 64, 2, 2, 4, 4, cols // 4, 4  # block, h, L, q, m, step, t


def _i8pack(v: torch.Tensor) -> torch.Tensor:
    """int8 values [rows, cols] as an int8 plane: per block of 64 rows and step of 4 k, the 8 vectors of 32 bytes
    ckernel.c's unpack_k4 makes of nibbles (see _hview), so the routines load them as they are."""
    rows, cols = v.shape
    return v.view(_hview(rows, cols)).permute(0, 5, 1, 3, 2, 4, 6).reshape(rows, cols).contiguous()


def _i8unpack(p: torch.Tensor) -> torch.Tensor:
    rows, cols = p.shape
    return p.view(rows // 64, cols // 4, 2, 4, 2, 4, 4).permute(0, 2, 4, 3, 5, 1, 6).reshape(rows, cols)


def _hpack(v: torch.Tensor, hbits: int) -> torch.Tensor:
    rows, cols = v.shape
    x = v.view(_hview(rows, cols)).permute(0, 5, 1, 3, 2, 4, 6).to(torch.uint8)  # block, step, h, q, L, m, t
    if hbits == 2:  # bits 2q of byte (h, n)
        out = sum(x[:, :, :, q] << (2 * q) for q in range(4))  # block, step, h, L, m, t
    else:  # bit 4h + q of byte n
        out = sum(x[:, :, h, q] << (4 * h + q) for h in range(2) for q in range(4))
    return out.to(torch.uint8).reshape(rows, cols * hbits // 8).contiguous()


def _hunpack(p: torch.Tensor, hbits: int, shape: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    if hbits == 2:
        b = p.view(rows // 64, cols // 4, 2, 1, 2, 4, 4)  # block, step, h, (q), L, m, t
        x = (b >> (2 * torch.arange(4, device=p.device, dtype=torch.uint8)).view(4, 1, 1, 1)) & 3
    else:
        b = p.view(rows // 64, cols // 4, 1, 1, 2, 4, 4)
        x = (b >> torch.arange(8, device=p.device, dtype=torch.uint8).view(2, 4, 1, 1, 1)) & 1
    return x.permute(0, 2, 4, 3, 5, 1, 6).reshape(rows, cols)  # block, h, L, q, m, step, t
