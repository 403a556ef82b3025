"""GGUF block formats in torch: dequantised on whatever device the bytes are on, and repacked into low-bit
copies from the file's own bits instead of being quantised again.

Dequantising: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS and MXFP4 (what
llama.cpp's Q2–Q8 and IQ4 files, their fallbacks for rows K-quants do not divide, and gpt-oss files hold their
experts in) are unpacked here, the IQ1–IQ3 codebooks and ternary types in gguf_iq.py, with torch ops, so on
a GPU the packed bytes cross and are unpacked there; any other type goes through gguf-py (llama.cpp's numpy
reference) on the CPU. Each is checked against gguf-py.

Copies: shadow policies (`-q4`, `-q48`, `shadow`) hold int4/int8 copies of experts in the fast tier. For
a GGUF whose experts are already 4- or 8-bit, re-quantising the dequantised weights would add a second
rounding on top of the file's; instead the file's integers and scales are repacked: Q4_0 → int4 and Q8_0 and
IQ4_NL/IQ4_XS → int8 (emoe's portable layout: symmetric, an fp16 scale per 32 values, as theirs) and Q4_K and
Q4_1 → the CPU int4 kernel's layout, whose per-group zero holds their minimum (value = (u − 8)·d·sc + 8·d·sc −
dmin·m). The values are the file's; the kernel holds scales (and zeros) in bf16 and multiplies bf16
activations, as every int4 copy on the CPU does. A type with no exact form at the requested precision
(Q6_K, Q5_K, …, or Q4_K where the kernel is not used) is dequantised and quantised by quant.quantize.

Host forms (each matrix in the CPU int4 kernel's layout, for misses run on the host) are in forms.py.
"""
from __future__ import annotations

import torch

from .kernel_layout import _hpack, _kpack
from .quant import KTensor, QTensor, kbytes, kernel_fits, pack_int4, qbytes, quantize
from .quant import dequantize as quant_dequantize

# ggml type ids (gguf.GGMLQuantizationType)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 10, 11, 12, 13, 14
IQ4_NL, IQ4_XS, MXFP4 = 20, 23, 39
FLOAT_TYPES = (0, 1, 30)  # F32, F16, BF16: not blocks
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # E2M1, doubled (ggml's kvalues_mxfp4)
GROUP = 32


def _half(b: torch.Tensor, at: int) -> torch.Tensor:
    return b[..., at:at + 2].contiguous().view(torch.float16)[..., 0]


def q4_0_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 rows → (values 0..15 [rows, cols], fp16 scale d per 32 values): the weight is (u − 8)·d."""
    rows = t.shape[0]
    b = t.reshape(rows, -1, 18)  # fp16 d, then 16 bytes: values 0..15 low nibbles, 16..31 high
    return torch.cat((b[..., 2:] & 0x0F, b[..., 2:] >> 4), -1).reshape(rows, -1), _half(b, 0).contiguous()


def q8_0_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 rows → (int8 values [rows, cols], fp16 scale d per 32 values): the weight is q·d."""
    rows = t.shape[0]
    b = t.reshape(rows, -1, 34)  # fp16 d, then 32 int8 values
    return b[..., 2:].contiguous().view(torch.int8).reshape(rows, -1), _half(b, 0).contiguous()


def q4_0(t: torch.Tensor, bits: int) -> QTensor:
    u, d = q4_0_parts(t)
    if bits == 4:
        return QTensor(pack_int4(u), d, tuple(u.shape), 4, GROUP)
    return QTensor((u.to(torch.int8) - 8).contiguous(), d, tuple(u.shape), 8, GROUP)


def q8_0(t: torch.Tensor) -> QTensor:
    q, d = q8_0_parts(t)
    return QTensor(q, d, tuple(q.shape), 8, GROUP)


