"""emoe's C routines for kernel forms on a CPU (the source, with the layout, is ckernel.c beside this file).

- Many rows (a prefill's): PyTorch's int4 kernel (quant._kmm) costs the same per 4 rows whatever their number,
  so past a few dozen rows the form is unpacked once to bf16 W^T and oneDNN's bf16 matmul reuses it across
  rows (`scripts/bench_prefill_dequant.py`). One thread: split over two it ran slower, beside torch's own.
- Few rows (a decode step's): the nibbles times bf16 activations (as PyTorch's kernel takes them; AVX512-BF16's
  pair dot products, or fp32 FMAs of the same exact products on AVX2; sums in fp32 to the end) or, with
  EMOE_KQ=int8, activations rounded to int8 per 32 as llama.cpp's quantised matmuls round them (VNNI or AVX2).
  Under AVX2 PyTorch's own int4 kernel reads another layout than the forms' (quant.kernel_reads_forms), so
  there these routines, or the unpacked matrix, are what multiplies a form. kq_moe runs all of a MoE layer's experts on forms
  in one call instead of ~8 torch ops each (`scripts/bench_kq.py`). Threads come from PyTorch's own OpenMP
  runtime (linked to torch's libgomp), so they are its threads, not a second team.

Built at first use with the system C compiler into ~/.cache/emoe (keyed by source, flags and CPU), loaded
with ctypes (which drops the GIL); without a compiler, or with EMOE_NO_CKERNEL=1, PyTorch's int4 kernel
serves every row count; EMOE_KQ=off keeps it for few rows only, EMOE_KQ=int8 rounds activations to int8 there.
"""
from __future__ import annotations

import contextvars
import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = (Path(__file__).parent / "ckernel.c").read_text()
# EMOE_CKERNEL_MARCH: the target (default this CPU); x86-64-v3 builds the AVX2 path, as tests do
FLAGS = ["-O3", f"-march={os.environ.get('EMOE_CKERNEL_MARCH', 'native')}", "-shared", "-fPIC"]


