/* The sampler's own unwinder (rule cache + .eh_frame reader) against libunwind's unw_backtrace,
 * on the kinds of frames real stacks have: deep recursion without frame pointers, rbp frames
 * with alloca and VLAs, callbacks through libc (qsort) and through lumalloc itself, a PIE main
 * down to _start, a thread down to clone3, and a signal handler, where the walk must end
 * cleanly at the signal trampoline; and the memo of the last walk, on one stack and across a
 * switch to a coroutine's.  Each walk is done twice: the first derives the rules from
 * the tables, the second takes them from the cache. */
#define _GNU_SOURCE 1
#define UNW_LOCAL_ONLY
#include <alloca.h>
#include <libunwind.h>
#include <link.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
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
#include "lumalloc_failure.h"
#include "obs_internal.h"
#include "unwind_memo.h"

#define NOINL __attribute__((noinline))
#define MAXF LUM_MAX_FRAMES

/* Our walk: frames from the return address into the caller of ours()'s caller. */
static NOINL uint32_t ours(uint64_t *f, uint32_t max)
{
    lum_obs_busy = 1;
    /* hook_ret = our return address: the linked-in skipping drops frames up to and with it */
    uint32_t n = lum_unwind(f, max, (uintptr_t)__builtin_return_address(0));
    lum_obs_busy = 0;
    return n;
}

/* libunwind's walk, from the same frame as ours(). */
static NOINL uint32_t theirs(uint64_t *f, uint32_t max)
{
    void *buf[MAXF + 32];
    int n = unw_backtrace(buf, MAXF + 32);
    uintptr_t me = (uintptr_t)__builtin_return_address(0);
    int i = 0;
    while (i < n && (uintptr_t)buf[i] != me)
        i++;
    uint32_t d = 0;
    for (i++; i < n && d < max; i++)
        f[d++] = (uint64_t)(uintptr_t)buf[i];
    return d;
}

static void dump(const char *what, const uint64_t *a, uint32_t na, const uint64_t *b, uint32_t nb)
{
    fprintf(stderr, "%s: ours %u frames, libunwind %u\n", what, na, nb);
    for (uint32_t i = 0; i < na || i < nb; i++)
        fprintf(stderr, "  %2u %#lx %#lx\n", i, (unsigned long)(i < na ? a[i] : 0), (unsigned long)(i < nb ? b[i] : 0));
}

enum { SAME, PREFIX };
static volatile int compared;
static volatile uint32_t last_depth;

/* Both walks from the caller's frame: identical (SAME), or ours a strict prefix of libunwind's
 * that ends at the signal trampoline (PREFIX). */
static NOINL int compare(const char *what, int how, uint32_t max)
{
    uint64_t a[MAXF], a2[MAXF], b[MAXF];
    uint32_t na = ours(a, max);
    uint32_t na2 = ours(a2, max); /* the same walk, now from the rule cache */
    uint32_t nb = theirs(b, max);
    bool ok = na == na2 && !memcmp(a, a2, na * sizeof *a) && na >= 2;
    if (how == SAME)
        ok = ok && na == nb && !memcmp(a, b, na * sizeof *a);
    else
        ok = ok && na < nb && !memcmp(a, b, na * sizeof *a);
    if (!ok) {
        dump(what, a, na, b, nb);
        dump("  (cached)", a2, na2, b, nb);
    }
    assert_true(ok);
    compared++;
    last_depth = na;
    return (int)na;
}

/* ---- deep recursion without frame pointers ---- */
__attribute__((noinline, optimize("omit-frame-pointer"))) static int recurse(int n, uint32_t max)
{
    volatile char pad[24 + (n % 3) * 40];
    pad[0] = (char)n;
    if (n == 0)
        return compare("recursion", SAME, max) + pad[0];
    return recurse(n - 1, max) + pad[0]; /* not a tail call */
}

static void test_recursion(void **state)
{
    (void)state;
    recurse(20, MAXF); /* the whole stack, down to _start */
    assert_true(last_depth > 21 && last_depth < MAXF);
    recurse(200, MAXF); /* cut at the depth */
    assert_int_equal(last_depth, MAXF);
    recurse(200, 7);
    assert_int_equal(last_depth, 7);
}

/* ---- rbp frames whose rsp moves (alloca, VLAs), between frames without one ---- */
__attribute__((noinline, optimize("no-omit-frame-pointer"))) static int with_alloca(int n)
{
    char *p = alloca((size_t)n);
    memset(p, 1, (size_t)n);
    return compare("alloca", SAME, MAXF) + p[n - 1];
}

