"""Host forms: experts held in the RAM tier in the layout of PyTorch's CPU int4 matmul kernel, so that a miss
run on the host (the `host`/`auto` policies, llama.cpp's --n-cpu-moe setup) multiplies them as they are
instead of dequantising every matrix per run (10-50x the kernel's matmul). A GGUF's blocks (host_form),
gpt-oss's MXFP4 release and the FP8 releases have forms; full-precision experts get int8 ones on request
(--host-int8). The kernel multiplies bf16 activations, as llama.cpp rounds its activations to 8 bits; a
load into the fast tier dequantises a form where it lands (quant.dequantize, on any device).
"""
from __future__ import annotations

import torch

from .checkpoint import PACKED, fp8_dequantize
from .ckernel import lut_able
from .gguf_blocks import (FLOAT_TYPES, GROUP, IQ4_NL, IQ4_VALUES, IQ4_XS, MXFP4, MXFP4_VALUES, Q2_K, Q3_K, Q4_0, Q4_1,
                          Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, dequantize, e8m0_half, iq4_parts, kernel_copy, mxfp4_parts,
                          q2_k_parts, q3_k_parts, q4_0_parts, q4_1_parts, q4_k_parts, q5_0_1_parts, q5_k_parts,
                          q6_k_parts, q8_0)
from .gguf_iq import IQ1_M, IQ2_S, IQ2_XS, IQ_TABLES, iq_parts
from .kernel_layout import _kpack
from .quant import _MM, KTensor, QTensor, fit_int4, int8_form, quantize

IQ_PER_16 = (IQ2_XS, IQ2_S, IQ1_M)  # i-quants scaled per 16 values


