"""GGUF block formats in torch: dequantised on whatever device the bytes are on, and repacked into low-bit
copies from the file's own bits instead of being quantised again.

Dequantising: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and MXFP4 (what llama.cpp's Q2–Q8 files,
their fallbacks for rows K-quants do not divide, and gpt-oss files hold their experts in) are unpacked here with torch ops, so on a GPU the packed bytes cross and are unpacked there; any other
type goes through gguf-py (llama.cpp's numpy reference) on the CPU. Each is checked against gguf-py.

Copies: shadow policies (`-q4`, `-q48`, `shadow`) hold int4/int8 copies of experts in the fast tier. For
a GGUF whose experts are already 4- or 8-bit, re-quantising the dequantised weights would add a second
rounding on top of the file's; instead the file's integers and scales are repacked: Q4_0 → int4 and Q8_0 →
int8 (emoe's portable layout: symmetric, an fp16 scale per 32 values, which is exactly theirs) and Q4_K and
Q4_1 → the CPU int4 kernel's layout, whose per-group zero holds their minimum (value = (u − 8)·d·sc + 8·d·sc −
dmin·m). The values are the file's; the kernel holds scales (and zeros) in bf16 and multiplies bf16
activations, as every int4 copy on the CPU does. A type with no exact form at the requested precision
(Q6_K, Q5_K, …, or Q4_K where the kernel is not used) is dequantised and quantised by quant.quantize.

Host forms: where misses run on the host (the `host`/`auto` policies, a RAM tier), each matrix is held in the
CPU int4 kernel's layout instead of packed (host_form; gpt-oss's MXFP4 and the FP8 releases too), so a host
run multiplies it without dequantising it first.
"""
from __future__ import annotations

import torch

from .quant import _MM, KTensor, QTensor, _kpack, kernel_fits, quantize, to_kernel
from .quant import dequantize as quant_dequantize
from .checkpoint import PACKED

# ggml type ids (gguf.GGMLQuantizationType)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, MXFP4 = 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 39
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # E2M1, doubled (ggml's kvalues_mxfp4)
GROUP = 32


def _half(b: torch.Tensor, at: int) -> torch.Tensor:
    return b[..., at:at + 2].contiguous().view(torch.float16)[..., 0]


def _emoe_nibbles(u: torch.Tensor) -> torch.Tensor:
    """Unsigned values [rows, cols] (0..15) → emoe's int4 packing (even column low, odd column high)."""
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


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
        return QTensor(_emoe_nibbles(u), d, tuple(u.shape), 4, GROUP)
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


def q3_k(t: torch.Tensor) -> torch.Tensor:
    """Q3_K: per 256 values 32 bytes of high bits (bit 4h+j of byte l for half h, plane j, value l), 64 bytes
    of 2-bit values laid out as Q2_K's, 12 bytes of 6-bit signed scales per 16 values, fp16 d. A clear high
    bit subtracts 4."""
    rows = t.shape[0]
    b = t.reshape(rows, -1, 110)
    s = b[..., 96:108]
    low = torch.cat((s[..., 0:8] & 0x0F, s[..., 0:8] >> 4), -1)
    high = torch.cat([(s[..., 8:12] >> k) & 3 for k in (0, 2, 4, 6)], -1)
    sc = (low | (high << 4)).float().sub_(32)
    shift = torch.tensor([0, 2, 4, 6], device=t.device, dtype=torch.uint8).view(4, 1)
    q = (b[..., 32:96].reshape(rows, -1, 2, 1, 32) >> shift) & 3
    hbit = (b[..., None, None, :32] >> torch.arange(8, device=t.device, dtype=torch.uint8).view(2, 4, 1)) & 1
    w = q.float().sub_(4 * (1 - hbit.float())).view(rows, -1, 16, 16)
    return w.mul_((_half(b, 108).float()[..., None] * sc)[..., None]).reshape(rows, -1)


