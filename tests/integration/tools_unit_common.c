/* Unit checks of tools/common pieces that the integration tests exercise only indirectly:
 * the u64 hash map (randomised against a reference, with deletions: the live-sample table of
 * allocsnoop depends on backward-shift deletion being right), frame formatting, JSON strings
 * from bytes that are not UTF-8, a registry walk that cannot reach the list's end, and (as root,
 * through ctest: SHAPES and FAKELUM) attaching the probes after the thread chosen for it exited. */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <bpf/libbpf.h>

#include "alloctop.h"
#include "alloctop.skel.h"
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

/* A frame resolved in a process whose files were then closed (allocsnoop -b releases a process
 * gone for a second) keeps its module's name: the name was dwfl's, freed with the process's Dwfl
 * session, and the pprof string table and the "[unknown] (module+0x...)" frames read garbage. */
static void module_name_outlives_release(void)
{
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    CHECK(n > 0, "readlink /proc/self/exe");
    if (n <= 0)
        return;
    exe[n] = 0;
    struct tc_symbolizer *s = tc_sym_new();
    tc_sym_snapshot(s, getpid(), NULL);
    const struct tc_frame *f = tc_sym_resolve(s, getpid(), (uint64_t)(uintptr_t)&map64_random + 1);
    CHECK(f->module && !strcmp(f->module, exe), "module before release: %s", f->module ? f->module : "(null)");
    pid_t key = tc_sym_retire(s, getpid());
    CHECK(key < 0, "retired key %d", (int)key);
    /* what was freed is handed out again and overwritten */
    enum { CHUNKS = 4096 };
    static char *chunks[CHUNKS];
    for (int i = 0; i < CHUNKS; i++)
        if ((chunks[i] = malloc((size_t)n + 1 + (size_t)(i % 64))))
            memset(chunks[i], 'X', (size_t)n + 1 + (size_t)(i % 64));
    f = tc_sym_resolve(s, key, (uint64_t)(uintptr_t)&map64_random + 1);
    CHECK(f->module && !strncmp(f->module, exe, (size_t)n + 1), "module after release: %.64s",
          f->module ? f->module : "(null)");
    CHECK(!strcmp(f->name, "map64_random"), "name after release: %s", f->name);
    for (int i = 0; i < CHUNKS; i++)
        free(chunks[i]);
    tc_sym_free(s);
}

/* CI runs as root with BPF: a case that cannot run there fails rather than skips. */
static bool in_ci(void)
{
    const char *ci = getenv("CI");
    return ci && !strcmp(ci, "true");
}

/* The section called `name` in an ELF64 image held in memory, or NULL. */
static Elf64_Shdr *find_section(char *img, size_t len, const char *name)
{
    Elf64_Ehdr *eh = (Elf64_Ehdr *)img;
    if (len < sizeof(*eh) || eh->e_shoff + (uint64_t)eh->e_shnum * sizeof(Elf64_Shdr) > len ||
        eh->e_shstrndx >= eh->e_shnum)
        return NULL;
    Elf64_Shdr *sh = (Elf64_Shdr *)(img + eh->e_shoff);
    const char *names = img + sh[eh->e_shstrndx].sh_offset;
    for (unsigned i = 0; i < eh->e_shnum; i++)
        if (!strcmp(names + sh[i].sh_name, name))
            return &sh[i];
    return NULL;
}

/* A copy of the ELF file src in a temporary file, changed by edit; its path in out (64 bytes). */
static bool elf_copy_edited(const char *src, char *out, bool (*edit)(char *img, size_t len))
{
    FILE *f = fopen(src, "rb");
    if (!f)
        return false;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    rewind(f);
    char *img = len > 0 ? malloc((size_t)len) : NULL;
    bool ok = img && fread(img, 1, (size_t)len, f) == (size_t)len && edit(img, (size_t)len);
    fclose(f);
    snprintf(out, 64, "/tmp/tools_unit_elf.XXXXXX");
    int fd = ok ? mkstemp(out) : -1;
    ok = fd >= 0 && write(fd, img, (size_t)len) == len;
    if (fd >= 0)
        close(fd);
    free(img);
    return ok;
}

static bool dynamic_entsize_zero(char *img, size_t len)
{
    Elf64_Shdr *sh = find_section(img, len, ".dynamic");
    if (sh)
        sh->sh_entsize = 0;
    return sh != NULL;
}

/* The first probe note's descriptor cut just before the NUL that ends its provider
 * ("lumalloc"): the string runs on past the note. */
