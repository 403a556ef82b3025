/* emoe's C routines on kernel forms (quant.KTensor: PyTorch's CPU int4 layout), loaded by ckernel.py.

   Layout: per block of 64 rows, byte [k, j] holds row j's nibble low and row j+32's high; bf16 (scale, zero)
   pairs [K / group, N, 2] per plane; the value is sum over planes of (u - 8) * s + z.

   1. kplanes_t: W^T unpacked to bf16, for many-row products (a prefill's), run by oneDNN's bf16 matmul.
   2. kq_linear / kq_moe: few-row products, the nibbles times bf16 activations (AVX512-BF16 pair dot
      products, as PyTorch's kernel takes its input; two rows share each unpacking) or, in int8 mode,
      activations rounded to int8 per 32 as llama.cpp's quantised matmuls round them (VNNI, or AVX2), summed
      in int32 and scaled per 32 in float. kq_moe runs all of a MoE layer's experts in one call.
   3. kq_attend: a decode step's rope, KV-cache writes and attention; kq_rmsnorm; kq_route. A decode step on a CPU pays
      per torch op: these replace a few dozen of them a layer. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* a dot product in 16 partial sums, so it vectorises (one running sum is a chain of dependent adds) */
static inline float dotf(const float *restrict a, const float *restrict b, int n) {
    float part[16] = {0}, acc = 0.f;
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int i = 0; i < 16; i++) part[i] += a[j + i] * b[j + i];
    for (; j < n; j++) acc += a[j] * b[j];
    for (int w = 8; w > 0; w /= 2)  /* a tree, not a chain of 16 dependent adds */
        for (int i = 0; i < w; i++) part[i] += part[i + w];
    return acc + part[0];
}

static inline float bf(uint16_t h) { uint32_t x = (uint32_t)h << 16; float f; memcpy(&f, &x, 4); return f; }
static inline uint16_t tobf(float f) { uint32_t x; memcpy(&x, &f, 4); return (uint16_t)((x + 0x7FFF + ((x >> 16) & 1)) >> 16); }

/* dotf with b in bf16 (a bf16 KV cache's keys), in the same order */
static inline float dotbf(const float *restrict a, const uint16_t *restrict b, int n) {
    float part[16] = {0}, acc = 0.f;
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int i = 0; i < 16; i++) part[i] += a[j + i] * bf(b[j + i]);
    for (; j < n; j++) acc += a[j] * bf(b[j]);
    for (int w = 8; w > 0; w /= 2)
        for (int i = 0; i < w; i++) part[i] += part[i + w];
    return acc + part[0];
}

/* ckernel._desc; lut: a codebook form's 16 values (u = lut[nibble]; one plane), else NULL; sg: they are int8;
   hb: the upper bits of a one-plane form of 5- or 6-bit values, u = nibble + 16 x upper (kernel_layout._hpack);
   i8: the plane holds int8 values u, a byte each, in the order the AVX2 routines unpack nibbles to
   (kernel_layout._i8pack) */
typedef struct { const uint8_t *p[2]; const uint32_t *sz[2]; int64_t np, N, K, group; const uint8_t *lut; int64_t sg;
                 const uint8_t *hb; int64_t hbits, i8; } kmat;

#if defined(__AVX2__)
/* 256-bit registers: two rounds of unpacking bring 4 k of a row into a lane, rows in the order
   {0-3, 16-19}, {4-7, 20-23}, ... per half, so the scales are read in that order too. u[h * 4 + j]: the 4 k at
   r (128 bytes) of a block's rows, h the low or high nibbles. */
static inline __attribute__((always_inline)) void unpack_k4(const uint8_t *r, __m256i *u) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i A = _mm256_loadu_si256((const __m256i *)r), B = _mm256_loadu_si256((const __m256i *)(r + 32));
    const __m256i C = _mm256_loadu_si256((const __m256i *)(r + 64)), D = _mm256_loadu_si256((const __m256i *)(r + 96));
    for (int h = 0; h < 2; h++) {
        const __m256i a0 = _mm256_and_si256(h ? _mm256_srli_epi16(A, 4) : A, m4);
        const __m256i b0 = _mm256_and_si256(h ? _mm256_srli_epi16(B, 4) : B, m4);
        const __m256i c0 = _mm256_and_si256(h ? _mm256_srli_epi16(C, 4) : C, m4);
        const __m256i d0 = _mm256_and_si256(h ? _mm256_srli_epi16(D, 4) : D, m4);
        const __m256i abl = _mm256_unpacklo_epi8(a0, b0), abh = _mm256_unpackhi_epi8(a0, b0);
        const __m256i cdl = _mm256_unpacklo_epi8(c0, d0), cdh = _mm256_unpackhi_epi8(c0, d0);
        u[h * 4 + 0] = _mm256_unpacklo_epi16(abl, cdl);
        u[h * 4 + 1] = _mm256_unpackhi_epi16(abl, cdl);
        u[h * 4 + 2] = _mm256_unpacklo_epi16(abh, cdh);
        u[h * 4 + 3] = _mm256_unpackhi_epi16(abh, cdh);
    }
}
/* a 5- or 6-bit form's upper bits (kernel_layout._hpack's layout: h, one step's 32 x hbits bytes) put into the step's
   unpacked nibbles u: one load, and a shift and mask per vector (epi16 shifts: the mask drops what crossed bytes) */
static inline __attribute__((always_inline)) void high_bits(const uint8_t *h, __m256i *u, const int hbits) {
    if (hbits == 2) {
        const __m256i m = _mm256_set1_epi8(0x30);
        for (int half = 0; half < 2; half++) {
            const __m256i H = _mm256_loadu_si256((const __m256i *)(h + 32 * half));
            __m256i *v = u + 4 * half;
            v[0] = _mm256_or_si256(v[0], _mm256_and_si256(_mm256_slli_epi16(H, 4), m));
            v[1] = _mm256_or_si256(v[1], _mm256_and_si256(_mm256_slli_epi16(H, 2), m));
            v[2] = _mm256_or_si256(v[2], _mm256_and_si256(H, m));
            v[3] = _mm256_or_si256(v[3], _mm256_and_si256(_mm256_srli_epi16(H, 2), m));
        }
    } else {
        const __m256i m = _mm256_set1_epi8(0x10), H = _mm256_loadu_si256((const __m256i *)h);
        u[0] = _mm256_or_si256(u[0], _mm256_and_si256(_mm256_slli_epi16(H, 4), m));
        u[1] = _mm256_or_si256(u[1], _mm256_and_si256(_mm256_slli_epi16(H, 3), m));
        u[2] = _mm256_or_si256(u[2], _mm256_and_si256(_mm256_slli_epi16(H, 2), m));
        u[3] = _mm256_or_si256(u[3], _mm256_and_si256(_mm256_slli_epi16(H, 1), m));
        u[4] = _mm256_or_si256(u[4], _mm256_and_si256(H, m));
        u[5] = _mm256_or_si256(u[5], _mm256_and_si256(_mm256_srli_epi16(H, 1), m));
        u[6] = _mm256_or_si256(u[6], _mm256_and_si256(_mm256_srli_epi16(H, 2), m));
        u[7] = _mm256_or_si256(u[7], _mm256_and_si256(_mm256_srli_epi16(H, 3), m));
    }
}
/* one step's upper bits, of block b's rows at k = kb * 32 + k4 * 4 */
static inline const uint8_t *high_at(const kmat *w, int b, int kb, int k4) {
    return w->hb + ((long)b * (w->K / 4) + kb * 8 + k4) * 32 * w->hbits;
}
/* a step's unpacked values (unpack_k4's order) back in row order, nat[t * 64 + row] for k = 4 step + t: a byte
   shuffle per vector groups each lane's bytes by t, then a 4 x 4 transpose of 32-bit units per half */
static inline void to_rows(const __m256i *u, uint8_t *nat) {
    const __m256i idx = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                         0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int h = 0; h < 2; h++) {
        __m256i v[4];
        for (int q = 0; q < 4; q++) v[q] = _mm256_shuffle_epi8(u[4 * h + q], idx);
        const __m256i a = _mm256_unpacklo_epi32(v[0], v[1]), c = _mm256_unpacklo_epi32(v[2], v[3]);
        const __m256i bb = _mm256_unpackhi_epi32(v[0], v[1]), d = _mm256_unpackhi_epi32(v[2], v[3]);
        const __m256i t[4] = {_mm256_unpacklo_epi64(a, c), _mm256_unpackhi_epi64(a, c),
                              _mm256_unpacklo_epi64(bb, d), _mm256_unpackhi_epi64(bb, d)};
        for (int i = 0; i < 4; i++) _mm256_storeu_si256((__m256i *)(nat + i * 64 + h * 32), t[i]);
    }
}
#endif

/* the upper bits of row j's value at k in a block's part of hb (kernel_layout._hpack's layout) */
static inline int upper(const uint8_t *hb, int hbits, int k, int j) {
    const uint8_t *s = hb + (long)(k / 4) * 32 * hbits;
    const int n = ((j >> 4) & 1) * 16 + (j & 3) * 4 + (k & 3), q = (j >> 2) & 3;
    return hbits == 2 ? (s[(j >> 5) * 32 + n] >> (2 * q)) & 3 : (s[n] >> ((j >> 5) * 4 + q)) & 1;
}

/* 16 x the upper bits of a block's rows at k .. k + 3 (k a multiple of 4), out[t * 64 + row] */
static inline void uppers(const uint8_t *hb, int hbits, int k, uint8_t *out) {
#if defined(__AVX2__)
    __m256i u[8];
    for (int i = 0; i < 8; i++) u[i] = _mm256_setzero_si256();
    high_bits(hb + (long)(k / 4) * 32 * hbits, u, hbits);
    to_rows(u, out);
#else
    for (int t = 0; t < 4; t++)
        for (int j = 0; j < 64; j++) out[t * 64 + j] = (uint8_t)(16 * upper(hb, hbits, k + t, j));
#endif
}

/* an int8 plane's (kernel_layout._i8pack) values of a block's rows at k .. k + 3 (k a multiple of 4),
   out[t * 64 + row] */
static inline void bytes4(const uint8_t *p, int k, int8_t *out) {
    const uint8_t *r = p + (long)(k / 4) * 256;
#if defined(__AVX2__)
    __m256i u[8];
    for (int i = 0; i < 8; i++) u[i] = _mm256_loadu_si256((const __m256i *)(r + 32 * i));
    to_rows(u, (uint8_t *)out);
#else
    for (int t = 0; t < 4; t++)
        for (int j = 0; j < 64; j++)
            out[t * 64 + j] = (int8_t)r[((j >> 5) * 4 + ((j >> 2) & 3)) * 32 + ((j >> 4) & 1) * 16 + (j & 3) * 4 + t];
#endif
}

/* W^T [K, (b1 - b0) * 64] in bf16 for row blocks b0..b1; with lo, also what the rounding left (hi + lo holds
   16 significant bits, as two-plane int8 values times their scales need); with fout, in float32 there instead.
   np is a constant in each call of run, so its inner loop vectorises. */
