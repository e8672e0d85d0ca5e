/* The elementary functions the sampler needs, so that lumalloc does not pull libm (and its
 * ~0.5 MiB of resident text) into every process it is preloaded into.  Relative error below
 * 1e-12 over the ranges used: plenty for drawing exponential intervals and weights.  And the
 * exponential draw itself. */
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include "lmath.h"

#define LN2 0.69314718055994530942

/* log(x), x > 0 and finite: x = m * 2^e with m in [sqrt(1/2), sqrt(2)), then
 * log(m) = 2 atanh((m - 1) / (m + 1)) by its odd series (|s| < 0.172). */
double lum_log(double x)
{
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    int e = (int)((bits >> 52) & 0x7ff) - 1023;
    bits = (bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL; /* m in [1, 2) */
    double m;
    memcpy(&m, &bits, sizeof m);
    if (m > 1.4142135623730951) {
        m *= 0.5;
        e++;
    }
    double s = (m - 1) / (m + 1), s2 = s * s;
    /* Horner over constant coefficients: the loop it replaces divided 1.0 / k at every step
     * (gcc does not fold that), 83 of the draw's 155 instructions a sample. */
    double series =
        1.0 + s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 * (1.0 / 9 + s2 * (1.0 / 11 +
        s2 * (1.0 / 13 + s2 * (1.0 / 15 + s2 * (1.0 / 17 + s2 * (1.0 / 19)))))))));
    return 2 * s * series + e * LN2;
}

/* 1 / k!, for the series below: constants, so that each term is a multiply and an add (the
 * loop it replaces divided by k at every step, ~180 instructions a call; the sampler's
 * ziggurat calls it on ~2 % of its draws). */
static const double inv_fact[18] = {
    1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320,
    1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0,
    1.0 / 87178291200.0, 1.0 / 1307674368000.0, 1.0 / 20922789888000.0, 1.0 / 355687428096000.0,
};

/* sum of inv_fact[k] y^k for k from lo to 17 (Horner) */
static inline double series(double y, int lo)
{
    double p = inv_fact[17];
#pragma GCC unroll 17
    for (int k = 16; k >= lo; k--)
        p = p * y + inv_fact[k];
    return p;
}

/* expm1(-x) for x >= 0, i.e. exp(-x) - 1, accurate also for tiny x where 1 - exp(-x) would
 * cancel: the Taylor series below 0.5 (its 17th term under 1e-20), range reduction by powers
 * of two above (r in [0, ln 2): the 17th term under 2e-17). */
double lum_expm1_neg(double x)
{
    if (x < 0.5)
        return -x * series(-x, 1);
    if (x > 745) return -1.0;
    int k = (int)(x / LN2);
    double r = x - k * LN2; /* in [0, ln 2) */
    double sum = series(-r, 0);
    /* exp(-x) = exp(-r) * 2^-k, scaled through the exponent field */
    uint64_t bits = (uint64_t)(1023 - k) << 52;
    double scale;
    if (k >= 1023) return -1.0;
    memcpy(&scale, &bits, sizeof scale);
    return sum * scale - 1;
}

/* ---- exponential variates ----
 * The sampler draws one per sample.  -log(u) costs ~90 instructions with the series above;
 * the ziggurat of Marsaglia and Tsang ("The Ziggurat Method for Generating Random Variables",
 * 2000) returns 98.9 % of its draws after one table compare and one multiply, and is exact:
 * the rest (wedges and the tail) are accepted or rejected against exp() itself.  Unlike their
 * 32-bit version, the layer index and the abscissa come from different bits of one 64-bit
 * draw (Doornik 2005: sharing them correlates the two), both from its high bits: xorshift64*'s
 * low bits are its weak ones. */
#define ZR 7.69711747013104972   /* where the tail starts */
#define ZV 3.949659822581572e-3  /* every layer's area (scripts/gen_zig_tables.py) */
/* The tables (lum_zig) are constants from scripts/gen_zig_tables.py
 * (lib/zig_tables.c): built by the first draw, they cost a short run ~2 instructions a sample
 * (bench ring's quick run).  The layers' heights exp(-x_i) are computed where the wedge test
 * needs them (one draw in ~45), one exp() more there, rather than read from a third 2 KiB
 * table: the library's read-only data fits in a page less, resident in every process. */

static double exp_neg(double x)
{
    return 1 + lum_expm1_neg(x);
}

/* uniform in (0, 1]: log() stays finite */
static inline double uniform01(uint64_t *rng)
{
    return (double)((lum_rand64(rng) >> 11) + 1) * 0x1.0p-53;
}

double lum_exp_variate_slow(uint64_t *rng, uint64_t r)
{
    for (;;) {
        uint64_t j = (r >> 3) & (((uint64_t)1 << 53) - 1);
        unsigned i = (unsigned)(r >> 56);
        double x = (double)j * lum_zig[i].w;
        if (j < lum_zig[i].k)
            return x;
        if (i == 0) /* the tail beyond ZR is ZR plus an exponential, by memorylessness */
            return ZR - lum_log(uniform01(rng));
        /* the wedge of layer i lies between heights exp(-x_i) and exp(-x_{i-1}), which the
         * tables were built from as exp(-x_{i-1}) = exp(-x_i) + ZV / x_i (x_i is lum_zig[i].w
         * * 2^53 exactly; the top layer's x_0 is 0, its height 1) */
        double xi = (double)((uint64_t)1 << 53) * lum_zig[i].w;
        double lo = exp_neg(xi), hi = i > 1 ? lo + ZV / xi : 1;
        if (lo + uniform01(rng) * (hi - lo) < exp_neg(x))
            return x;
        r = lum_rand64(rng);
    }
}
