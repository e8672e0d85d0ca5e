/* The Poisson sampler: exponential intervals (mean, spread, tail), the unbiased weight formula,
 * unbiasedness of the estimator over a mixed-size stream, and the sample hooks' bookkeeping and
 * recursion guard. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>
#include "observe.h"
#include "options.h"
#include "obs_internal.h"
#include "lumalloc_prof.h"

static void test_interval_distribution(void **state)
{
    (void)state;
    const double T = 512 * 1024;
    assert_int_equal(lum_opt.sample_interval, 512 * 1024);
    uint64_t rng = 12345;
    const int n = 1000000;
    double sum = 0, sum2 = 0;
    int above_mean = 0, above_3 = 0;
    for (int i = 0; i < n; i++) {
        int64_t v = lum_sampler_next_interval(&rng);
        assert_true(v >= 0);
        sum += (double)v;
        sum2 += (double)v * (double)v;
        above_mean += v > T;
        above_3 += v > 3 * T;
    }
    double mean = sum / n, var = sum2 / n - mean * mean;
    /* Exponential(T): mean T (sd of the mean T/1000), variance T^2, P(X > T) = e^-1,
     * P(X > 3T) = e^-3.  Tolerances are > 5 standard errors. */
    printf("mean %.0f (T %.0f), sd/T %.4f, P(>T) %.4f, P(>3T) %.5f\n", mean, T, sqrt(var) / T,
           (double)above_mean / n, (double)above_3 / n);
    assert_true(fabs(mean / T - 1) < 0.006);
    assert_true(fabs(sqrt(var) / T - 1) < 0.01);
    assert_true(fabs((double)above_mean / n - exp(-1)) < 0.003);
    assert_true(fabs((double)above_3 / n - exp(-3)) < 0.0015);
}

static void test_interval_off_and_zero_seed(void **state)
{
    (void)state;
    uint64_t rng = 0; /* a zero state must not get stuck */
    int64_t a = lum_sampler_next_interval(&rng);
    assert_true(rng != 0);
    int64_t b = lum_sampler_next_interval(&rng);
    assert_true(a != b);
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    assert_true(lum_sampler_next_interval(&rng) == INT64_MAX);
    assert_int_equal(lum_options_set("sample_interval", "512k"), 0);
}

static void test_weight_formula(void **state)
{
    (void)state;
    const uint64_t T = 512 * 1024;
    static const uint64_t sizes[] = {1, 16, 100, 4096, 65536, 524288, 1 << 20, 64u << 20};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        double s = (double)sizes[i];
        double want = s / (1 - exp(-s / (double)T));
        double got = lum_sample_weight(sizes[i], T);
        assert_true(fabs(got - want) <= want * 1e-9);
    }
    /* Limits: s << T gives ~ T + s/2; s >> T gives ~ s. */
    assert_true(fabs(lum_sample_weight(16, T) - ((double)T + 8)) < 0.01);
    assert_true(fabs(lum_sample_weight(1ull << 40, T) - (double)(1ull << 40)) < 1);
    assert_true(lum_sample_weight(0, T) > 0); /* malloc(0) counts as 1 byte */
    assert_true(lum_sample_weight(100, 0) == 100);
}

/* Simulates the core's countdown over a stream of mixed sizes and checks that the summed
 * weights estimate the bytes (and objects) of each size class without bias. */