def kernel_copy5(u: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> KTensor:
    """A 5-bit matrix (weight = scale·u − minimum, u 0..31, per 32 values) as two int4 planes, u = a + 3·b with
    a in 0..15 and b (0..6) nonzero only where u > 15: (a − 8)·scale + 8·scale − minimum, plus (b + 8 − 8)·3·scale.
    The kernel rounds each plane's product to bf16, so neither plane may be much larger than the weight
    (see mxfp4_planes)."""
    b = ((u.float() - 13) / 3).floor_().clamp_(min=0).to(torch.uint8)  # exact; integer floor division is several times slower
    z = torch.zeros_like(scale)
    sz = [torch.stack((m.t(), c.t()), -1).to(torch.bfloat16).contiguous()
          for m, c in ((scale, 8 * scale - minimum), (3 * scale, z))]
    return KTensor((_kpack(u - 3 * b), _kpack(b + 8)), tuple(sz), tuple(u.shape), 8, GROUP)


ONE_PLANE = (Q4_0, Q4_1, Q4_K)  # 4 bits + a bf16 scale and zero per 32: 5 bits a weight; others 5-10 (form_ratio)
# held with the file's own values; every other GGUF type is quantised again (to int8, or int4 where asked)
EXACT = frozenset({*ONE_PLANE, Q8_0, Q5_0, Q5_1, Q5_K, MXFP4, Q3_K, IQ4_NL, IQ4_XS})


def _exact(kind) -> bool:
    """Whether a block type's form holds the file's own values (Q2_K's, Q6_K's and the i-quants' only where scales
    per 16 and codebooks can be held)."""
    return kind in EXACT or ((kind in (Q2_K, Q6_K) or kind in IQ_TABLES) and lut_able())


def int4_able(kind) -> bool:
    """Whether a GGUF block type's form is its values quantised again and the file holds fewer than 4 bits a
    weight (Q2_K, the IQ1-IQ3 codebooks, TQ1_0/TQ2_0): an int4 form then adds little to the file's own
    rounding. Q6_K's int8 form (where it has no exact one) stays: int4 would round it as coarsely as a Q4 file."""
    if not isinstance(kind, int) or _exact(kind) or kind in FLOAT_TYPES:
        return False
    from gguf import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[kind]
    return 8 * size / block < 4


def form_ratio(kind, bits: int = 8) -> float | None:
    """A host form's bytes over the packed bytes it replaces, for a GGUF block type or a release layout
    ("mxfp4", "fp8"); None where there is no form (float types). bits: a requantised type's form (8 or 4)."""
    if kind in ("mxfp4", "fp8"):
        return (codebook_bits() if kind == "mxfp4" else int8_bits()) / (4.25 if kind == "mxfp4" else 8)
    if kind in FLOAT_TYPES:
        return None
    from gguf import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[kind]
    if kind in (MXFP4, IQ4_NL, IQ4_XS):
        return codebook_bits() / (8 * size / block)
    if kind in (Q2_K, Q3_K) and lut_able():  # one plane, scales per 16
        return 6 / (8 * size / block)
    if kind in (Q5_0, Q5_1, Q5_K, Q6_K) and lut_able():  # one plane and the upper bits (Q6_K's scales per 16)
        return (8 if kind == Q6_K else 6) / (8 * size / block)
    if kind in IQ_TABLES and lut_able():  # a codebook form, scales per 32 or 16
        return (6 if kind in IQ_PER_16 else 5) / (8 * size / block)
    one = kind in ONE_PLANE or (bits == 4 and int4_able(kind))
    return (5 if one else int8_bits()) / (8 * size / block)


def int8_bits() -> int:
    """Bits a weight of an int8 form (Q8_0's, a type quantised again): one byte plane where the AVX2 routines take
    it (quant.int8_form), else two nibble planes."""
    return 9 if lut_able() else 10


def codebook_bits() -> int:
    """Bits a weight of an MXFP4 or IQ4 form: a codebook's 5 where the routines take them, else 10."""
    return 5 if lut_able() else 10


def int4_form(w: torch.Tensor) -> KTensor:
    """A matrix quantised again to 4 bits per 32 values, asymmetric (quant.fit_int4): one kernel plane, 5 bits a
    weight, half the bytes of the int8 form. Not exact: on llama.cpp's Q2_K / IQ3_XXS / IQ2_XXS files of a
    random model, 1.1-1.3x the tokens/s of int8 forms (docs/results/host_form_bits.txt), but agreement with
    llama.cpp 0.883 / 0.820 / 0.867 against int8's 0.930 / 0.961 / 0.898 (host_form_bits_fit.txt)."""
    rows, cols = w.shape
    x = w.float().view(rows, cols // GROUP, GROUP)
    scale, lo = fit_int4(x)
    u = ((x - lo) / scale).round_().clamp_(0, 15).to(torch.uint8)
    return kernel_copy(u.view(rows, cols), scale[..., 0], -lo[..., 0])


def form_parts(locs) -> list[tuple[object, int]]:
    """(kind, packed bytes) of each part of an expert (ExpertLocs) that could have a host form."""
    if locs.layout == "gguf":
        return [(q, p.nbytes) for p, q in zip(locs.locs, locs.qtypes)]
    return [(locs.layout, locs.nbytes)] if locs.layout in ("mxfp4", "fp8") else []


def codebook_form(values: torch.Tensor | None, scale: torch.Tensor, table: tuple[int, ...],
                  codes: torch.Tensor | None = None, group: int = GROUP) -> KTensor:
    """Integers from a table of up to 16 (values [rows, cols], each in table) times a scale per `group` (32, or
    16 where the routines take scales per 16: the i-quants with them), exactly, as
    one plane of their indices and the table as the form's codebook (ckernel.lut_able: the AVX2 routines look
    each nibble up): 5 bits a weight. A table of small values (MXFP4's doubled E2M1, −12..12) is held
    offset by 12, unsigned (u − 8 − 4 is the value), which the routines sum as they sum plain nibbles; a
    wider one (IQ4's, −127..113) as int8, which they multiply by sign and magnitude. codes: the indices
    themselves where the caller has them (a file's nibbles), instead of values."""
    lo = min(table)
    if codes is None:
        code = torch.zeros(max(table) - lo + 1, dtype=torch.uint8)
        for i, v in reversed(list(enumerate(table))):  # (a value the table holds twice takes its first index)
            code[v - lo] = i
        codes = code[(values.long() - lo)]
    u = _kpack(codes)
    if lo >= -12 and max(table) <= 12:
        sz = torch.stack((scale.t(), -4 * scale.t()), -1).to(torch.bfloat16).contiguous()
        return KTensor((u,), (sz,), tuple(codes.shape), 4, group, torch.tensor([v + 12 for v in table], dtype=torch.uint8))
    sz = torch.stack((scale.t(), 8 * scale.t()), -1).to(torch.bfloat16).contiguous()
    return KTensor((u,), (sz,), tuple(codes.shape), 4, group, torch.tensor(table, dtype=torch.int8))


def mxfp4_planes(q: torch.Tensor, d: torch.Tensor, codebook: bool | None = None) -> KTensor:
    """Doubled MXFP4 values q (−12..12, [rows, cols]) and their scale per 32 (a power of two), exactly.
    Where emoe's routines take codebooks (ckernel.lut_able: the AVX2 build), as one plane of the values'
    own nibbles and E2M1's table (codebook_form): 5 bits a weight, as llama.cpp's 4.25 nearly. Elsewhere as two int4
    planes (PyTorch's kernel has no codebook): q = a + b, a = q clamped to −8..7 and b the rest (−4..5), both
    times the scale, exact in bf16. The kernel rounds each plane's product to bf16: split as 16·hi + lo
    instead, the two products ran to 3x the result on a gpt-oss model's weights and cancelled, and their
    roundings came to 1% of it (5x rounding the activations alone; now 1.4x). codebook: which (None: as said)."""
    if lut_able() if codebook is None else codebook:
        return codebook_form(q, d, MXFP4_VALUES)
    a = q.clamp(-8, 7)
    sz = torch.stack((d.t(), torch.zeros_like(d).t()), -1).to(torch.bfloat16).contiguous()
    return KTensor((_kpack((a + 8).to(torch.uint8)), _kpack((q - a + 8).to(torch.uint8))), (sz, sz), tuple(q.shape),
                   8, GROUP)


def mxfp4_form(t: torch.Tensor) -> KTensor:
    if lut_able():  # the file's nibbles are the codebook's indices already
        u, d = mxfp4_parts(t, codes=True)
        return codebook_form(None, d, MXFP4_VALUES, u.reshape(t.shape[0], -1))
    q, d = mxfp4_parts(t)
    return mxfp4_planes(q.reshape(t.shape[0], -1), d)


def mxfp4_release_forms(tensors: tuple[torch.Tensor, ...]) -> tuple[KTensor, KTensor, KTensor] | None:
    """gpt-oss's released MXFP4 expert (blocks [R, G, 16], low nibble first, and exponents [R, G] of gate_up
    with gate and up rows interleaved, then of down) as the (gate, up, down) host forms, or None where the
    kernel cannot hold them. Its exponent s means 2^(s − 127) on the plain table: ggml's scale on the doubled one."""
    out, book = [], lut_able()
    for blocks, scales in zip(tensors[0::2], tensors[1::2]):
        v = torch.stack((blocks & 0x0F, blocks >> 4), -1).reshape(blocks.shape[0], -1)
        out.append((v if book else torch.tensor(MXFP4_VALUES, dtype=torch.int8)[v.long()], e8m0_half(scales)))
    (gu, gu_d), (dn, dn_d) = out
    if gu.shape[0] % 128 or dn.shape[0] % 64 or _MM is None:
        return None
    form = (lambda u, d: codebook_form(None, d, MXFP4_VALUES, u.contiguous())) if book else mxfp4_planes
    return form(gu[0::2], gu_d[0::2]), form(gu[1::2], gu_d[1::2]), form(dn, dn_d)


def fp8_release_forms(tensors: tuple[torch.Tensor, ...], block: tuple[int, int]) -> tuple[KTensor, ...] | None:
    """A block-scaled FP8 expert (DeepSeek-V3, Qwen3 and GLM-4.5 FP8 releases: each matrix and its
    scale_inv) as int8 host forms, or None where the kernel cannot hold them: E4M3 is not a uniform grid, so
    its values are quantised again per 32 (0.5% of their size; E4M3's own steps are 6-12% of each value), 10
    bits a weight against 8 and the block scales."""
    ws = [fp8_dequantize(w, s, block, torch.float32) for w, s in zip(tensors[0::2], tensors[1::2])]
    if _MM is None or any(w.shape[0] % 64 or w.shape[1] % GROUP for w in ws):
        return None
    return tuple(int8_form(quantize(w, 8, GROUP)) for w in ws)


def q3_k_form(t: torch.Tensor) -> KTensor:
    """Q3_K exactly. Where the routines take scales per 16 (ckernel.lut_able), as one plane of u = value + 8 with
    its scales per 16 (6 bits a weight against 3.44). Elsewhere as two planes: the kernel's scales cover 32, so one
    plane holds each 32's first 16 values (the others 0) with the first scale, the other the second 16 with
    theirs (10 bits a weight: 2.9x the file's bytes, so built only where RAM holds them)."""
    v, scale = q3_k_parts(t)
    if lut_able():
        return kernel_copy((v + 8).to(torch.uint8), scale, 8 * scale, 16)
    rows = v.shape[0]
    halves = v.view(rows, -1, 2, 16)
    planes, sz = [], []
    for h in (0, 1):
        p = torch.full_like(halves, 8, dtype=torch.uint8)
        p[:, :, h] = (halves[:, :, h] + 8).to(torch.uint8)
        planes.append(_kpack(p.view(rows, -1)))
        sc = scale.view(rows, -1, 2)[..., h]
        sz.append(torch.stack((sc.t(), torch.zeros_like(sc).t()), -1).to(torch.bfloat16).contiguous())
    return KTensor(tuple(planes), tuple(sz), tuple(v.shape), 8, GROUP)


def host_form(t: torch.Tensor, qtype: int, bits: int = 8) -> KTensor | None:
    """One packed matrix in the CPU int4 kernel's layout, for running it where the RAM tier holds it (the
    `host` miss policy), or None where the kernel cannot hold it. Dequantising a matrix per host run costs
    10-50x the kernel's matmul. Q4_0/Q4_1/Q4_K (4 bits a weight + bf16 scale and zero per 32, against the
    file's 4.5-5) and Q8_0 (8 bits as two planes, against 8.5; one byte plane where the routines take it:
    quant.int8_form) hold the file's values with scales rounded to
    bf16: the RAM tier grows by at most 18%. Where the routines take them (ckernel.lut_able: AVX2),
    Q5_0/Q5_1/Q5_K hold their values as one plane and their fifth bits (6 bits against 5.5-6), Q6_K as one
    plane, its upper two bits and scales per 16 (8 against 6.56), MXFP4 (gpt-oss) and IQ4_NL/IQ4_XS as codebook
    forms (5 bits against 4.25-4.5), Q2_K and Q3_K with scales per 16 (6 bits), and the IQ1-IQ3 i-quants and
    TQ1_0/TQ2_0 as codebook forms of their grids' signed values (gguf_iq.IQ_TABLES: 5 bits, 6 with scales per
    16, against 1.56-3.44); elsewhere Q5_x, MXFP4, IQ4 and Q3_K take two planes (10 bits: kernel_copy5, IQ4's
    table's values as int8, q3_k_form). Every other block type (without the AVX2 routines: Q6_K, Q2_K, the
    IQ1-IQ3 codebooks, …) scales each 16 values or less regularly than the
    kernel's groups of 32 can hold: its values are quantised again to int8 per 32 (10 bits a weight; error
    0.5% of the values' size, far below the file's own rounding at 2-6 bits), or with bits=4 to int4
    (int4_form: half the bytes and kernel time, lossy; int4_able types only). The RAM tier builds forms only
    where they fit the memory available, int4 ones before none (store._form_kinds).
    The kernel multiplies bf16 activations, as llama.cpp rounds them to 8 bits."""
    if qtype in FLOAT_TYPES or t.shape[0] % 64 or _MM is None:  # the kernel's blocks of 64 rows
        return None
    if qtype == Q8_0:
        return int8_form(q8_0(t))
    if qtype in (Q5_0, Q5_1, Q5_K):  # one plane and a plane of fifth bits where the routines take it: 6 bits a weight
        u, d, m = q5_k_parts(t) if qtype == Q5_K else q5_0_1_parts(t, qtype == Q5_1)
        m = m if qtype == Q5_K else 16 * d if m is None else -m
        return kernel_copy(u, d, m, GROUP, 1) if lut_able() else kernel_copy5(u, d, m)
    if qtype == Q6_K and lut_able():  # exactly: one plane, the sixth and fifth bits, scales per 16; 8 bits a weight
        u, scale = q6_k_parts(t)
        # the scale rounded first, so the zero (8 − 32)·scale is the rounded one's: a weight's error is then the
        # scale's rounding times u − 32 (|.| <= 32), not u − 8 (up to 55): 0.29% of the weights' size, not 0.35%
        scale = scale.to(torch.bfloat16).float()
        return kernel_copy(u, scale, 32 * scale, 16, 2)
    if qtype == MXFP4:
        return mxfp4_form(t)
    if qtype == Q3_K:
        return q3_k_form(t)
    if qtype == Q2_K and lut_able():  # exactly, one plane with its scales and minimums per 16: 6 bits a weight
        u, scale, minimum = q2_k_parts(t)
        # u + c per 16 (c 0..12): the zero, (8 − c)·scale − minimum, as near 0 as c makes it, so that its
        # rounding to bf16 costs least (a fixed c = 6 left 1.2x the error on a random model's Q2_K experts)
        c = torch.where(scale > 0, (8 - minimum / scale.clamp_min(1e-30)).round().clamp(0, 12), torch.full_like(scale, 6))
        return kernel_copy(u + c.repeat_interleave(16, 1).to(torch.uint8), scale, minimum + c * scale, 16)
    if qtype in (IQ4_NL, IQ4_XS):
        if lut_able():  # the file's nibbles are the codebook's indices already
            u, scale = iq4_parts(t, qtype == IQ4_XS, codes=True)
            return codebook_form(None, scale, IQ4_VALUES, u)
        q, scale = iq4_parts(t, qtype == IQ4_XS)
        return int8_form(QTensor(q, scale, tuple(q.shape), 8, GROUP))
    if qtype in IQ_TABLES and lut_able():  # the i-quants' and ternary types' integers, exactly, as a codebook form
        values, scale, group = iq_parts(t, qtype)
        return codebook_form(values, scale, IQ_TABLES[qtype], group=group)
    if qtype == Q4_0:
        u, d = q4_0_parts(t)
        return kernel_copy(u, d.float(), 8 * d.float())
    if qtype in (Q4_K, Q4_1):
        return kernel_copy(*(q4_k_parts if qtype == Q4_K else q4_1_parts)(t))
    w = dequantize(t, qtype)
    if w.shape[1] % GROUP:
        return None
    return int4_form(w) if bits == 4 and int4_able(qtype) else int8_form(quantize(w, 8, GROUP))


def host_forms_of(locs, tensors: tuple[torch.Tensor, ...], int8: bool = False, kinds=None) -> tuple:
    """An expert as the RAM tier holds it for host runs (ExpertLocs, and its tensors as stored, or unpacked
    for full-precision layouts): host forms where its layout and types have them and `kinds` (form_parts'
    kinds; None: all) admits them, else as stored. int8:
    full-precision experts (bf16, fp16, fp32) as int8 forms too (0.5% of the weights' size; 10 bits a weight
    against bf16's 16), for CPUs whose bf16 matmuls are slow and for RAM: opt-in, they are not the weights.
    kinds as a dict: kind → bits of its form (4 or 8, for requantised types)."""
    if locs.layout not in PACKED:
        fits = int8 and _MM is not None
        return tuple(int8_form(quantize(t.float(), 8, GROUP)) if fits and t.dim() == 2 and t.shape[0] % 64 == 0
                     and t.shape[1] % GROUP == 0 else t for t in tensors)
    if locs.layout == "gguf":
        return tuple((host_form(t, q, kinds.get(q, 8) if isinstance(kinds, dict) else 8)
                      if kinds is None or q in kinds else None) or t for t, q in zip(tensors, locs.qtypes))
    if kinds is not None and locs.layout not in kinds:
        return tensors
    if locs.layout == "mxfp4":
        return mxfp4_release_forms(tensors) or tensors
    if locs.layout == "fp8":
        return fp8_release_forms(tensors, locs.block) or tensors
    return tensors


def file_dense(model_dir, shapes: dict) -> dict:
    """A GGUF import's dense projections (attention, shared experts, lm_head) as host forms of the file's own
    blocks, where the file quantised them and the kernel holds them: {name: form} for the names in `shapes`
    (name → the import's shape). What llama.cpp multiplies, at its bytes, instead of the float copies the
    import wrote (read whole for every token, those cost a CPU more than the experts a token runs)."""
    import json
    from pathlib import Path

    from .gguf_import import open_gguf
    meta = json.loads((Path(model_dir) / "gguf.json").read_text())
    out, g = {}, open_gguf(meta["files"][0]["path"])
    for name, rows, qtype in g.dense_blocks():
        form = host_form(rows, qtype) if name in shapes else None
        if form is not None and form.shape == tuple(shapes[name]):
            out[name] = form
    for name, rows, qtype in g.head_blocks():  # (beside kv_b's floats, which a prefill reads; mla_weights checks them)
        if (form := host_form(rows, qtype)) is not None:
            out[name] = form
    return out


def packed_experts(model_dir) -> bool:
    """Whether a model's experts are all held packed (a GGUF import, gpt-oss's MXFP4 release, an FP8 release):
    on a CPU they run best where the RAM tier holds them, in their host forms where they have them."""
    from .checkpoint import PACKED, Checkpoint
    return all(locs.layout in PACKED for locs in Checkpoint(model_dir).experts.values())