static inline void run(const uint8_t **planes, const uint16_t **sz, const int np, uint16_t *restrict out,
                       uint16_t *restrict lo_out, float *restrict fout, int N, int K, int group, int b0, int b1,
                       const uint8_t *lut, int sg, const uint8_t *hb, const int hbits, const int i8) {
    const long ld = (long)(b1 - b0) * 64;  /* out holds the columns of blocks b0..b1 only */
    float s[2][64], z[2][64];
    uint8_t up4[4 * 64] = {0};
    int8_t v4[4 * 64];
    for (int b = b0; b < b1; b++) {
        for (int k = 0; k < K; k++) {
            if (k % group == 0) {
                for (int i = 0; i < np; i++) {
                    const uint16_t *q = sz[i] + ((long)(k / group) * N + b * 64) * 2;
                    for (int j = 0; j < 64; j++) { s[i][j] = bf(q[2 * j]); z[i][j] = bf(q[2 * j + 1]) - 8 * s[i][j]; }
                }
            }
            if (hbits && k % 4 == 0) uppers(hb + (long)b * K * 8 * hbits, hbits, k, up4);
            if (i8 && k % 4 == 0) bytes4(planes[0] + (long)b * K * 64, k, v4);
            const uint8_t *up = up4 + (k % 4) * 64;
            if (i8) {  /* one int8 plane */
                const int8_t *v = v4 + (k % 4) * 64;
                for (int j = 0; j < 64; j++) {
                    const float f = (float)v[j] * s[0][j] + z[0][j];
                    if (fout) fout[(long)k * ld + (b - b0) * 64 + j] = f;
                    else out[(long)k * ld + (b - b0) * 64 + j] = tobf(f);
                }
                continue;
            }
            const uint8_t *restrict p0 = planes[0] + ((long)b * K + k) * 32;
            const uint8_t *restrict p1 = planes[np - 1] + ((long)b * K + k) * 32;
            uint16_t *restrict o = out + (long)k * ld + (b - b0) * 64;
            for (int j = 0; j < 32; j++) {
                float lo = (float)(lut ? (sg ? (int8_t)lut[p0[j] & 15] : lut[p0[j] & 15]) : (p0[j] & 15) + up[j]) * s[0][j] + z[0][j];
                float hi = (float)(lut ? (sg ? (int8_t)lut[p0[j] >> 4] : lut[p0[j] >> 4]) : (p0[j] >> 4) + up[j + 32]) * s[0][j + 32] + z[0][j + 32];
                if (np == 2) {
                    lo += (float)(p1[j] & 15) * s[1][j] + z[1][j];
                    hi += (float)(p1[j] >> 4) * s[1][j + 32] + z[1][j + 32];
                }
                if (fout) {  /* float32 W^T: for a CPU whose bf16 matmuls are slow (no AVX512-BF16) */
                    float *f = fout + (long)k * ld + (b - b0) * 64;
                    f[j] = lo;
                    f[j + 32] = hi;
                    continue;
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
void kplanes_t(const uint8_t **planes, const uint16_t **sz, int np, void *out, uint16_t *lo, int N, int K,
               int group, int b0, int b1, int f32, const uint8_t *lut, int sg, const uint8_t *hb, int hbits, int i8) {
    if (lut) {  /* a codebook form (one plane): each nibble is looked up first */
        if (f32) run(planes, sz, 1, NULL, NULL, out, N, K, group, b0, b1, lut, sg, NULL, 0, 0);
        else run(planes, sz, 1, out, lo, NULL, N, K, group, b0, b1, lut, sg, NULL, 0, 0);
    } else if (hb) {  /* one plane with upper bits */
        if (f32) run(planes, sz, 1, NULL, NULL, out, N, K, group, b0, b1, NULL, 0, hb, hbits, 0);
        else run(planes, sz, 1, out, lo, NULL, N, K, group, b0, b1, NULL, 0, hb, hbits, 0);
    } else if (i8) {  /* one int8 plane */
        if (f32) run(planes, sz, 1, NULL, NULL, out, N, K, group, b0, b1, NULL, 0, NULL, 0, 1);
        else run(planes, sz, 1, out, NULL, NULL, N, K, group, b0, b1, NULL, 0, NULL, 0, 1);
    } else if (f32) {
        if (np == 1) run(planes, sz, 1, NULL, NULL, out, N, K, group, b0, b1, NULL, 0, NULL, 0, 0);
        else run(planes, sz, 2, NULL, NULL, out, N, K, group, b0, b1, NULL, 0, NULL, 0, 0);
    } else if (np == 1) run(planes, sz, 1, out, lo, NULL, N, K, group, b0, b1, NULL, 0, NULL, 0, 0);
    else run(planes, sz, 2, out, lo, NULL, N, K, group, b0, b1, NULL, 0, NULL, 0, 0);
}

/* ---- few-row products --------------------------------------------------------------------------------------- */
/* a row rounded: int8 per 32, the scale, the scale x sum; h, the scale x sum of each half (int8 rows only) */
typedef struct { int8_t *q; float *d, *qs, *h; } qrow;

static void quant_row(const float *x, int n, qrow r) {
    for (int b = 0; b < n / 32; b++) {
        float amax = 0.f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        const float id = amax > 0.f ? 127.f / amax : 0.f;
        int s = 0;
        int s0 = 0;
        for (int j = 0; j < 32; j++) {
            int v = (int)nearbyintf(x[b * 32 + j] * id);
            r.q[b * 32 + j] = (int8_t)v;
            s += v;
            if (j == 15) s0 = s;
        }
        r.d[b] = amax / 127.f;
        r.qs[b] = r.d[b] * (float)s;
        r.h[2 * b] = r.d[b] * (float)s0;
        r.h[2 * b + 1] = r.d[b] * (float)(s - s0);
    }
}

#if defined(__AVX512F__)
/* group g's bf16 (scale, zero) pairs for rows b*64 .. b*64+63 as floats, the zeros less off x scale (8 where
   the routine sums u, not u - 8) */
static inline void sz16(const kmat *w, int pl, int g, int b, __m512 *s, __m512 *z, float off) {
    const uint32_t *p = w->sz[pl] + (long)g * w->N + b * 64;
    for (int i = 0; i < 4; i++) {
        const __m512i v = _mm512_loadu_si512(p + 16 * i);
        s[i] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        z[i] = _mm512_fnmadd_ps(_mm512_set1_ps(off), s[i],
                                _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u))));
    }
}
#endif

/* the bf16 variant: x rounded to bf16 (as PyTorch's int4 kernel takes it), qs the float sum per 32 */
static void bf16_row(const float *x, int n, qrow r) {
    uint16_t *h = (uint16_t *)r.q;
    for (int b = 0; b < n / 32; b++) {
        float s = 0.f;
        for (int j = 0; j < 32; j++) { h[b * 32 + j] = tobf(x[b * 32 + j]); s += bf(h[b * 32 + j]); }
        r.qs[b] = s;
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define KQ_BF16 1
/* y[b*64 .. b*64+63] = W x with bf16 activations: a byte permute pairs each column's k and k+1, the nibbles
   widen to 16 bits and a word table maps u to bf16(u - 8), and dpbf16ps sums the pairs' products in fp32
   (exact products, as the int4 kernel's). Per group: s * sum((u - 8) x) + z * sum(x). */
/* R rows (1 or 2, a constant once inlined) share each unpacking of the weights */
static inline __attribute__((always_inline)) void bf16_rows(const kmat *w, const qrow *x, float *const *y, const int R, int b) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    uint8_t ip[64];
    uint16_t lut[32] = {0};
    for (int p = 0; p < 64; p++) ip[p] = (uint8_t)((p % 2) * 32 + p / 2);
    for (int u = 0; u < 16; u++) lut[u] = tobf((float)(u - 8));
    const __m512i perm = _mm512_loadu_si512(ip), table = _mm512_loadu_si512(lut);
    const int K = (int)w->K;
    __m512 f[2][4], s[4], z[4];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 4; i++) f[r][i] = _mm512_setzero_ps();
    for (int pl = 0; pl < w->np; pl++) {
        const uint8_t *base = w->p[pl] + (long)b * K * 32;
        int gcur = -1;
        for (int kb = 0; kb < K / 32; kb++) {
            __m512 a[2][4];
            for (int r = 0; r < R; r++)
                for (int i = 0; i < 4; i++) a[r][i] = _mm512_setzero_ps();
            for (int k2 = 0; k2 < 16; k2++) {
                const __m512i P = _mm512_permutexvar_epi8(perm, _mm512_loadu_si512(base + (long)(kb * 32 + k2 * 2) * 32));
                const __m512i lo = _mm512_and_si512(P, m4), hi = _mm512_and_si512(_mm512_srli_epi16(P, 4), m4);
                const __m512i v[4] = {_mm512_cvtepu8_epi16(_mm512_castsi512_si256(lo)), _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(lo, 1)),
                                      _mm512_cvtepu8_epi16(_mm512_castsi512_si256(hi)), _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(hi, 1))};
                __m512bh wv[4];
                for (int i = 0; i < 4; i++) wv[i] = (__m512bh)_mm512_permutexvar_epi16(v[i], table);
                for (int r = 0; r < R; r++) {
                    int32_t x2;
                    memcpy(&x2, (const uint16_t *)x[r].q + kb * 32 + k2 * 2, 4);
                    const __m512bh xv = (__m512bh)_mm512_set1_epi32(x2);
                    for (int i = 0; i < 4; i++) a[r][i] = _mm512_dpbf16_ps(a[r][i], wv[i], xv);
                }
            }
            const int g = kb * 32 / (int)w->group;
            if (g != gcur) sz16(w, pl, gcur = g, b, s, z, 0.f);
            for (int r = 0; r < R; r++) {
                const __m512 sx = _mm512_set1_ps(x[r].qs[kb]);
                for (int i = 0; i < 4; i++) f[r][i] = _mm512_fmadd_ps(a[r][i], s[i], _mm512_fmadd_ps(z[i], sx, f[r][i]));
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(y[r] + b * 64 + 16 * i, f[r][i]);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define KQ_BF16 1
#define KQ_BF16_AVX2 1
/* The AVX2 variant (no bf16 dot product): 8 rows' nibbles widen to int32, become exact floats u and multiply
   the bf16 activations in fp32 FMAs (exact products, as above); per group s * sum(u x) + (z - 8 s) * sum(x),
   which saves a subtraction per 8 weights. 32 rows at a time (a byte's low nibbles, then its high ones: the
   1 KiB of a group stays in L1), so R rows' sums fit the 16 registers. A form with upper bits (hb) is unpacked a
   group at a time as the int8 routine unpacks it and put back in row order (to_rows), and read from there. */
static inline __attribute__((always_inline)) void bf16_rows(const kmat *w, const qrow *x, float *const *y, const int R, int b) {
    const __m128i m4 = _mm_set1_epi8(15);
    const __m256i hi16 = _mm256_set1_epi32((int)0xFFFF0000u);
    const __m256 eight = _mm256_set1_ps(8.f);
    const uint8_t *lut = w->lut;
    const int sg = (lut && w->sg) || w->i8, halves = w->group == 16 ? 2 : 1;  /* group 16: scales per half of each 32 */
    const int rows = w->hb || w->i8;  /* values read from nat */
    const __m128i table = lut ? _mm_loadu_si128((const __m128i *)lut) : m4;
    const int K = (int)w->K;
    float acc[2][64] = {{0.f}}, xs[2][32];
    uint8_t nat[32 * 64];  /* a group's values with their upper bits (or an int8 plane's), [k][row] */
    for (int pl = 0; pl < w->np; pl++) {
        const uint8_t *base = w->p[pl] + (long)b * K * 32;
        for (int kb = 0; kb < K / 32; kb++) {
            const uint32_t *p = w->sz[pl] + (long)(kb * 32 / (int)w->group) * w->N + b * 64;
            if (w->i8)
                for (int k4 = 0; k4 < 8; k4++) bytes4(w->p[0] + (long)b * K * 64, kb * 32 + k4 * 4, (int8_t *)nat + k4 * 4 * 64);
            else if (w->hb)
                for (int k4 = 0; k4 < 8; k4++) {
                    __m256i u[8];
                    unpack_k4(base + (long)(kb * 32 + k4 * 4) * 32, u);
                    high_bits(high_at(w, b, kb, k4), u, (int)w->hbits);
                    to_rows(u, nat + k4 * 4 * 64);
                }
            for (int r = 0; r < R; r++)
                for (int j = 0; j < 32; j++) xs[r][j] = bf(((const uint16_t *)x[r].q)[kb * 32 + j]);
            for (int hs = 0; hs < 2 * halves; hs++) {  /* low nibbles' rows, then high: each half of k with group 16 */
                const int h = hs / halves, k0 = (hs % halves) * 16, k1 = halves == 2 ? k0 + 16 : 32;
                __m256 a[2][4];
                for (int r = 0; r < R; r++)
                    for (int i = 0; i < 4; i++) a[r][i] = _mm256_setzero_ps();
                for (int k = k0; k < k1; k++) {
                    const uint8_t *c = base + (long)(kb * 32 + k) * 32;
                    __m256 wv[4];
                    for (int i = 0; i < 4; i++) {
                        const __m128i v = _mm_loadl_epi64((const __m128i *)(rows ? nat + k * 64 + h * 32 + 8 * i : c + 8 * i));
                        __m128i u = rows ? v : _mm_and_si128(h ? _mm_srli_epi16(v, 4) : v, m4);
                        if (lut) u = _mm_shuffle_epi8(table, u);  /* (loop invariants: the compiler unswitches them) */
                        wv[i] = _mm256_cvtepi32_ps(sg ? _mm256_cvtepi8_epi32(u) : _mm256_cvtepu8_epi32(u));
                    }
                    for (int r = 0; r < R; r++) {
                        const __m256 xv = _mm256_broadcast_ss(&xs[r][k]);
                        for (int i = 0; i < 4; i++) a[r][i] = _mm256_fmadd_ps(wv[i], xv, a[r][i]);
                    }
                }
                const uint32_t *ph = halves == 2 ? p + (long)(k0 / 16) * w->N : p;
                float xsum[2];
                for (int r = 0; r < R; r++) {
                    xsum[r] = halves == 2 ? 0.f : x[r].qs[kb];
                    if (halves == 2) for (int k = k0; k < k1; k++) xsum[r] += xs[r][k];
                }
                for (int i = 0; i < 4; i++) {
                    const int j0 = h * 32 + 8 * i;
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(ph + j0));
                    const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                    const __m256 z = _mm256_fnmadd_ps(eight, s, _mm256_castsi256_ps(_mm256_and_si256(v, hi16)));
                    for (int r = 0; r < R; r++) {
                        const __m256 f = _mm256_fmadd_ps(z, _mm256_set1_ps(xsum[r]), _mm256_loadu_ps(acc[r] + j0));
                        _mm256_storeu_ps(acc[r] + j0, _mm256_fmadd_ps(a[r][i], s, f));
                    }
                }
            }
        }
    }
    for (int r = 0; r < R; r++) memcpy(y[r] + b * 64, acc[r], sizeof acc[r]);
}
#endif
#ifdef KQ_BF16
static void block_bf16(const kmat *w, const qrow *x, float *const *y, int R, int b) {
    if (R == 2) bf16_rows(w, x, y, 2, b);
    else bf16_rows(w, x, y, 1, b);
}
#endif

#if defined(__AVX512VBMI__) && defined(__AVX512VNNI__)
/* y[b*64 .. b*64+63] = W x for one block of rows: a two-source byte permute gathers each of 32 byte columns'
   4 k bytes into one 32-bit lane, so one dpbusd sums 4 k for 16 rows, in natural row order (lo nibbles:
   rows 0-31, hi: 32-63). Sum over a group: s * sum((u) x) + (z - 8 s) * sum(x). */
static void int8_row(const kmat *w, qrow x, float *y, int b) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    uint8_t i0[64], i1[64];
    for (int p = 0; p < 64; p++) { i0[p] = (uint8_t)((p % 4) * 32 + p / 4); i1[p] = (uint8_t)((p % 4) * 32 + 16 + p / 4); }
    const __m512i x0 = _mm512_loadu_si512(i0), x1 = _mm512_loadu_si512(i1);
    const int K = (int)w->K;
    __m512 f[4], s[4], z[4];
    for (int i = 0; i < 4; i++) f[i] = _mm512_setzero_ps();
    for (int pl = 0; pl < w->np; pl++) {
        const uint8_t *base = w->p[pl] + (long)b * K * 32;
        int gcur = -1;
        for (int kb = 0; kb < K / 32; kb++) {
            __m512i a[4];
            for (int i = 0; i < 4; i++) a[i] = _mm512_setzero_si512();
            for (int k4 = 0; k4 < 8; k4++) {
                const uint8_t *r = base + (long)(kb * 32 + k4 * 4) * 32;
                const __m512i A = _mm512_loadu_si512(r), B = _mm512_loadu_si512(r + 64);
                const __m512i P0 = _mm512_permutex2var_epi8(A, x0, B), P1 = _mm512_permutex2var_epi8(A, x1, B);
                int32_t xq4;
                memcpy(&xq4, x.q + kb * 32 + k4 * 4, 4);
                const __m512i xv = _mm512_set1_epi32(xq4);
                a[0] = _mm512_dpbusd_epi32(a[0], _mm512_and_si512(P0, m4), xv);
                a[1] = _mm512_dpbusd_epi32(a[1], _mm512_and_si512(P1, m4), xv);
                a[2] = _mm512_dpbusd_epi32(a[2], _mm512_and_si512(_mm512_srli_epi16(P0, 4), m4), xv);
                a[3] = _mm512_dpbusd_epi32(a[3], _mm512_and_si512(_mm512_srli_epi16(P1, 4), m4), xv);
            }
            const int g = kb * 32 / (int)w->group;
            if (g != gcur) sz16(w, pl, gcur = g, b, s, z, 8.f);
            const __m512 dx = _mm512_set1_ps(x.d[kb]), zx = _mm512_set1_ps(x.qs[kb]);
            for (int i = 0; i < 4; i++)
                f[i] = _mm512_fmadd_ps(z[i], zx, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[i]), _mm512_mul_ps(s[i], dx), f[i]));
        }
    }
    for (int i = 0; i < 4; i++) _mm512_storeu_ps(y + b * 64 + 16 * i, f[i]);
}
#elif defined(__AVX2__) && defined(__FMA__)
/* acc += u . x over each lane's 4 bytes, for the 8 steps of a group of 32 k; dp_sum turns acc into int32 sums.
   Without VNNI the pair products stay in int16 lanes across the group: u <= 15 and |x| <= 127, so a pair
   is at most 3810 and 8 of them 30480 (exact: no saturation), and the widening madd runs once a group, not
   once a step (madd and maddubs share the multiply ports, which bound this loop). */
