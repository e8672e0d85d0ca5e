/* Profile dumps outside user calls: at exit (LUMALLOC_PROF_DUMP=path) and on a signal
 * (LUMALLOC_PROF_SIGNAL).  The signal handler only posts a semaphore (async-signal-safe); a small
 * dumper thread, started from a constructor where malloc is usable, does the work, so a dump
 * never runs inside an interrupted malloc. */
#define _GNU_SOURCE 1
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <sys/auxv.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "obs_internal.h"
#include "options.h"
#include "lumalloc_prof.h"

uint64_t lum_prof_dumps;

static int format_for(const char *path, int f)
{
    if (f != LUM_PROF_AUTO)
        return f;
    const char *dot = strrchr(path, '.');
    if (dot && !strchr(dot, '/')) {
        if (!strcmp(dot, ".folded"))
            return LUM_PROF_FOLDED;
        if (!strcmp(dot, ".pb") || !strcmp(dot, ".pprof") || !strcmp(dot, ".proto"))
            return LUM_PROF_PPROF;
    }
    return LUM_PROF_TEXT;
}

LUM_COLD_TEXT LUM_EXPORT int lum_prof_dump(const char *path, enum lum_prof_format format)
{
    if (!path || !*path)
        return -EINVAL;
    struct lum_buf b = {0};
    int rc = lum_prof_render(&b, format_for(path, (int)format));
    if (!rc) {
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0) {
            rc = -errno;
        } else {
            rc = lum_write_all(fd, b.data, b.len);
            if (close(fd) && !rc)
                rc = -errno;
        }
    }
    lum_buf_free(&b);
    return rc;
}

LUM_COLD_TEXT static void dump_failed(const char *path, int rc)
{
    char msg[512];
    int n = snprintf(msg, sizeof msg, "lumalloc: cannot write the profile to %s: %s\n", path,
                     strerror(-rc));
    if (n > 0)
        lum_write_all(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
}

/* ---- signal ---- */

static sem_t dump_sem;
static volatile sig_atomic_t dumper_ready;
static unsigned dump_seq;

static void on_signal(int sig)
{
    (void)sig;
    int saved = errno;
    if (dumper_ready)
        sem_post(&dump_sem);
    errno = saved;
}

/* The path a fork child inherited from its parent (set again in the child, it is another
 * copy: options.c), so that the child's dump does not overwrite the parent's. */
static const char *inherited_path;

static void remember_inherited_path(void)
{
    inherited_path = lum_opt.prof_dump;
}

/* The dump path: the prof_dump option with %p as the process ID (%% a %); in a fork child that
 * inherited it without %p, the child's ID before the extension; a signal dump's number (seq,
 * 0 at exit) after that: prof.folded, prof.<pid>.folded, prof.<n>.folded, prof.<pid>.<n>.folded.
 * No path set: lumalloc.<pid>.<n>.txt (signal dumps only).  Every process exec'd with the
 * variable in its environment writes the same file unless it has %p. */
LUM_COLD_TEXT static void dump_path(char *buf, size_t len, unsigned seq)
{
    const char *p = lum_opt.prof_dump;
    if (!p) {
        snprintf(buf, len, "lumalloc.%d.%u.txt", (int)getpid(), seq);
        return;
    }
    char expanded[4100];
    size_t n = 0;
    bool has_pid = false;
    for (const char *c = p; *c && n + 24 < sizeof expanded; c++) {
        if (c[0] == '%' && c[1] == 'p') {
            n += (size_t)snprintf(expanded + n, sizeof expanded - n, "%d", (int)getpid());
            has_pid = true;
            c++;
        } else if (c[0] == '%' && c[1] == '%') {
            expanded[n++] = '%';
            c++;
        } else {
            expanded[n++] = *c;
        }
    }
    expanded[n] = 0;
    char suffix[48] = "";
    size_t s = 0;
    if (p == inherited_path && !has_pid)
        s += (size_t)snprintf(suffix + s, sizeof suffix - s, ".%d", (int)getpid());
    if (seq)
        snprintf(suffix + s, sizeof suffix - s, ".%u", seq);
    const char *dot = strrchr(expanded, '.');
    if (dot && !strchr(dot, '/'))
        snprintf(buf, len, "%.*s%s%s", (int)(dot - expanded), expanded, suffix, dot);
    else
        snprintf(buf, len, "%s%s", expanded, suffix);
}

LUM_COLD_TEXT static void *dumper(void *arg)
{
    (void)arg;
    for (;;) {
        if (sem_wait(&dump_sem))
            continue; /* EINTR */
        char path[4200];
        dump_path(path, sizeof path, ++dump_seq);
        int rc = lum_prof_dump(path, (enum lum_prof_format)lum_opt.prof_format);
        if (rc)
            dump_failed(path, rc);
        else
            __atomic_fetch_add(&lum_prof_dumps, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

void lum_prof_dump_init(void)
{
    /* Installing the handler needs no allocation, so it happens at bootstrap; the thread is
     * started by the constructor below. */
    static int installed;
    if (installed || !lum_opt.prof_signal)
        return;
    installed = 1;
    sem_init(&dump_sem, 0, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(lum_opt.prof_signal, &sa, NULL) != 0) {
        static const char msg[] = "lumalloc: LUMALLOC_PROF_SIGNAL: the signal takes no handler; no dumps on it\n";
        lum_write_all(2, msg, sizeof msg - 1);
    }
}

__attribute__((constructor)) static void dumper_ctor(void)
{
    /* The allocator may not have bootstrapped yet (no malloc before this constructor): read
     * the options now; lum_options_init is idempotent. */
    if (!lum_opt.prof_signal && (!getenv("LUMALLOC_PROF_SIGNAL") || getauxval(AT_SECURE)))
        return;
    if (!lum_opt.prof_signal)
        lum_options_init();
    lum_prof_dump_init();
    if (!lum_opt.prof_signal)
        return;
    /* The dumper must not take the signal itself (it would post to itself while busy). */
    if (lum_obs_thread_start(dumper, 256 * 1024, "lumalloc-dump") == 0)
        dumper_ready = 1;
}

__attribute__((destructor)) static void dump_at_exit(void)
{
    if (!lum_opt.prof_dump)
        return;
    char path[4200];
    dump_path(path, sizeof path, 0);
    int rc = lum_prof_dump(path, (enum lum_prof_format)lum_opt.prof_format);
    if (rc)
        dump_failed(path, rc);
    else
        __atomic_fetch_add(&lum_prof_dumps, 1, __ATOMIC_RELAXED);
}

/* A fork child (from observe.c's fork handler, the last to run, with the allocator usable
 * again): its dumps go to paths of its own, and it gets a dumper thread of its own for the
 * signal (the parent's is not in the child: a signal there posted to nobody). */
void lum_prof_dump_after_fork_child(void)
{
    remember_inherited_path();
    if (!dumper_ready)
        return;
    dumper_ready = 0;
    sem_init(&dump_sem, 0, 0);
    if (lum_obs_thread_start(dumper, 256 * 1024, "lumalloc-dump") == 0)
        dumper_ready = 1;
}

