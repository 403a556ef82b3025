"""Low-bit shadow copies of experts: group-wise symmetric int8 / int4 quantisation (pure functions).

The fast tier can hold a small quantised copy of every expert it does not hold at full precision, so a
token routed to a missing expert runs an approximation of *that* expert instead of being rerouted to a
different one (HOBBIT-style mixed precision, arXiv 2411.01433). Scales are per `group` consecutive
input columns (fp16); int4 is asymmetric (a scale and an offset per group, fitted by least squares): on the
embedded model's experts it keeps ~7% relative weight error (symmetric absmax: ~10%), int8 ~0.5%.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .ckernel import bf16_matmul, dequant_t, kq_experts, kq_linear, kq_moe, kq_rows, lut_able, unpackable
from .kernel_layout import _hunpack, _i8pack, _i8unpack, _kpack, _kunpack

BITS = (4, 8)


@dataclass(frozen=True, slots=True)
class QTensor:
    data: torch.Tensor    # int8 values (bits 8) or two int4 values u (0..15) per uint8 (bits 4)
    scale: torch.Tensor   # fp16 [rows, cols // group]
    shape: tuple[int, int]
    bits: int
    group: int
    zero: torch.Tensor | None = None  # fp16 [rows, cols // group]: int4 weight = (u − 8)·scale + zero

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero) if t is not None)


def group_size(cols: int, group: int) -> int:
    """The requested group if it divides the row, else one scale per row."""
    return group if cols % group == 0 else cols


def qbytes(shape: tuple[int, int], bits: int, group: int) -> int:
    """Bytes a QTensor of this shape occupies (what the cache budgets before quantising anything)."""
    rows, cols = shape
    return rows * cols * bits // 8 + rows * (cols // group_size(cols, group)) * (4 if bits == 4 else 2)


def copy_group(cols: list[int], bits: int, kernel: bool, group: int = 32) -> int:
    """The group a copy of matrices with these row lengths is quantised in. The kernel layout holds a bf16
    scale and zero per group whatever the values, so int4 takes `group`; the portable layout pays 2 bytes a
    group for int4's offset, so it takes groups twice as wide, at the bytes a symmetric copy per `group` cost:
    on the embedded model's experts 8.6% relative error against symmetric's 9.7%. (Per 32 with the offset,
    7.3%, but 11% more bytes: at 20% of the bytes in bf16, fewer copies fit, and agreement fell 0.05.)"""
    wide = 2 * group
    return wide if bits == 4 and not kernel and all(c % wide == 0 for c in cols) else group


def fit_int4(x: torch.Tensor, steps: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset of an asymmetric 4-bit fit of each group x [..., g] (x ≈ u·scale + lo, u 0..15): the
    group's range, then rounds of assigning u and refitting both by least squares, as llama.cpp's k-quantisers
    refine theirs. On the embedded model's experts: 7.3% relative error, against 7.8% from the range alone
    and 9.7% from symmetric absmax (which also wastes one of the 16 levels); a third round gains 0.1 point
    for a third more time."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale, n = ((hi - lo) / 15).clamp_min(1e-12), x.shape[-1]
    sx, u = x.sum(-1, keepdim=True), torch.empty_like(x)
    for _ in range(steps):
        torch.sub(x, lo, out=u).div_(scale).round_().clamp_(0, 15)
        su = u.sum(-1, keepdim=True)
        suu, sux = torch.linalg.vecdot(u, u).unsqueeze(-1), torch.linalg.vecdot(u, x).unsqueeze(-1)
        det = n * suu - su * su
        ok = det > 0.5  # (u not all equal; else the range fit stands)
        fit = (n * sux - su * sx) / det.clamp_min(1)
        scale = torch.where(ok & (fit > 0), fit, scale)
        lo = torch.where(ok, (sx - scale * su) / n, lo)
    return scale, lo


def int4_params(scale: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fit's scale and offset (fit_int4) as an int4 copy holds them: fp16, weight = (u − 8)·scale + zero."""
    scale = scale.half().clamp_min(2 ** -24)  # (an all-zero group: no 0 / 0)
    return scale, (lo + 8 * scale.float()).half()


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """Values u [rows, cols] (0..15) two to a byte, even column low, odd column high (QTensor's int4 data)."""
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


ROWS = 128  # rows quantised at a time: their temporaries stay in cache (scripts/bench_quantize.py: int4 3.1-4.3x faster)