static inline __m256i dp(__m256i acc, __m256i u, __m256i x) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, x);
#else
    return _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, x));
#endif
}
static inline __m256i dp_sum(__m256i acc) {
#if defined(__AVXVNNI__)
    return acc;
#else
    return _mm256_madd_epi16(acc, _mm256_set1_epi16(1));
#endif
}
/* group g's scales, and zeros less 8 x scale (the routine sums u, not u - 8), of rows b*64 .. b*64+63 */
static inline void scales64(const kmat *w, int pl, int g, int b, float *sf, float *zf) {
    const uint32_t *p = w->sz[pl] + (long)g * w->N + b * 64;
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int j = 0; j < 64; j += 8) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(p + j));
        const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        _mm256_storeu_ps(sf + j, s);
        _mm256_storeu_ps(zf + j, _mm256_fnmadd_ps(_mm256_set1_ps(8.f), s, _mm256_castsi256_ps(_mm256_and_si256(v, hi))));
    }
}
static void int8_row(const kmat *w, qrow x, float *y, int b) {
    const int K = (int)w->K;
    __m256 f[8];
    float sf[64], zf[64];
    for (int i = 0; i < 8; i++) f[i] = _mm256_setzero_ps();
    for (int pl = 0; pl < w->np; pl++) {
        int gcur = -1;
        for (int kb = 0; kb < K / 32; kb++) {
            __m256i a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_si256();
            const uint8_t *base = w->p[pl] + ((long)b * K + kb * 32) * 32;
            for (int k4 = 0; k4 < 8; k4++) {
                __m256i u[8];
                unpack_k4(base + k4 * 128, u);
                int32_t xq4;
                memcpy(&xq4, x.q + kb * 32 + k4 * 4, 4);
                const __m256i xv = _mm256_set1_epi32(xq4);
                for (int i = 0; i < 8; i++) a[i] = dp(a[i], u[i], xv);
            }
            for (int i = 0; i < 8; i++) a[i] = dp_sum(a[i]);
            const int g = kb * 32 / (int)w->group;
            if (g != gcur) scales64(w, pl, gcur = g, b, sf, zf);
            const __m256 dx = _mm256_set1_ps(x.d[kb]), zx = _mm256_set1_ps(x.qs[kb]);
            for (int i = 0; i < 8; i++) {
                const int r0 = (i / 4) * 32 + (i % 4) * 4;
                const __m256 s = _mm256_loadu2_m128(&sf[r0 + 16], &sf[r0]), z = _mm256_loadu2_m128(&zf[r0 + 16], &zf[r0]);
                f[i] = _mm256_fmadd_ps(z, zx, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[i]), _mm256_mul_ps(s, dx), f[i]));
            }
        }
    }
    for (int i = 0; i < 8; i++) {
        const int r0 = b * 64 + (i / 4) * 32 + (i % 4) * 4;
        _mm256_storeu2_m128(&y[r0 + 16], &y[r0], f[i]);
    }
}
/* R rows of one block: each group of 32 k is unpacked once into the lanes int8_row builds (2 KiB, in L1) and
   every row's dot products run on that, so the unpacking (about 60% of a row's work) is shared; each row's
   sums are int8_row's, in the same order, bit for bit. */
static void int8_rows(const kmat *w, const qrow *x, float *const *y, int R, int b) {
    const int K = (int)w->K;
    __m256i u[8][8];
    float sf[64], zf[64];
    for (int r = 0; r < R; r++) memset(y[r] + b * 64, 0, 64 * sizeof(float));
    for (int pl = 0; pl < w->np; pl++) {
        int gcur = -1;
        for (int kb = 0; kb < K / 32; kb++) {
            const uint8_t *base = w->p[pl] + ((long)b * K + kb * 32) * 32;
            for (int k4 = 0; k4 < 8; k4++) unpack_k4(base + k4 * 128, u[k4]);
            const int g = kb * 32 / (int)w->group;
            if (g != gcur) scales64(w, pl, gcur = g, b, sf, zf);
            for (int rr = 0; rr < R; rr++) {
                __m256i a[8];
                for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_si256();
                for (int k4 = 0; k4 < 8; k4++) {
                    int32_t xq4;
                    memcpy(&xq4, x[rr].q + kb * 32 + k4 * 4, 4);
                    const __m256i xv = _mm256_set1_epi32(xq4);
                    for (int i = 0; i < 8; i++) a[i] = dp(a[i], u[k4][i], xv);
                }
                for (int i = 0; i < 8; i++) a[i] = dp_sum(a[i]);
                const __m256 dx = _mm256_set1_ps(x[rr].d[kb]), zx = _mm256_set1_ps(x[rr].qs[kb]);
                float *yr = y[rr] + b * 64;
                for (int i = 0; i < 8; i++) {
                    const int r0 = (i / 4) * 32 + (i % 4) * 4;
                    const __m256 s = _mm256_loadu2_m128(&sf[r0 + 16], &sf[r0]), z = _mm256_loadu2_m128(&zf[r0 + 16], &zf[r0]);
                    const __m256 f = _mm256_loadu2_m128(&yr[r0 + 16], &yr[r0]);
                    _mm256_storeu2_m128(&yr[r0 + 16], &yr[r0],
                                        _mm256_fmadd_ps(z, zx, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[i]), _mm256_mul_ps(s, dx), f)));
                }
            }
        }
    }
}
/* One-plane forms the other routines do not take (ckernel.lut_able), with int8_rows' unpacking and sums:
   - codebooks: the nibbles index 16 values (lut), which a byte shuffle puts in place of u. MXFP4's (unsigned,
     up to 24): pair products up to 2 x 24 x 127 in int16 lanes would pass 32767 over a group's 8 steps, so the
     lanes widen to int32 after each 4. IQ4's (sg: int8, -127..113): maddubs takes |v| and x with v's sign, as
     llama.cpp's AVX2 dot products do (a pair is then at most 2 x 127 x 127, 32258), and the lanes widen every step;
   - scales and zeros per 16 values (group 16: Q2_K's, Q3_K's, and with codebooks IQ2_XS's, IQ2_S's and IQ1_M's),
     applied to each half's sums, with the half's own sum of x for the zero;
   - 5- and 6-bit values (hb: Q5_0/Q5_1/Q5_K per 32, Q6_K per 16): the nibbles with their upper bits or'ed in
     (high_bits). 6-bit pair products (up to 16002) widen after every 2 steps, 5-bit ones (7874) after 4;
   - an int8 plane (i8: Q8_0, int8 forms), its bytes stored in the order the nibbles unpack to: loaded as they
     are and multiplied as an int8 table's values (|v| times x with v's sign), no unpacking. */