__attribute__((noinline, optimize("omit-frame-pointer"))) static int plain(int n)
{
    volatile int x = n;
    return with_alloca(x) + x;
}

__attribute__((noinline, optimize("no-omit-frame-pointer"))) static int with_vla(int n)
{
    char v[n];
    memset(v, 2, sizeof v);
    return plain(n * 3 + 5) + v[n - 1];
}

static void test_alloca_vla(void **state)
{
    (void)state;
    with_vla(17);
    with_vla(1000); /* other sizes, same code: the cached rules must still hold */
    with_vla(33);
}

/* ---- a callback through libc ---- */
static int qsort_calls;
static int by_value(const void *x, const void *y)
{
    if (!qsort_calls++)
        compare("qsort", SAME, MAXF);
    return *(const int *)x - *(const int *)y;
}

static void test_qsort(void **state)
{
    (void)state;
    int v[64];
    for (int i = 0; i < 64; i++)
        v[i] = (i * 37) % 64;
    qsort(v, 64, sizeof v[0], by_value);
    assert_true(qsort_calls > 0);
}

/* ---- a callback through lumalloc's own code ---- */
static int sweep_calls;
static void sweep_fn(void *arg)
{
    (void)arg;
    sweep_calls++;
    compare("lumalloc callback", SAME, MAXF); /* no allocation: one run */
}

static void test_own_library(void **state)
{
    (void)state;
    assert_int_equal(lum_with_allocation_failures(sweep_fn, NULL), 1);
    assert_int_equal(sweep_calls, 1);
}

/* ---- the main thread of a PIE, down to _start ---- */
static int find_exe(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)size;
    uintptr_t pc = *(uintptr_t *)arg;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        uintptr_t a = info->dlpi_addr + ph->p_vaddr;
        if (ph->p_type == PT_LOAD && pc >= a && pc < a + ph->p_memsz)
            return info->dlpi_name[0] ? 2 : 1; /* "": the executable */
    }
    return 0;
}

static void test_pie_main(void **state)
{
    (void)state;
    uint64_t a[MAXF];
    uint32_t n = ours(a, MAXF);
    assert_true(n >= 3 && n < MAXF);
    /* the outermost frame is _start, in the executable, which is position-independent */
    uintptr_t last = (uintptr_t)a[n - 1];
    assert_int_equal(dl_iterate_phdr(find_exe, &last), 1);
    uintptr_t main_addr = (uintptr_t)&test_pie_main;
    assert_true(main_addr > 0x10000000u); /* PIE: loaded high, not at 0x400000 */
    compare("main thread", SAME, MAXF);
}

/* ---- a thread, down to clone3 ---- */
static void *thread_fn(void *arg)
{
    (void)arg;
    compare("thread", SAME, MAXF);
    recurse(10, MAXF);
    return NULL;
}

static void test_thread(void **state)
{
    (void)state;
    pthread_t t;
    int before = compared;
    assert_int_equal(pthread_create(&t, NULL, thread_fn, NULL), 0);
    pthread_join(t, NULL);
    assert_int_equal(compared, before + 2);
}

/* ---- a signal handler: the walk ends at the trampoline ---- */
static volatile int in_handler;
static NOINL void handler_work(void)
{
    compare("signal handler", PREFIX, MAXF);
    in_handler++; /* volatile: compare is not a tail call */
}

static void on_usr1(int sig)
{
    (void)sig;
    handler_work();
    in_handler++;
}

static void test_signal(void **state)
{
    (void)state;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    int before = compared;
    raise(SIGUSR1);
    raise(SIGUSR1); /* again, through the cached "ends here" rule */
    assert_int_equal(compared, before + 2);
    assert_int_equal(last_depth, 3); /* handler_work's caller, the handler's, the trampoline */
    signal(SIGUSR1, SIG_DFL);
}

/* ---- the memo of the last walk: a hit only when the stack read is the same ---- */
static volatile int memo_sink;
static volatile uintptr_t memo_fake; /* when set: written over memo_leaf's return address slot */
static uintptr_t memo_fp;            /* memo_leaf's frame, the same whichever caller */

/* One walk (the memo's key frame is ours()'s), checked against libunwind's.  A frame pointer:
 * memo_leaf's return address slot is at fp + 8. */
