/* The unwind tables read from a loaded object's file (cfi.c): the rules must be the mapping's
 * whatever became of the file since it was loaded, and no descriptor may stay open.  A copy of
 * libcfi_victim.so is loaded, then replaced on disk by another ELF file (another build-id: the
 * file is not read) or by a copy of its first page only (the same build-id, but its tables are
 * missing: what cannot be read from the file comes from the mapping). */
#define _GNU_SOURCE 1
#include <dirent.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <link.h>
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
#include <time.h>
#include <sys/wait.h>
#include <pthread.h>
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

/* The rule for ra read through the mapping only, the reader's other source. */
static int mapping_rule(uintptr_t ra, struct lum_cfi_rule *m)
{
    lum_cfi_read_files = false;
    int k = lum_cfi_rule(ra, m);
    lum_cfi_read_files = true;
    return k;
}

/* Whether a lookup's answer for ra (k, with *r) is the mapping's (a rule left zeroed when there
 * is none). */
static bool as_mapping(uintptr_t ra, int k, const struct lum_cfi_rule *r)
{
    struct lum_cfi_rule m;
    int km = mapping_rule(ra, &m);
    return k == km && r->cfa_off == m.cfa_off && r->rbp_off == m.rbp_off && r->cfa_rbp == m.cfa_rbp;
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
            struct lum_cfi_rule r;
            uint64_t from_file = lum_cfi_file_lookups;
            int got = lum_cfi_rule(f + d, &r);
            bool used_file = lum_cfi_file_lookups != from_file;
            if (d == 1) /* the first byte: within every function's FDE */
                assert_int_equal(got, LUM_CFI_OK);
            assert_true(as_mapping(f + d, got, &r));
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

/* A walk's lookups (lum_cfi_rule_with) open an object's file once, whatever the number of rules
 * they derive in it, and again only when they move to another object; the rules are those of
 * lookups of their own, and no descriptor outlives lum_cfi_files_close. */
static void test_walk_opens_once(void **state)
{
    (void)state;
    char path[96];
    void *h = load("libw.so", path, sizeof path);
    /* both objects known to the reader (its first lookup in one reads its header) */
    struct lum_cfi_rule first;
    assert_int_equal(lum_cfi_rule((uintptr_t)dlsym(h, fns[0]) + 1, &first), LUM_CFI_OK);
    assert_true(lum_cfi_rule((uintptr_t)&qsort + 1, &first) != LUM_CFI_NONE);
    int fds = open_fds();
    struct lum_cfi_files files = LUM_CFI_FILES_INIT;
    uint64_t opens = lum_cfi_file_opens;
    for (size_t i = 0; i < NFNS; i++) {
        uintptr_t f = (uintptr_t)dlsym(h, fns[i]);
        struct lum_cfi_rule r, own;
        assert_int_equal(lum_cfi_rule_with(&files, f + 1, &r), LUM_CFI_OK);
        uint64_t before = lum_cfi_file_opens;
        assert_int_equal(lum_cfi_rule(f + 1, &own), LUM_CFI_OK);
        assert_int_equal(lum_cfi_file_opens, before + 1); /* a lookup of its own: its own open */
        opens++;
        assert_int_equal(r.cfa_off, own.cfa_off);
        assert_int_equal(r.rbp_off, own.rbp_off);
        assert_int_equal(r.cfa_rbp, own.cfa_rbp);
    }
    assert_int_equal(lum_cfi_file_opens, opens + 1);
    assert_int_equal(open_fds(), fds + 1); /* the walk's, until it ends */
    /* to libc and back: one open each way */
    struct lum_cfi_rule r;
    assert_true(lum_cfi_rule_with(&files, (uintptr_t)&qsort + 1, &r) != LUM_CFI_NONE);
    assert_int_equal(lum_cfi_rule_with(&files, (uintptr_t)dlsym(h, fns[0]) + 1, &r), LUM_CFI_OK);
    assert_int_equal(lum_cfi_file_opens, opens + 3);
    lum_cfi_files_close(&files);
    assert_int_equal(open_fds(), fds);
    dlclose(h);
}

/* Whether this process has a descriptor open on path. */
static bool has_fd_on(const char *path)
{
    DIR *d = opendir("/proc/self/fd");
    assert_non_null(d);
    bool found = false;
    struct dirent *e;
    while (!found && (e = readdir(d))) {
        char link[300], target[256];
        snprintf(link, sizeof link, "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(link, target, sizeof target - 1);
        if (n > 0) {
            target[n] = 0;
            found = strcmp(target, path) == 0;
        }
    }
    closedir(d);
    return found;
}

struct walk_arg {
    void *h;
    int ready[2]; /* the walker says it has the file open */
};

/* A walk that has read a rule from the file, and goes on for a while before it ends. */
static void *slow_walk(void *p)
{
    struct walk_arg *a = p;
    struct lum_cfi_files files = LUM_CFI_FILES_INIT;
    struct lum_cfi_rule r;
    assert_int_equal(lum_cfi_rule_with(&files, (uintptr_t)dlsym(a->h, fns[0]) + 1, &r), LUM_CFI_OK);
    assert_int_equal(write(a->ready[1], "x", 1), 1);
    usleep(300 * 1000);
    lum_cfi_files_close(&files);
    return NULL;
}

/* A fork while another thread's walk holds its object's file open waits for the walk to end:
 * the child must not inherit the descriptor (a program that checks for leaked descriptors, or
 * counts on the numbers it gets, would find it). */
static void test_walk_fd_not_forked(void **state)
{
    (void)state;
    char path[96];
    void *h = load("libk.so", path, sizeof path);
    struct lum_cfi_rule r;
    assert_int_equal(lum_cfi_rule((uintptr_t)dlsym(h, fns[0]) + 1, &r), LUM_CFI_OK);
    struct walk_arg a = {h, {-1, -1}};
    assert_int_equal(pipe(a.ready), 0);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, slow_walk, &a), 0);
    char c;
    assert_int_equal(read(a.ready[0], &c, 1), 1);
    assert_true(has_fd_on(path));
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
        _exit(has_fd_on(path) ? 1 : 0);
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
    pthread_join(t, NULL);
    assert_false(has_fd_on(path));
    close(a.ready[0]);
    close(a.ready[1]);
    dlclose(h);
}

