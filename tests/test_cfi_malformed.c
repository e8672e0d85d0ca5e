/* The .eh_frame reader (cfi.c) on tables that are not what a linker writes: it runs inside
 * malloc in every process, so a damaged or hostile object must give "no rule", never a read
 * outside the object's segments.  libcfi_victim.so is loaded, its .eh_frame_hdr and .eh_frame
 * made writable in memory and damaged, and its code looked up: targeted cases (an FDE pointer
 * past the segment, an indirect pointer whose address wraps), then many random corruptions. */
#define _GNU_SOURCE 1
#include <dlfcn.h>
#include <link.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <cmocka.h>
#include "obs_internal.h"

static void *lib;
static uint8_t *hdr, *seg, *seg_end; /* .eh_frame_hdr; the loaded segment holding it */
static uint8_t *saved;
static uintptr_t pcs[64];
static unsigned npcs;

static int find_victim(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)size, (void)arg;
    if (!info->dlpi_name || !strstr(info->dlpi_name, "libcfi_victim"))
        return 0;
    for (int i = 0; i < info->dlpi_phnum; i++)
        if (info->dlpi_phdr[i].p_type == PT_GNU_EH_FRAME)
            hdr = (uint8_t *)(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr);
    for (int i = 0; hdr && i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        uint8_t *a = (uint8_t *)(info->dlpi_addr + ph->p_vaddr);
        if (ph->p_type == PT_LOAD && hdr >= a && hdr < a + ph->p_filesz)
            seg = a, seg_end = a + ph->p_filesz;
    }
    return 1;
}

static int setup(void **state)
{
    (void)state;
    /* the damage is done in memory: the reader must read the mapping, not the intact file */
    lum_cfi_read_files = false;
    lib = dlopen(CFI_VICTIM_PATH, RTLD_NOW);
    if (!lib)
        return -1;
    dl_iterate_phdr(find_victim, NULL);
    if (!hdr || !seg)
        return -1;
    /* .eh_frame must sit in the same segment for the corruptions below to reach it */
    int32_t ehp;
    memcpy(&ehp, hdr + 4, 4);
    if (hdr[1] != 0x1b || hdr + 4 + ehp < seg || hdr + 4 + ehp >= seg_end)
        return -1;
    uintptr_t pg = (uintptr_t)seg & ~(uintptr_t)4095;
    if (mprotect((void *)pg, (uintptr_t)seg_end - pg, PROT_READ | PROT_WRITE))
        return -1;
    saved = malloc((size_t)(seg_end - seg));
    memcpy(saved, seg, (size_t)(seg_end - seg));
    static const char *const fns[] = {"victim_leaf", "victim_pushes", "victim_vla", "victim_early_out"};
    for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
        uintptr_t f = (uintptr_t)dlsym(lib, fns[i]);
        if (!f)
            return -1;
        /* as return addresses: the first byte, and a little way into the body */
        for (uintptr_t d = 1; d < 64; d += 5)
            pcs[npcs++] = f + d;
    }
    return 0;
}

static void restore(void)
{
    memcpy(seg, saved, (size_t)(seg_end - seg));
}

/* Every lookup returns, and a rule, when there is one, has the form the walk relies on. */
static unsigned look_all(void)
{
    unsigned ok = 0;
    for (unsigned i = 0; i < npcs; i++) {
        struct lum_cfi_rule r;
        int k = lum_cfi_rule(pcs[i], &r);
        if (k == LUM_CFI_OK) {
            assert_true(r.cfa_off >= 8);
            assert_true(r.rbp_off <= -8 || r.rbp_off == 0);
            ok++;
        } else {
            assert_true(k == LUM_CFI_LAST || k == LUM_CFI_NONE);
        }
    }
    return ok;
}

static void test_intact(void **state)
{
    (void)state;
    restore();
    assert_true(look_all() * 10 >= npcs * 9);
}

/* A table entry whose FDE lies past the end of the segment, in memory that cannot be read. */
static void test_fde_past_segment(void **state)
{
    (void)state;
    restore();
    /* above the segment (below it the reader's lower bound already holds), within reach of a
     * 32-bit table offset */
    size_t len = 1 << 20;
    uint8_t *none = MAP_FAILED;
    for (uintptr_t at = ((uintptr_t)seg_end + (16u << 20)) & ~(uintptr_t)4095;
         none == MAP_FAILED && at < (uintptr_t)hdr + (1u << 30); at += 64u << 20)
        none = mmap((void *)at, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    assert_true(none != MAP_FAILED);
    intptr_t d = (intptr_t)(none + len / 2 - hdr);
    assert_true(d == (int32_t)d && none > seg_end);
    uint32_t n;
    memcpy(&n, hdr + 8, 4);
    for (uint32_t i = 0; i < n; i++) {
        int32_t off = (int32_t)d;
        memcpy(hdr + 12 + i * 8 + 4, &off, 4);
    }
    for (unsigned i = 0; i < npcs; i++) {
        struct lum_cfi_rule r;
        assert_int_equal(lum_cfi_rule(pcs[i], &r), LUM_CFI_NONE);
    }
    restore();
    munmap(none, len);
}

/* An indirect eh_frame_ptr whose address is the top of the address space: address + 8 wraps
 * around, and a check by "q + 8 <= end" lets it through. */
static void test_indirect_wraps(void **state)
{
    (void)state;
    restore();
    hdr[1] = 0x80 | 0x04; /* indirect udata8: eh_frame_ptr and fde_count read as one pointer */
    uint64_t top = UINT64_MAX - 3;
    memcpy(hdr + 4, &top, 8);
    for (unsigned i = 0; i < npcs; i++) {
        struct lum_cfi_rule r;
        assert_int_equal(lum_cfi_rule(pcs[i], &r), LUM_CFI_NONE);
    }
    restore();
}

/* Random damage anywhere in the segment that holds the tables: lookups return, rules stay in
 * form.  The same seeds every run. */
static void test_random_damage(void **state)
{
    (void)state;
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    size_t len = (size_t)(seg_end - seg);
    unsigned rounds = 20000, ok = 0;
    for (unsigned round = 0; round < rounds; round++) {
        restore();
        unsigned flips = 1 + round % 4;
        for (unsigned k = 0; k < flips; k++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            size_t at = (size_t)(x % len);
            /* mostly in the tables (from .eh_frame_hdr on), some anywhere */
            if (round % 8 && hdr - seg < (ptrdiff_t)len)
                at = (size_t)(hdr - seg) + (size_t)(x >> 32) % (len - (size_t)(hdr - seg));
            seg[at] = round % 3 ? (uint8_t)(x >> 24) : (uint8_t)(seg[at] ^ (1u << (x >> 40) % 8));
        }
        ok += look_all();
    }
    restore();
    fprintf(stderr, "random damage: %u rounds, %u of %u lookups gave a rule\n", rounds, ok, rounds * npcs);
}

static int teardown(void **state)
{
    (void)state;
    restore();
    free(saved);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_intact),
        cmocka_unit_test(test_fde_past_segment),
        cmocka_unit_test(test_indirect_wraps),
        cmocka_unit_test(test_random_damage),
        cmocka_unit_test(test_intact),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
