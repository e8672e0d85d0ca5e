/* The profiler's hash tables (live records by address, stacks by hash) start small, in the
 * observability arena, and move to mappings of their own as they grow: with every allocation
 * sampled from 512 distinct stacks, each stack is kept once, every live record is found again
 * at its free, and nothing is dropped on the way through the growth steps. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <cmocka.h>
#include "lumalloc_options.h"
#include "lumalloc_prof.h"

#define LEVELS 9 /* 2^9 distinct call paths */
#define PATHS (1u << LEVELS)
#define ROUNDS 3
static void *blocks[ROUNDS][PATHS];

static void *descend(unsigned path, unsigned level);

/* Two functions with their own return addresses (noipa: not folded into one): the bits of path
 * choose the call chain.  The calls are kept out of tail position (the result is used after the
 * call), so that each level leaves a frame. */
static __attribute__((noipa)) void *left(unsigned path, unsigned level)
{
    void *p = descend(path, level + 1);
    __asm__ volatile("" : "+r"(p));
    return p;
}

static __attribute__((noipa)) void *right(unsigned path, unsigned level)
{
    void *p = descend(path, level + 1);
    __asm__ volatile("" : "+r"(p));
    return p;
}

static __attribute__((noipa)) void *descend(unsigned path, unsigned level)
{
    if (level == LEVELS) {
        void *p = malloc(48);
        __asm__ volatile("" : "+r"(p));
        return p;
    }
    return (path >> level) & 1 ? right(path, level) : left(path, level);
}

static int count_live(const struct lum_prof_site *site, void *arg)
{
    *(uint64_t *)arg += site->live_samples;
    return 0;
}

static void tables_grow_and_keep_everything(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "1"), 0);
    /* the thread's next sample point was drawn at the old interval */
    for (int i = 0; i < 20000; i++) free(malloc(48));
    struct lum_prof_stats s0, s1, s2;
    lum_prof_get_stats(&s0);
    for (unsigned r = 0; r < ROUNDS; r++)
        for (unsigned i = 0; i < PATHS; i++) assert_non_null(blocks[r][i] = descend(i, 0));
    lum_prof_get_stats(&s1);
    assert_int_equal(s1.dropped_stacks, s0.dropped_stacks);
    assert_int_equal(s1.dropped_records, s0.dropped_records);
    /* every path a stack of its own, found again (not added) on the later rounds */
    assert_true(s1.stacks >= s0.stacks + PATHS);
    assert_true(s1.stacks <= s0.stacks + PATHS + 8);
    /* enough live records to take their table past the arena sizes (64 to 256 buckets) */
    uint64_t added = s1.live_samples - s0.live_samples;
    assert_true(added > 2 * PATHS);
    uint64_t live = 0;
    assert_int_equal(lum_prof_foreach_site(count_live, &live), 0);
    assert_int_equal(live, s1.live_samples);

    for (unsigned r = 0; r < ROUNDS; r++)
        for (unsigned i = 0; i < PATHS; i++) free(blocks[r][i]);
    lum_prof_get_stats(&s2);
    /* every record found again at its block's free */
    assert_int_equal(s2.sample_frees - s1.sample_frees, added);
    assert_int_equal(s2.live_samples, s0.live_samples);
    assert_int_equal(s2.dropped_records, s0.dropped_records);
    assert_int_equal(lum_options_set("sample_interval", "524288"), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(tables_grow_and_keep_everything),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
