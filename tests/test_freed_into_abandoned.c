/* Frees into an exited thread's pages by a thread that allocates their class, while another
 * thread frees the rest: every block freed, the pages must empty.  A freeing thread once took
 * such a page over and left the other threads' frees on its thread_free until it looked for
 * room in the class, which a thread served by its cache never does: each round's pages stayed
 * in use, live blocks and RSS growing by a round's worth every round.  Its own process: which
 * thread holds which page is the point. */
#define _GNU_SOURCE
#include <pthread.h>
#include <semaphore.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_stats.h"

#define SZ 64
#define N 20000
static void *blocks[N];
static sem_t go_a, done_a;
static volatile int quit;
static struct lum_stats st;

static void *producer(void *arg)
{
    (void)arg;
    for (int i = 0; i < N; i++) {
        blocks[i] = malloc(SZ);
        memset(blocks[i], 1, SZ);
    }
    return NULL;
}

/* Frees the first block of each of the producer's pages, and keeps allocating its class (from
 * its cache: no look for room). */
static void *first_of_each_page(void *arg)
{
    (void)arg;
    void *mine = malloc(SZ);
    for (;;) {
        sem_wait(&go_a);
        if (quit) break;
        uintptr_t prev = 0;
        for (int i = 0; i < N; i++) {
            uintptr_t page = (uintptr_t)blocks[i] >> 16;
            if (page != prev) {
                free(blocks[i]);
                blocks[i] = NULL;
            }
            prev = page;
        }
        for (int k = 0; k < 1000; k++) {
            free(mine);
            mine = malloc(SZ);
        }
        sem_post(&done_a);
    }
    free(mine);
    return NULL;
}

static uint64_t live_blocks_of_class(void)
{
    lum_stats_snapshot(&st);
    for (int k = 0; k < LUM_STATS_CLASSES; k++)
        if (st.classes[k].block_size == SZ) return st.classes[k].live_blocks;
    return 0;
}

static void pages_freed_into_by_two_threads_empty(void **state)
{
    (void)state;
    sem_init(&go_a, 0, 0);
    sem_init(&done_a, 0, 0);
    pthread_t a;
    assert_int_equal(pthread_create(&a, NULL, first_of_each_page, NULL), 0);
    uint64_t live = 0;
    for (int round = 0; round < 4; round++) {
        pthread_t p;
        assert_int_equal(pthread_create(&p, NULL, producer, NULL), 0);
        pthread_join(p, NULL);
        sem_post(&go_a);
        sem_wait(&done_a);
        for (int i = 0; i < N; i++) free(blocks[i]); /* the rest, from another thread */
        live = live_blocks_of_class();
        printf("# round %d: %llu blocks of %d bytes live on pages\n", round, (unsigned long long)live, SZ);
    }
    /* what the two threads' own caches and current pages hold, not a round's 20000 */
    assert_true(live < N / 4);
    quit = 1;
    sem_post(&go_a);
    pthread_join(a, NULL);
    assert_int_equal(lum_heap_check(1), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(pages_freed_into_by_two_threads_empty),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
