/* Vector types and dtype conversions shared by fold_kernel.c and rows_kernel.c (GCC/Clang vector
 * extensions, no intrinsics: the same source vectorizes for AVX-512, AVX2, SSE and NEON). */
#ifndef LIEDEPLOY_KERNEL_VEC_H
#define LIEDEPLOY_KERNEL_VEC_H

#include <stdint.h>
#include <string.h>

#define VW 16

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));

enum { F32 = 0, F16 = 1, BF16 = 2 };

/* x - (+0) is x for every x (-0 included, unlike 0 + x), so the compiler drops it and broadcasts x
 * straight from memory; 0 + x cost an add and a register broadcast per use (a third of the rank
 * loop of the blocked fold). */
static inline vf splat(float x) { vf v = {0}; return x - v; }
static inline vu splatu(uint32_t x) { vu v = {0}; return v + x; }
static inline vf sel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
static inline vu selu(vi m, vu a, vu b) { return (vu)(((vu)m & a) | (~(vu)m & b)); }

/* float32 -> float16, round to nearest even (F. Giesen's float_to_half_fast3_rtne, vectorized). */
static inline vh to_f16(vf x) {
    vu f = (vu)x;
    vu sign = f & 0x80000000u;
    f ^= sign;
    vu big = selu((vi)(f > 0x7f800000u), splatu(0x7e00u), splatu(0x7c00u));
    const vf denorm_magic = (vf)splatu(((127u - 15u) + (23u - 10u) + 1u) << 23);
    vu sub = (vu)((vf)f + denorm_magic) - (vu)denorm_magic;
    vu mant_odd = (f >> 13) & 1u;
    vu norm = (f + (((uint32_t)(15 - 127) << 23) + 0xfffu) + mant_odd) >> 13;
    vu o = selu((vi)(f >= ((127u + 16u) << 23)), big, selu((vi)(f < (113u << 23)), sub, norm));
    return __builtin_convertvector(o | (sign >> 16), vh);
}

static inline vf from_f16(vh h16) {
    vu h = __builtin_convertvector(h16, vu);
    const vu shifted_exp = splatu(0x7c00u << 13);
    vu o = (h & 0x7fffu) << 13;
    vu e = o & shifted_exp;
    o += (127u - 15u) << 23;
    vi inf = (vi)(e == shifted_exp), zero = (vi)(e == 0u);
    o = selu(inf, o + ((128u - 16u) << 23), o);
    vf sub = (vf)(o + (1u << 23)) - (vf)splatu(113u << 23);
    o = selu(zero, (vu)sub, o);
    return (vf)(o | ((h & 0x8000u) << 16));
}

static inline vh to_bf16(vf x) {
    vu u = (vu)x;
    vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vi nan = (vi)((u & 0x7fffffffu) > 0x7f800000u);
    return __builtin_convertvector(selu(nan, (u >> 16) | 0x40u, rounded), vh);
}

static inline vf load_w(const void *w, int64_t i, int dt) {
    if (dt == F32) { vf v; memcpy(&v, (const float *)w + i, sizeof v); return v; }
    vh h; memcpy(&h, (const uint16_t *)w + i, sizeof h);
    if (dt == F16) return from_f16(h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

#endif