__attribute__((noinline, optimize("no-omit-frame-pointer"))) static uint32_t memo_leaf(uint64_t *f)
{
    uintptr_t *slot = (uintptr_t *)__builtin_frame_address(0) + 1, saved = *slot;
    memo_fp = (uintptr_t)__builtin_frame_address(0);
    if (memo_fake)
        *(volatile uintptr_t *)slot = memo_fake;
    uint32_t n = ours(f, 16);
    *(volatile uintptr_t *)slot = saved;
    if (!memo_fake) {
        uint64_t b[MAXF];
        uint32_t nb = theirs(b, 16);
        assert_int_equal(n, nb);
        assert_memory_equal(f, b, nb * sizeof *b);
    }
    memo_sink++; /* no tail call */
    return n;
}

static NOINL uint32_t memo_mid(uint64_t *f)
{
    uint32_t r = memo_leaf(f);
    memo_sink++;
    return r;
}

static NOINL uint32_t memo_mid2(uint64_t *f)
{
    uint32_t r = memo_mid(f);
    memo_sink++;
    return r;
}

/* Two callers alike but for their return addresses: memo_leaf's frames sit at the same place
 * under either, so only a word deeper down tells their stacks apart. */
static NOINL uint32_t memo_caller_a(uint64_t *f)
{
    uint32_t r = memo_mid2(f);
    memo_sink += 1;
    return r;
}

static NOINL uint32_t memo_caller_b(uint64_t *f)
{
    uint32_t r = memo_mid2(f);
    memo_sink += 2;
    return r;
}

static NOINL uint32_t memo_run(int b, uint64_t *f)
{
    uint32_t r = b ? memo_caller_b(f) : memo_caller_a(f);
    memo_sink++;
    return r;
}

static void test_memo(void **state)
{
    (void)state;
    /* walks in turn from one call site: A and B (another caller further up) to learn their
     * rules, A, A again, B, A, A with memo_leaf's return address overwritten, A as it was */
    static const int caller[] = {0, 1, 0, 0, 1, 0, 0, 0};
    static const uintptr_t fake[] = {0, 0, 0, 0, 0, 0, 0x1000, 0};
    enum { STEPS = sizeof caller / sizeof caller[0] };
    uint64_t f[STEPS][MAXF], hit[STEPS];
    uint32_t n[STEPS];
    uintptr_t fp[STEPS];
    for (int i = 0; i < STEPS; i++) {
        uint64_t h = lum_memo.hits;
        memo_fake = fake[i];
        n[i] = memo_run(caller[i], f[i]);
        memo_fake = 0;
        hit[i] = lum_memo.hits - h;
        fp[i] = memo_fp;
    }
    for (int i = 1; i < STEPS; i++)
        assert_int_equal(fp[i], fp[0]); /* else this would not test the memo */
    assert_true(n[0] >= 6);
    /* the same stack again: the memo's, and the same frames */
    assert_int_equal(hit[3], 1);
    assert_int_equal(n[3], n[0]);
    assert_memory_equal(f[3], f[0], n[0] * sizeof *f[0]);
    /* the same first frames, another caller further up: walked, not the memo's */
    assert_int_equal(hit[4], 0);
    assert_int_equal(n[4], n[0]);
    assert_memory_equal(f[4], f[0], 2 * sizeof *f[0]); /* memo_mid's, memo_mid2's */
    assert_true(f[4][2] != f[0][2]);                    /* memo_caller_b's */
    assert_true(f[4][3] != f[0][3]);                    /* memo_run's call of it */
    assert_memory_equal(f[4] + 4, f[0] + 4, (n[0] - 4) * sizeof *f[0]);
    assert_memory_equal(f[4], f[1], n[0] * sizeof *f[0]);
    assert_int_equal(hit[5], 0);
    assert_memory_equal(f[5], f[0], n[0] * sizeof *f[0]);
    /* a return address overwritten since the last walk from the same frame: seen */
    assert_int_equal(hit[6], 0);
    assert_int_equal(n[6], 1); /* no code at 0x1000: the walk ends there */
    assert_int_equal(f[6][0], 0x1000);
    /* and put back: not the memo's cut walk */
    assert_int_equal(hit[7], 0);
    assert_int_equal(n[7], n[0]);
    assert_memory_equal(f[7], f[0], n[0] * sizeof *f[0]);
}

/* ---- the memo across a stack switch (coroutines): only the thread's own stack has one ---- */
static ucontext_t co_main, co_ctx;
static uint64_t co_f[3][MAXF], co_hit[3];
static uint32_t co_n[3];
static bool co_run_here; /* the thread's stack run (lum_memo.stack_lo..hi) took the coroutine's in */