/* one k4 step of a one-plane form, unpacked, looked up (lut) and, for an int8 table, split into |v| (u) and v */
static inline __attribute__((always_inline)) void half_unpack(const uint8_t *r, __m256i *u, __m256i *v,
                                                              const __m256i table, int lut, int sg,
                                                              const uint8_t *h, int hbits, int i8) {
    if (i8) {  /* an int8 plane, in this order already: |v| and v, as an int8 table's */
        for (int i = 0; i < 8; i++) { v[i] = _mm256_loadu_si256((const __m256i *)(r + 32 * i)); u[i] = _mm256_abs_epi8(v[i]); }
        return;
    }
    unpack_k4(r, u);
    if (hbits) high_bits(h, u, hbits);
    if (lut)
        for (int i = 0; i < 8; i++) {
            u[i] = _mm256_shuffle_epi8(table, u[i]);
            if (sg) { v[i] = u[i]; u[i] = _mm256_abs_epi8(v[i]); }
        }
}
static inline __attribute__((always_inline)) __m256i half_dp(__m256i a, __m256i u, __m256i v, __m256i xv, int sg) {
    return sg ? _mm256_add_epi32(a, dp_sum(dp(_mm256_setzero_si256(), u, _mm256_sign_epi8(xv, v)))) : dp(a, u, xv);
}
static inline __m256i xq4(const qrow *x, int kb, int k4) {
    int32_t q;
    memcpy(&q, x->q + kb * 32 + k4 * 4, 4);
    return _mm256_set1_epi32(q);
}
static inline __attribute__((always_inline)) void half_rows_(const kmat *w, const qrow *x, float *const *y, const int R,
                                                             int b, const int lut, const int sg, const int g16,
                                                             const int hbits, const int i8) {
    const int K = (int)w->K;
    const __m256i table = lut ? _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)w->lut))
                              : _mm256_setzero_si256();
    __m256i u[8][8], v[8][8];
    float sf[2][64], zf[2][64];
    int gcur = -1;
    for (int r = 0; r < R; r++) memset(y[r] + b * 64, 0, 64 * sizeof(float));
    for (int kb = 0; kb < K / 32; kb++) {
        const int step = i8 ? 256 : 128;  /* bytes of a 4-k step */
        const uint8_t *base = w->p[0] + ((long)b * K + kb * 32) * (step / 4);
        if (g16) {
            scales64(w, 0, 2 * kb, b, sf[0], zf[0]);
            scales64(w, 0, 2 * kb + 1, b, sf[1], zf[1]);
        } else {
            const int g = kb * 32 / (int)w->group;
            if (g != gcur) scales64(w, 0, gcur = g, b, sf[0], zf[0]);
        }
        if (R > 1)  /* unpacked once for every row */
            for (int k4 = 0; k4 < 8; k4++)
                half_unpack(base + k4 * step, u[k4], v[k4], table, lut, sg, hbits ? high_at(w, b, kb, k4) : NULL, hbits, i8);
        for (int rr = 0; rr < R; rr++) {
            __m256i c[2][8];
            for (int half = 0; half < 2; half++) {
                __m256i a[8], a32[8];
                for (int i = 0; i < 8; i++) a[i] = a32[i] = _mm256_setzero_si256();
                for (int k4 = half * 4; k4 < half * 4 + 4; k4++) {
                    const __m256i xv = xq4(&x[rr], kb, k4);
                    if (R == 1) {  /* one row: each step's unpacking used at once, in registers */
                        __m256i uu[8], vv[8] = {0};
                        half_unpack(base + k4 * step, uu, vv, table, lut, sg, hbits ? high_at(w, b, kb, k4) : NULL, hbits, i8);
                        for (int i = 0; i < 8; i++) a[i] = half_dp(a[i], uu[i], vv[i], xv, sg);
                    } else
                        for (int i = 0; i < 8; i++) a[i] = half_dp(a[i], u[k4][i], v[k4][i], xv, sg);
                    if (hbits == 2 && k4 % 2)  /* 6-bit values: 2 steps' pair products (2 x 63 x 127 each) fill int16 */
                        for (int i = 0; i < 8; i++) { a32[i] = _mm256_add_epi32(a32[i], dp_sum(a[i])); a[i] = _mm256_setzero_si256(); }
                }
                for (int i = 0; i < 8; i++) c[half][i] = sg ? a[i] : hbits == 2 ? a32[i] : dp_sum(a[i]);
            }
            const __m256 dx = _mm256_set1_ps(x[rr].d[kb]);
            float *yr = y[rr] + b * 64;
            const float zs[2] = {g16 ? x[rr].h[2 * kb] : x[rr].qs[kb], x[rr].h[2 * kb + 1]};  /* sums of x, for zeros */
            if (!g16)
                for (int i = 0; i < 8; i++) c[0][i] = _mm256_add_epi32(c[0][i], c[1][i]);
            for (int h = 0; h <= g16; h++) {
                const __m256 zx = _mm256_set1_ps(zs[h]);
                for (int i = 0; i < 8; i++) {
                    const int r0 = (i / 4) * 32 + (i % 4) * 4;
                    const __m256 s = _mm256_loadu2_m128(&sf[h][r0 + 16], &sf[h][r0]);
                    const __m256 z = _mm256_loadu2_m128(&zf[h][r0 + 16], &zf[h][r0]);
                    const __m256 f = _mm256_loadu2_m128(&yr[r0 + 16], &yr[r0]);
                    _mm256_storeu2_m128(&yr[r0 + 16], &yr[r0], _mm256_fmadd_ps(z, zx, _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(c[h][i]), _mm256_mul_ps(s, dx), f)));
                }
            }
        }
    }
}
/* half_rows_ with its cases' flags constant, so that each is compiled without branches in its loops */
static void half_rows(const kmat *w, const qrow *x, float *const *y, int R, int b) {
    const int lut = w->lut != NULL, sg = lut && w->sg, g16 = w->group == 16;
#define HALF_(L, S, G, H, I) do { if (R == 1) half_rows_(w, x, y, 1, b, L, S, G, H, I); else half_rows_(w, x, y, R, b, L, S, G, H, I); } while (0)
    if (w->i8) HALF_(0, 1, 0, 0, 1);  /* one int8 plane (Q8_0, int8 forms), per 32 */
    else if (w->hb && w->hbits == 2) HALF_(0, 0, 1, 2, 0);  /* Q6_K: scales per 16 (ckernel._desc admits no other case) */
    else if (w->hb) HALF_(0, 0, 0, 1, 0);  /* Q5_0, Q5_1, Q5_K: per 32 */
    else if (g16 && sg) HALF_(1, 1, 1, 0, 0);  /* IQ2_XS, IQ2_S: a codebook, scales per 16 */
    else if (g16 && lut) HALF_(1, 0, 1, 0, 0);  /* IQ1_M */
    else if (g16) HALF_(0, 0, 1, 0, 0);
    else if (sg) HALF_(1, 1, 0, 0, 0);
    else HALF_(1, 0, 0, 0, 0);
#undef HALF_
}
#define KQ_AVX2 1
#endif
#if defined(KQ_AVX2) || (defined(__AVX512VBMI__) && defined(__AVX512VNNI__))
#define KQ_SIMD 1
#endif

/* which activation modes this build runs: 1 int8, 2 bf16 (0: neither; ckernel keeps PyTorch's kernel); 4 where
   bf16 has AVX512-BF16's pair dot products (about int8's speed there; the AVX2 variant decoded 1.0-1.7x slower) */
int kq_modes(void) {
    int m = 0;
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
    m |= 4;
#endif
#ifdef KQ_SIMD
    m |= 1;
#endif
#ifdef KQ_BF16
    m |= 2;
#endif
#if defined(KQ_AVX2) && defined(KQ_BF16_AVX2)
    m |= 8;  /* both modes take codebook forms (kmat.lut), scales per 16 values (group 16) and upper bits (kmat.hb) */
#endif
    return m;
}

#ifdef KQ_SIMD
typedef void (*rowfn)(const float *, int, qrow);
typedef void (*blockfn)(const kmat *, const qrow *, float *const *, int, int);
/* rows a call of block_ takes at most: the bf16 routine unpacks once for 2 rows, the AVX2 int8 one for any number */
#define GROUP 8
static void block_rows(const kmat *w, const qrow *x, float *const *y, int R, int b) {
#ifdef KQ_AVX2
    if (w->lut || w->group == 16 || w->hb || w->i8) { half_rows(w, x, y, R, b); return; }
    if (R > 1) { int8_rows(w, x, y, R, b); return; }
#endif
    for (int r = 0; r < R; r++) int8_row(w, x[r], y[r], b);  /* (AVX512: a row at a time) */
}
#ifdef KQ_BF16
#define PICK(bf16) rowfn quant_ = bf16 ? bf16_row : quant_row; blockfn block_ = bf16 ? block_bf16 : block_rows; \
    const int G = bf16 ? 2 : GROUP
#else
#define PICK(bf16) rowfn quant_ = quant_row; blockfn block_ = block_rows; const int G = GROUP; (void)bf16
#endif
static qrow qrows(void *mem, int M, int K) {  /* M rows' worth, laid out in one allocation */
    qrow r = {(int8_t *)mem, NULL, NULL, NULL};
    r.d = (float *)((char *)mem + (((long)M * K * 2 + 63) & ~63L));
    r.qs = r.d + (long)M * K / 32;
    r.h = r.qs + (long)M * K / 32;
    return r;
}
/* 2 bytes an activation: int8 rows use half of each row's space, bf16 rows all of it */
static size_t qbytes(int M, int K) { return (((long)M * K * 2 + 63) & ~63L) + 4 * sizeof(float) * ((long)M * K / 32); }
static qrow row(qrow r, int m, int K) {
    return (qrow){r.q + (long)m * K * 2, r.d + (long)m * K / 32, r.qs + (long)m * K / 32, r.h + (long)m * K / 16};
}

/* y [B, H * n] = per head h, x [B, H, K]'s row (b, h) times rows h n .. (h + 1) n - 1 of w [H n, K]: H matrices of n
   rows (a multiple of 64) stacked in one form, each taking its own input (DeepSeek's absorbed k_b and v_b); H = 1 is
   the plain product, kq_linear */
static void heads_linear(const kmat *w, const float *x, int B, int H, float *y, int threads, int bf16) {
    PICK(bf16);
    const int K = (int)w->K, N = (int)w->N, nb = N / 64, per = nb / H;
    void *mem = malloc(qbytes(B * H, K));
    qrow q = qrows(mem, B * H, K);
    for (int m = 0; m < B * H; m++) quant_(x + (long)m * K, K, row(q, m, K));
    const int P = (B + G - 1) / G;  /* rows in groups of G: the routine unpacks the weights once for a group */
    #pragma omp parallel for num_threads(threads) schedule(static) if (nb * P >= 4)
    for (int i = 0; i < nb * P; i++) {
        const int blk = i / P, h = blk / per, m = G * (i % P), R = B - m < G ? B - m : G;
        qrow xs[GROUP];
        float *ys[GROUP];
        for (int r = 0; r < R; r++) { xs[r] = row(q, (m + r) * H + h, K); ys[r] = y + (long)(m + r) * N; }
        block_(w, xs, ys, R, blk);
    }
    free(mem);
}

/* y [M, N] = x [M, K] W^T, float in and out */
void kq_linear(const kmat *w, const float *x, int M, float *y, int threads, int bf16) {
    heads_linear(w, x, M, 1, y, threads, bf16);
}

static inline float silu(float v) { return v / (1.f + expf(-v)); }

/* out [T, H] += sum over each token's top-k of its routing weight x SwiGLU_e(x[token]), for the n experts
   used[0..n-1] (ffn[3i .. 3i+2]: expert used[i]'s gate, up and down); entries of ids [T, k] naming other
   experts are left to the caller. Each expert takes its tokens in ascending order. One call for a MoE
   layer's experts: each token's input is rounded once, the gate and up products of every expert run as one
   parallel loop, then the down products; the sums go into out in expert order, so the result does not
   depend on the thread count. Returns how many of the n experts had tokens. With gb (gpt-oss's experts), the
   gate and up products get expert used[i]'s biases gb and ub [., I] and are clamped, h = (u + 1) g sigmoid(alpha g)
   replaces SiLU(g) u, and the down product gets db [., H]: clamped_swiglu's arithmetic. */