static bool provider_unterminated(char *img, size_t len)
{
    Elf64_Shdr *sh = find_section(img, len, ".note.stapsdt");
    if (!sh || sh->sh_offset + sizeof(Elf64_Nhdr) > len)
        return false;
    Elf64_Nhdr *nh = (Elf64_Nhdr *)(img + sh->sh_offset);
    const char *prov = (const char *)(nh + 1) + ((nh->n_namesz + 3) & ~3u) + 3 * 8;
    if (strcmp(prov, "lumalloc"))
        return false;
    nh->n_descsz = 3 * 8 + (Elf64_Word)strlen("lumalloc");
    return true;
}

/* ELF fields read from a file are checked before use: a .dynamic section with an entry size of
 * 0 killed the tools with SIGFPE (tc_elf_needs divided by it), and a probe note's provider was
 * compared with strcmp past the note's end. */
static void elf_untrusted(void)
{
    char path[64];
    if (!elf_copy_edited("/proc/self/exe", path, dynamic_entsize_zero)) {
        CHECK(0, "cannot make a copy of our executable with a .dynamic entry size of 0");
    } else {
        fflush(stdout);
        pid_t c = fork();
        if (c == 0) {
            char needed[256];
            _exit(tc_elf_needs(path, "lumalloc", needed, sizeof(needed)) ? 1 : 0);
        }
        int st = 0;
        waitpid(c, &st, 0);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "tc_elf_needs on .dynamic with sh_entsize 0: %s %d",
              WIFSIGNALED(st) ? "killed by signal" : "exit", WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
        unlink(path);
    }
    const char *fake = getenv("FAKELUM");
    if (!fake) {
        CHECK(!in_ci(), "elf_untrusted needs FAKELUM (ctest) under CI=true");
        printf("skip elf_untrusted's probe note: needs FAKELUM (ctest)\n");
        return;
    }
    CHECK(tc_elf_has_lumalloc_probes(fake), "%s has no lumalloc probes", fake);
    if (!elf_copy_edited(fake, path, provider_unterminated)) {
        CHECK(0, "cannot make a copy of %s with its first note's provider unterminated", fake);
        return;
    }
    CHECK(!tc_elf_has_lumalloc_probes(path), "a provider running past its note taken for 'lumalloc'");
    unlink(path);
}

static pid_t relay_pid;
static int relay_starts, relay_exits;

static int relay_event(void *ctx, void *data, size_t len)
{
    (void)ctx;
    const struct top_event *e = data;
    if (len >= sizeof(*e) && (pid_t)e->pid == relay_pid) {
        relay_starts += e->kind == TOP_THREAD_START;
        relay_exits += e->kind == TOP_THREAD_EXIT;
    }
    return 0;
}

/* Thread events of the relay process over up to `secs` (until both kinds came, if wait_both). */
static void relay_count(struct ring_buffer *rb, double secs, bool wait_both)
{
    relay_starts = relay_exits = 0;
    for (double end = tc_now() + secs; tc_now() < end && !(wait_both && relay_starts && relay_exits);)
        ring_buffer__poll(rb, 50);
}

/* Bounded waits of 10 s: a loaded CI machine may take its time, and they end as soon as done. */
static bool task_gone(pid_t pid, pid_t tid)
{
    for (int i = 0; i < 1000 && tc_task_alive(pid, tid); i++)
        usleep(10000);
    return !tc_task_alive(pid, tid);
}

/* The leader of the target left (pthread_exit), and the thread the probes are attached through
 * exits between two probes' attaches: what a tool met under load ("cannot attach to
 * lumalloc:sample ... (pid N): No such process", the process alive).  The second attach must go
 * through another live thread, the first probe (bound to the exited thread: its uprobe filter is
 * that task's mm, gone with it) must be reported for attaching again, and events must come. */
