/* Pages that other threads' frees emptied while nobody was looking at them go back: a thread's
 * parked full pages at its own malloc_trim.  They stayed resident, empty, for as long as the
 * thread allocated nothing of their class.  Its own process: which pages sit where is the
 * point. */
#define _GNU_SOURCE
#include <malloc.h>
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
#include "internal.h"
#include "lumalloc.h"
#include "lumalloc_stats.h"

static void *(*volatile p_malloc)(size_t) = malloc;
static struct lum_stats st;

/* pages and live blocks of the class that holds size bytes */
static void class_figures(size_t size, uint64_t *pages, uint64_t *live)
{
    lum_stats_snapshot(&st);
    for (unsigned c = 0; c < LUM_STATS_CLASSES; c++)
        if (st.classes[c].block_size == lum_class_size[lum_size_class(size)]) {
            *pages = st.classes[c].pages;
            *live = st.classes[c].live_blocks;
            return;
        }
    fail_msg("no class of %zu bytes in the statistics", size);
}

/* ---- malloc_trim and parked pages ---- */

#define TRIM_SIZE 1100 /* no other block of its class in this process; not a power of two (sampled pages) */
#define TRIM_BLOCKS 8000
static void *trim_blocks[TRIM_BLOCKS];
static sem_t trim_filled, trim_freed;
static struct {
    unsigned parked;      /* the owner's full pages of the class before the other thread freed */
    uint64_t pages_after; /* the class's pages after the owner's malloc_trim */
    uint64_t live_after;
    int check;
} trim_seen;

static unsigned list_length(const struct lum_page_list *l)
{
    unsigned n = 0;
    for (const struct lum_page *p = l->head; p; p = p->next) n++;
    return n;
}

static void *trim_owner(void *arg)
{
    (void)arg;
    for (int i = 0; i < TRIM_BLOCKS; i++) {
        trim_blocks[i] = p_malloc(TRIM_SIZE);
        memset(trim_blocks[i], 1, TRIM_SIZE);
    }
    trim_seen.parked = list_length(&lum_tls_heap->full[lum_size_class(TRIM_SIZE)]);
    sem_post(&trim_filled);
    sem_wait(&trim_freed);
    malloc_trim(0);
    class_figures(TRIM_SIZE, &trim_seen.pages_after, &trim_seen.live_after);
    trim_seen.check = lum_heap_check(1);
    return NULL;
}

static void *trim_freer(void *arg)
{
    (void)arg;
    sem_wait(&trim_filled);
    for (int i = 0; i < TRIM_BLOCKS; i++) free(trim_blocks[i]);
    sem_post(&trim_freed);
    return NULL;
}

/* The owner's pages fill and park on its full list; another thread frees every block (on each
 * parked page the first free goes to the owner's inbox, the rest onto the page); the owner,
 * idle since, calls malloc_trim.  The inbox's blocks are what take the pages off the full
 * list: left there, 125 of the 126 pages stayed, empty (8.8 MiB resident). */
static void trim_gives_back_pages_emptied_while_parked(void **state)
{
    (void)state;
    sem_init(&trim_filled, 0, 0);
    sem_init(&trim_freed, 0, 0);
    pthread_t owner, freer;
    assert_int_equal(pthread_create(&owner, NULL, trim_owner, NULL), 0);
    assert_int_equal(pthread_create(&freer, NULL, trim_freer, NULL), 0);
    pthread_join(freer, NULL);
    pthread_join(owner, NULL);
    printf("# parked pages %u; after malloc_trim: pages %llu, live blocks %llu\n", trim_seen.parked,
           (unsigned long long)trim_seen.pages_after, (unsigned long long)trim_seen.live_after);
    assert_true(trim_seen.parked > 100); /* the shape: nearly every page parked full */
    assert_int_equal(trim_seen.live_after, 0);
    assert_int_equal(trim_seen.pages_after, 0);
    assert_int_equal(trim_seen.check, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(trim_gives_back_pages_emptied_while_parked),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