static NOINL void co_walks(void)
{
    for (int i = 0; i < 3; i++) {
        uint64_t h = lum_memo.hits;
        co_n[i] = memo_run(0, co_f[i]);
        co_hit[i] = lum_memo.hits - h;
    }
    co_run_here = memo_fp >= lum_memo.stack_lo && memo_fp < lum_memo.stack_hi;
}

static void co_entry(void)
{
    co_walks();
    swapcontext(&co_ctx, &co_main);
}

static uint32_t main_walk(uint64_t *f, uint64_t *hit)
{
    uint64_t h = lum_memo.hits;
    uint32_t n = memo_run(0, f);
    *hit = lum_memo.hits - h;
    return n;
}

/* Walks from main_walk's calls at different lines: frame 4, where it returns to, differs. */
static void same_but_call_site(const uint64_t *a, const uint64_t *b, uint32_t n)
{
    assert_memory_equal(a, b, 4 * sizeof *a);
    assert_true(a[4] != b[4]);
    assert_memory_equal(a + 5, b + 5, (n - 5) * sizeof *a);
}

static void test_memo_stack_switch(void **state)
{
    (void)state;
    enum { STACK = 256 << 10 };
    uint64_t f[3][MAXF], hit[3];
    uint32_t n[3];
    /* rules learnt by the first walk, the memo recorded by the next */
    for (int i = 0; i < 3; i++) n[0] = main_walk(f[0], &hit[0]);
    assert_int_equal(hit[0], 1); /* the thread's own stack: the memo's */
    uintptr_t main_fp = memo_fp;
    /* a coroutine on a stack of its own, later unmapped, as a coroutine library frees it */
    void *stack = mmap(NULL, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(stack != MAP_FAILED);
    run_on_stack(&co_ctx, &co_main, stack, STACK, co_entry);
    assert_true(memo_fp >= (uintptr_t)stack && memo_fp < (uintptr_t)stack + STACK);
    /* a stack that may be unmapped under it: the run stays the thread's own */
    assert_false(co_run_here);
    /* its first walk starts on another stack: walked, not the main stack's memo */
    assert_int_equal(co_hit[0], 0);
    assert_true(co_n[0] >= 5);
    assert_memory_equal(co_f[0], f[0], 4 * sizeof *f[0]); /* memo_mid .. memo_run's call */
    assert_true(co_f[0][4] != f[0][4]);                   /* co_walks's, not main_walk's */
    /* and so is every walk there: no memo of a stack whose words may go */
    assert_int_equal(co_hit[2], 0);
    assert_int_equal(co_n[2], co_n[0]);
    assert_memory_equal(co_f[2], co_f[0], co_n[0] * sizeof *co_f[0]);
    /* back on the thread's stack, from another call site: walked again, same frames */
    n[1] = main_walk(f[1], &hit[1]);
    assert_int_equal(memo_fp, main_fp);
    assert_true(main_fp >= lum_memo.stack_lo && main_fp < lum_memo.stack_hi);
    assert_true(lum_memo.stack_lo >= (uintptr_t)stack + STACK || lum_memo.stack_hi <= (uintptr_t)stack);
    assert_int_equal(hit[1], 0);
    assert_int_equal(n[1], n[0]);
    same_but_call_site(f[1], f[0], n[0]);
    /* the coroutine once more, its stack then unmapped: the next walk on the thread's stack
     * must not read the memo's words there (a fault, were it to) */
    run_on_stack(&co_ctx, &co_main, stack, STACK, co_entry);
    assert_int_equal(co_hit[0], 0);
    assert_int_equal(co_hit[2], 0);
    assert_false(co_run_here);
    assert_int_equal(munmap(stack, STACK), 0);
    n[2] = main_walk(f[2], &hit[2]);
    assert_int_equal(hit[2], 0);
    assert_int_equal(n[2], n[0]);
    same_but_call_site(f[2], f[0], n[0]);
}

/* ---- the reader alone ---- */
static NOINL uintptr_t here(void)
{
    return (uintptr_t)__builtin_return_address(0);
}

static void test_reader(void **state)
{
    (void)state;
    struct lum_cfi_rule r;
    uintptr_t ra = here();
    assert_int_equal(lum_cfi_rule(ra, &r), LUM_CFI_OK);
    assert_true(r.cfa_off >= 8);
    /* a second object lookup in the same object does not walk the loader's list again */
    uintptr_t ra2 = here();
    uint64_t scans = lum_cfi_object_scans;
    assert_int_equal(lum_cfi_rule(ra2, &r), LUM_CFI_OK);
    assert_int_equal(lum_cfi_rule(ra, &r), LUM_CFI_OK);
    assert_true(lum_cfi_object_scans == scans);
    /* code outside any object (JIT-like) has no rule, and the answer is clean */
    void *m = mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(m != MAP_FAILED);
    assert_int_equal(lum_cfi_rule((uintptr_t)m + 100, &r), LUM_CFI_NONE);
    munmap(m, 4096);
    assert_int_equal(lum_cfi_rule(1, &r), LUM_CFI_NONE);
    /* libc's functions have tables too */
    uintptr_t in_libc = (uintptr_t)&qsort + 1; /* looked up at qsort itself */
    assert_true(lum_cfi_rule(in_libc, &r) != LUM_CFI_NONE);
}

/* ---- every function of libc and of this executable ---- */
struct sweep {
    const char *name; /* substring of the object's name; "" for the executable */
    unsigned fdes, ok, last, none;
};

static int sweep_object(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)size;
    struct sweep *sw = arg;
    const char *n = info->dlpi_name ? info->dlpi_name : "";
    if (sw->name[0] ? !strstr(n, sw->name) : n[0] != 0)
        return 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        if (info->dlpi_phdr[i].p_type != PT_GNU_EH_FRAME)
            continue;
        const uint8_t *hdr = (const uint8_t *)(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr);
        /* version 1, eh_frame_ptr pcrel sdata4, fde_count udata4, table datarel sdata4 */
        if (hdr[0] != 1 || hdr[1] != 0x1b || hdr[2] != 0x03 || hdr[3] != 0x3b)
            return 1;
        uint32_t count;
        memcpy(&count, hdr + 8, 4);
        const int32_t *tab = (const int32_t *)(hdr + 12);
        for (uint32_t k = 0; k < count; k++) {
            uintptr_t start = (uintptr_t)hdr + (uintptr_t)(intptr_t)tab[2 * k];
            uintptr_t next = k + 1 < count ? (uintptr_t)hdr + (uintptr_t)(intptr_t)tab[2 * k + 2] : start + 2;
            /* as if returning to the function's first byte + 1, and to its middle */
            uintptr_t pcs[2] = {start + 1, start + (next - start) / 2 + 1};
            for (int j = 0; j < 2; j++) {
                struct lum_cfi_rule r, m;
                int got = lum_cfi_rule(pcs[j], &r);
                /* the tables read through the mapping say the same as the file */
                lum_cfi_read_files = false;
                int got_m = lum_cfi_rule(pcs[j], &m);
                lum_cfi_read_files = true;
                assert_int_equal(got, got_m);
                if (got == LUM_CFI_OK) {
                    assert_int_equal(r.cfa_off, m.cfa_off);
                    assert_int_equal(r.rbp_off, m.rbp_off);
                    assert_int_equal(r.cfa_rbp, m.cfa_rbp);
                }
                if (got == LUM_CFI_OK) {
                    sw->ok++;
                    assert_true(r.cfa_off >= 8);
                    assert_true(r.rbp_off <= 0);
                } else {
                    got == LUM_CFI_LAST ? sw->last++ : sw->none++;
                }
            }
            sw->fdes++;
        }
    }
    return 1;
}

