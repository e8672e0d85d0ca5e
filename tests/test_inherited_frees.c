/* Pages an exited thread left with live blocks.  Freed by the thread that took over its data
 * while a third thread allocates the same class, the blocks count free at once, on pages the
 * freeing thread now owns, instead of waiting as remote frees on pages of the thread that
 * happened to need the class first (which never looks at them while it is idle).  Left alone,
 * their holes still serve a thread that allocates the class.  Its own process: pages left by
 * other tests would change which thread holds which page. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_options.h"
#include "lumalloc_stats.h"

#define BLOCK 1024 /* a one-slice class: 64 blocks a page */
#define NBLOCKS 256
static void *left[NBLOCKS];
static pthread_barrier_t barrier;
static void *(*volatile p_malloc)(size_t) = malloc;

static void *leaver(void *arg)
{
    (void)arg;
    for (int i = 0; i < NBLOCKS; i++) {
        left[i] = p_malloc(BLOCK);
        memset(left[i], 1, BLOCK);
    }
    return NULL; /* its pages, full, go to the abandoned lists */
}

static void *bystander(void *arg)
{
    void **mine = arg;
    *mine = p_malloc(BLOCK); /* needs a page of the class while the left pages are ownerless */
    pthread_barrier_wait(&barrier);
    pthread_barrier_wait(&barrier); /* idle, alive, until the main thread has looked */
    return NULL;
}

static uint64_t live_blocks(unsigned size)
{
    static struct lum_stats s;
    lum_stats_snapshot(&s);
    for (unsigned c = 0; c < LUM_STATS_CLASSES; c++)
        if (s.classes[c].block_size == size) return s.classes[c].live_blocks;
    return 0;
}

static void inherited_frees_count_at_once(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0); /* no block on a sampled page */
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, leaver, NULL), 0);
    pthread_join(t, NULL);
    void *theirs = NULL;
    pthread_barrier_init(&barrier, NULL, 2);
    assert_int_equal(pthread_create(&t, NULL, bystander, &theirs), 0);
    pthread_barrier_wait(&barrier);
    void *ours = p_malloc(BLOCK); /* this thread allocates the class too */
    uint64_t before = live_blocks(BLOCK);
    for (int i = 0; i < NBLOCKS; i += 2) free(left[i]);
    uint64_t after = live_blocks(BLOCK);
    printf("# live blocks of %d B: %llu before the frees, %llu after %d frees\n", BLOCK,
           (unsigned long long)before, (unsigned long long)after, NBLOCKS / 2);
    assert_true(before >= NBLOCKS + 2);
    assert_true(after <= before - NBLOCKS / 2);
    /* the freed blocks are this thread's to reuse: allocating as many brings none from new memory */
    void *again[NBLOCKS / 2];
    for (int i = 0; i < NBLOCKS / 2; i++) again[i] = p_malloc(BLOCK);
    unsigned reused = 0;
    for (int i = 0; i < NBLOCKS / 2; i++)
        for (int j = 0; j < NBLOCKS; j += 2)
            if (again[i] == left[j]) reused++;
    printf("# %u of %d allocations reused the freed blocks\n", reused, NBLOCKS / 2);
    assert_true(reused >= NBLOCKS / 4);
    for (int i = 0; i < NBLOCKS / 2; i++) free(again[i]);
    for (int i = 1; i < NBLOCKS; i += 2) free(left[i]);
    free(ours);
    pthread_barrier_wait(&barrier);
    pthread_join(t, NULL);
    free(theirs);
    lum_options_set("sample_interval", "512k");
}

/* The other side: data an exited thread left with holes in it, which no thread frees.  A
 * thread that allocates the class takes one page of its own, and then fills those holes rather
 * than carve fresh memory. */
#define BLOCK2 512 /* another one-slice class: 128 blocks a page */
#define NBLOCKS2 512
static void *kept[NBLOCKS2];

static void *holer(void *arg)
{
    (void)arg;
    for (int i = 0; i < NBLOCKS2; i++) kept[i] = p_malloc(BLOCK2);
    for (int i = 0; i < NBLOCKS2; i += 4) {
        free(kept[i]);
        kept[i] = NULL;
    }
    return NULL; /* its pages, three quarters full, go to the abandoned lists */
}

static void holes_of_left_data_are_reused(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, holer, NULL), 0);
    pthread_join(t, NULL);
    void *mine[2 * NBLOCKS2 / 4];
    for (int i = 0; i < 2 * NBLOCKS2 / 4; i++) mine[i] = p_malloc(BLOCK2);
    unsigned reused = 0;
    for (int i = 0; i < 2 * NBLOCKS2 / 4; i++) {
        uintptr_t p = (uintptr_t)mine[i];
        for (int j = 1; j < NBLOCKS2; j++)
            if (kept[j] && (p >> 16) == ((uintptr_t)kept[j] >> 16)) { /* on one of the left pages */
                reused++;
                break;
            }
    }
    printf("# %u of %d allocations filled holes in the left pages (%d holes)\n", reused,
           2 * NBLOCKS2 / 4, NBLOCKS2 / 4);
    assert_true(reused >= NBLOCKS2 / 8);
    for (int i = 0; i < 2 * NBLOCKS2 / 4; i++) free(mine[i]);
    for (int i = 0; i < NBLOCKS2; i++) free(kept[i]);
    lum_options_set("sample_interval", "512k");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(inherited_frees_count_at_once),
        cmocka_unit_test(holes_of_left_data_are_reused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
