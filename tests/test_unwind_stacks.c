/* Walks on stacks that are not the thread's own.  A coroutine's stack is memory the program
 * maps and unmaps; what lies above it is whatever was mapped next, often the next stack of a
 * pool.  A walk whose rules are wrong for a frame (hand-written switch code, asm with a wrong
 * .cfi offset) reads above the top of such a stack; when it read there while the neighbour was
 * mapped, the unwinder once kept those pages as known readable for the thread, and its memo of
 * the walk too, and the next sample after the neighbour was unmapped faulted inside malloc.
 * Every allocation here is sampled: each case crashed before the fix.  Also: the thread's own
 * stack is still found (the memo serves it, the run stays on it) for the main thread, a thread,
 * a thread on a stack of the program's without a guard page, and one reusing an exited
 * thread's stack. */
#define _GNU_SOURCE 1
#include <pthread.h>
#include <stdbool.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <cmocka.h>
#include "test_support.h"
#include "lumalloc_options.h"
#include "obs_internal.h"
#include "unwind_memo.h"

#define NOINL __attribute__((noinline))
#define STACK (64u << 10)

/* The usual hand-rolled switch (cf. Boost.Context's make_fcontext): the coroutine's entry
 * function returns to co_finish, which has no CFI and directly follows co_start, so a walk
 * takes co_start's last rule for it (CFA = rsp + 56) and reads 56 bytes above the coroutine
 * stack's top.  rdi: the coroutine's stack, with co_finish at its top; rsi: the entry. */
void co_start(void *sp, void (*fn)(void));
void co_finish(void);
__asm__(".text\n.globl co_start\n.type co_start,@function\nco_start:\n.cfi_startproc\n"
        "push %rbp\n.cfi_adjust_cfa_offset 8\n.cfi_rel_offset rbp,0\n"
        "push %rbx\n.cfi_adjust_cfa_offset 8\npush %r12\n.cfi_adjust_cfa_offset 8\n"
        "push %r13\n.cfi_adjust_cfa_offset 8\npush %r14\n.cfi_adjust_cfa_offset 8\n"
        "push %r15\n.cfi_adjust_cfa_offset 8\n"
        "mov %rsp, co_saved_sp(%rip)\n"
        "mov %rdi, %rsp\n"
        "jmp *%rsi\n"
        ".cfi_endproc\n.size co_start,.-co_start\n"
        ".globl co_finish\n.type co_finish,@function\nco_finish:\n"
        "mov co_saved_sp(%rip), %rsp\n"
        "pop %r15\npop %r14\npop %r13\npop %r12\npop %rbx\npop %rbp\nret\n.size co_finish,.-co_finish\n"
        ".bss\n.align 8\nco_saved_sp: .quad 0\n.text\n");

/* asm whose CFI claims an 8 KiB frame where there are 8 bytes */
void bad_cfi(void);
__asm__(".text\n.globl bad_cfi\n.type bad_cfi,@function\nbad_cfi:\n.cfi_startproc\n"
        "sub $8, %rsp\n.cfi_def_cfa_offset 8200\n"
        "call sampled_leaf\n"
        "add $8, %rsp\n.cfi_def_cfa_offset 8\nret\n.cfi_endproc\n.size bad_cfi,.-bad_cfi\n");

static volatile int sink;
static int on_own_stack; /* walks whose start the thread's stack run took in */

/* Each allocation sampled (the interval is 1 byte); the run looked at after it. */
NOINL void sampled_leaf(void)
{
    void *p = malloc(64);
    __asm__ volatile("" ::"r"(p) : "memory");
    free(p);
    uintptr_t here = (uintptr_t)__builtin_frame_address(0);
    on_own_stack += here >= lum_memo.stack_lo && here < lum_memo.stack_hi;
}

static NOINL void co_body(void)
{
    for (int i = 0; i < 10; i++)
        sampled_leaf();
}

static void co_run(char *stack)
{
    uintptr_t *sp = (uintptr_t *)(stack + STACK) - 1; /* rsp = 16n - 8, as at a function's entry */
    *sp = (uintptr_t)co_finish;
    co_start(sp, co_body);
}