static int cmp_uptr(const void *a, const void *b)
{
    uintptr_t x = *(const uintptr_t *)a, y = *(const uintptr_t *)b;
    return x < y ? -1 : x > y;
}

static uintptr_t libc_pcs[1 << 13];
static unsigned libc_npcs;

static int libc_functions(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)size, (void)arg;
    if (!info->dlpi_name || !strstr(info->dlpi_name, "libc.so"))
        return 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        if (info->dlpi_phdr[i].p_type != PT_GNU_EH_FRAME)
            continue;
        const uint8_t *hdr = (const uint8_t *)(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr);
        uint32_t count;
        memcpy(&count, hdr + 8, 4);
        const int32_t *tab = (const int32_t *)(hdr + 12);
        for (uint32_t k = 0; k < count && libc_npcs < sizeof libc_pcs / sizeof *libc_pcs; k++)
            libc_pcs[libc_npcs++] = (uintptr_t)hdr + (uintptr_t)(intptr_t)tab[2 * k] + 1;
    }
    return 1;
}

/* The top of the search through an object's table is kept (cfi.c, PROBE_LEVELS): libc's ~3700
 * entries took 6 reads of a probe each, then the last 64 entries, the FDE and its CIE; once the
 * top is known, a lookup reads the last three only.  The rules are the mapping's. */
