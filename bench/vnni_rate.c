// Issue rate of the two training kernels' instructions on this CPU, from registers only:
// `vpdpbusd` (64 int8 multiply-adds) and `vdpbf16ps` (32 bf16 multiply-adds) on zmm, 12
// independent accumulators, and `vpdpbusd` fed as the two-limb kernel feeds it (one
// activation broadcast from memory per two instructions). One thread.
// (The loops must unroll, so that the accumulators stay in registers: GCC or Clang, -O2.)
//   cc -O2 -mavx512f -mavx512bw -mavx512vnni -mavx512bf16 bench/vnni_rate.c -o /tmp/vnni_rate && /tmp/vnni_rate
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int act[1024];

int main(void) {
    const long n = 100000000;
    __m512i a = _mm512_set1_epi32(0x01020304), b = _mm512_set1_epi32(0x01010101);
    __m512i acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_epi32(i);
    double t0 = now();
    for (long i = 0; i < n; i++) {
#pragma GCC unroll 12
        for (int j = 0; j < 12; j++) acc[j] = _mm512_dpbusd_epi32(acc[j], a, b);
        __asm__ volatile("" : "+v"(a));
    }
    double t = now() - t0;
    __m512i s = acc[0];
    for (int i = 1; i < 12; i++) s = _mm512_add_epi32(s, acc[i]);
    printf("vpdpbusd zmm: %.2f G/s (check %d)\n", 12.0 * n / t / 1e9, _mm512_reduce_add_epi32(s));

    __m512 f[12];
    for (int i = 0; i < 12; i++) f[i] = _mm512_set1_ps((float)i);
    __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = x;
    t0 = now();
    for (long i = 0; i < n; i++) {
#pragma GCC unroll 12
        for (int j = 0; j < 12; j++) f[j] = _mm512_dpbf16_ps(f[j], x, y);
        __asm__ volatile("" : "+v"(x));
    }
    t = now() - t0;
    __m512 fs = f[0];
    for (int i = 1; i < 12; i++) fs = _mm512_add_ps(fs, f[i]);
    printf("vdpbf16ps zmm: %.2f G/s (check %g)\n", 12.0 * n / t / 1e9, _mm512_reduce_add_ps(fs));

    for (int i = 0; i < 1024; i++) act[i] = i * 7;
    for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_epi32(i);
    t0 = now();
    for (long i = 0; i < n; i++) {
        const int *p = act + ((i * 8) & 1023);
        __asm__ volatile("" : "+r"(p));
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++) {
            __m512i v = _mm512_set1_epi32(p[r]);
            acc[2 * r] = _mm512_dpbusd_epi32(acc[2 * r], a, v);
            acc[2 * r + 1] = _mm512_dpbusd_epi32(acc[2 * r + 1], b, v);
        }
    }
    t = now() - t0;
    s = acc[0];
    for (int i = 1; i < 16; i++) s = _mm512_add_epi32(s, acc[i]);
    printf("vpdpbusd zmm, a broadcast load per two: %.2f G/s (check %d)\n", 16.0 * n / t / 1e9,
           _mm512_reduce_add_epi32(s));
    return 0;
}