/* Two stacks of a pool, one mapping; the walks on the lower read the upper's first words. */
static char *pool(void)
{
    char *p = mmap(NULL, 2 * STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(p != MAP_FAILED);
    return p;
}

static int setup(void **state)
{
    (void)state;
    return lum_options_set("sample_interval", "1");
}

static int teardown(void **state)
{
    (void)state;
    return lum_options_set("sample_interval", "512k");
}

static void test_fake_return_address(void **state)
{
    (void)state;
    uint64_t samples = lum_unwind_count;
    char *p = pool();
    on_own_stack = 0;
    co_run(p);
    /* the neighbour freed, and the pages mapped again with nothing: another mapping in its place */
    assert_int_equal(munmap(p + STACK, STACK), 0);
    co_run(p);
    char *q = mmap(p + STACK, STACK, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    co_run(p);
    if (q != MAP_FAILED)
        munmap(q, STACK);
    munmap(p, STACK);
    assert_true(lum_unwind_count - samples >= 30);
    assert_int_equal(on_own_stack, 0);
}

/* ---- a wrong CFA in asm, on a ucontext coroutine ---- */
static ucontext_t uc_main, uc_co;
static int uc_pad;

static NOINL void uc_body(void)
{
    /* another pad: the walks start at another sp, so that the memo cannot serve them and the
     * walk from the cached rules makes the reads */
    volatile char *pad = __builtin_alloca((size_t)uc_pad);
    pad[0] = 0;
    for (int i = 0; i < 10; i++)
        bad_cfi();
    sink += pad[0];
}

static void uc_run(char *stack, int pad)
{
    uc_pad = pad;
    run_on_stack(&uc_co, &uc_main, stack, STACK, uc_body);
}

static void test_wrong_cfa(void **state)
{
    (void)state;
    for (int pad = 16; pad <= 48; pad += 32) {
        char *p = pool();
        uc_run(p, 16);
        assert_int_equal(munmap(p + STACK, STACK), 0);
        uc_run(p, pad);
        munmap(p, STACK);
    }
}

/* ---- the thread's own stack: found, and served by the memo ---- */
/* [lo, hi): the stack pthread_getattr_np reports; for the main thread, lo is RLIMIT_STACK below
 * the mapping's top, which lies a few pages above the top the unwinder takes (argc's page).
 * What failed, by name (cmocka's asserts are for the main thread only), or NULL. */
static NOINL const char *own_walks(uintptr_t lo, uintptr_t hi, bool main_thread)
{
    uintptr_t here = (uintptr_t)__builtin_frame_address(0);
    if (here < lo || here >= hi)
        return "pthread_getattr_np's stack";
    uint64_t hits = lum_memo.hits;
    on_own_stack = 0;
    for (int i = 0; i < 8; i++)
        sampled_leaf();
    /* the first may derive rules and walk; the rest repeat its stack */
    if (lum_memo.hits - hits < 6)
        return "memo hits";
    if (on_own_stack != 8)
        return "walks in the stack run";
    if (!lum_memo.home_known || lum_memo.home_lo >= here || here >= lum_memo.home_hi)
        return "the thread's own stack found";
    if ((!main_thread && lum_memo.home_lo < lo) || lum_memo.home_hi > hi)
        return "the thread's own stack within pthread_getattr_np's";
    if (lum_memo.stack_lo < lum_memo.home_lo || lum_memo.stack_hi != lum_memo.home_hi)
        return "the stack run within the thread's stack, up to its top";
    return NULL;
}

struct own {
    const char *failed;
    uintptr_t top;
};

static void own_stack_bounds(uintptr_t *lo, uintptr_t *hi)
{
    pthread_attr_t a;
    void *addr;
    size_t size;
    assert_int_equal(pthread_getattr_np(pthread_self(), &a), 0);
    assert_int_equal(pthread_attr_getstack(&a, &addr, &size), 0);
    pthread_attr_destroy(&a);
    *lo = (uintptr_t)addr;
    *hi = (uintptr_t)addr + size;
}

static void *own_thread(void *arg)
{
    struct own *o = arg;
    uintptr_t lo, hi;
    own_stack_bounds(&lo, &hi);
    o->failed = own_walks(lo, hi, false);
    o->top = lum_memo.home_hi;
    return NULL;
}

static void check(const char *failed)
{
    if (failed)
        fprintf(stderr, "failed: %s\n", failed);
    assert_null(failed);
}

static void test_own_stacks(void **state)
{
    (void)state;
    uintptr_t lo, hi;
    struct own o[2];
    own_stack_bounds(&lo, &hi);
    check(own_walks(lo, hi, true));
    /* a thread, then another that reuses its cached stack (and TLS block) */
    for (int i = 0; i < 2; i++) {
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, own_thread, &o[i]), 0);
        pthread_join(t, NULL);
        check(o[i].failed);
    }
    assert_int_equal(o[1].top, o[0].top);
    /* the program's own stack, no guard page, under the next mapping (a coroutine pool's) */
    char *p = pool();
    pthread_attr_t a;
    pthread_attr_init(&a);
    assert_int_equal(pthread_attr_setstack(&a, p + STACK, STACK), 0);
    pthread_t t;
    assert_int_equal(pthread_create(&t, &a, own_thread, &o[0]), 0);
    pthread_join(t, NULL);
    pthread_attr_destroy(&a);
    check(o[0].failed);
    assert_true(o[0].top <= (uintptr_t)p + 2 * STACK && o[0].top > (uintptr_t)p + STACK);
    munmap(p, 2 * STACK);
}

/* ---- coroutines in a thread whose own stack lies right above the pool ---- */
static char *nb_pool;
static int nb_on_own_stack;

static void *neighbour_thread(void *arg)
{
    (void)arg;
    sampled_leaf(); /* the run: on the thread's own stack */
    co_run(nb_pool);
    on_own_stack = 0;
    co_run(nb_pool);
    nb_on_own_stack = on_own_stack;
    return NULL;
}

static void test_coroutine_below_own_stack(void **state)
{
    (void)state;
    /* [coroutine stack | the thread's stack, no guard]: readable all the way up, but only the
     * upper part is the thread's */
    nb_pool = pool();
    pthread_attr_t a;
    pthread_attr_init(&a);
    assert_int_equal(pthread_attr_setstack(&a, nb_pool + STACK, STACK), 0);
    pthread_t t;
    nb_on_own_stack = -1;
    assert_int_equal(pthread_create(&t, &a, neighbour_thread, NULL), 0);
    pthread_join(t, NULL);
    pthread_attr_destroy(&a);
    munmap(nb_pool, 2 * STACK);
    assert_int_equal(nb_on_own_stack, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_own_stacks),
        cmocka_unit_test(test_fake_return_address),
        cmocka_unit_test(test_wrong_cfa),
        cmocka_unit_test(test_coroutine_below_own_stack),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
