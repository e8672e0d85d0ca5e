/* libm-free log, expm1 and exponential variates for the sampler (see lmath.c for why). */
#ifndef LUM_LMATH_H
#define LUM_LMATH_H
#include <stdint.h>
#include "hidden.h"
double lum_log(double x);        /* x > 0, finite */
double lum_expm1_neg(double x);  /* exp(-x) - 1 for x >= 0 */
/* xorshift64* step; a zero state is moved off its fixed point. */
static inline uint64_t lum_rand64(uint64_t *state)
{
    uint64_t x = *state;
    if (__builtin_expect(!x, 0))
        x = 0x853c49e6748fea9bULL; /* xorshift has a fixed point at 0 */
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545f4914f6cdd1dULL; /* xorshift64*: the high bits are the good ones */
}

/* The double whose bits are `bits`, built in a register from an immediate: a constant the
 * sampling path would otherwise load from .rodata, a line that is out of cache at every sample
 * (one in 512 KiB allocated) and that nothing else in malloc's paths reads. */
static inline double lum_double_imm(uint64_t bits)
{
    double d;
    __asm__("" : "+r"(bits));
    __builtin_memcpy(&d, &bits, sizeof d);
    return d;
}

/* Exponential with mean 1 from the generator state *rng, by the ziggurat (lmath.c).  Inline:
 * 98.9 % of draws end after the one compare here. */
#define LUM_ZIG_N 256
struct __attribute__((aligned(16))) lum_zig_layer {
    uint64_t k;
    double w;
};
extern LUM_HIDDEN const struct lum_zig_layer lum_zig[LUM_ZIG_N];
double lum_exp_variate_slow(uint64_t *rng, uint64_t r);
static inline double lum_exp_variate(uint64_t *rng)
{
    /* the layer from the top 8 bits, the abscissa from the 53 below (xorshift64*'s low bits
     * are its weak ones) */
    uint64_t r = lum_rand64(rng), j = (r >> 3) & (((uint64_t)1 << 53) - 1);
    unsigned i = (unsigned)(r >> 56);
    if (__builtin_expect(j < lum_zig[i].k, 1))
        return (double)j * lum_zig[i].w;
    return lum_exp_variate_slow(rng, r);
}
#endif