static void test_every_function(void **state)
{
    (void)state;
    static struct sweep objs[] = {{"libc.so", 0, 0, 0, 0}, {"", 0, 0, 0, 0}};
    for (size_t i = 0; i < sizeof objs / sizeof objs[0]; i++) {
        struct sweep *sw = &objs[i];
        uint64_t from_files = lum_cfi_file_lookups;
        dl_iterate_phdr(sweep_object, sw);
        /* both objects have a build-id: their tables were read from their files */
        assert_true(lum_cfi_file_lookups - from_files >= sw->fdes);
        fprintf(stderr, "%s: %u FDEs, %u lookups: %u rules, %u outermost, %u not of that form\n",
                sw->name[0] ? sw->name : "executable", sw->fdes, sw->ok + sw->last + sw->none, sw->ok,
                sw->last, sw->none);
        assert_true(sw->fdes > 10);
        /* nearly everything compiled code does fits the rule form */
        assert_true(sw->ok * 100 >= (sw->ok + sw->last + sw->none) * 95);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reader),
        cmocka_unit_test(test_recursion),
        cmocka_unit_test(test_alloca_vla),
        cmocka_unit_test(test_qsort),
        cmocka_unit_test(test_own_library),
        cmocka_unit_test(test_pie_main),
        cmocka_unit_test(test_thread),
        cmocka_unit_test(test_signal),
        cmocka_unit_test(test_memo),
        cmocka_unit_test(test_memo_stack_switch),
        cmocka_unit_test(test_every_function),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