static int moe_(const kmat **ffn, int n, const int64_t *used, const int64_t *ids, const float *weights, int k,
                const float *x, int T, float *out, int threads, int bf16, const float *gb, const float *ub,
                const float *db, float limit, float alpha) {
    PICK(bf16);
    int64_t *start = calloc(n + 1, sizeof(int64_t)), *slot = malloc(sizeof(int64_t) * (size_t)T * k);
    for (long r = 0; r < (long)T * k; r++) {
        slot[r] = -1;
        for (int i = 0; i < n; i++) if (used[i] == ids[r]) { slot[r] = i; start[i + 1]++; break; }
    }
    for (int i = 0; i < n; i++) start[i + 1] += start[i];
    int64_t *toks = malloc(sizeof(int64_t) * (size_t)(start[n] + 1)), *fill = calloc(n, sizeof(int64_t));
    float *gates = malloc(sizeof(float) * (size_t)(start[n] + 1));
    for (long r = 0; r < (long)T * k; r++) if (slot[r] >= 0) {
        const int64_t at = start[slot[r]] + fill[slot[r]]++;
        toks[at] = r / k;
        gates[at] = weights[r];
    }
    free(slot);
    free(fill);
    if (start[n] == 0) {
        free(start); free(toks); free(gates);
        return 0;
    }
    int first = 0;  /* the shapes from an expert with tokens: a table's other entries may be NULL (not held) */
    while (first < n - 1 && start[first + 1] == start[first]) first++;
    const int H = (int)ffn[3 * first]->K, I = (int)ffn[3 * first]->N, R = (int)start[n];
    void *mem = malloc(qbytes(T, H) + qbytes(R, I) + sizeof(float) * ((size_t)R * I * 2 + (size_t)R * H));
    qrow qx = qrows(mem, T, H);
    qrow qh = qrows((char *)mem + qbytes(T, H), R, I);
    float *gu = (float *)((char *)mem + qbytes(T, H) + qbytes(R, I)), *ys = gu + (size_t)R * I * 2;
    int *tok_used = calloc(T, sizeof(int));
    for (int r = 0; r < R; r++) tok_used[toks[r]] = 1;
    for (int t = 0; t < T; t++) if (tok_used[t]) quant_(x + (long)t * H, H, row(qx, t, H));
    free(tok_used);
    const int nbi = I / 64, nbh = H / 64;
    int np = 0;  /* an expert's rows in groups of G (r0, rows, expert): the routine unpacks the weights once a group */
    int (*pairs)[3] = malloc(sizeof(int[3]) * (size_t)(R + 1)), *rexp = malloc(sizeof(int) * (size_t)(R + 1));
    for (int e = 0; e < n; e++)
        for (int64_t r = start[e]; r < start[e + 1]; r++) rexp[r] = e;
    for (int e = 0; e < n; e++)
        for (int64_t r = start[e]; r < start[e + 1]; r += G) {
            pairs[np][0] = (int)r; pairs[np][1] = start[e + 1] - r < G ? (int)(start[e + 1] - r) : G; pairs[np][2] = e; np++;
        }
    #pragma omp parallel num_threads(threads) if (np * nbi >= 2)
    {
        #pragma omp for schedule(static)
        for (int i = 0; i < np * nbi * 2; i++) {  /* (pair, gate or up, block) */
            const int *pr = pairs[i / (nbi * 2)], j = i % (nbi * 2), which = j / nbi, r0 = pr[0];
            qrow xs[GROUP];
            float *ys2[GROUP];
            for (int r = 0; r < pr[1]; r++) { xs[r] = row(qx, (int)toks[r0 + r], H); ys2[r] = gu + ((size_t)(r0 + r) * 2 + which) * I; }
            block_(ffn[3 * pr[2] + which], xs, ys2, pr[1], j % nbi);
        }
        #pragma omp for schedule(static)
        for (int r = 0; r < R; r++) {
            float *g = gu + (size_t)r * 2 * I, *u = g + I;
            if (gb) {
                const int64_t e = used[rexp[r]];
                const float *bg = gb + e * I, *bu = ub + e * I;
                for (int c = 0; c < I; c++) {
                    const float gc = fminf(g[c] + bg[c], limit), uc = fmaxf(fminf(u[c] + bu[c], limit), -limit);
                    g[c] = (uc + 1.f) * gc * (1.f / (1.f + expf(-alpha * gc)));
                }
            } else
                for (int c = 0; c < I; c++) g[c] = silu(g[c]) * u[c];
            quant_(g, I, row(qh, r, I));
        }
        #pragma omp for schedule(static)
        for (int i = 0; i < np * nbh; i++) {
            const int *pr = pairs[i / nbh], r0 = pr[0];
            qrow hs[GROUP];
            float *ys2[GROUP];
            for (int r = 0; r < pr[1]; r++) { hs[r] = row(qh, r0 + r, I); ys2[r] = ys + (size_t)(r0 + r) * H; }
            block_(ffn[3 * pr[2] + 2], hs, ys2, pr[1], i % nbh);
        }
    }
    free(pairs);
    for (int r = 0; r < R; r++) {
        float *o = out + toks[r] * (long)H;
        const float *yr = ys + (size_t)r * H, gr = gates[r];
        if (db) {
            const float *bd = db + used[rexp[r]] * H;
            for (int c = 0; c < H; c++) o[c] += gr * (yr[c] + bd[c]);
        } else
            for (int c = 0; c < H; c++) o[c] += gr * yr[c];
    }
    free(rexp);
    int ran = 0;
    for (int e = 0; e < n; e++) ran += start[e + 1] > start[e];
    free(mem);
    free(start);
    free(toks);
    free(gates);
    return ran;
}

int kq_moe(const kmat **ffn, int n, const int64_t *used, const int64_t *ids, const float *weights, int k,
           const float *x, int T, float *out, int threads, int bf16) {
    return moe_(ffn, n, used, ids, weights, k, x, T, out, threads, bf16, NULL, NULL, NULL, 0.f, 0.f);
}

int kq_moe_act(const kmat **ffn, int n, const int64_t *used, const int64_t *ids, const float *weights, int k,
               const float *x, int T, float *out, int threads, int bf16, const float *gb, const float *ub,
               const float *db, float limit, float alpha) {
    return moe_(ffn, n, used, ids, weights, k, x, T, out, threads, bf16, gb, ub, db, limit, alpha);
}

#endif

/* y = x / sqrt(mean(x^2) + eps) * w per row of n, in float */
void kq_rmsnorm(const float *x, const float *w, float *y, int rows, int n, float eps) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (long)r * n;
        const float inv = 1.f / sqrtf(dotf(xr, xr, n) / (float)n + eps);
        for (int j = 0; j < n; j++) y[(long)r * n + j] = xr[j] * inv * w[j];
    }
}

/* A MoE router for a few tokens (a decode step's): logits = x W^T (+ b), probs = softmax or sigmoid, each token's
   top k of probs (+ choice: DeepSeek's balancing bias, which picks but never weighs), its weights the probs there,
   normalised to sum 1 if norm, times scale. Ties go to the lower expert. With ng > 1 groups (DeepSeek-V2/V3's
   group-limited routing), only the experts of the tg best groups are chosen from: a group scores the sum of its two
   best choice values under sigmoid, its best under softmax, as model.route. Replaces ~10 torch ops a layer. */
void kq_route(const float *x, const float *W, const float *b, const float *choice, int T, int H, int E, int k,
              int sigmoid, int norm, float scale, int ng, int tg, float *probs, float *w, int64_t *ids) {
    const int per = ng > 1 ? E / ng : E;
    char allowed[ng > 1 ? ng : 1];
    for (int t = 0; t < T; t++) {
        const float *xt = x + (long)t * H;
        float *p = probs + (long)t * E, mx = -INFINITY, sum = 0.f;
        for (int e = 0; e < E; e++) {
            const float acc = dotf(xt, W + (long)e * H, H) + (b ? b[e] : 0.f);
            p[e] = acc;
            mx = acc > mx ? acc : mx;
        }
        for (int e = 0; e < E; e++) {
            p[e] = sigmoid ? 1.f / (1.f + expf(-p[e])) : expf(p[e] - mx);
            sum += p[e];
        }
        if (!sigmoid)
            for (int e = 0; e < E; e++) p[e] /= sum;
        int64_t *it = ids + (long)t * k;
        float *wt = w + (long)t * k, best[k], tot = 0.f;
        if (ng > 1) {
            float gs[ng];
            for (int g = 0; g < ng; g++) {
                float m1 = -INFINITY, m2 = -INFINITY;
                for (int e = g * per; e < (g + 1) * per; e++) {
                    const float v = choice ? p[e] + choice[e] : p[e];
                    if (v > m1) m2 = m1, m1 = v; else if (v > m2) m2 = v;
                }
                gs[g] = sigmoid ? m1 + m2 : m1;
                allowed[g] = 0;
            }
            for (int j = 0; j < tg; j++) {  /* the tg best groups, ties to the lower one */
                int bg = -1;
                for (int g = 0; g < ng; g++) if (!allowed[g] && (bg < 0 || gs[g] > gs[bg])) bg = g;
                allowed[bg] = 1;
            }
        }
        for (int j = 0; j < k; j++) best[j] = -INFINITY, it[j] = -1;
        for (int e = 0; e < E; e++) {  /* insertion into the k best so far, kept in descending order */
            if (ng > 1 && !allowed[e / per]) continue;
            const float v = choice ? p[e] + choice[e] : p[e];
            if (v <= best[k - 1] && it[k - 1] >= 0) continue;
            int j = k - 1;
            for (; j > 0 && (v > best[j - 1] || it[j - 1] < 0); j--) best[j] = best[j - 1], it[j] = it[j - 1];
            best[j] = v, it[j] = e;
        }
        for (int j = 0; j < k; j++) tot += (wt[j] = p[it[j]]);
        for (int j = 0; j < k; j++) wt[j] = (norm ? wt[j] / (tot + 1e-20f) : wt[j]) * scale;
    }
}

#ifdef KQ_SIMD
static inline float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

/* e^x for 8 lanes (Cephes' expf: 2^n e^r, |r| <= ln2 / 2, a degree-6 polynomial; within 2 ulp of expf, x clamped
   to [-87.3, 88.4]). A long context's softmax is one exp per position and head: scalar expf had been most of it */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447505531f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* s[j] = e^(s[j] - mx) for n scores, returning their sum (a softmax's numerators and denominator) */
static inline float exp_sum(float *s, int n, float mx) {
    const __m256 m8 = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m8));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    float t = hsum8(acc);
    for (; j < n; j++) t += (s[j] = expf(s[j] - mx));
    return t;
}

static inline float max_of(const float *s, int n, float mx) {
    __m256 m8 = _mm256_set1_ps(mx);
    int j = 0;
    for (; j + 8 <= n; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + j));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float m = _mm_cvtss_f32(h);
    for (; j < n; j++) m = fmaxf(m, s[j]);
    return m;
}

/* 8 values at element i of k: float32, or (half) bf16 widened exactly */
static inline __m256 load8(const void *k, size_t i, int half) {
    if (half)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)k + i))), 16));
    return _mm256_loadu_ps((const float *)k + i);
}
static inline float at1(const void *k, size_t i, int half) { return half ? bf(((const uint16_t *)k)[i]) : ((const float *)k)[i]; }

/* s[t ld + j] = (q_t . k_j) scale for nh <= 4 queries q_t (n wide, one after another) and m keys k_j (kst elements
   apart; float32, or bf16 with half): two keys at a time, each loaded once for the four queries, the eight sums in
   registers and reduced together (horizontal adds: one reduction per 8 sums, not one per sum) */
static void scores4(const float *q, int nh, const void *k, long kst, int m, int n, float scale, float *s, long ld,
                    int half) {
    const int n8 = n & ~7;
    const float *qt[4];
    for (int t = 0; t < 4; t++) qt[t] = q + (size_t)(t < nh ? t : 0) * n;  /* past nh: row 0 again, not kept */
    int j = 0;
    for (; j + 2 <= m; j += 2) {
        const size_t k0 = (size_t)j * kst, k1 = k0 + kst;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int c = 0; c < n8; c += 8) {
            const __m256 x = load8(k, k0 + c, half), y = load8(k, k1 + c, half);
            const __m256 q0 = _mm256_loadu_ps(qt[0] + c), q1 = _mm256_loadu_ps(qt[1] + c),
                         q2 = _mm256_loadu_ps(qt[2] + c), q3 = _mm256_loadu_ps(qt[3] + c);
            a0 = _mm256_fmadd_ps(q0, x, a0), b0 = _mm256_fmadd_ps(q0, y, b0);
            a1 = _mm256_fmadd_ps(q1, x, a1), b1 = _mm256_fmadd_ps(q1, y, b1);
            a2 = _mm256_fmadd_ps(q2, x, a2), b2 = _mm256_fmadd_ps(q2, y, b2);
            a3 = _mm256_fmadd_ps(q3, x, a3), b3 = _mm256_fmadd_ps(q3, y, b3);
        }
        const __m256 ga = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3)),
                     gb = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
        float ra[4], rb[4];  /* each query's sum for key j and key j + 1 */
        _mm_storeu_ps(ra, _mm_add_ps(_mm256_castps256_ps128(ga), _mm256_extractf128_ps(ga, 1)));
        _mm_storeu_ps(rb, _mm_add_ps(_mm256_castps256_ps128(gb), _mm256_extractf128_ps(gb, 1)));
        for (int t = 0; t < nh; t++) {
            for (int c = n8; c < n; c++) ra[t] += qt[t][c] * at1(k, k0 + c, half), rb[t] += qt[t][c] * at1(k, k1 + c, half);
            s[(size_t)t * ld + j] = ra[t] * scale;
            s[(size_t)t * ld + j + 1] = rb[t] * scale;
        }
    }
    for (; j < m; j++) {
        const size_t kj = (size_t)j * kst;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int c = 0; c < n8; c += 8) {
            const __m256 kv = load8(k, kj + c, half);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qt[0] + c), kv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qt[1] + c), kv, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(qt[2] + c), kv, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(qt[3] + c), kv, a3);
        }
        const __m256 acc[4] = {a0, a1, a2, a3};
        for (int t = 0; t < nh; t++) {
            float tot = hsum8(acc[t]);
            for (int c = n8; c < n; c++) tot += qt[t][c] * at1(k, kj + c, half);
            s[(size_t)t * ld + j] = tot * scale;
        }
    }
}

/* out[t] [r] = sum_j p[t m + j] k_j[:r] for nh <= 4 weight rows and m keys (kst elements apart; float32, or bf16
   with half): 16 columns at a time for the four rows in registers across the keys, so nothing is stored until a
   column block is done */