def _openmp_flags() -> list[str]:
    """OpenMP against the libgomp PyTorch loaded (same soname: the process keeps one runtime), else none: the
    pragmas are then ignored and the routines run on one thread."""
    lib = Path(torch.__file__).parent / "lib"
    return ["-fopenmp", f"-L{lib}", f"-Wl,-rpath,{lib}"] if (lib / "libgomp.so.1").is_file() else []
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet
_scratch = threading.local()


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(flags: list[str]) -> Path:
    """The shared object for these flags, compiled into the cache unless it is there already."""
    key = hashlib.sha256("\0".join([SOURCE, *flags, _cpu_key()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emoe"
    so = cache / f"ckernel-{key}.so"
    if not so.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
            src.write_text(SOURCE)
            subprocess.run([os.environ.get("CC", "cc"), *flags, str(src), "-o", str(out)], check=True,
                           capture_output=True, timeout=120)
            os.replace(out, so)  # atomic: a second process sees the whole file or none
    return so


def library() -> ctypes.CDLL | None:
    """The compiled routines, built once per source, flags and CPU; None where they cannot be (said once). A
    compiler without OpenMP builds them single-threaded."""
    global _lib
    if _lib is not False:
        return _lib
    _lib = None
    if os.environ.get("EMOE_NO_CKERNEL"):
        return None
    try:
        try:
            so = _build(FLAGS + _openmp_flags())
        except subprocess.CalledProcessError:
            if not _openmp_flags():
                raise
            so = _build(FLAGS)
        lib = ctypes.CDLL(str(so))
        P, i = ctypes.c_void_p, ctypes.c_int
        lib.kplanes_t.restype = None
        lib.kplanes_t.argtypes = [ctypes.POINTER(P), ctypes.POINTER(P), i, P, P] + [i] * 6 + [P, i, P, i, i]
        lib.kq_modes.restype = i
        lib.modes = lib.kq_modes()
        _resolve(lib.modes)
        if lib.modes:
            lib.kq_linear.argtypes, lib.kq_linear.restype = [P, P, i, P, i, i], None
            lib.kq_moe.argtypes, lib.kq_moe.restype = [P, i, P, P, P, i, P, i, P, i, i], i
            f = ctypes.c_float
            lib.kq_moe_act.argtypes, lib.kq_moe_act.restype = [P, i, P, P, P, i, P, i, P, i, i, P, P, P, f, f], i
            lib.kq_attn_block.argtypes = [P, P, i, i, P, P, f] + [P] * 9 + [i] * 6 + [f, P, P, P, i, P, P, P, i, i]
            lib.kq_attn_block.restype = None
            lib.kq_mla_block.argtypes = [P, P, i, i, P, P, f] + [P] * 12 + [i] * 6 + [f, i, P, P, P, P, P, i, i]
            lib.kq_mla_block.restype = None
            lib.kq_delta_block.argtypes, lib.kq_delta_block.restype = [P, P, i, i, P, P, f] + [P] * 13 + [i] * 7, None
            lib.kq_layers.argtypes = [P, P, i, P, i, i, f, P, P, P, P] + [i] * 8 + [f, i, i, P, P, P, P, i, i, P, P]
            lib.kq_layers.restype = i
        lib.kq_attend.argtypes, lib.kq_attend.restype = [P] * 9 + [i] * 7 + [ctypes.c_float] + [P] * 3 + [
            ctypes.c_float, P, i, i], None
        lib.kq_rmsnorm.argtypes, lib.kq_rmsnorm.restype = [P] * 3 + [i] * 2 + [ctypes.c_float], None
        lib.kq_route.argtypes, lib.kq_route.restype = [P] * 4 + [i] * 6 + [ctypes.c_float, i, i, P, P, P], None
        _lib = lib
    except (OSError, RuntimeError, KeyError, subprocess.SubprocessError) as e:  # no compiler, no writable cache, no home
        print(f"[emoe] emoe's C routines could not be built ({type(e).__name__}): kernel forms run on PyTorch's "
              f"int4 kernel where it reads their layout (AVX512), else dequantised per product (slow); attention and "
              f"norms in torch", file=sys.stderr)
    return _lib


def unpackable(w) -> bool:
    """Whether dequant_t takes this KTensor: the routine is built, and the form is on the CPU in one or two planes."""
    return w.planes[0].device.type == "cpu" and len(w.planes) <= 2 and library() is not None


def dequant_t(w, b0: int = 0, b1: int | None = None, f32: bool = False) -> tuple[torch.Tensor, ...] | None:
    """A KTensor's rows b0·64 .. b1·64 (all by default) as bf16 W^T [cols, those rows] (contiguous), or None
    where the routine is unavailable. A two-plane form (int8 values: more significant bits than bf16 holds)
    comes as (hi, lo), W^T = hi + lo; with f32, as one float32 W^T (for a CPU whose bf16 matmuls are slow).
    The tensors are this thread's scratch, valid until its next call: a fresh megabyte-sized allocation is
    paged in anew each time, which cost as much as the unpacking."""
    if not unpackable(w):
        return None
    lib, (rows, cols) = library(), w.shape
    b1 = rows // 64 if b1 is None else b1
    n = (b1 - b0) * 64
    planes = [p.contiguous() for p in w.planes]
    sz = [t.contiguous() for t in w.sz]
    bufs = _scratch.__dict__.setdefault("bufs", {})
    keys = [(cols, n, "f32")] if f32 else [(cols, n, i) for i in range(len(planes))]
    for key in keys:
        if key not in bufs:
            bufs[key] = torch.empty(cols, n, dtype=torch.float32 if f32 else torch.bfloat16)
    out = [bufs[key] for key in keys]
    arr = ctypes.c_void_p * len(planes)
    pp, ss = arr(*(p.data_ptr() for p in planes)), arr(*(t.data_ptr() for t in sz))
    lib.kplanes_t(pp, ss, len(planes), out[0].data_ptr(), out[-1].data_ptr() if len(out) > 1 else None,
                  rows, cols, w.group, b0, b1, f32, None if w.lut is None else w.lut.contiguous().data_ptr(),
                  w.lut is not None and w.lut.dtype == torch.int8,
                  None if w.high is None else w.high.contiguous().data_ptr(), w.hbits, w.i8)
    return tuple(out)


# -- few rows: a decode step's products ---------------------------------------------------------------------------
def _desc(w) -> list:
    """The form's C descriptor, made once per KTensor (its `cdesc` slot): [address or 0 where the routines cannot
    take it (planes elsewhere than the CPU, not contiguous, more than two, a codebook, 16-value groups or upper bits
    where lut_able is not), the descriptor tensor, planes]."""
    if not w.cdesc:
        extra = [t for t in (w.lut, w.high) if t is not None]  # (a codebook form's table, upper bits)
        if len(w.planes) <= 2 and w.planes[0].device.type == "cpu" and \
                all(t.is_contiguous() for t in (*w.planes, *w.sz)) and (w.plain or (
                    lut_able() and all(t.is_contiguous() and t.device.type == "cpu" for t in extra)
                    and _routine_for(w))):
            # the kmat (ckernel.c): addresses of planes and scales, sizes, the codebook, the upper bits; lives as
            # long as the tensors do
            p, sz = [t.data_ptr() for t in w.planes], [t.data_ptr() for t in w.sz]
            d = torch.tensor([p[0], p[-1], sz[0], sz[-1], len(p), *w.shape, w.group,
                              0 if w.lut is None else w.lut.data_ptr(), w.lut is not None and w.lut.dtype == torch.int8,
                              0 if w.high is None else w.high.data_ptr(), w.hbits, w.i8], dtype=torch.int64)
            w.cdesc.extend((d.data_ptr(), d, len(p)))
        else:
            w.cdesc.extend((0, None, 0))
    return w.cdesc


def _routine_for(w) -> bool:
    """Whether the AVX2 routines have a case for this one-plane form (ckernel.c's half_rows): nibbles or a
    codebook with scales per 16 or per multiple of 32, 5-bit values per 32, 6-bit ones per 16, int8 bytes."""
    if w.high is not None:
        return w.lut is None and len(w.planes) == 1 and (w.hbits, w.group) in ((1, 32), (2, 16))
    if w.i8:
        return w.lut is None and len(w.planes) == 1 and w.group % 32 == 0
    return w.group == 16 or w.group % 32 == 0


def lut_able() -> bool:
    """Whether this build's few-row routines (both modes) take codebook forms (quant.KTensor.lut), scales per
    16 values (group 16), 5- and 6-bit values (KTensor.high) and int8 planes (KTensor.i8): the AVX2 ones. Where
    they do, MXFP4, IQ4 and the IQ1-IQ3 i-quants are one plane of codebook indices (forms.codebook_form), Q2_K
    and Q3_K one plane with their scales per 16, Q5_x and Q6_K one plane with their upper bits beside it, int8
    forms one byte plane (quant.int8_form): 5-9 bits a weight against two int4 planes' 10. AVX512 builds keep
    the two planes."""
    lib = _lib if _lib is not False else library()
    return lib is not None and bool(lib.modes & 8)


def _mode_on() -> bool:
    """The routines are built for this CPU and run the mode now (mode())."""
    lib = _lib if _lib is not False else library()
    return lib is not None and bool(lib.modes & MODES.get(mode(), 0))


def _within(ws, rows: int) -> bool:
    """Each of ws is a form the routines take (a KTensor's `cdesc`: ckernel cannot import quant, which imports
    it) and `rows` is fewer than ROWS says for its planes."""
    for w in ws:
        d = getattr(w, "cdesc", None)
        if d is None:
            return False
        d = d or _desc(w)
        if not d[0] or rows >= ROWS.get(d[2], 0):
            return False
    return True


def kq_able(w) -> bool:
    """Whether kq_linear / kq_moe take this KTensor: the routine is built for this CPU and the mode (mode()), the form
    is on the CPU in contiguous planes."""
    return _mode_on() and _desc(w)[0] != 0


def kq_rows(ws, rows: int) -> bool:
    """Whether the few-row routines run all of the forms ws on `rows` rows: each kq_able, and fewer rows than
    ROWS says for its planes. Asked per projection in a decode step, so it reads each form's `cdesc`."""
    return _mode_on() and _within(ws, rows)


def kq_experts(fetched: dict, counts) -> bool:
    """kq_rows for each expert e of a layer (fetched[e]: its (gate, up, down), counts[e] its rows), in one call."""
    if not _mode_on():
        return False
    for e, ws in fetched.items():
        if len(ws) != 3 or not _within(ws, counts[e]):
            return False
    return True


# few rows on kq_linear / kq_moe with activations in bf16 (as PyTorch's kernel takes them) or int8 (llama.cpp's
# rounding, faster where the product is compute-bound), or "off": PyTorch's kernel. Process-wide. "auto" (the
# default) becomes bf16 where the CPU has AVX512-BF16 and int8 elsewhere, when the routines load: on AVX2 bf16
# costs fp32 FMAs, and decoded 1.0-1.7x slower than int8 with the same agreement with llama.cpp
# (docs/results/avx2.txt).
MODES = {"int8": 1, "bf16": 2}
KQ = os.environ.get("EMOE_KQ", "auto")
ASKED = KQ  # (before `auto` resolves: an engine's own choice, for_gguf, applies only where nothing was asked)
_RUNNING = contextvars.ContextVar("emoe_kq", default=None)  # the mode of the model whose forward runs (per thread)


def ask(mode: str) -> None:
    """Set the mode for the process, as EMOE_KQ does (`--activations`): every engine then runs it."""
    global KQ, ASKED
    if mode not in (*MODES, "off", "auto"):
        raise ValueError(f"activations must be auto, bf16, int8 or off, got {mode!r}")
    KQ = ASKED = mode
    if _lib:
        _resolve(_lib.modes)


def mode() -> str:
    """The few-row routines' activations now: the running model's own (MoEModel.activations), else KQ."""
    return _RUNNING.get() or KQ


def for_gguf() -> str | None:
    """An engine's mode over a GGUF's forms where none was asked: int8 where its routine is built. llama.cpp
    quantised the file for int8 activations, and on a DeepSeek-shaped Q4_K_M int8 decoded 1.16-1.21x faster than
    bf16 with the same agreement with llama.cpp (docs/results/mla_step.txt). None: KQ's (bf16 is the exact one on
    an engine's own copies)."""
    lib = library()
    return "int8" if ASKED == "auto" and lib is not None and lib.modes & MODES["int8"] else None


def running_mode(forward):
    """A model's forward run under its `activations` (None: KQ's), set for this thread while it runs."""
    @functools.wraps(forward)
    def run(self, *args, **kwargs):
        if self.activations is None:
            return forward(self, *args, **kwargs)
        token = _RUNNING.set(self.activations)
        try:
            return forward(self, *args, **kwargs)
        finally:
            _RUNNING.reset(token)
    return run


@functools.cache
def bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (oneDNN's test: AVX512 or AMX); elsewhere a bf16 matmul ran 12x
    slower than float32's, so the unpacked matrix is float32 there (quant._kmm)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# fewer rows than these (by planes) take the routines, more the prefill unpacking (quant.DEQUANT_ROWS, which
# rules alone when they are off): bf16 runs rows in pairs and beats PyTorch's kernel at every count below, and
# the unpacked matrix from about 56 rows (one plane) and 72 (two) (`scripts/bench_kq.py`); int8 is faster still.
# Without native bf16 matmuls the unpacked matrix is float32, twice the bytes and no faster to multiply: on an
# AVX2 EPYC the routines beat it up to about 240 rows (one plane) and 175 (two) (docs/results/avx2.txt).
ROWS = {1: 56, 2: 72} if bf16_matmul() else {1: 192, 2: 160}
if KQ not in (*MODES, "off", "auto"):
    raise ValueError(f"EMOE_KQ must be auto, bf16, int8 or off, got {KQ!r}")


def _resolve(modes: int) -> None:
    global KQ
    if KQ == "auto":
        KQ = "bf16" if modes & 4 else "int8" if modes & 1 else "off"


def kq_linear(x: torch.Tensor, w) -> torch.Tensor:
    """x [M, K] float32 (contiguous) times the form's matrix transposed: y [M, N] float32."""
    y = torch.empty(x.shape[0], w.shape[0])
    _lib.kq_linear(w.cdesc[0], x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads(), mode() == "bf16")
    return y


def kq_moe(out: torch.Tensor, x: torch.Tensor, ffns: list, used: list[int], ids: torch.Tensor,
           weights: torch.Tensor, act: tuple | None = None) -> None:
    """out [T, H] += Σ over each token's top-k of weight × SwiGLU_e(x[token]) for the experts used[i] whose
    (gate, up, down) forms (kq_able) are ffns[i]; ids / weights [T, k] the routing (int64 / float32; entries
    naming other experts are skipped). x, out: float32, contiguous. act: gpt-oss's activation (_moe)."""
    n = len(ffns)
    _moe(_descs(ffns), n, (ctypes.c_int64 * n)(*used), ids, weights, x, out, act)


def _descs(ffns: list):
    """The (gate, up, down) forms' C descriptors, expert after expert, as kq_moe takes them."""
    return (ctypes.c_void_p * (3 * len(ffns)))(*[m.cdesc[0] for f in ffns for m in f])


def moe_table(ffns: list) -> tuple | None:
    """A layer's experts (gate, up, down forms, one tuple per expert in expert order) made ready for kq_moe_all
    once: their descriptors and ids as C arrays, their count, and the row count below which every form takes
    the routine. None where some form is not kq_able."""
    if not _mode_on() or not all(len(f) == 3 and all(_desc(m)[0] for m in f) for f in ffns):
        return None
    n = len(ffns)
    return _descs(ffns), (ctypes.c_int64 * n)(*range(n)), n, min(ROWS.get(m.cdesc[2], 0) for f in ffns for m in f)


def kq_moe_all(out: torch.Tensor, x: torch.Tensor, table: tuple, ids: torch.Tensor, weights: torch.Tensor,
               act: tuple | None = None) -> int:
    """kq_moe over every expert of a layer (moe_table's), without listing the used ones first (the routine
    skips experts without tokens, and sums in expert order as kq_moe does). Returns how many ran."""
    descs, used, n, _ = table
    return _moe(descs, n, used, ids, weights, x, out, act)


def _moe(descs, n: int, used, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor, out: torch.Tensor,
         act: tuple | None) -> int:
    """kq_moe, or kq_moe_act with act's (gate bias, up bias, down bias, limit, alpha): gpt-oss's experts, the
    biases float32 CPU tensors [experts, I] / [experts, I] / [experts, H] indexed by expert id."""
    args = (descs, n, used, ids.data_ptr(), weights.data_ptr(), ids.shape[-1], x.data_ptr(), x.shape[0],
            out.data_ptr(), torch.get_num_threads(), mode() == "bf16")
    if act is None:
        return _lib.kq_moe(*args)
    gb, ub, db, limit, alpha = act
    return _lib.kq_moe_act(*args, gb.data_ptr(), ub.data_ptr(), db.data_ptr(), limit, alpha)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x / sqrt(mean(x²) + eps) · w over the last dimension for float32 CPU tensors, in one C call (F.rms_norm
    costs ~8-12 µs here for a 1024-wide row: a decode step pays it ~4 times a layer); None where not built."""
    if library() is None or not w.is_contiguous():
        return None
    x = x.contiguous()
    y = torch.empty_like(x)
    _lib.kq_rmsnorm(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return y


# tokens up to which kq_route runs a router (a decode step's few; a prefill's matmul is oneDNN's)
ROUTE_ROWS = 16


def route(x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor | None, top_k: int, norm_topk: bool, scoring: str,
          choice: torch.Tensor | None, scale: float, groups: tuple[int, int] = (1, 1)
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """model.route's (scores, weights, ids) for a few float32 CPU tokens x [T, H] and router gate [E, H] (+ bias),
    softmax or sigmoid scoring, choice the selection-only bias, groups (n_group, topk_group): in one C call. None
    where it does not apply."""
    T, (E, H) = x.shape[0], gate.shape
    if T > ROUTE_ROWS or scoring not in ("softmax", "sigmoid") or x.dim() != 2 or not _f32(x) or not _f32(gate) \
            or (bias is not None and not _f32(bias)) or (choice is not None and not _f32(choice)):
        return None  # (plain tests, not generators: asked per layer and step)
    if library() is None:  # (asked last: a GPU's forward never builds the routines)
        return None
    probs, w, ids = torch.empty(T, E), torch.empty(T, top_k), torch.empty(T, top_k, dtype=torch.int64)
    _lib.kq_route(x.contiguous().data_ptr(), gate.contiguous().data_ptr(),
                  bias.contiguous().data_ptr() if bias is not None else None,
                  choice.contiguous().data_ptr() if choice is not None else None, T, H, E, top_k,
                  scoring == "sigmoid", norm_topk, scale, *groups, probs.data_ptr(), w.data_ptr(), ids.data_ptr())
    return probs, w, ids


def _f32(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu"


def describe(kq: str | None = None) -> str:
    """What runs a few-row product on a kernel form here (kq: an engine's own mode, else KQ's), for the memory line."""
    from .quant import kernel_reads_forms  # (quant imports this module)
    lib = library()
    torch_side = "PyTorch's int4 kernel" if kernel_reads_forms() else \
        "the unpacked matrix (PyTorch's int4 kernel reads another layout on this CPU)" if lib is not None else \
        "dequantised copies, slowly (PyTorch's int4 kernel reads another layout on this CPU)"
    if lib is None:
        return f"{torch_side}: no C routines built"
    kq = kq or KQ
    if kq == "off":
        return f"{torch_side} below a prefill's rows: --activations torch / EMOE_KQ=off"
    if not lib.modes & MODES[kq]:
        return f"{torch_side} below a prefill's rows: no {kq} routine for this CPU"
    return f"emoe's C routines, {kq} activations"