def q6_k(t: torch.Tensor) -> torch.Tensor:
    rows = t.shape[0]
    b = t.reshape(rows, -1, 210)  # 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, fp16 d
    ql, qh = b[..., :128].reshape(rows, -1, 2, 2, 32), b[..., 128:192].reshape(rows, -1, 2, 1, 32)
    sc = b[..., 192:208].contiguous().view(torch.int8).float().reshape(rows, -1, 2, 8, 1)
    d = _half(b, 208).float()
    shift = torch.tensor([0, 2, 4, 6], device=t.device, dtype=torch.uint8).view(4, 1)
    low = torch.cat((ql & 0x0F, ql >> 4), 3)  # per half of 128: ql[0:32] low, ql[32:64] low, then high
    q = (low | (((qh >> shift) & 3) << 4)).float().sub_(32)  # [rows, blocks, 2, 4, 32]
    return q.view(rows, -1, 2, 8, 16).mul_(sc).mul_(d[..., None, None, None]).reshape(rows, -1)


def mxfp4_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's MXFP4 (gpt-oss GGUFs) → (doubled E2M1 values −12..12 [rows, blocks, 32], int8; scale per 32
    values): per 32 values an E8M0 exponent byte, then 16 bytes of nibbles (low nibbles the first 16 values).
    The table is doubled, so the scale is half of 2^(e−127), built from its float32 bits as
    ggml_e8m0_to_fp32_half does (exact on any device)."""
    rows = t.shape[0]
    b = t.reshape(rows, -1, 17)
    u = torch.cat((b[..., 1:] & 0x0F, b[..., 1:] >> 4), -1).long()
    return torch.tensor(MXFP4_VALUES, dtype=torch.int8, device=t.device)[u], e8m0_half(b[..., 0])


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
    the RAM tier holds in its host form (host_form) gives that form's values."""
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