static void mix4(const float *p, int m, int nh, const void *k, long kst, int r, float *out, int half) {
    const float *pt[4];
    for (int t = 0; t < 4; t++) pt[t] = p + (size_t)(t < nh ? t : 0) * m;
    int c0 = 0;
    for (; c0 + 16 <= r; c0 += 16) {
        __m256 a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
        for (int j = 0; j < m; j++) {
            const size_t kj = (size_t)j * kst + c0;
            const __m256 k0 = load8(k, kj, half), k1 = load8(k, kj + 8, half);
            for (int t = 0; t < 4; t++) {
                const __m256 pj = _mm256_broadcast_ss(pt[t] + j);
                a[2 * t] = _mm256_fmadd_ps(pj, k0, a[2 * t]);
                a[2 * t + 1] = _mm256_fmadd_ps(pj, k1, a[2 * t + 1]);
            }
        }
        for (int t = 0; t < nh; t++) {
            _mm256_storeu_ps(out + (size_t)t * r + c0, a[2 * t]);
            _mm256_storeu_ps(out + (size_t)t * r + c0 + 8, a[2 * t + 1]);
        }
    }
    for (int t = 0; t < nh; t++)
        for (int c = c0; c < r; c++) {
            float v = 0.f;
            for (int j = 0; j < m; j++) v += pt[t][j] * at1(k, (size_t)j * kst + c, half);
            out[(size_t)t * r + c] = v;
        }
}
#endif

/* ---- a decode step's attention: one new token per row ------------------------------------------------------ */
static void rope_head(float *x, const float *cs, const float *sn, int rd) {  /* halves convention, rd dims */
    const int h = rd / 2;
    for (int i = 0; i < h; i++) {
        const float a = x[i], b = x[i + h];
        x[i] = a * cs[i] - b * sn[i];
        x[i + h] = b * cs[i + h] + a * sn[i + h];
    }
}

/* For each row b: normalise each head of q [B, H, d] and k [B, Hkv, d] by RMS with weights qn / kn [d] where given
   (Qwen3's per-head qk norm), rotate them by its position's cos/sin [B, rd] (rd = 0: none), write
   k and v into the caches [slots, L, Hkv, d] at (slot[b], pos[b]), then attend over that slot's keys
   max(0, pos - window + 1) .. pos (window 0: all), head h reading kv head h / (H / Hkv), with an optional
   sink logit per head joining the softmax (gpt-oss). out [B, H, d]. q and k are normalised and rotated in place. */
/* a head's position: its qk norm (nw), rotary; with flags & 2 (ERNIE's rotary pairs (x0, x1), (x2, x3), ...) its
   dims reordered to halves first, as model.rotate reorders q and k alike (their dot products do not change); with
   flags & 4 (Hunyuan) the norm after the rotary. kq_attend's flags & 16: the caches hold bf16 (uint16), written
   rounded to nearest even as torch's .to(bfloat16) rounds, read back exactly. */
static void place_head(float *x, const float *nw, float eps, const float *cs, const float *sn, int rd, int d, int flags) {
    if (nw && !(flags & 4)) kq_rmsnorm(x, nw, x, 1, d, eps);
    if (flags & 2) {
        float t[d];
        for (int i = 0; i < d / 2; i++) { t[i] = x[2 * i]; t[d / 2 + i] = x[2 * i + 1]; }
        memcpy(x, t, sizeof(float) * d);
    }
    if (rd) rope_head(x, cs, sn, rd);
    if (nw && (flags & 4)) kq_rmsnorm(x, nw, x, 1, d, eps);
}
#ifdef KQ_SIMD
/* element i of a cache of float32, or (half) bf16, as a pointer */
static inline const void *at_el(const void *c, size_t i, int half) {
    return half ? (const void *)((const uint16_t *)c + i) : (const void *)((const float *)c + i);
}

/* Decode attention in chunks of CH positions (kq_attend's and kq_mla_block's). chunk_table: row b attends
   positions j0[b] .. pos[b] (a window's start, else 0), in chunks t0[b] .. t0[b + 1] - 1 of the T = t0[B] chunks.
   chunk_of: chunk t's row and its positions [*a, *a + *m). */
enum { CH = 64 };
static int *chunk_table(const int64_t *pos, int B, int window, int **j0_out) {
    int *t0 = malloc(sizeof(int) * (2 * B + 1)), *j0 = t0 + B + 1;
    t0[0] = 0;
    for (int b = 0; b < B; b++) {
        const int p = (int)pos[b];
        j0[b] = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
        t0[b + 1] = t0[b] + (p - j0[b] + CH) / CH;  /* p - j0 + 1 positions */
    }
    *j0_out = j0;
    return t0;
}
static inline int chunk_of(const int *t0, const int *j0, const int64_t *pos, int t, int *a, int *m) {
    int b = 0;
    while (t >= t0[b + 1]) b++;
    *a = j0[b] + (t - t0[b]) * CH;
    *m = (*a + CH < (int)pos[b] + 1 ? *a + CH : (int)pos[b] + 1) - *a;
    return b;
}

/* Flash decoding's merge: per (row b, head h), its chunks' softmax max and sum (pm [T, H, 2]) and weighted values
   (pc [T, H, w]) into out [B, H, w], in chunk order, so the result does not depend on the thread count; sinks[h]
   (or NULL) joins the denominator. */
static void merge_chunks(const float *pm, const float *pc, const int *t0, int B, int H, int w, const float *sinks,
                         float *out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (B * H >= 2)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H;
        float mx = sinks ? sinks[h] : -INFINITY, *o = out + (size_t)bh * w;
        for (int t = t0[b]; t < t0[b + 1]; t++) mx = fmaxf(mx, pm[((size_t)t * H + h) * 2]);
        float tot = sinks ? expf(sinks[h] - mx) : 0.f;
        for (int t = t0[b]; t < t0[b + 1]; t++) tot += expf(pm[((size_t)t * H + h) * 2] - mx) * pm[((size_t)t * H + h) * 2 + 1];
        memset(o, 0, sizeof(float) * w);
        for (int t = t0[b]; t < t0[b + 1]; t++) {
            const float f = expf(pm[((size_t)t * H + h) * 2] - mx) / tot, *pt = pc + ((size_t)t * H + h) * w;
            for (int c = 0; c < w; c++) o[c] += f * pt[c];
        }
    }
}

/* kq_attend's attention where the routines are built. A task is a chunk of CH positions of one row for all its
   heads: it reads the chunk's cached keys and values ([CH, Hkv, d], one contiguous block) once, whatever the heads,
   and a long context spreads over the threads however few rows and KV heads there are. Each chunk keeps each
   head's softmax max, sum and weighted values; they are merged after, in chunk order (flash decoding), the sink
   logit joining there, so the result does not depend on the thread count. Against a task per (row, KV head)
   reading its strided keys one position at a time: 1.66x decode tokens/s at 4096 positions (ab_decode.py). */
static void attend_chunks(const float *q, const void *kc, const void *vc, const int64_t *slot, const int64_t *pos,
                          int B, int H, int Hkv, int d, int L, int window, float scale, const float *sinks,
                          float *out, int threads, int half) {
    const int rep = H / Hkv;
    const size_t ld = (size_t)Hkv * d;  /* from one position's keys to the next */
    int *j0, *t0 = chunk_table(pos, B, window, &j0), T = t0[B];
    float *pm = malloc(sizeof(float) * (size_t)T * H * 2), *pc = malloc(sizeof(float) * (size_t)T * H * d);
    #pragma omp parallel for num_threads(threads) schedule(dynamic) if (T >= 2)
    for (int t = 0; t < T; t++) {
        int a, m;
        const int b = chunk_of(t0, j0, pos, t, &a, &m);
        const size_t first = ((size_t)slot[b] * L + a) * ld;
        float *sc = malloc(sizeof(float) * (size_t)H * m), *st = pm + (size_t)t * H * 2;
        for (int g = 0; g < Hkv; g++)
            for (int r0 = 0; r0 < rep; r0 += 4)
                scores4(q + ((size_t)b * H + g * rep + r0) * d, rep - r0 < 4 ? rep - r0 : 4,
                        at_el(kc, first + (size_t)g * d, half), ld, m, d, scale, sc + (size_t)(g * rep + r0) * m, m, half);
        for (int h = 0; h < H; h++) {
            float *sh = sc + (size_t)h * m, mx = max_of(sh, m, -INFINITY);
            st[2 * h] = mx, st[2 * h + 1] = exp_sum(sh, m, mx);
        }
        for (int g = 0; g < Hkv; g++)
            for (int r0 = 0; r0 < rep; r0 += 4)
                mix4(sc + (size_t)(g * rep + r0) * m, m, rep - r0 < 4 ? rep - r0 : 4, at_el(vc, first + (size_t)g * d, half),
                     ld, d, pc + ((size_t)t * H + g * rep + r0) * d, half);
        free(sc);
    }
    merge_chunks(pm, pc, t0, B, H, d, sinks, out, threads);
    free(t0);
    free(pm);
    free(pc);
}
#endif

void kq_attend(float *q, float *k, const float *v, void *kc, void *vc, const int64_t *slot, const int64_t *pos,
               const float *cs, const float *sn, int rd, int B, int H, int Hkv, int d, int L, int window,
               float scale, const float *sinks, const float *qn, const float *kn, float eps, float *out, int threads,
               int flags) {
    const int half = flags & 16;  /* bf16 caches */
    for (int b = 0; b < B; b++) {
        for (int g = 0; g < Hkv; g++) {
            float *kk = k + ((long)b * Hkv + g) * d;
            const float *vv = v + ((long)b * Hkv + g) * d;
            place_head(kk, kn, eps, cs + (long)b * rd, sn + (long)b * rd, rd, d, flags);
            const long at = (((long)slot[b] * L + pos[b]) * Hkv + g) * d;
            if (half)
                for (int c = 0; c < d; c++) ((uint16_t *)kc)[at + c] = tobf(kk[c]), ((uint16_t *)vc)[at + c] = tobf(vv[c]);
            else {
                memcpy((float *)kc + at, kk, sizeof(float) * d);
                memcpy((float *)vc + at, vv, sizeof(float) * d);
            }
        }
    }
#ifdef KQ_SIMD
    for (long bh = 0; bh < (long)B * H; bh++)
        place_head(q + bh * d, qn, eps, cs + (bh / H) * rd, sn + (bh / H) * rd, rd, d, flags);
    attend_chunks(q, kc, vc, slot, pos, B, H, Hkv, d, L, window, scale, sinks, out, threads, half);
#else
    const int rep = H / Hkv;
    /* per (row, kv head): its rep query heads read each cached key and value once */
    #pragma omp parallel for num_threads(threads) schedule(static) if (B * Hkv >= 2)
    for (int bg = 0; bg < B * Hkv; bg++) {
        const int b = bg / Hkv, g = bg % Hkv, h0 = g * rep;
        const int p = (int)pos[b], j0 = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0, n = p - j0 + 1;
        float *qq = q + ((long)b * H + h0) * d, *restrict o = out + ((long)b * H + h0) * d;
        for (int r = 0; r < rep; r++) place_head(qq + (long)r * d, qn, eps, cs + (long)b * rd, sn + (long)b * rd, rd, d, flags);
        float *restrict s = malloc(sizeof(float) * (size_t)n * rep), mx[rep], den[rep];
        const long first = (((long)slot[b] * L + j0) * Hkv + g) * d, ld = (long)Hkv * d;  /* ld: position to position */
        const float *kv0 = (const float *)kc + first, *vv0 = (const float *)vc + first;
        const uint16_t *kh0 = (const uint16_t *)kc + first, *vh0 = (const uint16_t *)vc + first;
        for (int r = 0; r < rep; r++) mx[r] = sinks ? sinks[h0 + r] : -INFINITY;
        for (int j = 0; j < n; j++)
            for (int r = 0; r < rep; r++) {
                const float v = (half ? dotbf(qq + (long)r * d, kh0 + j * ld, d) : dotf(qq + (long)r * d, kv0 + j * ld, d)) * scale;
                s[(long)r * n + j] = v;
                mx[r] = fmaxf(mx[r], v);
            }
        for (int r = 0; r < rep; r++) {
            float *sr = s + (long)r * n, t = sinks ? expf(sinks[h0 + r] - mx[r]) : 0.f;
            for (int j = 0; j < n; j++) sr[j] = expf(sr[j] - mx[r]);
            for (int j = 0; j < n; j++) t += sr[j];
            den[r] = 1.f / t;
        }
        for (int c = 0; c < rep * d; c++) o[c] = 0.f;
        float vb[half ? d : 1];
        for (int j = 0; j < n; j++) {
            const float *restrict vj = vv0 + j * ld;
            if (half) {
                for (int c = 0; c < d; c++) vb[c] = bf(vh0[j * ld + c]);
                vj = vb;
            }
            for (int r = 0; r < rep; r++) {
                const float pj = s[(long)r * n + j] * den[r];
                float *restrict orow = o + (long)r * d;
                for (int c = 0; c < d; c++) orow[c] += pj * vj[c];
            }
        }
        free(s);
    }
#endif
}