static void test_estimator_unbiased(void **state)
{
    (void)state;
    static const uint64_t sizes[] = {24, 200, 3000, 70000, 900000};
    double truth_b[5] = {0}, est_b[5] = {0}, truth_o[5] = {0}, est_o[5] = {0};
    /* The estimator's property does not depend on T; a small T gives many samples (~26000 per
     * class here), so a 3% tolerance is > 5 standard errors. */
    const uint64_t T = 32 * 1024;
    assert_int_equal(lum_options_set("sample_interval", "32k"), 0);
    uint64_t rng = 99;
    int64_t countdown = lum_sampler_next_interval(&rng);
    uint64_t x = 7;
    for (long i = 0; i < 40000000; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        /* Equal byte shares across classes: class probability ~ 1/size (out of 2^20). */
        unsigned k = (unsigned)(x >> 33) & ((1u << 20) - 1);
        unsigned cls = k < 25 ? 4 : k < 343 ? 3 : k < 7773 ? 2 : k < 118773 ? 1 : 0;
        uint64_t s = sizes[cls];
        truth_b[cls] += (double)s;
        truth_o[cls] += 1;
        countdown -= (int64_t)s;
        if (countdown < 0) {
            double w = lum_sample_weight(s, T);
            est_b[cls] += w;
            est_o[cls] += w / (double)s;
            countdown = lum_sampler_next_interval(&rng);
        }
    }
    for (int c = 0; c < 5; c++) {
        printf("size %7llu: bytes est/truth %.4f, objects %.4f (truth %.3g bytes)\n",
               (unsigned long long)sizes[c], est_b[c] / truth_b[c], est_o[c] / truth_o[c],
               truth_b[c]);
        assert_true(fabs(est_b[c] / truth_b[c] - 1) < 0.03);
        assert_true(fabs(est_o[c] / truth_o[c] - 1) < 0.03);
    }
    assert_int_equal(lum_options_set("sample_interval", "512k"), 0);
}

static __attribute__((noinline)) void take_sample(struct lum_thread_counters_v1 *tc, void *p,
                                                  size_t s)
{
    lum_on_sample(tc, p, s, s);
    __asm__ volatile("" ::: "memory"); /* not a tail call: keep this frame */
}

static void test_sample_hooks(void **state)
{
    (void)state;
    struct lum_thread_counters_v1 tc;
    memset(&tc, 0, sizeof tc);
    struct lum_prof_stats before, after;
    lum_prof_get_stats(&before);
    static char blocks[4][64];
    uint64_t expect = 0;
    for (int i = 0; i < 4; i++) {
        take_sample(&tc, blocks[i], 64);
        expect += (uint64_t)(lum_sample_weight(64, lum_opt.sample_interval) + 0.5);
    }
    assert_int_equal(tc.sampled_bytes, expect);
    lum_prof_get_stats(&after);
    assert_int_equal(after.samples - before.samples, 4);
    assert_int_equal(after.live_samples - before.live_samples, 4);
    assert_int_equal(after.unwinds - before.unwinds, 4);
    assert_true(after.unwind_frames > before.unwind_frames);
    printf("unwinding: %.2f us per stack, %.1f frames\n",
           (double)(after.unwind_ns - before.unwind_ns) / 1e3 / 4,
           (double)(after.unwind_frames - before.unwind_frames) / 4);

    /* Freeing an unsampled address is ignored; sampled ones leave the live set. */
    lum_on_sample_free(&tc, 64);
    for (int i = 0; i < 4; i++)
        lum_on_sample_free(blocks[i], 64);
    lum_prof_get_stats(&after);
    assert_int_equal(after.live_samples, before.live_samples);
    assert_int_equal(after.sample_frees - before.sample_frees, 4);

    /* The allocator samples by usable bytes: a 100-byte request served from a 128-byte block
     * was sampled with p(128), and stands for 100 / p(128) requested bytes. */
    uint64_t sb = tc.sampled_bytes;
    lum_on_sample(&tc, blocks[2], 100, 128);
    double want = 100.0 / -expm1(-128.0 / (double)lum_opt.sample_interval);
    assert_int_equal(tc.sampled_bytes - sb, (uint64_t)(want + 0.5));
    lum_on_sample_free(blocks[2], 128);

    /* Recursion guard: inside profiler code a sample is counted but nothing is unwound. */
    lum_prof_get_stats(&before);
    lum_obs_busy = 1;
    take_sample(&tc, blocks[0], 64);
    lum_obs_busy = 0;
    lum_prof_get_stats(&after);
    assert_int_equal(after.samples - before.samples, 1);
    assert_int_equal(after.unwinds, before.unwinds);
    lum_on_sample_free(blocks[0], 64);

    /* prof off, no tracer attached: no unwinding at all (the semaphore is zero). */
    assert_int_equal(lum_probe_semaphore("sample"), 0);
    assert_int_equal(lum_options_set("prof", "off"), 0);
    lum_prof_get_stats(&before);
    take_sample(&tc, blocks[1], 64);
    lum_prof_get_stats(&after);
    assert_int_equal(after.unwinds, before.unwinds);
    assert_int_equal(after.live_samples - before.live_samples, 1); /* still paired at free */
    lum_on_sample_free(blocks[1], 64);
    assert_int_equal(lum_options_set("prof", "on"), 0);
}