def kernel_copy(u: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> KTensor:
    """An asymmetric 4-bit matrix (weight = scale·u − minimum per 32 values) in the CPU int4 kernel's layout:
    (u − 8)·scale + zero with zero = 8·scale − minimum."""
    zero = 8 * scale - minimum
    sz = torch.stack((scale.t(), zero.t()), -1).to(torch.bfloat16).contiguous()
    return KTensor((_kpack(u),), (sz,), tuple(u.shape), 4, GROUP)


def file_copy(t: torch.Tensor, qtype: int, bits: int, kernel: bool) -> QTensor | KTensor | None:
    """The file's own `bits`-bit form of one packed GGUF matrix, or None where it has none."""
    if qtype == Q4_0:
        return q4_0(t, bits)
    if qtype == Q8_0 and bits == 8:
        return q8_0(t)
    parts = {Q4_K: q4_k_parts, Q4_1: q4_1_parts}.get(qtype)
    if parts is not None and bits == 4 and kernel:  # asymmetric: only the kernel's zero holds the minimum
        u, scale, minimum = parts(t)
        return kernel_copy(u, scale, minimum) if kernel_fits(tuple(u.shape), GROUP) else None
    return None


def kernel_copy5(u: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> KTensor:
    """A 5-bit matrix (weight = scale·u − minimum, u 0..31, per 32 values) as two int4 planes, u = a + 3·b with
    a in 0..15 and b (0..6) nonzero only where u > 15: (a − 8)·scale + 8·scale − minimum, plus (b + 8 − 8)·3·scale.
    The kernel rounds each plane's product to bf16, so neither plane may be much larger than the weight
    (see mxfp4_form)."""
    b = ((u.to(torch.int16) - 13) // 3).clamp_(min=0).to(torch.uint8)
    z = torch.zeros_like(scale)
    sz = [torch.stack((m.t(), c.t()), -1).to(torch.bfloat16).contiguous()
          for m, c in ((scale, 8 * scale - minimum), (3 * scale, z))]
    return KTensor((_kpack(u - 3 * b), _kpack(b + 8)), tuple(sz), tuple(u.shape), 8, GROUP)


# bits a weight: the file's block type → its host form (Q2_K/Q3_K forms would cost 2.9-3.8x the file's bytes)
FORM_BITS = {Q4_0: (4.5, 5), Q4_1: (5, 5), Q4_K: (4.5, 5), Q8_0: (8.5, 10), Q6_K: (6.5625, 10), Q5_0: (5.5, 10),
             Q5_1: (6, 10), Q5_K: (5.5, 10), MXFP4: (4.25, 10)}
HOST_TYPES = tuple(FORM_BITS)


def mxfp4_planes(q: torch.Tensor, d: torch.Tensor) -> KTensor:
    """Doubled MXFP4 values q (−12..12, [rows, cols]) and their scale per 32 (a power of two) as two int4
    planes, exactly: q = a + b, a = q clamped to −8..7 and b the rest (−4..5), both times the scale, exact in
    bf16. The kernel rounds each plane's product to bf16: split as 16·hi + lo instead, the two products ran
    to 3x the result on a gpt-oss model's weights and cancelled, and their roundings came to 1% of it (5x
    rounding the activations alone; now 1.4x)."""
    a = q.clamp(-8, 7)
    sz = torch.stack((d.t(), torch.zeros_like(d).t()), -1).to(torch.bfloat16).contiguous()
    return KTensor((_kpack((a + 8).to(torch.uint8)), _kpack((q - a + 8).to(torch.uint8))), (sz, sz), tuple(q.shape),
                   8, GROUP)


def mxfp4_form(t: torch.Tensor) -> KTensor:
    q, d = mxfp4_parts(t)
    return mxfp4_planes(q.reshape(t.shape[0], -1), d)


def mxfp4_release_forms(tensors: tuple[torch.Tensor, ...]) -> tuple[KTensor, KTensor, KTensor] | None:
    """gpt-oss's released MXFP4 expert (blocks [R, G, 16], low nibble first, and exponents [R, G] of gate_up
    with gate and up rows interleaved, then of down) as the (gate, up, down) host forms, or None where the
    kernel cannot hold them. Its exponent s means 2^(s − 127) on the plain table: ggml's scale on the doubled one."""
    out = []
    for blocks, scales in zip(tensors[0::2], tensors[1::2]):
        v = torch.stack((blocks & 0x0F, blocks >> 4), -1).reshape(blocks.shape[0], -1).long()
        out.append((torch.tensor(MXFP4_VALUES, dtype=torch.int8)[v], e8m0_half(scales)))
    (gu, gu_d), (dn, dn_d) = out
    if gu.shape[0] % 128 or dn.shape[0] % 64 or _MM is None:
        return None
    return mxfp4_planes(gu[0::2], gu_d[0::2]), mxfp4_planes(gu[1::2], gu_d[1::2]), mxfp4_planes(dn, dn_d)


def fp8_release_forms(tensors: tuple[torch.Tensor, ...], block: tuple[int, int]) -> tuple[KTensor, ...] | None:
    """A block-scaled FP8 expert (DeepSeek-V3, Qwen3 and GLM-4.5 FP8 releases: each matrix and its
    scale_inv) as int8 host forms, or None where the kernel cannot hold them: E4M3 is not a uniform grid, so
    its values are quantised again per 32 (0.5% of their size; E4M3's own steps are 6% of each value), 10
    bits a weight against 8 and the block scales."""
    from .checkpoint import fp8_dequantize
    ws = [fp8_dequantize(w, s, block, torch.float32) for w, s in zip(tensors[0::2], tensors[1::2])]
    if _MM is None or any(w.shape[0] % 64 or w.shape[1] % GROUP for w in ws):
        return None
    return tuple(to_kernel(quantize(w, 8, GROUP)) for w in ws)


def host_form(t: torch.Tensor, qtype: int) -> KTensor | None:
    """One packed matrix in the CPU int4 kernel's layout, for running it where the RAM tier holds it (the
    `host` miss policy), or None where the type has no form that cheap. Dequantising a matrix per host run
    costs 10-50x the kernel's matmul. Q4_0/Q4_1/Q4_K (4 bits a weight + bf16 scale and zero per 32, against
    the file's 4.5-5) and Q8_0 (8 bits as two planes, against 8.5) hold the file's values with scales rounded
    to bf16: the RAM tier grows by at most 18%. Q6_K (Q4_K_M's down projections in half the layers) scales
    each 16 values, which the kernel's groups of 32 cannot: its values are quantised again to int8 per 32
    (10 bits against 6.56; error 0.5% of the values' size, as any int8 copy's). Q5_0/Q5_1/Q5_K hold their
    values as two planes (kernel_copy5: 10 bits against 5.5-6, the RAM tier 1.7-1.8x the file's bytes; still
    far below the 32 bits a weight of the float32 fast tier). MXFP4 (gpt-oss) holds its values exactly as
    two planes (10 bits against 4.25: 2.35x). Q2_K and Q3_K have none (2.9-3.8x). The RAM tier builds
    forms only where they fit the memory available (store.RamStore).
    The kernel multiplies bf16 activations, as llama.cpp rounds them to 8 bits."""
    if qtype not in HOST_TYPES or t.shape[0] % 64 or _MM is None:  # the kernel's blocks of 64 rows
        return None
    if qtype == Q8_0:
        return to_kernel(q8_0(t))
    if qtype == Q6_K:
        return to_kernel(quantize(q6_k(t), 8, GROUP))
    if qtype in (Q5_0, Q5_1):
        u, d, m = q5_0_1_parts(t, qtype == Q5_1)
        return kernel_copy5(u, d, 16 * d if m is None else -m)
    if qtype == Q5_K:
        return kernel_copy5(*q5_k_parts(t))
    if qtype == MXFP4:
        return mxfp4_form(t)
    if qtype == Q4_0:
        u, d = q4_0_parts(t)
        return kernel_copy(u, d.float(), 8 * d.float())
    return kernel_copy(*(q4_k_parts if qtype == Q4_K else q4_1_parts)(t))


def host_forms_of(locs, tensors: tuple[torch.Tensor, ...], int8: bool = False) -> tuple:
    """An expert as the RAM tier holds it for host runs (ExpertLocs, and its tensors as stored, or unpacked
    for full-precision layouts): host forms where its layout and types have them, else as stored. int8:
    full-precision experts (bf16, fp16, fp32) as int8 forms too (0.5% of the weights' size; 10 bits a weight
    against bf16's 16), for CPUs whose bf16 matmuls are slow and for RAM: opt-in, they are not the weights."""
    if locs.layout not in PACKED:
        fits = int8 and _MM is not None
        return tuple(to_kernel(quantize(t.float(), 8, GROUP)) if fits and t.dim() == 2 and t.shape[0] % 64 == 0
                     and t.shape[1] % GROUP == 0 else t for t in tensors)
    if locs.layout == "gguf":
        return tuple(host_form(t, q) or t for t, q in zip(tensors, locs.qtypes))
    if locs.layout == "mxfp4":
        return mxfp4_release_forms(tensors) or tensors
    if locs.layout == "fp8":
        return fp8_release_forms(tensors, locs.block) or tensors
    return tensors


def forms_bytes(locs) -> int:
    """Bytes one expert takes in the RAM tier with host forms (ExpertLocs: its packed parts and types)."""
    if locs.layout in ("mxfp4", "fp8"):
        return int(locs.nbytes * 10 / (4.25 if locs.layout == "mxfp4" else 8))
    return int(sum(p.nbytes * (FORM_BITS[q][1] / FORM_BITS[q][0] if q in FORM_BITS else 1)
                   for p, q in zip(locs.locs, locs.qtypes)))


def packed_experts(model_dir) -> bool:
    """Whether a model's experts are all held packed (a GGUF import, gpt-oss's MXFP4 release, an FP8 release):
    on a CPU they run best where the RAM tier holds them, in their host forms where they have them."""
    from .checkpoint import PACKED, Checkpoint
    return all(locs.layout in PACKED for locs in Checkpoint(model_dir).experts.values())


class GGUFCopies:
    """`cache.copy_files[bits]` for a GGUF import: copies repacked from the file where they can be, made
    by quant.quantize otherwise."""

    def __init__(self, cache, bits: int):
        self.cache, self.bits = cache, bits

    def get(self, key: tuple[int, int]) -> tuple:
        packed, _ = self.cache.store.read_packed(*key)
        locs = self.cache.store.ckpt.experts[key]
        kernel = self.cache.kernel and self.cache.device.type == "cpu"
        group = getattr(self.cache, "_group", GROUP)
        out = []
        for t, qtype in zip(packed, locs.qtypes):
            if isinstance(t, KTensor):  # a RAM tier holding host forms: the kernel copy is that very form
                same = kernel and t.bits == self.bits and group == GROUP
                out.append(t if same else quantize(quant_dequantize(t), self.bits, group))
                continue
            t = t.cpu()
            c = file_copy(t, qtype, self.bits, kernel) if group == GROUP else None
            out.append(c if c is not None else quantize(dequantize(t, qtype), self.bits, group))
        return tuple(out)
