/* A fork child pools the heap records of the parent's other threads for its own new threads, as
 * those threads left them.  One caught inside realloc's padded allocation (lum_realloc sets the
 * heap's pad_want, pad_asked and padding around the lum_malloc of the padded size) handed the
 * child's next thread its padding: every allocation of pad_want bytes was reported as one of
 * pad_asked in samples, large-allocation warnings and failure reports (found in review). */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include "internal.h"

static pthread_barrier_t forked;
static struct lum_heap *padded; /* the heap record of the thread caught inside realloc */

/* A thread inside lum_realloc's padded allocation while the main thread forks. */
static void *inside_padded_realloc(void *arg)
{
    (void)arg;
    void *volatile p = malloc(16); /* its heap record (volatile: GCC drops a free(malloc(n))) */
    free(p);
    struct lum_heap *heap = lum_tls_heap;
    assert_true(heap != &lum_empty_heap);
    padded = heap;
    heap->pad_want = 777;
    heap->pad_asked = 5;
    heap->padding = true;
    pthread_barrier_wait(&forked);
    pthread_barrier_wait(&forked);
    heap->padding = false;
    heap->pad_want = heap->pad_asked = 0;
    return NULL;
}

static void *requested_777(void *arg)
{
    void *volatile p = malloc(16); /* a heap record: the dead thread's, pooled by the fork child */
    free(p);
    /* the only record in the child's pool: if it were not this one, nothing would be tested */
    *(size_t *)arg = lum_tls_heap == padded ? lum_requested(lum_tls_heap, 777) : 0;
    return NULL;
}

static void test_child_thread_not_padded(void **state)
{
    (void)state;
    pthread_barrier_init(&forked, NULL, 2);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, inside_padded_realloc, NULL), 0);
    pthread_barrier_wait(&forked);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        size_t req = 0;
        pthread_t c;
        if (pthread_create(&c, NULL, requested_777, &req) || pthread_join(c, NULL))
            _exit(2);
        _exit(req == 777 ? 0 : req == 0 ? 3 : 1);
    }
    pthread_barrier_wait(&forked);
    pthread_join(t, NULL);
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_child_thread_not_padded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