#ifdef KQ_SIMD
/* A decode step's attention half of a layer in one call, composing the routines above for few rows on forms:
   h = rmsnorm(x) ln; [q k v] = h Wqkv^T (or [q k] = h Wqk^T and v = h Wv^T, wv given); kq_attend (qk norm, rope,
   cache writes, attention); x += att Wo^T; hn = rmsnorm(x) ln2. x [B, D] is updated in place; q is H * d wide,
   k and v Hkv * d. One eps for all norms. With flags & 1, qn and kn normalise the whole q and k (H * d, Hkv * d
   wide) before attention, not each head; flags 2 and 4 go to kq_attend. bqkv (the stacked product's), bv and bo: the projections' biases, or NULL. */
void kq_attn_block(float *x, float *hn, int B, int D, const float *ln, const float *ln2, float eps,
                   const kmat *wqkv, const kmat *wv, const kmat *wo, void *kc, void *vc, const int64_t *slot,
                   const int64_t *pos, const float *cs, const float *sn, int rd, int H, int Hkv, int d, int L,
                   int window, float scale, const float *sinks, const float *qn, const float *kn, int flags,
                   const float *bqkv, const float *bv, const float *bo, int threads, int bf16) {
    const int full = flags & 1, gated = flags & 8;  /* OLMoE's qk norm, Qwen3-Next's output gate; 2, 4 and 16: kq_attend's */
    const int nq = H * d, nk = Hkv * d, nqp = gated ? 2 * nq : nq, N = nqp + 2 * nk,
              ld = wv ? nqp + nk : N;  /* ld: a row of the stacked product (a gated q: each head's q, then its gate) */
    float *h = malloc(sizeof(float) * (size_t)B * (2 * D + 2 * N + 3 * nq + 2 * nk));
    float *qkv = h + (size_t)B * D, *q = qkv + (size_t)B * N, *k = q + (size_t)B * nq, *v = k + (size_t)B * nk,
          *att = v + (size_t)B * nk, *o = att + (size_t)B * nq, *va = o + (size_t)B * D, *gt = va + (size_t)B * N;
    kq_rmsnorm(x, ln, h, B, D, eps);
    kq_linear(wqkv, h, B, qkv, threads, bf16);
    if (wv) kq_linear(wv, h, B, va, threads, bf16);
    for (int b = 0; b < B; b++) {  /* biases (gpt-oss, Qwen2-MoE): added to the products, as linear adds them */
        if (bqkv) for (int c = 0; c < ld; c++) qkv[(size_t)b * ld + c] += bqkv[c];
        if (bv) for (int c = 0; c < nk; c++) va[(size_t)b * nk + c] += bv[c];
    }
    for (int b = 0; b < B; b++) {
        if (gated)
            for (int hh = 0; hh < H; hh++) {
                memcpy(q + (size_t)b * nq + (size_t)hh * d, qkv + (size_t)b * ld + (size_t)hh * 2 * d, sizeof(float) * d);
                memcpy(gt + (size_t)b * nq + (size_t)hh * d, qkv + (size_t)b * ld + (size_t)hh * 2 * d + d, sizeof(float) * d);
            }
        else
            memcpy(q + (size_t)b * nq, qkv + (size_t)b * ld, sizeof(float) * nq);
        memcpy(k + (size_t)b * nk, qkv + (size_t)b * ld + nqp, sizeof(float) * nk);
        memcpy(v + (size_t)b * nk, wv ? va + (size_t)b * nk : qkv + (size_t)b * ld + nqp + nk, sizeof(float) * nk);
    }
    if (full) {  /* OLMoE's qk norm: over the whole projection, before the heads are split */
        kq_rmsnorm(q, qn, q, B, nq, eps);
        kq_rmsnorm(k, kn, k, B, nk, eps);
    }
    kq_attend(q, k, v, kc, vc, slot, pos, cs, sn, rd, B, H, Hkv, d, L, window, scale, sinks, full ? NULL : qn,
              full ? NULL : kn, eps, att, threads, flags & 22);
    if (gated) for (long i = 0; i < (long)B * nq; i++) att[i] *= 1.f / (1.f + expf(-gt[i]));
    kq_linear(wo, att, B, o, threads, bf16);
    if (bo) for (int b = 0; b < B; b++) for (int c = 0; c < D; c++) o[(size_t)b * D + c] += bo[c];
    for (long i = 0; i < (long)B * D; i++) x[i] += o[i];
    kq_rmsnorm(x, ln2, hn, B, D, eps);
    free(h);
}

/* DeepSeek's latent attention (MLA) for a decode step, absorbed as mla.attention runs it, in one call:
   h = rmsnorm(x) ln; q = h Wq^T, or (q_lora) q = rmsnorm(h Wqa^T + bqa) qan Wq^T; [latent k_rot] = h Wkva^T + bkva;
   the cache kc [slots, L, r + rope] gets [rmsnorm(latent) kvan, rope(k_rot)] at (slot, pos); each head's query
   moves into the latent space through kv_b's key half (wkvb [H, nope + vd, r], float), attends over the slot's
   latents, and kv_b's value half maps the result back; x += att Wo^T (+ bo); hn = rmsnorm(x) ln2. flags & 2: the
   rotary in pairs (mla.interleave), reordered to halves first as model.rotate does for q and k alike. With wkb
   [H r, nope] and wvb [H vd, r] (kv_b's halves per head as forms, r and vd multiples of 64) those products run on
   them (heads_linear): the float kv_b is 4 bytes a weight, and read whole each step it was half a step's time.
   flags & 16: the latent cache holds bf16, as kq_attend's caches may. */
void kq_mla_block(float *x, float *hn, int B, int D, const float *ln, const float *ln2, float eps,
                  const kmat *wqa, const float *qan, const kmat *wq, const kmat *wkva, const float *kvan,
                  const float *wkvb, const kmat *wo, void *kc, const int64_t *slot, const int64_t *pos,
                  const float *cs, const float *sn, int H, int nope, int rope, int vd, int r, int L, float scale,
                  int flags, const float *bqa, const float *bkva, const float *bo, const kmat *wkb, const kmat *wvb,
                  int threads, int bf16) {
    const int ql = wqa ? (int)wqa->N : 0, qd = nope + rope, kvw = r + rope, nq = H * qd, half = flags & 16;
    float *h = malloc(sizeof(float) * (size_t)B * (2 * D + ql + nq + kvw + H * vd + H * kvw + H * nope + 2 * H * r));
    float *qa = h + (size_t)B * D, *q = qa + (size_t)B * ql, *kva = q + (size_t)B * nq, *att = kva + (size_t)B * kvw,
          *o = att + (size_t)B * H * vd, *qry = o + (size_t)B * D,  /* qry [B, H, r + rope]: the absorbed queries */
          *qn = qry + (size_t)B * H * kvw, *qk = qn + (size_t)B * H * nope, *ctx = qk + (size_t)B * H * r;
    kq_rmsnorm(x, ln, h, B, D, eps);
    if (wqa) {
        kq_linear(wqa, h, B, qa, threads, bf16);
        if (bqa) for (int b = 0; b < B; b++) for (int c = 0; c < ql; c++) qa[(size_t)b * ql + c] += bqa[c];
        kq_rmsnorm(qa, qan, qa, B, ql, eps);
        kq_linear(wq, qa, B, q, threads, bf16);
    } else
        kq_linear(wq, h, B, q, threads, bf16);
    kq_linear(wkva, h, B, kva, threads, bf16);
    for (int b = 0; b < B; b++) {
        float *kv = kva + (size_t)b * kvw;
        const size_t at = ((size_t)slot[b] * L + pos[b]) * kvw;
        if (bkva) for (int c = 0; c < kvw; c++) kv[c] += bkva[c];
        kq_rmsnorm(kv, kvan, kv, 1, r, eps);
        place_head(kv + r, NULL, eps, cs + (long)b * rope, sn + (long)b * rope, rope, rope, flags & 2);
        if (half)
            for (int c = 0; c < kvw; c++) ((uint16_t *)kc)[at + c] = tobf(kv[c]);
        else
            memcpy((float *)kc + at, kv, sizeof(float) * kvw);
    }
    if (wkb) {  /* every head's q_nope through its k_b in one call */
        for (long bh = 0; bh < (long)B * H; bh++) memcpy(qn + bh * nope, q + bh * qd, sizeof(float) * nope);
        heads_linear(wkb, qn, B, H, qk, threads, bf16);
    }
    #pragma omp parallel for num_threads(threads) schedule(static) if (B * H >= 2)
    for (int bh = 0; bh < B * H; bh++) {  /* the absorbed queries: [q_nope k_b, rope(q_rot)] */
        const int b = bh / H, hh = bh % H;
        const float *qh = q + (size_t)bh * qd, *wk = wkvb + (size_t)hh * (nope + vd) * r;
        float *y = qry + (size_t)bh * kvw;
        if (wkb)
            memcpy(y, qk + (size_t)bh * r, sizeof(float) * r);
        else {
            for (int c = 0; c < r; c++) y[c] = 0.f;
            for (int dd = 0; dd < nope; dd++) {
                const float a = qh[dd], *wr = wk + (size_t)dd * r;
                for (int c = 0; c < r; c++) y[c] += a * wr[c];
            }
        }
        memcpy(y + r, qh + nope, sizeof(float) * rope);
        place_head(y + r, NULL, eps, cs + (long)b * rope, sn + (long)b * rope, rope, rope, flags & 2);
    }
    /* Every head of a row reads the one cached latent of each position, so a task is a row's chunk of CH positions
       for all its heads: each latent is read once, not once a head (16-128 times), and a long context spreads over
       the threads however few rows there are. Each chunk keeps its own softmax max, sum and context per head; they
       are merged after, in chunk order (flash decoding), so the result does not depend on the thread count. */
    int *j0, *t0 = chunk_table(pos, B, 0, &j0), T = t0[B];
    float *pm = malloc(sizeof(float) * (size_t)T * H * 2), *pc = malloc(sizeof(float) * (size_t)T * H * r);
    #pragma omp parallel for num_threads(threads) schedule(dynamic) if (T >= 2)
    for (int t = 0; t < T; t++) {
        int a, m;
        const int b = chunk_of(t0, j0, pos, t, &a, &m);
        const void *k0 = at_el(kc, ((size_t)slot[b] * L + a) * kvw, half);
        const float *qb = qry + (size_t)b * H * kvw;
        float *sc = malloc(sizeof(float) * (size_t)m * H), *cx = pc + (size_t)t * H * r, *st = pm + (size_t)t * H * 2;
        for (int hh = 0; hh < H; hh += 4) scores4(qb + (size_t)hh * kvw, H - hh < 4 ? H - hh : 4, k0, kvw, m, kvw, scale,
                                                  sc + (size_t)hh * m, m, half);
        for (int hh = 0; hh < H; hh++) {
            float *sh = sc + (size_t)hh * m, mx = max_of(sh, m, -INFINITY);
            st[2 * hh] = mx, st[2 * hh + 1] = exp_sum(sh, m, mx);
        }
        for (int hh = 0; hh < H; hh += 4)
            mix4(sc + (size_t)hh * m, m, H - hh < 4 ? H - hh : 4, k0, kvw, r, cx + (size_t)hh * r, half);
        free(sc);
    }
    merge_chunks(pm, pc, t0, B, H, r, NULL, ctx, threads);
    if (!wvb) {  /* float kv_b: each head's context through its value half */
        #pragma omp parallel for num_threads(threads) schedule(static) if (B * H >= 2)
        for (int bh = 0; bh < B * H; bh++) {
            const int b = bh / H, hh = bh % H;
            const float *wv = wkvb + ((size_t)hh * (nope + vd) + nope) * r, *cx = ctx + (size_t)bh * r;
            float *ot = att + (size_t)b * H * vd + (size_t)hh * vd;
            for (int v = 0; v < vd; v++) ot[v] = dotf(wv + (size_t)v * r, cx, r);
        }
    }
    free(t0);
    free(pm);
    free(pc);
    if (wvb) heads_linear(wvb, ctx, B, H, att, threads, bf16);  /* every head's context through its v_b */
    kq_linear(wo, att, B, o, threads, bf16);
    if (bo) for (int b = 0; b < B; b++) for (int c = 0; c < D; c++) o[(size_t)b * D + c] += bo[c];
    for (long i = 0; i < (long)B * D; i++) x[i] += o[i];
    kq_rmsnorm(x, ln2, hn, B, D, eps);
    free(h);
}

