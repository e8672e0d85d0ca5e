/* Pages of an exited thread, freed into by threads that do not allocate their class.  Its own
 * process: a pooled heap record or pages left by earlier tests change which thread ends up
 * holding the pages, and the case hides. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_options.h"
#include "lumalloc_stats.h"

#define PIN_BLOCKS 20000
#define PIN_SIZE 3000
static void *pin_blocks[PIN_BLOCKS];
static pthread_barrier_t pin_barrier;
static void *(*volatile p_malloc)(size_t) = malloc;

static void *pin_producer(void *arg)
{
    (void)arg;
    for (int i = 0; i < PIN_BLOCKS; i++) {
        pin_blocks[i] = p_malloc(PIN_SIZE);
        memset(pin_blocks[i], 1, 64);
    }
    return NULL;
}

static void *pin_consumer(void *arg)
{
    long first = (long)arg;
    if (first == 1) pthread_barrier_wait(&pin_barrier); /* the evens first, then the odds */
    for (int i = (int)first; i < PIN_BLOCKS; i += 2) free(pin_blocks[i]);
    if (first == 0) pthread_barrier_wait(&pin_barrier);
    pthread_barrier_wait(&pin_barrier); /* all freed */
    pthread_barrier_wait(&pin_barrier); /* stay alive until the main thread has looked */
    return NULL;
}

/* Two long-lived threads that never allocate the class free an exited thread's blocks.  Had
 * the first of them taken the pages over, the second one's frees would wait on those pages
 * until the first exited (it never looks for room in that class): with the code that did so,
 * ~950 pages and 60 MiB stayed pinned here. */
static void freeing_others_blocks_pins_nothing(void **state)
{
    (void)state;
    pthread_t p, c[2];
    assert_int_equal(pthread_create(&p, NULL, pin_producer, NULL), 0);
    pthread_join(p, NULL);
    pthread_barrier_init(&pin_barrier, NULL, 3);
    for (long i = 0; i < 2; i++) assert_int_equal(pthread_create(&c[i], NULL, pin_consumer, (void *)i), 0);
    pthread_barrier_wait(&pin_barrier); /* evens freed */
    pthread_barrier_wait(&pin_barrier); /* odds freed, consumers still alive */
    lum_purge();
    static struct lum_stats s;
    lum_stats_snapshot(&s);
    unsigned pages = 0;
    uint64_t live = 0;
    for (int k = 0; k < LUM_STATS_CLASSES; k++)
        if (s.classes[k].block_size >= PIN_SIZE) { /* the class PIN_SIZE rounds up to */
            pages = s.classes[k].pages;
            live = s.classes[k].live_blocks;
            break;
        }
    printf("# %d blocks of %d B freed by two other threads: %u pages, %llu live blocks left\n",
           PIN_BLOCKS, PIN_SIZE, pages, (unsigned long long)live);
    pthread_barrier_wait(&pin_barrier);
    for (int i = 0; i < 2; i++) pthread_join(c[i], NULL);
    assert_int_equal(live, 0);
    assert_int_equal(pages, 0);
    pthread_barrier_destroy(&pin_barrier);
    assert_int_equal(lum_heap_check(1), 0);
}

#define BIG_SIZE 20000 /* blocks over 16 KiB: their empty pages are uncarved (lum_page_uncarve) */

static void *big_user(void *arg)
{
    (void)arg;
    void *b[8];
    for (int i = 0; i < 8; i++) {
        b[i] = p_malloc(BIG_SIZE);
        memset(b[i], 1, BIG_SIZE);
    }
    for (int i = 0; i < 8; i++) free(b[i]);
    return NULL;
}

static unsigned class_pages(size_t size)
{
    static struct lum_stats s;
    lum_stats_snapshot(&s);
    for (int k = 0; k < LUM_STATS_CLASSES; k++)
        if (s.classes[k].block_size >= size) return (unsigned)s.classes[k].pages;
    return 0;
}

/* An exited thread's empty pages are kept for the decay time at most, those of big blocks too.
 * Emptied, such a page carves afresh (nothing carved): kept on the abandoned lists it counted
 * nothing towards the empty bytes there, which decay looks at before it looks for pages, and
 * stayed for good, its slices taken from every other class. */
static void exited_threads_empty_big_pages_decay(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0); /* every block on the class's pages */
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, big_user, NULL), 0);
    pthread_join(t, NULL);
    unsigned at_exit = class_pages(BIG_SIZE);
    usleep(1100 * 1000); /* the default decay time, 1 s */
    /* decay runs before a page is mapped: this class has none here */
    void *p = p_malloc(6000);
    unsigned after = class_pages(BIG_SIZE);
    printf("# pages of %d B blocks after their thread exited: %u, after the decay time: %u\n", BIG_SIZE,
           at_exit, after);
    free(p);
    lum_options_set("sample_interval", "512k");
    assert_int_equal(after, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(freeing_others_blocks_pins_nothing),
        cmocka_unit_test(exited_threads_empty_big_pages_decay),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
