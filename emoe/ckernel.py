"""A small C routine for many-row products with kernel forms on a CPU: PyTorch's int4 kernel (quant._kmm) costs
the same per 4 rows whatever their number, so each of a prefill's rows costs about what a decoded token's
does. Past a few dozen rows it is cheaper to unpack the form once to bf16 (W^T, in the kernel
layout's own order, so reads and writes run along memory) and let oneDNN's bf16 matmul reuse it across rows:
`scripts/bench_prefill_dequant.py` measures both. Built at first use with the system C compiler into
~/.cache/emoe (keyed by source, flags and CPU), loaded with ctypes; without a compiler, or with
EMOE_NO_CKERNEL=1, the int4 kernel serves every row count. One thread: split over two (ctypes drops the GIL)
it ran slower here, beside torch's own threads.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = r"""
#include <stdint.h>
#include <string.h>
static inline float bf(uint16_t h) { uint32_t x = (uint32_t)h << 16; float f; memcpy(&f, &x, 4); return f; }
static inline uint16_t tobf(float f) { uint32_t x; memcpy(&x, &f, 4); return (uint16_t)((x + 0x7FFF + ((x >> 16) & 1)) >> 16); }
/* W^T [K, (b1 - b0) * 64] in bf16 for row blocks b0..b1 of a matrix held as np (1 or 2) planes of PyTorch's CPU int4 layout
   (per block of 64 rows, byte [k, j] holds row j's nibble low and row j+32's high; bf16 (scale, zero) pairs
   [K / group, N, 2]): out[k, n] = sum over planes of (u - 8) * s[g, n] + z[g, n], g = k / group, summed in
   float and rounded once; with lo, also what that rounding left (a second bf16 matrix: hi + lo holds 16
   significant bits, as the int8 values times their scales need). np is a constant in each call of run, so its
   inner loop vectorises. */
static inline void run(const uint8_t **planes, const uint16_t **sz, const int np, uint16_t *restrict out,
                       uint16_t *restrict lo_out, int N, int K, int group, int b0, int b1) {
    const long ld = (long)(b1 - b0) * 64;  /* out holds the columns of blocks b0..b1 only */
    float s[2][64], z[2][64];
    for (int b = b0; b < b1; b++) {
        for (int k = 0; k < K; k++) {
            if (k % group == 0) {
                for (int i = 0; i < np; i++) {
                    const uint16_t *q = sz[i] + ((long)(k / group) * N + b * 64) * 2;
                    for (int j = 0; j < 64; j++) { s[i][j] = bf(q[2 * j]); z[i][j] = bf(q[2 * j + 1]) - 8 * s[i][j]; }
                }
            }
            const uint8_t *restrict p0 = planes[0] + ((long)b * K + k) * 32;
            const uint8_t *restrict p1 = planes[np - 1] + ((long)b * K + k) * 32;
            uint16_t *restrict o = out + (long)k * ld + (b - b0) * 64;
            for (int j = 0; j < 32; j++) {
                float lo = (float)(p0[j] & 15) * s[0][j] + z[0][j];
                float hi = (float)(p0[j] >> 4) * s[0][j + 32] + z[0][j + 32];
                if (np == 2) {
                    lo += (float)(p1[j] & 15) * s[1][j] + z[1][j];
                    hi += (float)(p1[j] >> 4) * s[1][j + 32] + z[1][j + 32];
                }
                o[j] = tobf(lo);
                o[j + 32] = tobf(hi);
                if (np == 2) {
                    lo_out[(long)k * ld + (b - b0) * 64 + j] = tobf(lo - bf(o[j]));
                    lo_out[(long)k * ld + (b - b0) * 64 + j + 32] = tobf(hi - bf(o[j + 32]));
                }
            }
        }
    }
}
void kplanes_t(const uint8_t **planes, const uint16_t **sz, int np, uint16_t *out, uint16_t *lo, int N, int K,
               int group, int b0, int b1) {
    if (np == 1) run(planes, sz, 1, out, lo, N, K, group, b0, b1);
    else run(planes, sz, 2, out, lo, N, K, group, b0, b1);
}
"""
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet
_scratch = threading.local()


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def library() -> ctypes.CDLL | None:
    """The compiled routine, built once per source, flags and CPU; None where it cannot be (said once)."""
    global _lib
    if _lib is not False:
        return _lib
    _lib = None
    if os.environ.get("EMOE_NO_CKERNEL"):
        return None
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    try:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emoe"
        so = cache / f"ckernel-{key}.so"
        if not so.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
                src.write_text(SOURCE)
                subprocess.run([os.environ.get("CC", "cc"), *FLAGS, str(src), "-o", str(out)], check=True,
                               capture_output=True, timeout=120)
                os.replace(out, so)  # atomic: a second process sees the whole file or none
        lib = ctypes.CDLL(str(so))
        lib.kplanes_t.restype = None
        lib.kplanes_t.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                  ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 5
        _lib = lib
    except (OSError, RuntimeError, KeyError, subprocess.SubprocessError) as e:  # no compiler, no writable cache, no home
        print(f"[emoe] the prefill routine could not be built ({type(e).__name__}): many-row products stay on "
              f"PyTorch's int4 kernel", file=sys.stderr)
    return _lib


def unpackable(w) -> bool:
    """Whether dequant_t takes this KTensor: the routine is built, and the form is on the CPU in one or two planes."""
    return w.planes[0].device.type == "cpu" and len(w.planes) <= 2 and library() is not None


def dequant_t(w, b0: int = 0, b1: int | None = None) -> tuple[torch.Tensor, ...] | None:
    """A KTensor's rows b0·64 .. b1·64 (all by default) as bf16 W^T [cols, those rows] (contiguous), or None
    where the routine is unavailable. A two-plane form (int8 values: more significant bits than bf16 holds)
    comes as (hi, lo), W^T = hi + lo. The tensors are this thread's scratch, valid until its next call: a
    fresh megabyte-sized allocation is paged in anew each time, which cost as much as the unpacking."""
    if not unpackable(w):
        return None
    lib, (rows, cols) = library(), w.shape
    b1 = rows // 64 if b1 is None else b1
    n = (b1 - b0) * 64
    planes = [p.contiguous() for p in w.planes]
    sz = [t.contiguous() for t in w.sz]
    bufs = _scratch.__dict__.setdefault("bufs", {})
    for i in range(len(planes)):
        if (cols, n, i) not in bufs:
            bufs[(cols, n, i)] = torch.empty(cols, n, dtype=torch.bfloat16)
    out = [bufs[(cols, n, i)] for i in range(len(planes))]
    arr = ctypes.c_void_p * len(planes)
    pp, ss = arr(*(p.data_ptr() for p in planes)), arr(*(t.data_ptr() for t in sz))
    lib.kplanes_t(pp, ss, len(planes), out[0].data_ptr(), out[-1].data_ptr() if len(out) > 1 else None,
                  rows, cols, w.group, b0, b1)
    return tuple(out)