def q4_k_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K rows → (values 0..15 [rows, cols], scale and minimum per 32 values [rows, cols/32], fp32):
    the weight is scale·u − minimum (ggml's dequantize_row_q4_K)."""
    rows = t.shape[0]
    b = t.reshape(rows, -1, 144)  # per 256 values: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 of nibbles
    d, dmin = _half(b, 0).float(), _half(b, 2).float()
    sc, m = _k_scales(b[..., 4:16])
    qs = b[..., 16:].reshape(rows, -1, 4, 32)  # four 64-value chunks: low nibbles first 32, high the next
    u = torch.stack((qs & 0x0F, qs >> 4), 3).reshape(rows, -1)
    return u, (d[..., None] * sc).reshape(rows, -1), (dmin[..., None] * m).reshape(rows, -1)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 bytes of 6-bit scales and minimums of Q4_K/Q5_K's 8 sub-blocks (ggml's get_scale_min_k4)."""
    sc = torch.cat((s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)), -1).float()
    m = torch.cat((s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)), -1).float()
    return sc, m


def q5_k_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q5_K rows → (values 0..31, scale and minimum per 32 values, fp32): the weight is scale·u − minimum."""
    rows = t.shape[0]
    b = t.reshape(rows, -1, 176)  # d, dmin, 12 bytes of scales, 32 of fifth bits, 128 of nibbles
    d, dmin = _half(b, 0).float(), _half(b, 2).float()
    sc, m = _k_scales(b[..., 4:16])
    qh, qs = b[..., 16:48], b[..., 48:].reshape(rows, -1, 4, 32)
    shift = torch.arange(8, device=t.device, dtype=torch.uint8).view(4, 2, 1)  # chunk c: bits 2c (low), 2c+1
    high = (qh[..., None, None, :] >> shift) & 1  # [rows, blocks, 4, 2, 32]
    u = torch.stack((qs & 0x0F, qs >> 4), 3) | (high << 4)
    return u.reshape(rows, -1), (d[..., None] * sc).reshape(rows, -1), (dmin[..., None] * m).reshape(rows, -1)


def q5_k(t: torch.Tensor) -> torch.Tensor:
    u, scale, minimum = q5_k_parts(t)
    rows = t.shape[0]
    return u.float().view(rows, -1, 32).mul_(scale[..., None]).sub_(minimum[..., None]).reshape(rows, -1)


