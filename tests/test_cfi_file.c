/* The unwind tables read from a loaded object's file (cfi.c): the rules must be the mapping's
 * whatever became of the file since it was loaded, and no descriptor may stay open.  A copy of
 * libcfi_victim.so is loaded, then replaced on disk by another ELF file (another build-id: the
 * file is not read) or by a copy of its first page only (the same build-id, but its tables are
 * missing: what cannot be read from the file comes from the mapping). */
#define _GNU_SOURCE 1
#include <dirent.h>
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
#include "options.h"

static char dir[] = "/tmp/test_cfi_file.XXXXXX";
static const char *const fns[] = {"victim_leaf", "victim_pushes", "victim_vla", "victim_early_out"};
#define NFNS (sizeof fns / sizeof fns[0])

/* Copies the first `len` bytes of from (all when 0) to a temporary file renamed to `to`. */
static void replace(const char *from, const char *to, off_t len)
{
    char tmp[96];
    snprintf(tmp, sizeof tmp, "%s/new", dir);
    int in = open(from, O_RDONLY), out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0755);
    assert_true(in >= 0 && out >= 0);
    struct stat st;
    assert_int_equal(fstat(in, &st), 0);
    size_t n = (size_t)(len ? len : st.st_size);
    assert_int_equal(sendfile(out, in, NULL, n), (ssize_t)n);
    close(in);
    close(out);
    assert_int_equal(rename(tmp, to), 0);
}

static int open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    assert_non_null(d);
    int n = 0;
    while (readdir(d))
        n++;
    closedir(d);
    return n;
}

/* Each function's rule, as return addresses a little way into it (past the end of the
 * smallest: no rule there, from either source): from the file (when it is the one loaded) and
 * through the mapping must agree. */
static void check_rules(void *h, bool expect_file)
{
    for (size_t i = 0; i < NFNS; i++) {
        uintptr_t f = (uintptr_t)dlsym(h, fns[i]);
        assert_true(f != 0);
        for (uintptr_t d = 1; d < 16; d += 3) {
            struct lum_cfi_rule r, m;
            uint64_t from_file = lum_cfi_file_lookups;
            int got = lum_cfi_rule(f + d, &r);
            bool used_file = lum_cfi_file_lookups != from_file;
            lum_cfi_read_files = false;
            int got_m = lum_cfi_rule(f + d, &m);
            lum_cfi_read_files = true;
            if (d == 1) /* the first byte: within every function's FDE */
                assert_int_equal(got_m, LUM_CFI_OK);
            assert_int_equal(got, got_m);
            assert_int_equal(r.cfa_off, m.cfa_off);
            assert_int_equal(r.rbp_off, m.rbp_off);
            assert_int_equal(r.cfa_rbp, m.cfa_rbp);
            assert_int_equal(used_file, expect_file);
        }
    }
}

static void *load(const char *name, char *path, size_t size)
{
    snprintf(path, size, "%s/%s", dir, name);
    replace(CFI_VICTIM_PATH, path, 0);
    void *h = dlopen(path, RTLD_NOW);
    assert_non_null(h);
    return h;
}

static void test_intact(void **state)
{
    (void)state;
    char path[96];
    int fds = open_fds();
    void *h = load("liba.so", path, sizeof path);
    check_rules(h, true);
    assert_int_equal(open_fds(), fds + 0);
    dlclose(h);
}

/* Another build at the path: its tables are not the loaded object's. */
static void test_other_file(void **state)
{
    (void)state;
    char path[96];
    void *h = load("libb.so", path, sizeof path);
    check_rules(h, true); /* the object known to the reader while its file is intact */
    replace("/proc/self/exe", path, 0);
    int fds = open_fds();
    check_rules(h, false);
    assert_int_equal(open_fds(), fds);
    dlclose(h);
}

/* The same build-id but not the tables (the file cut after its first page): the mapping's. */
static void test_short_file_known(void **state)
{
    (void)state;
    char path[96];
    void *h = load("libc1.so", path, sizeof path);
    check_rules(h, true);
    replace(CFI_VICTIM_PATH, path, 4096);
    int fds = open_fds();
    for (size_t i = 0; i < NFNS; i++) {
        uintptr_t f = (uintptr_t)dlsym(h, fns[i]);
        struct lum_cfi_rule r;
        assert_int_equal(lum_cfi_rule(f + 1, &r), LUM_CFI_OK);
    }
    check_rules(h, true); /* opened (the build-id matches), read where it could be */
    assert_int_equal(open_fds(), fds);
    dlclose(h);
}

/* The same, cut before the reader first met the object: it must not be remembered as an
 * object without tables. */
static void test_short_file_first(void **state)
{
    (void)state;
    char path[96];
    void *h = load("libc2.so", path, sizeof path);
    replace(CFI_VICTIM_PATH, path, 4096);
    int fds = open_fds();
    check_rules(h, true);
    assert_int_equal(open_fds(), fds);
    dlclose(h);
}

/* LUMALLOC_UNWIND_FILES=off (a sandbox that kills on openat): the mapping only, same rules. */
static void test_files_off(void **state)
{
    (void)state;
    char path[96];
    void *h = load("libd.so", path, sizeof path);
    assert_int_equal(lum_options_set("unwind_files", "off"), 0);
    check_rules(h, false);
    assert_int_equal(lum_options_set("unwind_files", "on"), 0);
    dlclose(h);
}

/* The path now names a FIFO (a plugin loaded from /proc/self/fd/N whose N was closed and
 * reused): opened as the file, it blocked the walk, and with it malloc, for good. */
static void test_path_now_a_fifo(void **state)
{
    (void)state;
    char path[96];
    void *h = load("libf.so", path, sizeof path);
    check_rules(h, true);
    assert_int_equal(unlink(path), 0);
    assert_int_equal(mkfifo(path, 0600), 0);
    int fds = open_fds();
    alarm(30); /* a blocked open never returns: SIGALRM ends the test */
    check_rules(h, false);
    alarm(0);
    assert_int_equal(open_fds(), fds);
    dlclose(h);
}

static int setup(void **state)
{
    (void)state;
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    static const char *const names[] = {"liba.so", "libb.so", "libc1.so", "libc2.so", "libd.so", "libf.so", "new"};
    char p[96];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        unlink(p);
    }
    rmdir(dir);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_intact),
        cmocka_unit_test(test_other_file),
        cmocka_unit_test(test_short_file_known),
        cmocka_unit_test(test_short_file_first),
        cmocka_unit_test(test_files_off),
        cmocka_unit_test(test_path_now_a_fifo),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