/* The unwinder caches a rule per return address, derived from the call frame information.
 * Frames with a variable stack size (alloca) are the case a wrong rule would get wrong: walk the
 * same recursion at several depths and alloca sizes, each twice (the first walk may derive the
 * rules, the second is the cache's), and check the stacks agree with each other and with the
 * shape of the recursion. */
static __attribute__((noinline)) uint32_t unwind_at(int n, size_t pad, uint64_t *frames)
{
    volatile char *buf = __builtin_alloca(pad);
    buf[0] = (char)n;
    uint32_t d;
    if (n) {
        d = unwind_at(n - 1, pad, frames);
    } else {
        lum_obs_busy = 1;
        d = lum_unwind(frames, LUM_MAX_FRAMES, 0); /* 0: drop nothing (from lum_unwind's caller) */
        lum_obs_busy = 0;
    }
    __asm__ volatile("" ::: "memory"); /* not a tail call: keep this frame */
    return d + (uint32_t)buf[0] * 0;
}

static void test_cached_unwind(void **state)
{
    (void)state;
    static const size_t pads[] = {16, 5000, 200, 70000};
    uint64_t ref[LUM_MAX_FRAMES], a[LUM_MAX_FRAMES], b[LUM_MAX_FRAMES];
    uint32_t ref_tail = 0;
    for (size_t p = 0; p < sizeof pads / sizeof *pads; p++) {
        for (int n = 0; n <= 6; n++) {
            uint32_t d[2];
            uint64_t *dst[2] = {a, b};
            for (volatile int i = 0; i < 2; i++) /* one call site (volatile: not unrolled) */
                d[i] = unwind_at(n, pads[p], dst[i]);
            uint32_t da = d[0], db = d[1];
            assert_int_equal(da, db);
            assert_memory_equal(a, b, da * sizeof *a);
            assert_true(da > (uint32_t)n + 2);
            /* a[0] is unwind_at's call of lum_unwind, a[1..n] its recursive call site, then
             * its caller (this function: the compiler may copy the call site) and what is
             * above it, the same for every depth and size */
            for (int k = 2; k <= n; k++)
                assert_true(a[k] == a[1]);
            if (n)
                assert_true(a[n + 1] != a[1]);
            uint32_t tail = da - (uint32_t)n - 2;
            if (!ref_tail) {
                ref_tail = tail;
                memcpy(ref, a + n + 2, tail * sizeof *a);
            }
            assert_int_equal(tail, ref_tail);
            assert_memory_equal(ref, a + n + 2, tail * sizeof *a);
        }
    }
}

static void test_probe_semaphores_zero(void **state)
{
    (void)state;
    static const char *const probes[] = {"sample", "sample_free", "large_alloc", "large_free",
                                         "alloc_failure", "thread_start", "thread_exit",
                                         "purge", "pressure", "sample_batch"};
    for (size_t i = 0; i < sizeof probes / sizeof *probes; i++)
        assert_int_equal(lum_probe_semaphore(probes[i]), 0);
    assert_int_equal(lum_probe_semaphore("nope"), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_interval_distribution),
        cmocka_unit_test(test_interval_off_and_zero_seed),
        cmocka_unit_test(test_weight_formula),
        cmocka_unit_test(test_estimator_unbiased),
        cmocka_unit_test(test_sample_hooks),
        cmocka_unit_test(test_cached_unwind),
        cmocka_unit_test(test_probe_semaphores_zero),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
