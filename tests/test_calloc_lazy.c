/* A large calloc touches nothing of a fresh mapping (the kernel's pages are zero already), even
 * as a thread's first allocation (the slow path then mapped the block and calloc's memset
 * faulted all of it in: 2 GiB resident for calloc(1, 2 GiB) where glibc had 1 MiB), and even
 * with failure injection armed (the same way).  A block of a page's (4-256 KiB) carved from
 * memory no block had used is left untouched too but for its first bytes (python3 callocs 128
 * and 256 KiB at start-up and uses little of them), and every other is cleared: one freed
 * before, one carved by malloc and then written, one on slices another class's page wrote. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include <string.h>
#include "lumalloc.h"
#include "test_support.h"
#include "lumalloc_failure.h"
#include "lumalloc_options.h"

#define BIG ((size_t)256 << 20)

/* Pages of [p, p + len) resident. */
static size_t resident_pages(const void *p, size_t len)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = (uintptr_t)p & ~(page - 1), hi = ((uintptr_t)p + len + page - 1) & ~(page - 1);
    size_t n = (hi - lo) / page, in = 0;
    unsigned char *vec = malloc(n);
    assert_non_null(vec);
    assert_int_equal(mincore((void *)lo, hi - lo, vec), 0);
    for (size_t i = 0; i < n; i++) in += vec[i] & 1;
    free(vec);
    return in;
}

static void *first_allocation(void *arg)
{
    (void)arg;
    return calloc(1, BIG);
}

static void first_allocation_of_a_thread(void **state)
{
    (void)state;
    pthread_t th;
    void *p;
    assert_int_equal(pthread_create(&th, NULL, first_allocation, NULL), 0);
    assert_int_equal(pthread_join(th, &p), 0);
    assert_non_null(p);
    assert_true(resident_pages(p, BIG) < 64); /* of 65536 */
    assert_int_equal(((char *)p)[BIG - 1], 0);
    free(p);
}

static void with_failure_injection_armed(void **state)
{
    (void)state;
    lum_fail_after(1000);
    char *p = calloc(1, BIG);
    lum_fail_cancel();
    assert_non_null(p);
    assert_true(resident_pages(p, BIG) < 64);
    assert_int_equal(p[BIG / 2], 0);
    free(p);
}

static void injected_failure_still_fails(void **state)
{
    (void)state;
    lum_fail_after(0);
    assert_null(calloc(1, BIG));
    assert_true(lum_fail_fired());
}

/* Called through pointers: GCC knows what malloc, calloc and free do, and would drop a write
 * to a block about to be freed and take a calloc'd block's bytes to be zero unread. */
static void *(*volatile p_malloc)(size_t) = malloc;
static void *(*volatile p_calloc)(size_t, size_t) = calloc;
static void (*volatile p_free)(void *) = free;

/* Sizes carved one block at a time, from pages of one slice to one-block pages of four. */
static const size_t page_sizes[] = { 4096, 5000, 20000, 60000, 100000, 131072, 200000, 262144 };
#define NSIZES (sizeof page_sizes / sizeof page_sizes[0])

/* No sample moves a block to a sampled page (cleared whole there). */
static int sampling_off(void **state)
{
    (void)state;
    return lum_options_set("sample_interval", "0");
}

static void fresh_page_block_left_untouched(void **state)
{
    (void)state;
    for (size_t i = 0; i < NSIZES; i++) {
        lum_purge(); /* every free slice back to the kernel: the next page is on fresh memory */
        unsigned char *p = p_calloc(1, page_sizes[i]);
        assert_non_null(p);
        /* the first page holds the free list's link the carve wrote, cleared */
        if (resident_pages(p, page_sizes[i]) > 1)
            fail_msg("calloc(%zu) of fresh memory: %zu pages resident", page_sizes[i], resident_pages(p, page_sizes[i]));
        assert_zero(p, page_sizes[i]);
        p_free(p);
    }
}

/* In a thread of its own: a heap with no page yet, so that malloc carves the block fresh. */
static void *carve_write_free_calloc(void *arg)
{
    size_t size = *(const size_t *)arg;
    /* malloc carves the block from fresh memory, the program writes it all and frees it:
     * calloc's block is that one again (the one before keeps a page of smaller blocks from
     * emptying and going back) */
    void *pin = p_malloc(size);
    unsigned char *p = p_malloc(size);
    assert_non_null(pin);
    assert_non_null(p);
    memset(p, 0xa5, size);
    p_free(p);
    unsigned char *z = p_calloc(1, size);
    assert_non_null(z);
    assert_zero(z, size);
    p_free(z);
    p_free(pin);
    return NULL;
}

static void recycled_block_cleared(void **state)
{
    (void)state;
    for (size_t i = 0; i < NSIZES; i++) {
        lum_purge();
        pthread_t th;
        assert_int_equal(pthread_create(&th, NULL, carve_write_free_calloc, (void *)&page_sizes[i]), 0);
        assert_int_equal(pthread_join(th, NULL), 0);
    }
}

static void block_on_written_slices_cleared(void **state)
{
    (void)state;
    /* pages of one class written whole and given back, their slices' spans kept or trimmed,
     * then blocks of every other size carved over them */
    enum { N = 24 };
    for (size_t i = 0; i < NSIZES; i++) {
        unsigned char *held[N];
        for (int k = 0; k < N; k++) {
            held[k] = p_malloc(page_sizes[i]);
            assert_non_null(held[k]);
            memset(held[k], 0x5a, page_sizes[i]);
        }
        for (int k = 0; k < N; k++) p_free(held[k]);
        for (size_t j = 0; j < NSIZES; j++) {
            if (j == i) continue;
            for (int k = 0; k < 4; k++) {
                held[k] = p_calloc(1, page_sizes[j]);
                assert_non_null(held[k]);
                assert_zero(held[k], page_sizes[j]);
                memset(held[k], 0x3c, page_sizes[j]);
            }
            for (int k = 0; k < 4; k++) p_free(held[k]);
        }
    }
}

/* A fork child takes no memory for zero, as a thread of the parent may have lowered records
 * whose madvise had not run when fork copied the memory: its calloc clears the block whole.
 * The parent, once fork returns, trusts them again. */
static void fork_child_clears_whole(void **state)
{
    (void)state;
    enum { SIZE = 262144 }; /* a one-block page, 64 pages */
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        lum_purge();
        unsigned char *p = p_calloc(1, SIZE);
        int ok = p != NULL && resident_pages(p, SIZE) == SIZE / 4096;
        for (size_t j = 0; ok && j < SIZE; j++) ok = p[j] == 0;
        _exit(ok ? 0 : 1);
    }
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    lum_purge();
    unsigned char *p = p_calloc(1, SIZE);
    assert_non_null(p);
    assert_true(resident_pages(p, SIZE) <= 1);
    assert_zero(p, SIZE);
    p_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(fresh_page_block_left_untouched, sampling_off),
        cmocka_unit_test_setup(recycled_block_cleared, sampling_off),
        cmocka_unit_test_setup(block_on_written_slices_cleared, sampling_off),
        cmocka_unit_test_setup(fork_child_clears_whole, sampling_off),
        cmocka_unit_test(first_allocation_of_a_thread),
        cmocka_unit_test(with_failure_injection_armed),
        cmocka_unit_test(injected_failure_still_fails),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
