/* The unwinder's rule cache across dlclose and dlopen: rules are learnt per code address, and
 * the next dlopen often maps another object where the closed one was.  libcfi_plug_a.so and
 * libcfi_plug_b.so have plug() at the same offset and the return address inside it at the same
 * offset, with frames of different sizes: walked through b after a, at the same address, the
 * stack must be b's, not one read with a's frame size.  Unloads are looked at by one walk in 64
 * a thread, and by walks that cannot be served from the cache, which alone compare the
 * objects' bytes at every look (what tells b from a here: same link_map, same layout); the
 * periodic look does so at most once in 10 ms.  Here the first walk through b is such a walk
 * (b's frame is not the one the cached walk read), so b's stack is right from the first walk
 * that follows it; the 10 ms bound is test_cfi_file's (test_prints_every_10ms). */
#define _GNU_SOURCE 1
#include <dlfcn.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>
#include "obs_internal.h"
#include "unwind_memo.h"

#define WALKS_TO_NOTICE 64

static uint64_t frames[LUM_MAX_FRAMES];
static uint32_t depth;

/* Called by plug: the walk starts after plug's frame (hook_ret = the return into plug). */
static __attribute__((noinline)) unsigned from_plug(void)
{
    lum_obs_busy = 1;
    depth = lum_unwind(frames, LUM_MAX_FRAMES, (uintptr_t)__builtin_return_address(0));
    lum_obs_busy = 0;
    return depth;
}

/* O0: one call site of plug however many walks (no peeled or unrolled copies) */
static __attribute__((noinline, optimize("O0"))) uintptr_t through(const char *path, uint64_t *out, uint32_t *n, int walks)
{
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    assert_non_null(h);
    unsigned (*plug)(unsigned (*)(void)) = (unsigned (*)(unsigned (*)(void)))dlsym(h, "plug");
    assert_non_null(plug);
    for (int i = 0; i < walks; i++) {
        plug(from_plug);
        __asm__ volatile("" ::: "memory");
    }
    memcpy(out, frames, depth * sizeof *frames);
    *n = depth;
    dlclose(h);
    return (uintptr_t)plug;
}

/* gen_skip: generations the rule cache is moved on by between a and b, as if as many libraries
 * had been unloaded meanwhile (the walks through b move it once more). */
static __attribute__((optimize("O0"))) void reload_same_address(uint32_t gen_skip)
{
    uint64_t a[LUM_MAX_FRAMES], b[LUM_MAX_FRAMES];
    uint32_t na = 0, nb = 0;
    uintptr_t pa = 0, pb = 0;
    /* one call site for both (O0: the loop is not unrolled), so every frame beyond plug is the
     * same; a: learnt, then from the cache */
    static const char *const paths[2] = {CFI_PLUG_A, CFI_PLUG_B};
    const int walks[2] = {2, WALKS_TO_NOTICE + 1};
    uint64_t *outs[2] = {a, b};
    uint32_t *ns[2] = {&na, &nb};
    uintptr_t ps[2] = {0, 1};
    for (int i = 0; i < 2; i++) {
        if (i == 1)
            __atomic_fetch_add(&lum_rules_gen, gen_skip, __ATOMIC_RELEASE);
        ps[i] = through(paths[i], outs[i], ns[i], walks[i]);
    }
    pa = ps[0], pb = ps[1];
    if (pa != pb)
        skip(); /* not mapped at the same address: nothing to show */
    assert_true(na >= 3);
    if (nb != na || memcmp(a, b, na * sizeof *a)) {
        fprintf(stderr, "through a: %u frames, through b at the same address: %u\n", na, nb);
        for (uint32_t i = 0; i < na || i < nb; i++)
            fprintf(stderr, "  %2u %#lx %#lx\n", i, (unsigned long)(i < na ? a[i] : 0),
                    (unsigned long)(i < nb ? b[i] : 0));
    }
    assert_int_equal(nb, na);
    assert_memory_equal(a, b, na * sizeof *a);
}

static void test_reload_same_address(void **state)
{
    (void)state;
    reload_same_address(0);
}

/* Rule keys hold a generation's low 16 bits: 65536 generations later a's rules carry the tag
 * of the walks through b. */
static void test_reload_same_address_tag_wrapped(void **state)
{
    (void)state;
    reload_same_address(0xffff);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reload_same_address),
        cmocka_unit_test(test_reload_same_address_tag_wrapped),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