/* Qwen3-Next / Qwen3.5's linear attention (the gated delta rule) for a decode step, deltanet.delta_net_rows' one-token
   arithmetic in one call, on the projections as a GGUF import holds them: h = rmsnorm(x) ln; mixed = h Wqkv^T
   ([q (hk dk), k (hk dk), v (hv dv)]), z = h Wz^T, b and a = h Wb^T, h Wa^T (float [hv, D]); a causal depthwise conv
   (kernel K, weights cw [C, K]) over the slot's last K - 1 inputs (conv [slots, C, K - 1], shifted here) and this
   one, SiLU; q and k l2-normalised per key head (value head j reads key head j / (hv / hk)), q scaled by dk^-1/2;
   per value head the slot's state S [dk, dv] (st [slots, hv, dk, dv]) decays by exp(g), g = -exp(A_log)
   softplus(a + dt_bias), takes the delta correction (v - S^T k) sigmoid(b) along k, and gives S^T q; each head
   RMS-normalised, times nw [dv] and SiLU(z); x += that Wo^T; hn = rmsnorm(x) ln2. A row at position 0 starts
   from zero state. */
void kq_delta_block(float *x, float *hn, int B, int D, const float *ln, const float *ln2, float eps,
                    const kmat *wqkv, const kmat *wz, const float *wb, const float *wa, const float *cw, float *conv,
                    float *st, const int64_t *slot, const int64_t *pos, const float *alog, const float *dtb,
                    const float *nw, const kmat *wo, int hk, int hv, int dk, int dv, int K, int threads, int bf16) {
    const int C = 2 * hk * dk + hv * dv, nz = hv * dv, rep = hv / hk;
    float *h = malloc(sizeof(float) * (size_t)B * (2 * D + C + nz + 2 * hv + nz));
    float *mx = h + (size_t)B * D, *z = mx + (size_t)B * C, *ba = z + (size_t)B * nz, *out = ba + (size_t)B * 2 * hv,
          *o = out + (size_t)B * nz;
    kq_rmsnorm(x, ln, h, B, D, eps);
    kq_linear(wqkv, h, B, mx, threads, bf16);
    kq_linear(wz, h, B, z, threads, bf16);
    for (int b = 0; b < B; b++)
        for (int j = 0; j < hv; j++) {
            ba[(size_t)b * 2 * hv + j] = dotf(h + (size_t)b * D, wb + (size_t)j * D, D);
            ba[(size_t)b * 2 * hv + hv + j] = dotf(h + (size_t)b * D, wa + (size_t)j * D, D);
        }
    for (int b = 0; b < B; b++) {  /* the conv over the slot's last K - 1 inputs and this one, then SiLU */
        float *cp = conv + (size_t)slot[b] * C * (K - 1), *m = mx + (size_t)b * C;
        if (pos[b] == 0) {
            memset(cp, 0, sizeof(float) * (size_t)C * (K - 1));
            memset(st + (size_t)slot[b] * hv * dk * dv, 0, sizeof(float) * (size_t)hv * dk * dv);
        }
        for (int c = 0; c < C; c++) {
            float *pc = cp + (size_t)c * (K - 1), acc = cw[(size_t)c * K + K - 1] * m[c];
            for (int k = 0; k < K - 1; k++) acc += cw[(size_t)c * K + k] * pc[k];
            for (int k = 0; k + 1 < K - 1; k++) pc[k] = pc[k + 1];
            if (K > 1) pc[K - 2] = m[c];
            m[c] = silu(acc);
        }
        for (int g = 0; g < 2 * hk; g++) {  /* q heads, then k heads: l2-normalised */
            float *v = m + (size_t)g * dk, ss = 0.f;
            for (int c = 0; c < dk; c++) ss += v[c] * v[c];
            const float inv = 1.f / sqrtf(ss + 1e-6f) * (g < hk ? 1.f / sqrtf((float)dk) : 1.f);
            for (int c = 0; c < dk; c++) v[c] *= inv;
        }
    }
    #pragma omp parallel for num_threads(threads) schedule(static) if (B * hv >= 2)
    for (int bj = 0; bj < B * hv; bj++) {
        const int b = bj / hv, j = bj % hv;
        const float *m = mx + (size_t)b * C, *q = m + (size_t)(j / rep) * dk, *k = m + (size_t)(hk + j / rep) * dk,
                    *v = m + (size_t)2 * hk * dk + (size_t)j * dv;
        const float av = ba[(size_t)b * 2 * hv + hv + j] + dtb[j], sp = av > 20.f ? av : log1pf(expf(av));
        const float decay = expf(-expf(alog[j]) * sp), beta = 1.f / (1.f + expf(-ba[(size_t)b * 2 * hv + j]));
        float *S = st + ((size_t)slot[b] * hv + j) * dk * dv, mem[dv], *y = out + (size_t)b * nz + (size_t)j * dv;
        for (int c = 0; c < dv; c++) mem[c] = 0.f;
        for (int r = 0; r < dk; r++) {
            float *Sr = S + (size_t)r * dv;
            const float kr = k[r];
            for (int c = 0; c < dv; c++) mem[c] += (Sr[c] *= decay) * kr;
        }
        for (int c = 0; c < dv; c++) mem[c] = (v[c] - mem[c]) * beta;  /* the correction, delta */
        for (int c = 0; c < dv; c++) y[c] = 0.f;
        for (int r = 0; r < dk; r++) {
            float *Sr = S + (size_t)r * dv;
            const float kr = k[r], qr = q[r];
            for (int c = 0; c < dv; c++) y[c] += (Sr[c] += kr * mem[c]) * qr;
        }
        float ss = 0.f;  /* gated RMS norm of the head */
        for (int c = 0; c < dv; c++) ss += y[c] * y[c];
        const float inv = 1.f / sqrtf(ss / (float)dv + eps), *zz = z + (size_t)b * nz + (size_t)j * dv;
        for (int c = 0; c < dv; c++) y[c] = nw[c] * (y[c] * inv) * silu(zz[c]);
    }
    kq_linear(wo, out, B, o, threads, bf16);
    for (long i = 0; i < (long)B * D; i++) x[i] += o[i];
    kq_rmsnorm(x, ln2, hn, B, D, eps);
    free(h);
}

/* A decode step's layers, one after another, in one call where every layer is kq_attn_block's, routed by
   kq_route and runs all its experts on host forms (a budget-0 table, as kq_moe takes it): per layer, the
   attention half, the router on its output, kq_moe of the layer's experts, the sum added to x [B, D]. Each
   layer's 40 int64 fields (pointers as integers): ln, ln2, wqkv, wv, wo, kc, vc, window, sinks, q norm, k norm,
   router weight, router bias, choice bias, the experts' descriptors, their count, their ids, the cache length,
   kq_attn_block's flags (q/k norms over the whole projection, rotary pairs, norms after the rotary), the qkv, v and o biases, gpt-oss's expert biases (gate,
   up, down: kq_moe_act's), a shared expert's or a dense layer's (gate, up, down) descriptors, its gate vector
   (Qwen2-MoE: its output times sigmoid(h . g)) and whether the layer routes (0: a dense layer, its MLP the
   shared one alone); then whether its attention is latent (kq_mla_block's, wqkv its q (or q_b) and kc its latents),
   its q_a form, q_a norm, kv_a form, kv_a norm, kv_b, q_a and kv_a biases, nope, v and rank dims and k_b's form
   (v_b's in wv's field); or (2) whether it is a linear-attention layer (kq_delta_block's: in_proj_qkv, z and
   out_proj in wqkv's, wv's and wo's fields, its conv inputs and state in kc's and vc's, then b and a, the conv
   weights, A_log, dt_bias, the norm weight and hk, hv, dk, dv, K); fl[3l .. 3l+2] its attention scale and gpt-oss's limit and alpha. Writes each routed
   layer's probs [B, E], weights and ids [B, k] and how many experts ran, for the caller's accounting; the
   arithmetic is the routines', in their order (a shared expert's sum added to the routed one's, as the
   model adds them), bit for bit but for the shared gate's dot product. With held [nl, E] (a fast tier that holds
   some experts: the table's others are NULL), a layer routed to an expert it does not hold stops the call after
   routing: its MLP input goes to hn_out [B, D] and the layer's index is returned, x holding its attention; else nl. */
int kq_layers(const int64_t *lf, const float *fl, int nl, float *x, int B, int D, float eps,
              const int64_t *slot, const int64_t *pos, const float *cs, const float *sn, int rd, int H, int Hkv,
              int d, int E, int k, int sigmoid, int norm, float rscale, int ng, int tg, float *probs, float *w,
              int64_t *ids, int *ran, int threads, int bf16, const uint8_t *held, float *hn_out) {
    float *hn = malloc(sizeof(float) * ((size_t)B * D * 3 + B)), *out = hn + (size_t)B * D, *out2 = out + (size_t)B * D,
          *sg = out2 + (size_t)B * D;
    int64_t *zeros = calloc(B + 1, sizeof(int64_t));
    for (int l = 0; l < nl; l++) {
        const int64_t *f = lf + (size_t)l * 40;
#define F_(i, T) ((T)(intptr_t)f[i])
        if (f[28] == 2)  /* a linear-attention layer: wqkv, wz (wv's field), wo; conv and state in kc's and vc's; 29-39 */
            kq_delta_block(x, hn, B, D, F_(0, const float *), F_(1, const float *), eps, F_(2, const kmat *),
                           F_(3, const kmat *), F_(29, const float *), F_(30, const float *), F_(31, const float *),
                           F_(5, float *), F_(6, float *), slot, pos, F_(32, const float *), F_(33, const float *),
                           F_(34, const float *), F_(4, const kmat *), (int)f[35], (int)f[36], (int)f[37], (int)f[38],
                           (int)f[39], threads, bf16);
        else if (f[28] == 1)  /* DeepSeek's latent attention: its fields 29-38 */
            kq_mla_block(x, hn, B, D, F_(0, const float *), F_(1, const float *), eps, F_(29, const kmat *),
                         F_(30, const float *), F_(2, const kmat *), F_(31, const kmat *), F_(32, const float *),
                         F_(33, const float *), F_(4, const kmat *), F_(5, float *), slot, pos, cs, sn, H, (int)f[36], rd,
                         (int)f[37], (int)f[38], (int)f[17], fl[3 * l], (int)f[18], F_(34, const float *),
                         F_(35, const float *), F_(21, const float *), F_(39, const kmat *), F_(3, const kmat *),
                         threads, bf16);
        else kq_attn_block(x, hn, B, D, F_(0, const float *), F_(1, const float *), eps, F_(2, const kmat *),
                      F_(3, const kmat *), F_(4, const kmat *), F_(5, float *), F_(6, float *), slot, pos, cs, sn, rd,
                      H, Hkv, d, (int)f[17], (int)f[7], fl[3 * l], F_(8, const float *), F_(9, const float *),
                      F_(10, const float *), (int)f[18], F_(19, const float *), F_(20, const float *),
                      F_(21, const float *), threads, bf16);
        float *pl = probs + (size_t)l * B * E, *wl = w + (size_t)l * B * k;
        int64_t *il = ids + (size_t)l * B * k;
        memset(out, 0, sizeof(float) * (size_t)B * D);
        ran[l] = 0;
        if (f[27]) {
            kq_route(hn, F_(11, const float *), F_(12, const float *), F_(13, const float *), B, D, E, k, sigmoid, norm,
                     rscale, ng, tg, pl, wl, il);
            if (held) {  /* a routed expert the table does not hold: the caller reads it, runs the layer's MLP, goes on */
                const uint8_t *hl = held + (size_t)l * E;
                int all = 1;
                for (long r = 0; r < (long)B * k; r++) all &= hl[il[r]];
                if (!all) {
                    memcpy(hn_out, hn, sizeof(float) * (size_t)B * D);
                    free(zeros);
                    free(hn);
                    return l;
                }
            }
            ran[l] = moe_(F_(14, const kmat **), (int)f[15], F_(16, const int64_t *), il, wl, k, hn, B, out, threads,
                          bf16, F_(22, const float *), F_(23, const float *), F_(24, const float *), fl[3 * l + 1],
                          fl[3 * l + 2]);
        }
        if (f[25]) {  /* the shared expert (or a dense layer's MLP) as a one-expert table, each row weighted 1 or its gate */
            const float *g = F_(26, const float *);
            for (int b = 0; b < B; b++) sg[b] = g ? 1.f / (1.f + expf(-dotf(hn + (size_t)b * D, g, D))) : 1.f;
            memset(out2, 0, sizeof(float) * (size_t)B * D);
            moe_(F_(25, const kmat **), 1, zeros, zeros, sg, 1, hn, B, out2, threads, bf16, NULL, NULL, NULL, 0.f, 0.f);
            for (long i = 0; i < (long)B * D; i++) out[i] += out2[i];
        }
        for (long i = 0; i < (long)B * D; i++) x[i] += out[i];
#undef F_
    }
    free(zeros);
    free(hn);
    return nl;
}
#endif