static void attach_after_chosen_thread_exits(void)
{
    const char *shapes = getenv("SHAPES"), *fake = getenv("FAKELUM");
    if (getenv("TOOLS_UNIT_NO_BPF")) { /* tools_valgrind: libbpf's bpf() calls are outside valgrind's model */
        printf("skip attach_after_chosen_thread_exits: TOOLS_UNIT_NO_BPF\n");
        return;
    }
    if (!shapes || !fake || geteuid() != 0) {
        CHECK(!in_ci(), "attach_after_chosen_thread_exits needs root and SHAPES, FAKELUM (ctest), and CI=true");
        if (!in_ci()) printf("skip attach_after_chosen_thread_exits: needs root and SHAPES, FAKELUM (ctest)\n");
        return;
    }
    tc_libbpf_quiet();
    int in[2], out[2];
    if (pipe(in) || pipe(out)) {
        CHECK(0, "pipe: %s", strerror(errno));
        return;
    }
    relay_pid = fork();
    if (relay_pid == 0) {
        dup2(in[0], 0);
        dup2(out[1], 1);
        close(in[1]);
        close(out[0]);
        setenv("LD_PRELOAD", fake, 1);
        execl(shapes, shapes, "relay", "30", (char *)NULL);
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    FILE *f = fdopen(out[0], "r");
    int first = 0, spawner = 0;
    CHECK(f && fscanf(f, "%d %d", &first, &spawner) == 2, "relay: no TIDs on its stdout");
    for (int i = 0; i < 1000 && tc_task_alive(relay_pid, relay_pid); i++)
        usleep(10000); /* the leader leaves right after printing */
    struct tc_target t = {.pid = relay_pid, .alive = true, .reattach = true};
    char err[512] = "";
    struct alloctop_bpf *skel = NULL;
    struct ring_buffer *rb = NULL;
    if (!first || tc_task_alive(relay_pid, relay_pid) || tc_target_locate(&t, err, sizeof(err))) {
        CHECK(0, "relay %d: leader still there, or not located: %s", (int)relay_pid, err);
        goto out;
    }
    CHECK(tc_attach_pid(&t) == first, "attach task %d, not the first thread %d", (int)tc_attach_pid(&t), first);
    skel = alloctop_bpf__open_and_load();
    rb = skel ? ring_buffer__new(bpf_map__fd(skel->maps.events), relay_event, NULL, NULL) : NULL;
    if (!rb) {
        int e = errno;
        CHECK(skel || !in_ci(), "alloctop's BPF programs: %s", strerror(e));
        CHECK(!skel, "ring buffer: %s", strerror(e));
        if (!skel && !in_ci()) printf("skip attach_after_chosen_thread_exits: no BPF here (%s)\n", strerror(e));
        goto out;
    }
    int r = tc_attach_usdt(&t, skel->progs.on_thread_start, "thread_start", true);
    CHECK(r == 0, "thread_start through %d: %s", first, strerror(-r));
    if (write(in[1], "x", 1) != 1 || !task_gone(relay_pid, first)) {
        CHECK(0, "thread %d did not exit", first);
        goto out;
    }
    ring_buffer__consume(rb); /* the events from before it exited */
    r = tc_attach_usdt(&t, skel->progs.on_thread_exit, "thread_exit", true);
    CHECK(r == 0, "thread_exit after thread %d exited: %s", first, strerror(-r));
    CHECK(t.attach_task != first && tc_task_alive(relay_pid, t.attach_task),
          "attached through %d, not a live thread other than %d (%d lives)", (int)t.attach_task, first, spawner);
    relay_count(rb, 0.3, false);
    printf("through an exited thread: %d thread_start events in 0.3 s (its uprobes' filter died with it)\n",
           relay_starts);
    CHECK(tc_target_moved(&t), "thread_start, attached through exited %d, not reported for attaching again", first);
    tc_detach(&t);
    CHECK(tc_attach_usdt(&t, skel->progs.on_thread_start, "thread_start", true) == 0 &&
              tc_attach_usdt(&t, skel->progs.on_thread_exit, "thread_exit", true) == 0,
          "attaching again through %d", spawner);
    CHECK(!tc_target_moved(&t), "reported moved after attaching again");
    relay_count(rb, 5, true);
    CHECK(relay_starts && relay_exits, "after attaching again: %d thread_start, %d thread_exit events", relay_starts,
          relay_exits);
    tc_detach(&t);
    /* the process gone: the failure is the process's, not an endless search for a thread */
    kill(relay_pid, SIGKILL);
    waitpid(relay_pid, NULL, 0);
    relay_pid = 0;
    r = tc_attach_usdt(&t, skel->progs.on_thread_start, "thread_start", true);
    CHECK(r == -ESRCH, "attach to a dead process: %d (%s)", r, strerror(-r));
out:
    tc_detach(&t);
    ring_buffer__free(rb);
    alloctop_bpf__destroy(skel);
    tc_target_close(&t);
    if (relay_pid > 0) {
        kill(relay_pid, SIGKILL);
        waitpid(relay_pid, NULL, 0);
    }
    if (f)
        fclose(f);
    close(in[1]);
}

int main(void)
{
    map64_random();
    frame_format();
    json_utf8();
    registry_walk_cut();
    module_name_outlives_release();
    elf_untrusted();
    attach_after_chosen_thread_exits();
    printf(failures ? "%d failure(s)\n" : "PASS\n", failures);
    return failures != 0;
}
