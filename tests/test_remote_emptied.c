/* Pages that other threads' frees emptied while nobody was looking at them go back: a thread's
 * parked full pages at its own malloc_trim, and exited threads' pages that a thread with no
 * heap left (a pthread-key destructor that runs after lumalloc's) freed into, at the next
 * decay.  Both stayed resident, empty, for as long as the process lived or allocated nothing
 * of their class.  Its own process: which pages sit where is the point, and no empty
 * abandoned page left by another test may set decay going. */
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
#include <unistd.h>
#include <cmocka.h>
#include "internal.h"
#include "lumalloc.h"
#include "lumalloc_options.h"
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

/* ---- frees after the freeing thread's heap was torn down ---- */

#define LATE_SIZE 3000 /* no other block of its class in this process */
#define LATE_BLOCKS 2000
#define OWN_BLOCKS 200
static void *late_blocks[LATE_BLOCKS + OWN_BLOCKS];
static pthread_key_t late_key;
static struct {
    int heapless; /* the destructor freed with no heap of its own */
    int freed;
} late_seen;

static void *late_producer(void *arg)
{
    (void)arg;
    for (int i = 0; i < LATE_BLOCKS; i++) {
        late_blocks[i] = p_malloc(LATE_SIZE);
        memset(late_blocks[i], 1, 64);
    }
    return NULL;
}

/* Runs in a later destructor round than lumalloc's own (heap_teardown) if need be: its key was
 * made after lumalloc's, so it runs after it in the same round already. */
static void late_free(void *arg)
{
    if (lum_tls_heap != &lum_empty_heap) {
        pthread_setspecific(late_key, arg);
        return;
    }
    late_seen.heapless = 1;
    for (int i = 0; i < LATE_BLOCKS + OWN_BLOCKS; i++) {
        free(late_blocks[i]);
        late_seen.freed++;
    }
}

/* Frees the producer's blocks, and its own, on its way out. */
static void *late_consumer(void *arg)
{
    (void)arg;
    for (int i = LATE_BLOCKS; i < LATE_BLOCKS + OWN_BLOCKS; i++) {
        late_blocks[i] = p_malloc(LATE_SIZE);
        memset(late_blocks[i], 1, 64);
    }
    pthread_setspecific(late_key, (void *)1);
    return NULL;
}

/* An exited thread's pages, and the freeing thread's own abandoned a moment before at its
 * teardown, emptied by frees from a key destructor that runs after lumalloc's: those frees
 * land on the pages' thread_free lists, the pages stay filed as holding blocks, and decay,
 * which looked only while empty abandoned pages waited, never came back for them (95 pages,
 * 7 MiB, kept until a purge or a thread that allocated their class). */
static void decay_gives_back_pages_freed_into_late(void **state)
{
    (void)state;
    /* decay looks once a millisecond at most, and gives back every empty abandoned page it
     * finds */
    assert_int_equal(lum_options_set("decay_ms", "0"), 0);
    assert_int_equal(pthread_key_create(&late_key, late_free), 0);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, late_producer, NULL), 0);
    pthread_join(t, NULL);
    assert_int_equal(pthread_create(&t, NULL, late_consumer, NULL), 0);
    pthread_join(t, NULL);
    assert_true(late_seen.heapless);
    assert_int_equal(late_seen.freed, LATE_BLOCKS + OWN_BLOCKS);
    uint64_t pages, live;
    class_figures(LATE_SIZE, &pages, &live);
    printf("# after the late frees: pages %llu, live blocks %llu\n", (unsigned long long)pages,
           (unsigned long long)live);
    assert_int_equal(live, 0);
    usleep(2000);
    lum_abandoned_decay();
    class_figures(LATE_SIZE, &pages, &live);
    printf("# after decay: pages %llu, live blocks %llu\n", (unsigned long long)pages, (unsigned long long)live);
    assert_int_equal(pages, 0);
    assert_int_equal(lum_heap_check(1), 0);
    assert_int_equal(lum_options_set("decay_ms", "1000"), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        /* first: no empty abandoned page of another case's yet */
        cmocka_unit_test(decay_gives_back_pages_freed_into_late),
        cmocka_unit_test(trim_gives_back_pages_emptied_while_parked),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