static void test_search_top_kept(void **state)
{
    (void)state;
    dl_iterate_phdr(libc_functions, NULL);
    assert_true(libc_npcs > 1024);
    qsort(libc_pcs, libc_npcs, sizeof *libc_pcs, cmp_uptr);
    struct lum_cfi_files files = LUM_CFI_FILES_INIT;
    struct lum_cfi_rule r;
    /* a first pass over every 7th function learns the top */
    for (unsigned i = 0; i < libc_npcs; i += 7)
        lum_cfi_rule_with(&files, libc_pcs[i], &r);
    unsigned looked = 0;
    uint64_t reads = lum_cfi_file_reads, lookups = lum_cfi_file_lookups;
    for (unsigned i = 3; i < libc_npcs; i += 7, looked++) {
        int k = lum_cfi_rule_with(&files, libc_pcs[i], &r);
        assert_true(as_mapping(libc_pcs[i], k, &r));
    }
    lum_cfi_files_close(&files);
    assert_int_equal(lum_cfi_file_lookups - lookups, looked);
    fprintf(stderr, "libc: %u lookups after the first pass, %.2f file reads each\n", looked,
            (double)(lum_cfi_file_reads - reads) / looked);
    assert_true(lum_cfi_file_reads - reads <= 3 * (uint64_t)looked);
}

/* Lookups of all 700 functions of a layout library in one walk's scope against the mapping's:
 * how many differ. */
static unsigned layout_mismatches(void *h)
{
    struct lum_cfi_files files = LUM_CFI_FILES_INIT;
    unsigned bad = 0;
    for (int i = 0; i < 700; i++) {
        char name[16];
        snprintf(name, sizeof name, "f%d", i);
        uintptr_t f = (uintptr_t)dlsym(h, name);
        assert_true(f != 0);
        struct lum_cfi_rule r, m;
        int k = lum_cfi_rule_with(&files, f + 1, &r);
        assert_int_equal(mapping_rule(f + 1, &m), LUM_CFI_OK);
        bad += !as_mapping(f + 1, k, &r);
    }
    lum_cfi_files_close(&files);
    return bad;
}

/* Layout X loaded at path (a copy of its file). */
static void *load_x(const char *path)
{
    replace(CFI_LAYOUT_X, path, 0);
    void *h = dlopen(path, RTLD_NOW);
    assert_non_null(h);
    return h;
}

/* h (layout X at path) closed, and layout Y loaded there, returned; *same: where X was, with
 * X's link_map and name, as a plugin rebuilt and reloaded often is (else there is nothing to
 * show: the index tells the two apart). */
static void *reload_as_y(const char *path, void *h, bool *same)
{
    struct link_map *lm;
    assert_int_equal(dlinfo(h, RTLD_DI_LINKMAP, &lm), 0);
    uintptr_t base = lm->l_addr;
    const void *lm_x = lm;
    const char *name_x = lm->l_name;
    size_t name_len = strlen(name_x) + 1;
    dlclose(h);
    /* the block of the name's size a free let go of first goes here: the loader's next one is
     * then the old name's (lumalloc's thread cache hands blocks back last in, first out) */
    void *hold = malloc(name_len);
    replace(CFI_LAYOUT_Y, path, 0);
    h = dlopen(path, RTLD_NOW);
    assert_non_null(h);
    assert_int_equal(dlinfo(h, RTLD_DI_LINKMAP, &lm), 0);
    *same = lm->l_addr == base && (const void *)lm == lm_x && lm->l_name == name_x;
    free(hold);
    return h;
}

/* Another build loaded where one of the same layout was (a plugin rebuilt and reloaded): the
 * same address, link_map and name when the loader's freed blocks are taken again, which the
 * object cache takes for the same object.  The kept top of the first build's table search must
 * not serve the second: it sent lookups to the wrong 64 entries, "no rule" for 31 functions of
 * 700, until the slot took another object (found in review). */
static void test_same_layout_reload(void **state)
{
    (void)state;
    char path[96];
    snprintf(path, sizeof path, "%s/liblayout.so", dir);
    void *h = load_x(path);
    assert_int_equal(layout_mismatches(h), 0);
    bool same;
    h = reload_as_y(path, h, &same);
    unsigned bad = same ? layout_mismatches(h) : 0;
    dlclose(h);
    unlink(path);
    if (!same)
        skip();
    assert_int_equal(bad, 0);
}

