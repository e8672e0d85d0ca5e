/* Threads whose pthread-key destructor allocates in every round, setting its key again (a
 * library keeping per-thread state to the very end).  lumalloc's own key destructor tears the
 * thread's heap down in some round; an allocation after it made a heap and registered it again,
 * and after glibc's last round (PTHREAD_DESTRUCTOR_ITERATIONS) nothing tore that one down: a
 * heap record marked live for good, with its pages, per thread. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_probes.h"

extern struct lum_registry_v1 lumalloc_registry; /* the exported data symbol */

static pthread_key_t key;

static void keep_state(void *p)
{
    free(p);
    pthread_setspecific(key, malloc(100));
}

static void *worker(void *arg)
{
    (void)arg;
    pthread_setspecific(key, malloc(100));
    for (int i = 0; i < 1000; i++) free(malloc(48));
    return NULL;
}

static unsigned live_records(void)
{
    unsigned n = 0;
    for (const struct lum_thread_counters_v1 *tc = (const void *)(uintptr_t)lumalloc_registry.threads_head; tc;
         tc = (const void *)(uintptr_t)tc->next)
        n += tc->state == LUM_THREAD_LIVE;
    return n;
}

static void heaps_made_in_destructors_are_torn_down(void **state)
{
    (void)state;
    assert_int_equal(pthread_key_create(&key, keep_state), 0);
    unsigned before = live_records();
    for (int i = 0; i < 200; i++) {
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, worker, NULL), 0);
        pthread_join(t, NULL);
    }
    unsigned after = live_records();
    printf("# heap records marked live: %u before, %u after 200 threads\n", before, after);
    /* the background thread may have started meanwhile */
    assert_true(after <= before + 1);
    assert_int_equal(lum_heap_check(1), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(heaps_made_in_destructors_are_torn_down),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
