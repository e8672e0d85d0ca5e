/* Function names from an object's own symbol tables (elfsym.c): for the executable and a loaded
 * library, and none when the file at the library's path is no longer the one that was loaded
 * (renamed over by an upgrade or a rebuild): names from another file would be wrong names. */
#define _GNU_SOURCE 1
#include <dlfcn.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>
#include "obs_internal.h"

static char dir[] = "/tmp/test_elfsym.XXXXXX";

static void copy(const char *from, const char *to)
{
    int in = open(from, O_RDONLY), out = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0755);
    assert_true(in >= 0 && out >= 0);
    struct stat st;
    assert_int_equal(fstat(in, &st), 0);
    assert_int_equal(sendfile(out, in, NULL, (size_t)st.st_size), st.st_size);
    close(in);
    close(out);
}

static __attribute__((noinline)) int static_in_executable(int x)
{
    return x * 7 + (int)(uintptr_t)__builtin_return_address(0);
}

static void test_executable(void **state)
{
    (void)state;
    char name[128];
    uint64_t off = 0;
    assert_true(static_in_executable(1) != 0);
    assert_true(lum_elf_proc_name((uintptr_t)&static_in_executable + 3, name, sizeof name, &off));
    assert_string_equal(name, "static_in_executable");
    assert_int_equal(off, 3);
}

static void test_library(void **state)
{
    (void)state;
    char path[64], name[128];
    snprintf(path, sizeof path, "%s/libv.so", dir);
    copy(CFI_VICTIM_PATH, path);
    void *h = dlopen(path, RTLD_NOW);
    assert_non_null(h);
    uintptr_t f = (uintptr_t)dlsym(h, "victim_pushes");
    uint64_t off = 0;
    assert_true(lum_elf_proc_name(f + 4, name, sizeof name, &off));
    assert_string_equal(name, "victim_pushes");
    assert_int_equal(off, 4);
    dlclose(h);
}

/* Another ELF file renamed over a loaded library's path: its symbols are not the library's. */
static void test_replaced_file(void **state)
{
    (void)state;
    char path[64], tmp[64], name[128];
    snprintf(path, sizeof path, "%s/libw.so", dir);
    snprintf(tmp, sizeof tmp, "%s/new", dir);
    copy(CFI_VICTIM_PATH, path);
    void *h = dlopen(path, RTLD_NOW);
    assert_non_null(h);
    uintptr_t f = (uintptr_t)dlsym(h, "victim_pushes");
    copy("/proc/self/exe", tmp);
    assert_int_equal(rename(tmp, path), 0);
    uint64_t off = 0;
    bool named = lum_elf_proc_name(f + 4, name, sizeof name, &off);
    if (named)
        fprintf(stderr, "named from the new file: %s+%#lx\n", name, (unsigned long)off);
    assert_false(named);
    dlclose(h);
}

/* A library rebuilt and loaded again at the same address under the same path: the file mapped
 * for the first build must give way to the new one (it was kept, and every later name of the
 * library was lost). */
static void test_reloaded_rebuild(void **state)
{
    (void)state;
    char path[64], tmp[64], name[128];
    snprintf(path, sizeof path, "%s/libr.so", dir);
    snprintf(tmp, sizeof tmp, "%s/new", dir);
    uintptr_t at[2];
    static const char *const builds[2] = {CFI_PLUG_A, CFI_PLUG_B};
    for (int i = 0; i < 2; i++) {
        copy(builds[i], tmp);
        assert_int_equal(rename(tmp, path), 0);
        void *h = dlopen(path, RTLD_NOW);
        assert_non_null(h);
        at[i] = (uintptr_t)dlsym(h, "plug");
        uint64_t off = 0;
        bool named = lum_elf_proc_name(at[i] + 2, name, sizeof name, &off);
        dlclose(h);
        if (i == 1 && at[1] != at[0])
            skip(); /* not loaded at the same address: nothing to show */
        assert_true(named);
        assert_string_equal(name, "plug");
    }
}

static int setup(void **state)
{
    (void)state;
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char p[64];
    snprintf(p, sizeof p, "%s/libv.so", dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/libw.so", dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/libr.so", dir);
    unlink(p);
    rmdir(dir);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_executable),
        cmocka_unit_test(test_library),
        cmocka_unit_test(test_replaced_file),
        cmocka_unit_test(test_reloaded_rebuild),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