def q5_0_1_parts(t: torch.Tensor, offset: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Q5_0 (fp16 d; weight (u − 16)·d) or Q5_1 (fp16 d, fp16 m; weight u·d + m) → (values 0..31, d, m or
    None): per 32 values the scale(s), 4 bytes holding each value's fifth bit (bit j for value j), 16 bytes
    of nibbles (low: values 0..15)."""
    rows, head = t.shape[0], 4 if offset else 2
    b = t.reshape(rows, -1, head + 20)
    qh = b[..., head:head + 4].long()
    bits = (qh[..., 0] | qh[..., 1] << 8 | qh[..., 2] << 16 | qh[..., 3] << 24)[..., None]
    high = (bits >> torch.arange(32, device=t.device)) & 1
    qs = b[..., head + 4:]
    u = torch.cat((qs & 0x0F, qs >> 4), -1) | (high << 4).to(torch.uint8)
    return u.reshape(rows, -1), _half(b, 0).float(), _half(b, 2).float() if offset else None


def q5_0_1(t: torch.Tensor, offset: bool) -> torch.Tensor:
    u, d, m = q5_0_1_parts(t, offset)
    rows = t.shape[0]
    w = u.float().view(rows, -1, 32)
    if offset:
        return w.mul_(d[..., None]).add_(m[..., None]).reshape(rows, -1)
    return w.sub_(16).mul_(d[..., None]).reshape(rows, -1)


def q2_k(t: torch.Tensor) -> torch.Tensor:
    """Q2_K: per 256 values 16 bytes of 4-bit scale (low) and minimum (high) per 16 values, 64 bytes of
    2-bit values, fp16 d and dmin; halves of 128 take 32 bytes, each 2-bit plane 32 values."""
    rows = t.shape[0]
    b = t.reshape(rows, -1, 84)
    sc, d, dmin = b[..., :16].float(), _half(b, 80).float()[..., None], _half(b, 82).float()[..., None]
    shift = torch.tensor([0, 2, 4, 6], device=t.device, dtype=torch.uint8).view(4, 1)
    q = (b[..., 16:80].reshape(rows, -1, 2, 1, 32) >> shift) & 3  # [rows, blocks, half, plane, 32]
    w = q.float().view(rows, -1, 16, 16)
    return w.mul_((d * (sc.remainder(16)))[..., None]).sub_((dmin * (sc // 16))[..., None]).reshape(rows, -1)


def q2_k_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q2_K rows → (values 0..3 [rows, cols], uint8; scale and minimum per 16 values, fp32): the weight is
    scale·u − minimum (q2_k's arithmetic)."""
    rows = t.shape[0]
    b = t.reshape(rows, -1, 84)
    sc, d, dmin = b[..., :16].float(), _half(b, 80).float()[..., None], _half(b, 82).float()[..., None]
    shift = torch.tensor([0, 2, 4, 6], device=t.device, dtype=torch.uint8).view(4, 1)
    u = ((b[..., 16:80].reshape(rows, -1, 2, 1, 32) >> shift) & 3).reshape(rows, -1)
    return u, (d * sc.remainder(16)).reshape(rows, -1), (dmin * (sc // 16)).reshape(rows, -1)


def q3_k_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K rows → (values −4..3 [rows, cols], int8; scale per 16 values, fp32): per 256 values 32 bytes of
    high bits (bit 4h+j of byte l for half h, plane j, value l), 64 bytes of 2-bit values laid out as Q2_K's,
    12 bytes of 6-bit signed scales per 16 values, fp16 d. A clear high bit subtracts 4."""
    rows = t.shape[0]
    b = t.reshape(rows, -1, 110)
    s = b[..., 96:108]
    low = torch.cat((s[..., 0:8] & 0x0F, s[..., 0:8] >> 4), -1)
    high = torch.cat([(s[..., 8:12] >> k) & 3 for k in (0, 2, 4, 6)], -1)
    sc = (low | (high << 4)).float().sub_(32)
    shift = torch.tensor([0, 2, 4, 6], device=t.device, dtype=torch.uint8).view(4, 1)
    q = (b[..., 32:96].reshape(rows, -1, 2, 1, 32) >> shift) & 3
    hbit = (b[..., None, None, :32] >> torch.arange(8, device=t.device, dtype=torch.uint8).view(2, 4, 1)) & 1
    v = (q.to(torch.int8) - 4 + 4 * hbit.to(torch.int8)).reshape(rows, -1)
    return v, (_half(b, 108).float()[..., None] * sc).reshape(rows, -1)


def q3_k(t: torch.Tensor) -> torch.Tensor:
    v, scale = q3_k_parts(t)
    rows = t.shape[0]
    return v.float().view(rows, -1, 16).mul_(scale[..., None]).reshape(rows, -1)


def q6_k_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K rows → (values 0..63 [rows, cols], uint8; scale per 16 values, fp32): the weight is scale·(u − 32).
    Per 256 values 128 bytes of low nibbles, 64 of upper bit pairs, 16 int8 scales, fp16 d; per half of 128,
    ql[0:32] low, ql[32:64] low, then their high nibbles."""
    rows = t.shape[0]
    b = t.reshape(rows, -1, 210)
    ql, qh = b[..., :128].reshape(rows, -1, 2, 2, 32), b[..., 128:192].reshape(rows, -1, 2, 1, 32)
    sc = b[..., 192:208].contiguous().view(torch.int8).float()
    shift = torch.tensor([0, 2, 4, 6], device=t.device, dtype=torch.uint8).view(4, 1)
    u = torch.cat((ql & 0x0F, ql >> 4), 3) | (((qh >> shift) & 3) << 4)  # [rows, blocks, 2, 4, 32]
    return u.reshape(rows, -1), (_half(b, 208).float()[..., None] * sc).reshape(rows, -1)


def q6_k(t: torch.Tensor) -> torch.Tensor:
    u, scale = q6_k_parts(t)
    rows = t.shape[0]
    return u.float().view(rows, -1, 16).sub_(32).mul_(scale[..., None]).reshape(rows, -1)


def iq4_parts(t: torch.Tensor, xs: bool, codes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ4_NL (per 32 values: fp16 d, 16 bytes of nibbles, low ones the first 16 values) or IQ4_XS (per 256:
    fp16 d, 2 bytes of high and 4 of low scale bits giving each 32 a 6-bit scale ls, then 8 runs of IQ4_NL's
    nibbles) → (int8 values from ggml's non-uniform table [rows, cols]; scale per 32, d or d·(ls − 32), fp32)."""
    rows = t.shape[0]
    if xs:
        b = t.reshape(rows, -1, 136)
        low = torch.stack((b[..., 4:8] & 0x0F, b[..., 4:8] >> 4), -1).reshape(rows, -1, 8).to(torch.int32)
        high = b[..., 2:4].to(torch.int32)
        high = ((high[..., 0] | high[..., 1] << 8)[..., None] >> torch.arange(0, 16, 2, device=t.device)) & 3
        scale = _half(b, 0).float()[..., None] * ((low | high << 4) - 32).float()
        qs = b[..., 8:].reshape(rows, -1, 16)
    else:
        b = t.reshape(rows, -1, 18)
        scale, qs = _half(b, 0).float(), b[..., 2:]
    u = torch.cat((qs & 0x0F, qs >> 4), -1)  # (codes: these nibbles, not their values)
    return (u if codes else torch.tensor(IQ4_VALUES, dtype=torch.int8, device=t.device)[u.long()]).reshape(rows, -1), \
        scale.reshape(rows, -1)


def mxfp4_parts(t: torch.Tensor, codes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's MXFP4 (gpt-oss GGUFs) → (doubled E2M1 values −12..12 [rows, blocks, 32], int8; scale per 32
    values): per 32 values an E8M0 exponent byte, then 16 bytes of nibbles (low nibbles the first 16 values).
    The table is doubled, so the scale is half of 2^(e−127), built from its float32 bits as
    ggml_e8m0_to_fp32_half does (exact on any device). codes: the nibbles themselves, not their values."""
    rows = t.shape[0]
    b = t.reshape(rows, -1, 17)
    u = torch.cat((b[..., 1:] & 0x0F, b[..., 1:] >> 4), -1)
    return u if codes else torch.tensor(MXFP4_VALUES, dtype=torch.int8, device=t.device)[u.long()], e8m0_half(b[..., 0])


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """Half of 2^(e − 127) per exponent byte, from its float32 bits (exact on any device; e < 2 subnormal)."""
    e = e.to(torch.int32)
    return torch.where(e < 2, torch.full_like(e, 0x00200000) << e, (e - 1) << 23).view(torch.float32)


def mxfp4(t: torch.Tensor) -> torch.Tensor:
    q, d = mxfp4_parts(t)
    return q.float().mul_(d[..., None]).reshape(t.shape[0], -1)


def dequantize(t: torch.Tensor, qtype: int, dtype=torch.float32) -> torch.Tensor:
    """One GGUF matrix's packed rows [R, bytes] → [R, C] in `dtype` on t's device; float32 arithmetic, as
    llama.cpp's, so a float32 engine runs the file's exact values. In place after the one float32 buffer:
    temporaries the size of the matrix would fragment the host heap that resident experts live in. A matrix
    the RAM tier holds in its host form (forms.host_form) gives that form's values."""
    if isinstance(t, KTensor):
        return quant_dequantize(t, dtype)
    rows = t.shape[0]
    if qtype == Q4_0:
        u, d = q4_0_parts(t)
        w = u.float().view(rows, -1, 32).sub_(8).mul_(d.float()[..., None])
    elif qtype == Q8_0:
        q, d = q8_0_parts(t)
        w = q.float().view(rows, -1, 32).mul_(d.float()[..., None])
    elif qtype in (Q4_1, Q4_K):  # asymmetric: scale·u − minimum
        u, scale, minimum = (q4_1_parts if qtype == Q4_1 else q4_k_parts)(t)
        w = u.float().view(rows, -1, 32).mul_(scale[..., None]).sub_(minimum[..., None])
    elif qtype in (Q5_0, Q5_1):
        w = q5_0_1(t, qtype == Q5_1)
    elif qtype == Q2_K:
        w = q2_k(t)
    elif qtype == Q3_K:
        w = q3_k(t)
    elif qtype == Q5_K:
        w = q5_k(t)
    elif qtype == Q6_K:
        w = q6_k(t)
    elif qtype == MXFP4:
        w = mxfp4(t)
    elif qtype in (IQ4_NL, IQ4_XS):
        q, scale = iq4_parts(t, qtype == IQ4_XS)
        w = q.float().view(rows, -1, 32).mul_(scale[..., None])
    else:
        from .gguf_iq import IQ_TYPES, iq_dequantize
        if qtype in IQ_TYPES:
            w = iq_dequantize(t, qtype)
        else:
            from gguf import GGMLQuantizationType, quants
            w = torch.from_numpy(quants.dequantize(t.cpu().numpy(), GGMLQuantizationType(qtype))).to(t.device)
    return w.reshape(rows, -1).to(dtype)


def q4_1_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 rows → (values 0..15, scale d, minimum −m per 32 values): the weight is d·u + m."""
    rows = t.shape[0]
    b = t.reshape(rows, -1, 20)
    u = torch.cat((b[..., 4:] & 0x0F, b[..., 4:] >> 4), -1).reshape(rows, -1)
    return u, _half(b, 0).float(), -_half(b, 2).float()


def kernel_copy(u: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group: int = GROUP,
                hbits: int = 0) -> KTensor:
    """An asymmetric 4-bit matrix (weight = scale·u − minimum per `group` values) in the CPU int4 kernel's
    layout: (u − 8)·scale + zero with zero = 8·scale − minimum. hbits (1, 2): u has 4 + hbits bits, its upper
    ones held beside the nibbles (KTensor.high; only ckernel's AVX2 routines take that)."""
    zero = 8 * scale - minimum
    sz = torch.stack((scale.t(), zero.t()), -1).to(torch.bfloat16).contiguous()
    if not hbits:
        return KTensor((_kpack(u),), (sz,), tuple(u.shape), 4, group)
    return KTensor((_kpack(u & 15),), (sz,), tuple(u.shape), 4 + hbits, group, high=_hpack(u >> 4, hbits), hbits=hbits)


def file_copy(t: torch.Tensor, qtype: int, bits: int, kernel: bool) -> QTensor | KTensor | None:
    """The file's own `bits`-bit form of one packed GGUF matrix, or None where it has none."""
    if qtype == Q4_0:
        return q4_0(t, bits)
    if qtype == Q8_0 and bits == 8:
        return q8_0(t)
    if qtype in (IQ4_NL, IQ4_XS) and bits == 8:  # the table's integers; IQ4_XS's d·(ls − 32) rounded to fp16
        q, scale = iq4_parts(t, qtype == IQ4_XS)
        return QTensor(q, scale.half(), tuple(q.shape), 8, GROUP)
    parts = {Q4_K: q4_k_parts, Q4_1: q4_1_parts}.get(qtype)
    if parts is not None and bits == 4 and kernel:  # asymmetric: only the kernel's zero holds the minimum
        u, scale, minimum = parts(t)
        return kernel_copy(u, scale, minimum) if kernel_fits(tuple(u.shape), GROUP) else None
    return None


class GGUFCopies:
    """`cache.copy_files[bits]` for a GGUF import: copies repacked from the file where they can be, made
    by quant.quantize otherwise."""

    def __init__(self, cache, bits: int):
        self.cache, self.bits = cache, bits

    def get(self, key: tuple[int, int]) -> tuple:
        packed, _ = self.cache.store.read_packed(*key)
        locs = self.cache.store.ckpt.experts[key]
        kernel = self.cache.kernel and self.cache.device.type == "cpu"
        group = self.cache._groups.get(self.bits, GROUP)
        out = []
        for t, qtype in zip(packed, locs.qtypes):
            if isinstance(t, KTensor):  # a RAM tier holding host forms: the kernel copy is that very form
                # the form itself where it is such a copy, and costs what the budget counts for one (a codebook,
                # scales per 16 or upper bits cost more)
                same = kernel and t.bits == self.bits and group == GROUP and t.plain and \
                    t.nbytes == kbytes(t.shape, self.bits, group)
                out.append(t if same else quantize(quant_dequantize(t), self.bits, group))
                continue
            t = t.cpu()
            c = file_copy(t, qtype, self.bits, kernel)  # (a Q4_0's, per 32, costs what int4 per 64 with offsets does)
            fits = c is not None and c.nbytes <= (kbytes if kernel else qbytes)(c.shape, self.bits, group)
            out.append(c if fits else quantize(dequantize(t, qtype), self.bits, group))
        return tuple(out)