/* The periodic look (not thorough) compares the objects' bytes at most once in 10 ms: another
 * build of the same layout reloaded where the first was, with the same link_map (which only
 * the bytes tell apart), moves the count at the first such look over 10 ms later (the coarse
 * clock's tick added: 30 ms). */
static void test_prints_every_10ms(void **state)
{
    (void)state;
    char path[96];
    snprintf(path, sizeof path, "%s/liblayout2.so", dir);
    void *h = load_x(path);
    /* an earlier test's unload noticed now (a moved count starts the set anew), then rules
     * derived: the object is one a look reads */
    (void)lum_cfi_unloads(true);
    assert_int_equal(layout_mismatches(h), 0);
    uint64_t before = lum_cfi_unloads(true);
    bool same;
    h = reload_as_y(path, h, &same);
    if (same) {
        struct timespec pause = {0, 30 * 1000000L};
        nanosleep(&pause, NULL);
    }
    uint64_t after = lum_cfi_unloads(false);
    dlclose(h);
    unlink(path);
    if (!same)
        skip();
    assert_true(after != before);
}

/* Copies of the victim (each an object of its own, its build-id note at an address of its
 * own), loaded and a rule derived in each: objects an unload look reads, past one batch. */
#define COPIES 12
static void *copies[COPIES];

static void derive_in_copies(int n)
{
    for (int i = 0; i < n; i++) {
        struct lum_cfi_rule r;
        assert_int_equal(lum_cfi_rule((uintptr_t)dlsym(copies[i], fns[0]) + 1, &r), LUM_CFI_OK);
    }
}

/* Whether the look's count stays put over many looks, and then moves once copy i is unloaded
 * (a moved count starts the set of objects looked at anew).  The periodic look (not thorough:
 * the objects' bytes read at most once in 10 ms) notices an object gone at once, as the index
 * no longer names it. */
static void unload_noticed(int i)
{
    uint64_t u = lum_cfi_unloads(true);
    for (int k = 0; k < 100; k++)
        assert_true(lum_cfi_unloads(k & 1) == u);
    dlclose(copies[i]);
    uint64_t after = lum_cfi_unloads(false);
    assert_true(after != u);
    assert_true(lum_cfi_unloads(true) == after);
}

/* The look at unloads reads the objects rules came from in batches (cfi.c, PRINT_BATCH): with
 * nothing unloaded its count stays put, look after look; an object unloaded in the last batch
 * or the first moves it. */
static void test_unloads_many_objects(void **state)
{
    (void)state;
    /* an unload by an earlier test noticed now: the set of objects starts anew before ours */
    (void)lum_cfi_unloads(true);
    for (int i = 0; i < COPIES; i++) {
        char name[32], path[96];
        snprintf(name, sizeof name, "libcopy%d.so", i);
        copies[i] = load(name, path, sizeof path);
    }
    derive_in_copies(COPIES);
    unload_noticed(COPIES - 1);
    derive_in_copies(COPIES - 1);
    unload_noticed(0);
    for (int i = 1; i < COPIES - 1; i++)
        dlclose(copies[i]);
}

static int setup(void **state)
{
    (void)state;
    /* the process's own samples would derive rules too, and move the counts tests read */
    if (lum_options_set("sample_interval", "0") != 0)
        return -1;
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    static const char *const names[] = {"liba.so", "libb.so", "libc1.so", "libc2.so", "libd.so", "libf.so", "libw.so", "libk.so", "liblayout.so", "new"};
    char p[96];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        unlink(p);
    }
    for (int i = 0; i < COPIES; i++) {
        snprintf(p, sizeof p, "%s/libcopy%d.so", dir, i);
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
        cmocka_unit_test(test_walk_opens_once),
        cmocka_unit_test(test_walk_fd_not_forked),
        cmocka_unit_test(test_search_top_kept),
        cmocka_unit_test(test_same_layout_reload),
        cmocka_unit_test(test_prints_every_10ms),
        cmocka_unit_test(test_unloads_many_objects),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