def quantize(w: torch.Tensor, bits: int = 4, group: int = 32) -> QTensor:
    if bits not in BITS:
        raise ValueError(f"shadow precision must be one of {BITS} bits, got {bits}")
    if w.dim() != 2 or w.shape[1] % 2:
        raise ValueError(f"expects a 2-D matrix with an even number of columns, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    g = group_size(cols, group)
    parts = [_quantize_rows(w[i:i + ROWS].float().reshape(-1, cols // g, g), bits) for i in range(0, rows, ROWS)]
    data, scale, zero = (None if p[0] is None else torch.cat(p) for p in zip(*parts))
    return QTensor(data, scale, (rows, cols), bits, g, zero)


def _quantize_rows(x: torch.Tensor, bits: int) -> tuple:
    """(data, scale, zero) of rows grouped as x [rows, groups, group]."""
    rows = x.shape[0]
    if bits == 4:  # u assigned against the scale and zero as held (fp16), two per byte
        scale, zero = int4_params(*fit_int4(x))
        u = ((x - zero.float()) / scale.float() + 8).round_().clamp_(0, 15).to(torch.uint8).reshape(rows, -1)
        return pack_int4(u), scale.reshape(rows, -1), zero.reshape(rows, -1)
    scale = (x.abs().amax(-1, keepdim=True) / 127).half().clamp_min(2 ** -24)
    q = torch.round(x / scale.float()).clamp_(-127, 127).to(torch.int8).reshape(rows, -1)
    return q, scale.reshape(rows, -1), None


def dequantize(q: "QTensor | KTensor", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = q.shape
    if isinstance(q, KTensor):  # Σ over planes of (u − 8)·scale + zero: the kernel's own arithmetic
        out = None  # in place, one full-size temporary at most: loads from a RAM tier of these run it per expert
        for p, sz in zip(q.planes, q.sz):
            s, z = (sz[..., i].t().to(dtype)[..., None] for i in (0, 1))
            u = _i8unpack(p) if q.i8 else _kunpack(p) if q.lut is None else q.lut[_kunpack(p).long()]
            if q.high is not None:  # (one plane: the fifth and sixth bits belong to its nibbles)
                u = u | (_hunpack(q.high, q.hbits, q.shape) << 4)
            v = u.view(rows, cols // q.group, q.group).to(dtype).sub_(8).mul_(s).add_(z)
            out = v if out is None else out.add_(v)
        return out.view(rows, cols)
    if q.bits == 4:  # unpack into one preallocated buffer: fewer passes than stack + reshape on CPU
        v = torch.empty(rows, cols // 2, 2, dtype=torch.uint8, device=q.data.device)
        v[..., 0] = q.data & 0x0F
        v[..., 1] = q.data >> 4
        x = v.view(rows, cols // q.group, q.group).to(dtype).sub_(8)
    else:
        x = q.data.view(rows, cols // q.group, q.group).to(dtype)
    x = x.mul_(q.scale.to(dtype)[..., None])
    return (x if q.zero is None else x.add_(q.zero.to(dtype)[..., None])).view(rows, cols)


# -- the fast tier's layout on CPU: PyTorch's int4 matmul kernel ------------------------------------------
# Dequantising a copy per miss costs 4-10x the matmul on a CPU; aten's int4 kernel (bf16 activations, fp32
# accumulation) multiplies the packed nibbles directly, faster than even a full-precision bf16 matmul.
# Its layout: per block of 64 rows, byte [k, j] holds row j's nibble low and row j+32's high, for each k.
_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)


@dataclass(frozen=True, slots=True)
class KTensor:
    """A copy in the CPU kernel's layout: int4 as one nibble plane, int8 (v + 128 = 16·hi + lo) as two, run
    as two int4 matmuls. The kernel reads bf16 scale-and-zero pairs; holding them (4 bytes a group and
    plane, against the portable copy's 2-byte scale) is what its speed costs, and `kbytes` budgets it."""
    planes: tuple[torch.Tensor, ...]  # uint8 [rows, cols // 2] each
    sz: tuple[torch.Tensor, ...]      # bf16 [cols // group, rows, 2] per plane
    shape: tuple[int, int]
    bits: int
    group: int
    lut: torch.Tensor | None = None   # a codebook form (forms.codebook_form): u = lut[nibble], [16] uint8 or int8
    high: torch.Tensor | None = None  # a 5- or 6-bit form's upper bits (_hpack), u = nibble + 16·high: one plane
    hbits: int = 0                    # bits a value in `high` (1 or 2; bits is then 4 + hbits)
    i8: bool = False                  # one plane of int8 values u, a byte each (_i8pack's order): int8_form
    cdesc: list = field(default_factory=list, init=False, repr=False, compare=False)  # ckernel._desc's, made once

    @property
    def plain(self) -> bool:
        """Whether PyTorch's int4 kernel can run it: nibbles (no codebook, no upper bits, no int8 plane), groups of
        32 or more."""
        return self.lut is None and self.high is None and not self.i8 and self.group >= 32

    @property
    def nbytes(self) -> int:
        return sum(p.numel() for p in self.planes) + sum(t.numel() * t.element_size() for t in self.sz) + \
            (0 if self.lut is None else 16) + (0 if self.high is None else self.high.numel())

    def to(self, device, non_blocking: bool = False) -> "KTensor":
        """Moved as a tensor would be (a load copies the bytes and dequantises them where they land)."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, planes=tuple(map(move, self.planes)), sz=tuple(map(move, self.sz)),
                       lut=None if self.lut is None else move(self.lut),
                       high=None if self.high is None else move(self.high))


def kernel_fits(shape: tuple[int, int], group: int) -> bool:
    rows, cols = shape
    return _MM is not None and rows % 64 == 0 and group in (32, 64, 128, 256) and cols % group == 0


def kbytes(shape: tuple[int, int], bits: int, group: int) -> int:
    """Bytes a KTensor of this shape occupies."""
    rows, cols = shape
    return rows * cols * bits // 8 + (bits // 4) * rows * (cols // group) * 4


def _nibbles(q: QTensor) -> list[torch.Tensor]:
    """Unsigned nibble planes [rows, cols] (values 0..15): the value is (16·hi +) lo minus 8 (128)."""
    if q.bits == 4:
        u = torch.empty(q.shape[0], q.shape[1] // 2, 2, dtype=torch.uint8)
        u[..., 0], u[..., 1] = q.data & 0x0F, q.data >> 4
        return [u.view(q.shape)]
    v = (q.data.to(torch.int16) + 128).to(torch.uint8)
    return [v >> 4, v & 0x0F]


def int8_form(q: QTensor) -> KTensor:
    """An int8 copy (per 32 values or a multiple) as a kernel form: where ckernel's AVX2 routines take one
    (lut_able), one plane of its bytes in the order they unpack nibbles to (9 bits a weight with the bf16 scale
    and zero; a product loads them as they are, where two nibble planes took two unpackings and twice the
    multiplies), else to_kernel's two planes (10 bits; what PyTorch's kernel and the AVX512 routines take)."""
    if not (lut_able() and q.bits == 8 and q.group % 32 == 0 and q.shape[0] % 64 == 0):
        return to_kernel(q)
    s = q.scale.t().to(torch.bfloat16)
    return KTensor((_i8pack(q.data),), (torch.stack((s, 8 * s), -1).contiguous(),), q.shape, 8, q.group, i8=True)


def to_kernel(q: QTensor) -> KTensor:
    s = q.scale.t().to(torch.bfloat16)
    zero = torch.zeros_like(s) if q.zero is None else q.zero.t().to(torch.bfloat16)
    # value (u - 8)·scale + zero per plane: int4 (u - 8)·s + zero; int8 (hi - 8)·16s + ((lo - 8)·s + 8s)
    sz = [(s, zero)] if q.bits == 4 else [(s * 16, zero), (s, s * 8)]
    return KTensor(tuple(_kpack(u) for u in _nibbles(q)), tuple(torch.stack(p, -1).contiguous() for p in sz),
                   q.shape, q.bits, q.group)


def stack_rows(ws: list) -> "torch.Tensor | KTensor | None":
    """Weights [N_i, K] stacked into one [sum N_i, K] of the same kind, so that one product serves them all:
    full tensors of one dtype and device, or KTensors of one layout (bits, group, K, planes); None where they
    differ (a GGUF's q and v in different types, say). A KTensor's rows run in blocks of 64, so its planes
    stack along rows and its scale pairs [K / group, N, 2] along N."""
    if all(isinstance(w, torch.Tensor) and w.dim() == 2 and not w.requires_grad for w in ws):
        return torch.cat(ws) if len({(w.dtype, w.device, w.shape[1]) for w in ws}) == 1 else None
    if not all(type(w) is KTensor for w in ws) or len({(w.bits, w.group, w.shape[1], len(w.planes), w.planes[0].device,
                                                        w.sz[0].dtype, None if w.lut is None else tuple(w.lut.tolist()),
                                                        w.hbits, w.i8) for w in ws}) != 1:
        return None
    return KTensor(tuple(torch.cat(p) for p in zip(*(w.planes for w in ws))),
                   tuple(torch.cat(t, 1) for t in zip(*(w.sz for w in ws))),
                   (sum(w.shape[0] for w in ws), ws[0].shape[1]), ws[0].bits, ws[0].group, ws[0].lut,
                   None if ws[0].high is None else torch.cat([w.high for w in ws]), ws[0].hbits, ws[0].i8)


def stack_qkv(weights: dict, layers: list[int]) -> tuple[dict, dict[int, tuple[int, ...]]]:
    """The weights with each listed attention layer's q, k and v (and biases) stacked into one `qkv_proj`, where
    their kinds allow (stack_rows), else q and k into one `qk_proj` beside v (a Q4_K_M file holds v as Q6_K in
    about half its layers), and per stacked layer the widths that split its output again. A decode step then
    makes one product instead of three (or two): on a CPU fewer calls, on a GPU fewer launches."""
    out, widths = dict(weights), {}
    for i in layers:
        p = f"model.layers.{i}.self_attn."
        names = [p + n + "_proj.weight" for n in "qkv"]
        biases = [weights.get(p + n + "_proj.bias") for n in "qkv"]
        if not all(n in weights for n in names) or len({b is None for b in biases}) > 1:
            continue
        for parts in ("qkv", "qk"):
            stacked = stack_rows([weights[p + n + "_proj.weight"] for n in parts])
            if stacked is not None:
                break
        else:
            continue
        widths[i] = tuple(weights[p + n + "_proj.weight"].shape[0] for n in parts)
        out[p + parts + "_proj.weight"] = stacked
        if biases[0] is not None:
            out[p + parts + "_proj.bias"] = torch.cat(biases[: len(parts)])
        for n in parts:
            out.pop(p + n + "_proj.weight"), out.pop(p + n + "_proj.bias", None)
    return out, widths


def from_kernel(k: KTensor) -> QTensor:
    """The portable copy back (values exact; scales as the kernel holds them, rounded to bf16)."""
    if k.lut is not None or k.high is not None:
        raise ValueError("a codebook or 5/6-bit form has no portable int4/int8 copy: dequantize it")
    if k.i8:  # (the scale as the kernel holds it, rounded to bf16; int8_form's zero is 8 x scale)
        return QTensor(_i8unpack(k.planes[0]).contiguous(), k.sz[0][..., 0].t().half().contiguous(), k.shape, 8, k.group)
    u = [_kunpack(p) for p in k.planes]
    if k.bits == 4:
        return QTensor(pack_int4(u[0]), k.sz[0][..., 0].t().half().contiguous(), k.shape, 4, k.group,
                       k.sz[0][..., 1].t().half().contiguous())
    data = ((u[0].to(torch.int16) << 4 | u[1]) - 128).to(torch.int8)
    return QTensor(data.contiguous(), k.sz[-1][..., 0].t().half().contiguous(), k.shape, k.bits, k.group)


# rows (of one call) from which unpacking a form to bf16 once and multiplying with oneDNN beats the int4 kernel,
# which costs the same per 4 rows whatever their number: by planes (scripts/bench_prefill_dequant.py)
DEQUANT_ROWS = {1: 48, 2: 48}


DEQUANT_COLS = 4096  # W^T unpacked this many output columns at a time: a 150k-token lm_head stays in scratch-sized parts


PAD_ROWS = 32  # the unpacked product's rows rounded up to this: oneDNN builds a primitive per new shape (~0.5 ms)


_READS_FORMS: bool | None = None


def kernel_reads_forms() -> bool:
    """Whether PyTorch's int4 kernel reads the forms as emoe packs them. ATen lays its blocks out by the vector
    width it dispatched for: 64 rows under AVX512 (the forms' layout, and ckernel.c's), 32 under AVX2, where
    it would multiply our forms as garbage (relative error 1.4 on a 2-core AVX2 EPYC). Probed once on a
    known matrix; where it fails, the forms run on ckernel's routines, or dequantised in torch."""
    global _READS_FORMS
    if _READS_FORMS is None:
        w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0), device="cpu")
        k, x = to_kernel(quantize(w, 4, 32)), torch.randn(2, 64, generator=torch.Generator().manual_seed(1), device="cpu")
        want = x @ dequantize(k).T
        _READS_FORMS = _MM is not None and bool(
            (_MM(x.bfloat16(), k.planes[0], k.group, k.sz[0]).float() - want).norm() <= 0.05 * want.norm())
    return _READS_FORMS


def _kmm(xb: torch.Tensor, w: KTensor) -> torch.Tensor:
    """xb [M, K] @ W^T: bf16 out where PyTorch's kernel or a bf16 matmul makes it, float32 where the CPU's bf16
    matmuls are slow (the callers cast to their activations' dtype)."""
    m, reads = xb.shape[0], kernel_reads_forms()
    if (m >= DEQUANT_ROWS.get(len(w.planes), 1 << 30) or not reads or not w.plain) and unpackable(w):  # a prefill's many rows
        bf = bf16_matmul()
        if bf and m % PAD_ROWS:  # every prompt length (and every expert's share of it) would be a new oneDNN shape
            return _kmm(F.pad(xb, (0, 0, 0, PAD_ROWS - m % PAD_ROWS)), w)[:m]
        x, parts = (xb if bf else xb.float()), []
        for c in range(0, w.shape[0], DEQUANT_COLS):  # two planes: W^T = hi + lo, the small product inside the big one's
            wt = dequant_t(w, c // 64, min(c + DEQUANT_COLS, w.shape[0]) // 64, f32=not bf)
            parts.append(x @ wt[0] if len(wt) == 1 else torch.addmm(x @ wt[1], x, wt[0]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    if not reads or not w.plain:  # neither kernel nor routine: the exact arithmetic, dequantised for the call
        return F.linear(xb.float(), dequantize(w))
    xb = xb.to(torch.bfloat16)
    y = _MM(xb, w.planes[0], w.group, w.sz[0])
    return y if w.bits == 4 else y + _MM(xb, w.planes[1], w.group, w.sz[1])


def kq_ffn(x: torch.Tensor, w, rows: int | None = None) -> bool:
    """Whether an expert's (gate, up, down) run as SwiGLU through ckernel.kq_moe on `rows` of x's rows (all):
    float32 on a CPU, and ckernel.kq_experts for its forms."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2 \
        and kq_experts({0: w}, {0: len(x) if rows is None else rows})


def linear(x: torch.Tensor, w: "torch.Tensor | QTensor | KTensor", bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) for a full weight, a copy (dequantised for the call: cheap on a GPU) or a KTensor (few
    float32 rows: ckernel's few-row routine; else _kmm: the unpacked matrix or PyTorch's int4 kernel, which
    take 2-D bf16 activations: x is flattened and rounded to bf16 for them)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    if isinstance(w, QTensor):
        y = F.linear(x, dequantize(w, x.dtype))
    elif x.dtype == torch.float32 and x.device.type == "cpu" and kq_rows((w,), x.numel() // x.shape[-1]):
        y = kq_linear(x.reshape(-1, x.shape[-1]).contiguous(), w).view(*x.shape[:-1], w.shape[0])
    else:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        y = _kmm(flat, w).to(x.dtype).view(*x.shape[:-1], w.shape[0])
    return y if bias is None else y + bias


# projections the model only ever multiplies by (quant.linear): the router and kv_b (viewed per head) stay full
DENSE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                     "in_proj_qkvz", "in_proj_ba", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj", "up_proj",
                     "down_proj", "lm_head")


def int8_dense(weights: dict[str, torch.Tensor]) -> dict:
    """Dense projections as int8 copies on the CPU kernel (group 32, two planes: 10 bits a weight against
    float32's 32), where the kernel fits them: on a CPU the dense weights, read whole for every token, cost
    more time than the few experts a token runs. Error 0.5% of the weights' size, plus bf16 activations."""
    out = dict(weights)
    for k, w in weights.items():
        name = k.removesuffix(".weight").rsplit(".", 1)[-1]
        if k.endswith(".weight") and name in DENSE_PROJECTIONS and isinstance(w, torch.Tensor) and w.dim() == 2 \
                and kernel_fits(tuple(w.shape), 32):
            out[k] = int8_form(quantize(w, 8, 32))
    return out


def swiglu(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """One expert's FFN on full weights or copies. An expert whose three matrices are KTensors runs wholly
    in bf16, casting once each way: per-call overhead, not the matmul, dominates small experts on a CPU."""
    if isinstance(gate, KTensor) and isinstance(up, KTensor) and isinstance(down, KTensor):
        if kq_ffn(x, (gate, up, down)):
            out = torch.zeros_like(x)
            kq_moe(out, x.contiguous(), [(gate, up, down)], [0], torch.zeros(len(x), 1, dtype=torch.long),
                   torch.ones(len(x), 1))
            return out
        xb = x.to(torch.bfloat16)
        return _kmm(F.silu(_kmm(xb, gate)) * _kmm(xb, up), down).to(x.dtype)
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)
