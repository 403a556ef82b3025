"""One 768x2048 product on each kind of kernel form, side by side in one run: ckernel's few-row routines at 1 and 4
rows, and the prefill's unpacking (float32 W^T), one thread, the matrix in cache (so this is the arithmetic, not the
memory: a decode reading experts from RAM also gains from a form's fewer bytes). Best of 7 x 50 calls.

  python scripts/bench_forms.py

Forms: int8 as two nibble planes (to_kernel) and as one byte plane (int8_form), int4 one plane, Q6_K-like 6-bit
values with scales per 16, Q5-like 5-bit values as one plane with fifth bits and as two planes (kernel_copy5).
The one-plane kinds other than int4 exist only where ckernel.lut_able (the AVX2 build).
"""
from __future__ import annotations


import torch

from emoe import ckernel, quant
from emoe.bench.kernel import best_us
from emoe.forms import kernel_copy5
from emoe.gguf_blocks import kernel_copy


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    N, K = 768, 2048
    w = torch.randn(N, K, generator=g)
    u6, s6 = torch.randint(0, 64, (N, K), generator=g, dtype=torch.uint8), torch.rand(N, K // 16, generator=g) * 0.01
    u5 = torch.randint(0, 32, (N, K), generator=g, dtype=torch.uint8)
    s5, m5 = torch.rand(N, K // 32, generator=g) * 0.01, torch.rand(N, K // 32, generator=g) * 0.01
    forms = {"int8, two nibble planes": quant.to_kernel(quant.quantize(w, 8, 32)),
             "int8, one byte plane": quant.int8_form(quant.quantize(w, 8, 32)),
             "int4, one plane": quant.to_kernel(quant.quantize(w, 4, 32)),
             "6-bit, scales per 16": kernel_copy(u6, s6, 32 * s6, 16, 2) if ckernel.lut_able() else None,
             "5-bit, one plane": kernel_copy(u5, s5, m5, 32, 1) if ckernel.lut_able() else None,
             "5-bit, two planes": kernel_copy5(u5, s5, m5)}
    print(f"{N}x{K}, one thread; us per product (1 row / 4 rows), ms to unpack to float32 W^T, MB held")
    for name, f in forms.items():
        if f is None or not ckernel.kq_able(f):
            print(f"{name:24s} not taken by this build's routines")
            continue
        x1, x4 = torch.randn(1, K, generator=g), torch.randn(4, K, generator=g)
        t1, t4 = best_us(lambda: ckernel.kq_linear(x1, f), 50, 7), best_us(lambda: ckernel.kq_linear(x4, f), 50, 7)
        tu = best_us(lambda: ckernel.dequant_t(f, f32=True), 2, 5)
        print(f"{name:24s} {t1:7.1f} / {t4:7.1f} us   unpack {tu / 1e3:5.2f} ms   {f.nbytes / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
