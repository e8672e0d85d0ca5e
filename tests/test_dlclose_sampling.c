/* Sampling beside dlopen/dlclose.  The sampler takes its sample under lum_sampled_lock, and one
 * walk in 64 looks at the loader's unload count, which waits for the loader's lock; dlclose
 * frees under that lock, and the free of a sampled block waits for lum_sampled_lock.  The look
 * made under the sampler's lock deadlocked the two within seconds at a 1 KiB interval. */
#define _GNU_SOURCE 1
#include <dlfcn.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include "lumalloc_options.h"

static volatile int stop;
static volatile uint64_t allocs, reloads;
static void *(*volatile p_malloc)(size_t) = malloc;

static void *allocate(void *arg)
{
    (void)arg;
    while (!stop) {
        void *v[8];
        for (int i = 0; i < 8; i++) v[i] = p_malloc(48 + 16 * (size_t)i);
        for (int i = 0; i < 8; i++) free(v[i]);
        __atomic_fetch_add(&allocs, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

static void *reload(void *arg)
{
    (void)arg;
    while (!stop) {
        void *h = dlopen(CFI_PLUG_A, RTLD_NOW | RTLD_LOCAL);
        if (!h) abort();
        dlclose(h);
        __atomic_fetch_add(&reloads, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sampling_and_dlclose_both_progress(void **state)
{
    (void)state;
    /* A deadlock can take this thread too (its own allocations sample): SIGALRM ends it. */
    alarm(30);
    assert_int_equal(lum_options_set("sample_interval", "1k"), 0);
    pthread_t a, r;
    pthread_create(&a, NULL, allocate, NULL);
    pthread_create(&r, NULL, reload, NULL);
    /* Both threads must keep moving for 3 s; neither standing still for 5 s in a row (a
     * deadlock never moves again, a busy machine only slows them). */
    double start = now(), last_move = start;
    uint64_t la = 0, lr = 0;
    while (now() - start < 3) {
        usleep(50 * 1000);
        uint64_t ca = __atomic_load_n(&allocs, __ATOMIC_RELAXED), cr = __atomic_load_n(&reloads, __ATOMIC_RELAXED);
        if (ca != la && cr != lr) last_move = now();
        la = ca, lr = cr;
        if (now() - last_move > 5) {
            fprintf(stderr, "stuck: %llu allocation rounds, %llu reloads\n", (unsigned long long)ca,
                    (unsigned long long)cr);
            _exit(1); /* the threads cannot be joined */
        }
    }
    stop = 1;
    pthread_join(a, NULL);
    pthread_join(r, NULL);
    fprintf(stderr, "%llu allocation rounds, %llu reloads\n", (unsigned long long)allocs, (unsigned long long)reloads);
    alarm(0);
    assert_true(reloads > 100 && allocs > 1000);
    assert_int_equal(lum_options_set("sample_interval", "512k"), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(sampling_and_dlclose_both_progress),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
