/* Unit checks of tools/common pieces that the integration tests exercise only indirectly:
 * the u64 hash map (randomised against a reference, with deletions: the live-sample table of
 * allocsnoop depends on backward-shift deletion being right), frame formatting, JSON strings
 * from bytes that are not UTF-8, and a registry walk that cannot reach the list's end. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "tc.h"

static int failures;
#define CHECK(c, ...)                                                                                          \
    do {                                                                                                       \
        if (!(c)) {                                                                                            \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                                        \
            printf(__VA_ARGS__);                                                                               \
            printf("\n");                                                                                      \
            failures++;                                                                                        \
        }                                                                                                      \
    } while (0)

static void map64_random(void)
{
    enum { KEYS = 4096, OPS = 300000 };
    static uint64_t ref[KEYS];
    static int has[KEYS];
    struct tc_map64 m = {0};
    uint64_t rng = 88172645463325252ull;
    for (int it = 0; it < OPS && !failures; it++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        int k = (int)(rng % KEYS), op = (int)((rng >> 20) % 3);
        uint64_t key = (uint64_t)k << 4 | 1; /* pointer-like keys */
        if (op == 0) {
            bool created;
            uint64_t *v = tc_map64_put(&m, key, &created);
            CHECK(v, "put returned NULL");
            CHECK(created == !has[k], "put: created %d for key present %d", created, has[k]);
            *v = (uint64_t)it;
            ref[k] = (uint64_t)it;
            has[k] = 1;
        } else if (op == 1) {
            uint64_t v = 0;
            bool d = tc_map64_del(&m, key, &v);
            CHECK(d == (bool)has[k] && (!d || v == ref[k]), "del mismatch at op %d", it);
            has[k] = 0;
        } else {
            uint64_t *v = tc_map64_get(&m, key);
            CHECK((v != NULL) == (bool)has[k] && (!v || *v == ref[k]), "get mismatch at op %d", it);
        }
    }
    size_t n = 0;
    for (int k = 0; k < KEYS; k++)
        n += (size_t)has[k];
    CHECK(m.len == n, "len %zu != %zu", m.len, n);
    tc_map64_free(&m);
}

static void frame_format(void)
{
    char buf[256];
    struct tc_frame named = {"site_a", "/usr/bin/x", 0x10, false};
    struct tc_frame unknown = {"[unknown]", "/usr/lib/libfoo.so.1", 0x1234, false};
    struct tc_frame nomod = {"[unknown]", NULL, 0, false};
    CHECK(!strcmp(tc_frame_str(&named, buf, sizeof(buf)), "site_a"), "named frame");
    CHECK(!strcmp(tc_frame_str(&unknown, buf, sizeof(buf)), "[unknown] (libfoo.so.1+0x1234)"), "got %s", buf);
    CHECK(!strcmp(tc_frame_str(&nomod, buf, sizeof(buf)), "[unknown]"), "unknown without module");
    char *d = tc_demangle("_ZN7lumtest4PoolIdE4fillEm");
    CHECK(d && !strcmp(d, "lumtest::Pool<double>::fill(unsigned long)"), "demangle: %s", d ? d : "(null)");
    free(d);
    CHECK(tc_demangle("malloc") == NULL, "C name left alone");
}

static void json_utf8(void)
{
    static const struct {
        const char *in, *out;
    } cases[] = {
        {"plain \"q\" \\ \n", "\"plain \\\"q\\\" \\\\ \\u000a\""},
        {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\""},
        {"cut\xe2\x82", "\"cut\\ufffd\\ufffd\""},      /* a comm cut inside a character */
        {"cut\xe2", "\"cut\\ufffd\""},
        {"\xff\xfe", "\"\\ufffd\\ufffd\""},
        {"\xc0\xaf", "\"\\ufffd\\ufffd\""},              /* overlong '/' */
        {"\xed\xa0\x80", "\"\\ufffd\\ufffd\\ufffd\""},  /* surrogate */
        {"\xf4\x90\x80\x80", "\"\\ufffd\\ufffd\\ufffd\\ufffd\""}, /* past U+10FFFF */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);
        tc_json_str(f, cases[i].in);
        fclose(f);
        CHECK(!strcmp(buf, cases[i].out), "json case %zu: got %s", i, buf);
        free(buf);
    }
}

/* A thread list whose third record links to memory that cannot be read, in our own process:
 * what an interval reading meets when the task it reads through exits mid-walk (there ESRCH,
 * here EFAULT).  The reading must fail, not pass for a list of two threads: alloctop kept such
 * a cut reading, newest threads only, and its final report lost the oldest 105 of 4200 threads
 * (past the exit-time reading's bound, they show the last interval's figures). */
static void registry_walk_cut(void)
{
    long page = sysconf(_SC_PAGESIZE);
    char *gone = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(gone != MAP_FAILED, "mmap");
    if (gone == MAP_FAILED)
        return;
    munmap(gone, (size_t)page);
    static struct lum_thread_counters_v1 rec[3];
    static struct lum_registry_v1 reg;
    reg.magic = LUM_REGISTRY_MAGIC;
    reg.version = LUM_PROBES_VERSION;
    reg.counters_size = sizeof(rec[0]);
    reg.threads_head = (uint64_t)(uintptr_t)&rec[0];
    for (int i = 0; i < 3; i++) {
        rec[i].tid = 100 + (uint32_t)i;
        rec[i].state = LUM_THREAD_LIVE;
        rec[i].next = i < 2 ? (uint64_t)(uintptr_t)&rec[i + 1] : 0;
    }
    struct tc_target t = {.pid = getpid(), .registry_addr = (uint64_t)(uintptr_t)&reg};
    struct lum_registry_v1 got;
    struct tc_thread *threads = NULL;
    size_t n = 0;
    int r = tc_registry_read(&t, &got, &threads, &n);
    if (r == -EPERM || r == -ENOSYS) { /* no process_vm_readv here (seccomp): nothing to check */
        printf("skip registry_walk_cut: process_vm_readv: %s\n", strerror(-r));
        free(threads);
        return;
    }
    CHECK(r == 0 && n == 3, "whole list: r %d, %zu threads", r, n);
    rec[2].next = (uint64_t)(uintptr_t)gone;
    n = 0;
    r = tc_registry_read(&t, &got, &threads, &n);
    CHECK(r < 0, "a walk cut at its fourth record passed for a list of %zu threads (r %d)", n, r);
    free(threads);
}

int main(void)
{
    map64_random();
    frame_format();
    json_utf8();
    registry_walk_cut();
    printf(failures ? "%d failure(s)\n" : "PASS\n", failures);
    return failures != 0;
}
