/* libm-free log and expm1 for the sampler (see lmath.c for why). */
#ifndef LUM_LMATH_H
#define LUM_LMATH_H
double lum_log(double x);        /* x > 0, finite */
double lum_expm1_neg(double x);  /* exp(-x) - 1 for x >= 0 */
#endif
