/* The profile's stack table as a tool reads it from outside (lumalloc_profile,
 * include/lumalloc_probes.h): walked while another thread keeps adding stacks, every record the
 * list names must already be whole (its id the hash of its frames), and the count read after a
 * walk must cover every record the walk saw. */
#include <pthread.h>
#include <stdbool.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <cmocka.h>
#include "lumalloc_options.h"
#include "lumalloc_probes.h"
#include "obs_internal.h"

#define LEVELS 12 /* 4096 distinct stacks: two call sites at each level */

static void *volatile sink;
static _Atomic int writer_done;

__attribute__((noinline)) static void descend(unsigned bits, int level);
__attribute__((noinline)) static void left(unsigned bits, int level)
{
    descend(bits >> 1, level - 1);
    __asm__ volatile("" ::: "memory"); /* not a tail call: this frame stays on the stack */
}
__attribute__((noinline)) static void right(unsigned bits, int level)
{
    descend(bits >> 1, level - 1);
    __asm__ volatile("" ::: "memory");
}
__attribute__((noinline)) static void descend(unsigned bits, int level)
{
    if (!level) {
        free(sink);
        sink = malloc(4096); /* with the interval at 1 byte, every allocation is a sample */
        return;
    }
    if (bits & 1)
        left(bits, level);
    else
        right(bits, level);
    __asm__ volatile("" ::: "memory");
}

static void *writer(void *arg)
{
    (void)arg;
    /* a new interval takes effect within 4 MiB of a thread's allocations */
    for (int i = 0; i < 2048; i++) {
        void *volatile p = malloc(4096); /* volatile: GCC drops a free(malloc()) pair */
        free(p);
    }
    /* The whole run takes a few ms, less than a time slice: on a CPU shared with the reader,
     * it went by while the reader waited its turn (1 new record seen of 4096).  A yield after
     * each stack lets the reader look at it then. */
    for (unsigned i = 0; i < (1u << LEVELS); i++) {
        descend(i, LEVELS);
        sched_yield();
    }
    atomic_store(&writer_done, 1);
    return NULL;
}

static bool whole(const struct lum_profile_stack_v1 *r)
{
    const uint64_t *frames = (const uint64_t *)((const char *)r + lumalloc_profile.stack_size);
    return r->depth <= LUM_MAX_FRAMES && r->stack_id == (r->depth ? lum_stack_hash(frames, r->depth) : 1);
}

/* One walk as a tool makes it; returns the records seen.  Checking each record's hash here too
 * made a walk so long that the newest records went by unlooked at. */
static uint64_t walk(uint64_t *bad)
{
    uint64_t seen = 0;
    for (uint64_t a = __atomic_load_n(&lumalloc_profile.stacks, __ATOMIC_ACQUIRE); a;) {
        const struct lum_profile_stack_v1 *r = (const void *)(uintptr_t)a;
        *bad += r->depth > LUM_MAX_FRAMES;
        seen++;
        a = r->older;
    }
    return seen;
}

static void test_walk_while_stacks_are_added(void **state)
{
    (void)state;
    assert_int_equal(lumalloc_profile.magic, LUM_PROFILE_MAGIC);
    assert_int_equal(lumalloc_profile.stack_size, LUM_PROFILE_STACK_SIZE);
    assert_int_equal(lum_options_set("sample_interval", "1"), 0);
    uint64_t before = __atomic_load_n(&lumalloc_profile.nstacks, __ATOMIC_RELAXED);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, writer, NULL), 0);
    /* Mostly the newest record, looked at the moment the list names it (where a record
     * published before it is filled would be caught: a whole walk takes too long to land in
     * that moment), and now and then a whole walk, for the count. */
    uint64_t bad = 0, heads = 0, walks = 0, last = 0;
    for (unsigned i = 0; !atomic_load(&writer_done) || !walks; i++) {
        uint64_t a = __atomic_load_n(&lumalloc_profile.stacks, __ATOMIC_ACQUIRE);
        if (a && a != last) {
            bad += !whole((const void *)(uintptr_t)a);
            heads++;
            last = a;
        }
        if (i % 65536 == 0) {
            uint64_t seen = walk(&bad);
            assert_true(seen <= __atomic_load_n(&lumalloc_profile.nstacks, __ATOMIC_RELAXED));
            walks++;
        }
    }
    pthread_join(t, NULL);
    uint64_t seen = walk(&bad);
    assert_int_equal(bad, 0);
    assert_true(heads > 16); /* it did look while stacks came */
    assert_int_equal(seen, __atomic_load_n(&lumalloc_profile.nstacks, __ATOMIC_RELAXED));
    /* the writer's stacks are all there: one per path down the call tree */
    assert_true(seen - before >= (1u << LEVELS));
    assert_int_equal(lumalloc_profile.enabled, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_walk_while_stacks_are_added)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
