/* What several unit tests share: whether they run under ThreadSanitizer, a cheap random
 * sequence, a coroutine on a stack of the test's own, a child process whose stderr is read back, and what of a range is resident.
 * Include after cmocka.h. */
#ifndef LUM_TEST_SUPPORT_H
#define LUM_TEST_SUPPORT_H
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__SANITIZE_THREAD__)
#define UNDER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define UNDER_TSAN 1
#endif
#endif
#ifndef UNDER_TSAN
#define UNDER_TSAN 0
#endif

static inline uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* Runs fn in a child with its stderr captured into err; returns the signal that ended it, or
 * minus its exit status. */
static inline int run_child(void (*fn)(void), char *err, size_t errlen)
{
    int pipefd[2];
    assert_int_equal(pipe(pipefd), 0);
    pid_t pid = fork();
    if (pid == 0) {
        /* cmocka catches SIGSEGV/SIGABRT to report them: the child must die of them instead */
        signal(SIGSEGV, SIG_DFL);
        signal(SIGABRT, SIG_DFL);
        dup2(pipefd[1], 2);
        close(pipefd[0]);
        fn();
        _exit(0);
    }
    close(pipefd[1]);
    size_t n = 0;
    ssize_t r;
    while (n < errlen - 1 && (r = read(pipefd[0], err + n, errlen - 1 - n)) > 0) n += (size_t)r;
    err[n] = 0;
    close(pipefd[0]);
    int status;
    waitpid(pid, &status, 0);
    return WIFSIGNALED(status) ? WTERMSIG(status) : -WEXITSTATUS(status);
}
/* Forks; the child exits with child()'s return, the parent waits for it: its wait status. */
static inline int fork_and_wait(int (*child)(void))
{
    pid_t pid = fork();
    if (pid == 0) _exit(child());
    assert_true(pid > 0);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    return status;
}

#ifdef LUM_INTERNAL_H
/* Allocates size-byte blocks with alloc into v[from..max) until one lands on another page than
 * v[from - 1] (from 0: the first is allocated too); returns how many v holds then, the last the
 * first block of the new page (a failed assertion with no new page by max). */
static inline int fill_until_new_page_in(void **v, int max, void *(*alloc)(size_t), size_t size, int from)
{
    int n = from;
    if (n == 0) v[n++] = alloc(size);
    while (n < max) {
        v[n] = alloc(size);
        if (lum_page_of(v[n]) != lum_page_of(v[n - 1])) return n + 1;
        n++;
    }
    fail_msg("no new page after %d blocks", max);
    return 0;
}
#endif

/* Resident bytes of the 4 KiB pages [p, p + len) touches (mincore), for ranges up to 32 MiB. */
static inline size_t resident_bytes(const void *p, size_t len)
{
    static unsigned char vec[(32 << 20) / 4096];
    uintptr_t a = (uintptr_t)p & ~(uintptr_t)4095, e = ((uintptr_t)p + len + 4095) & ~(uintptr_t)4095;
    assert_true((e - a) / 4096 <= sizeof vec);
    assert_int_equal(mincore((void *)a, e - a, vec), 0);
    size_t n = 0;
    for (size_t i = 0; i < (e - a) / 4096; i++) n += vec[i] & 1;
    return n * 4096;
}

/* Runs fn as a coroutine on stack (size bytes), as a coroutine library does: co and back are
 * the coroutine's context and the caller's, which fn's return (or a swap to back) resumes. */
static inline void run_on_stack(ucontext_t *co, ucontext_t *back, void *stack, size_t size, void (*fn)(void))
{
    assert_int_equal(getcontext(co), 0);
    co->uc_stack.ss_sp = stack;
    co->uc_stack.ss_size = size;
    co->uc_link = back;
    makecontext(co, fn, 0);
    assert_int_equal(swapcontext(back, co), 0);
}

#ifdef fail_msg /* after cmocka.h */
/* Bytes from..to-1 of p set to a pattern of their offset, which check_pattern finds again
 * after a block moved or grew (realloc's tests). */
static inline void fill_pattern(unsigned char *p, size_t from, size_t to)
{
    for (size_t j = from; j < to; j++) p[j] = (unsigned char)(j * 13 + 5);
}

static inline void check_pattern(const unsigned char *p, size_t n)
{
    for (size_t j = 0; j < n; j++)
        if (p[j] != (unsigned char)(j * 13 + 5)) fail_msg("byte %zu of %zu lost", j, n);
}

/* What calloc(1, n) gave: every byte zero. */
static inline void assert_zero(const unsigned char *p, size_t n)
{
    for (size_t j = 0; j < n; j++)
        if (p[j]) fail_msg("calloc(%zu): byte %zu is %#x", n, j, p[j]);
}
#endif

#endif
