/*
 * allocsnoop: lumalloc's sampled, large and failed allocations as they happen, with stacks
 * unwound in-process by the library (right without frame pointers), and end-of-run reports:
 * live (probably leaked) bytes per stack, top sites, folded stacks, pprof.
 *
 * Estimates: each `sample` stands for weight_bytes bytes (and weight/size objects); a sample
 * whose pointer is seen again in `sample_free` is no longer live.  Live bytes per stack at the
 * end are therefore an unbiased estimate of the bytes still allocated from that stack by
 * allocations made while allocsnoop was attached.
 *
 * --heap attaches nothing: it reads the library's own profile from the process's memory (every
 * sample since the process started, include/lumalloc_probes.h) into the same reports.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "allocsnoop.h"
#include "allocsnoop.skel.h"
#include "tc.h"

#define MAX_TARGETS 16

static const char *const kind_names[SNOOP_NKINDS] = {"sample",        "sample_free",  "large_alloc",
                                                     "large_free",    "alloc_failure", "thread_start",
                                                     "thread_exit",   "purge",        "pressure"};

struct stack_agg {
    pid_t pid;
    /* the process's key in the symbolizer: pid, or once the process is released (-b), the key it
     * was retired under, so that a later process given the same PID is told apart */
    pid_t sym_pid;
    unsigned depth;
    uint64_t *frames;
    double alloc_objects, alloc_space, inuse_objects, inuse_space;
    uint64_t samples, live_samples;
    uint64_t large_live_bytes, large_live_count; /* exact: large_alloc minus large_free */
    /* the live reports' figures: the live ones, or with --older only those old enough */
    double shown_space, shown_objects;
    uint64_t shown_samples, shown_large_bytes, shown_large_count;
    uint64_t oldest_ns, large_oldest_ns; /* when the oldest shown block was allocated (0: unknown) */
};

struct live_rec {
    uint32_t stack;  /* index into stacks */
    uint32_t next_free;
    double weight, objects;
    uint64_t ts_ns;  /* allocated (CLOCK_MONOTONIC, the events' clock) */
};

static struct {
    uint32_t kinds;
    uint64_t min_size;
    double duration;
    bool stacks_out, quiet, json, all_frames, no_batch, heap;
    const char *folded, *pprof;
    int leaks;
    uint64_t older_ns; /* --older: the live reports leave out blocks younger than this */
} opt = {.kinds = 0xffffffff, .leaks = 10};

static struct tc_target targets[MAX_TARGETS];
static int ntargets;
static struct tc_symbolizer *sym;
static struct tc_tidmap tidmap; /* the library's thread IDs (a container's) -> ours */
static struct stack_agg *stacks;
static size_t nstacks, capstacks;
static struct tc_map64 stack_idx; /* stack key -> index+1 */
static struct live_rec *lives;
static size_t nlives, caplives;
static uint32_t free_live = UINT32_MAX;
static struct tc_map64 live_idx; /* pid/ptr key -> live index+1 */
static struct tc_map64 large_idx; /* pid/ptr key -> stack index << 40 | usable size */
static struct tc_map64 large_ts;  /* pid/ptr key -> when that large block was allocated */
static uint64_t counts[SNOOP_NKINDS];
static uint64_t batches, batch_malformed; /* sample_batch firings received; records unparsable */
/* Records the library had not published when the process exec'd (taken at the execve's
 * entry): used, and left to the process (its exec failed: it publishes them itself), and lost
 * (the exec's outcome never came: the process died in it, or the ring was full). */
static uint64_t exec_records, exec_dropped, exec_lost;
static uint64_t start_ns;
static double t_start, t_end;
static volatile sig_atomic_t stop;
static double last_snap[MAX_TARGETS];
static uint64_t image_seen[MAX_TARGETS]; /* tc_image_id at the last poll: another means an exec */

static void on_signal(int sig) { (void)sig, stop = 1; }

static void usage(FILE *f)
{
    fprintf(f,
            "usage: allocsnoop [options] -p PID[,PID...] | -c 'CMD ARGS' | -b PATH\n"
            "       allocsnoop --heap [-j] [--leaks N] [--folded F] [--pprof F] -p PID[,PID...]\n"
            "  -p, --pid PID[,PID...]   attach to running processes (repeatable)\n"
            "  -c, --command 'CMD ARGS' start CMD with the probes attached from its first instruction\n"
            "  -b, --binary PATH        every process that maps PATH (liblumalloc.so or a static executable);\n"
            "                           one that exits before its first event is read keeps raw addresses\n"
            "                           (its maps are gone): use -c for short-lived commands\n"
            "      --preload PATH       LD_PRELOAD this liblumalloc.so into CMD (default: $LUMALLOC_LIB)\n"
            "  -e, --events LIST        sample,sample_free,large,large_free,failure,thread,purge,pressure\n"
            "  -m, --min-size BYTES     only allocation events (samples, large, failures, their frees)\n"
            "                           of at least this size; thread/purge/pressure events all pass\n"
            "  -d, --duration SECONDS   stop after this long (default: until the targets exit or ^C)\n"
            "  -U, --stacks             print each event's symbolised stack\n"
            "  -q, --quiet              no per-event lines, reports only\n"
            "  -j, --json               JSON lines (events and reports)\n"
            "      --folded FILE        folded stacks (sampled bytes) for flame graphs\n"
            "      --pprof FILE         pprof profile (uncompressed profile.proto)\n"
            "      --leaks N            stacks shown in the live/leak report (default 10)\n"
            "  -o, --older SECONDS      the live/leak report leaves out blocks allocated less than\n"
            "                           SECONDS before it, or before the exit of a process gone\n"
            "                           (memleak's -o): what is held, not churn (the report's\n"
            "                           oldest ages are taken at the same moment)\n"
            "      --all-frames         keep the allocator's own frames in stack output\n"
            "      --ringbuf-kib N      ring buffer size (default 16384 KiB; below 256 most batched samples are lost)\n"
            "      --no-batch           per-event sample/sample_free probes even where the library has\n"
            "                           sample_batch (two probe hits per sampled block instead of ~1/300)\n"
            "  -H, --heap               the live heap now, by stack, as lumalloc's own profile has it in\n"
            "                           each process (everything sampled since it started, not only\n"
            "                           while attached): read from its memory, no probe attached, the\n"
            "                           process not stopped; then --folded writes live bytes\n"
            "  -v, --verbose            libbpf diagnostics\n");
}

static uint32_t parse_kinds(const char *arg)
{
    uint32_t m = 0;
    char *dup = strdup(arg), *save = NULL;
    for (char *t = strtok_r(dup, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (!strcmp(t, "sample"))
            m |= 1u << SNOOP_SAMPLE;
        else if (!strcmp(t, "sample_free") || !strcmp(t, "free"))
            m |= 1u << SNOOP_SAMPLE_FREE;
        else if (!strcmp(t, "large") || !strcmp(t, "large_alloc"))
            m |= 1u << SNOOP_LARGE_ALLOC;
        else if (!strcmp(t, "large_free"))
            m |= 1u << SNOOP_LARGE_FREE;
        else if (!strcmp(t, "failure") || !strcmp(t, "alloc_failure"))
            m |= 1u << SNOOP_FAILURE;
        else if (!strcmp(t, "thread"))
            m |= 1u << SNOOP_THREAD_START | 1u << SNOOP_THREAD_EXIT;
        else if (!strcmp(t, "purge"))
            m |= 1u << SNOOP_PURGE;
        else if (!strcmp(t, "pressure"))
            m |= 1u << SNOOP_PRESSURE;
        else
            tc_die("unknown event kind '%s'", t);
    }
    free(dup);
    if (!m) /* '' or ',' traced nothing, then failed as if the library had no probes */
        tc_die("no event kinds in -e '%s' (sample,sample_free,large,large_free,failure,thread,purge,pressure)", arg);
    return m;
}

static uint64_t parse_size(const char *s)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno || !isfinite(v) || v < 0)
        tc_die("invalid size '%s'", s);
    switch (*end) {
    case 'k': case 'K': v *= 1024; break;
    case 'm': case 'M': v *= 1024 * 1024; break;
    case 'g': case 'G': v *= 1024.0 * 1024 * 1024; break;
    case 0: break;
    default: tc_die("invalid size '%s'", s);
    }
    if (end[0] && end[1])
        tc_die("invalid size '%s'", s);
    if (v >= 0x1p62)
        tc_die("invalid size '%s' (larger than any allocation)", s);
    return (uint64_t)v;
}

/* --folded/--pprof: a path that cannot be written is an error before tracing, not after it. */
static const char *check_writable(const char *path)
{
    int r = tc_check_report_path(path);
    if (r)
        tc_die("cannot write %s: %s", path, strerror(-r));
    return path;
}

static int target_index(pid_t pid)
{
    for (int i = 0; i < ntargets; i++)
        if (targets[i].pid == pid)
            return i;
    return -1;
}

/* Keep the symbol snapshot fresh while the target lives: after it exits, only what was
 * snapshotted can be resolved. */
static const char *binary_path;     /* -b: every process that maps this file */
static struct tc_map64 pid_snap;    /* -b: pid -> time of its last snapshot (ms since start) */
static struct tc_map64 pid_execd;   /* -b: pids whose new image is to be snapshotted and watched */
static struct tc_map64 pid_start; /* -b: pid -> its start time (tc_proc_start_time) when first snapshotted */
static struct tc_map64 pid_gen;   /* -b: pid -> how many processes with that PID were released */
static struct tc_map64 pid_lives; /* see pid_lives_add */
static bool pid_lives_incomplete;

static int exec_watch_fd = -1; /* the BPF exec_watch map, if the exec programs are attached */
static unsigned exec_watch_full; /* processes it had no room for */

static void unwatch_exec(pid_t pid)
{
    uint32_t k = (uint32_t)pid;
    if (exec_watch_fd >= 0)
        bpf_map_delete_elem(exec_watch_fd, &k);
}

/* Have the BPF side take the records waiting in pid's batch buffer at its execve entries
 * (pid's current image: after an exec, again for the new one).  false: its batch buffer is not
 * there (yet: a new image that has not loaded the library). */
static bool watch_exec(pid_t pid)
{
    if (exec_watch_fd < 0 || pid <= 0)
        return true;
    struct tc_target t = {.pid = pid, .alive = true};
    char err[512];
    uint32_t k = (uint32_t)pid;
    bool armed = tc_target_locate(&t, err, sizeof(err)) == 0 && t.batch_addr;
    if (armed && bpf_map_update_elem(exec_watch_fd, &k, &t.batch_addr, BPF_ANY)) {
        armed = false;
        if (!exec_watch_full++)
            tc_warn("records waiting at an exec will be lost for some processes: the exec watch is full (%s)",
                    strerror(errno));
    }
    if (!armed)
        unwatch_exec(pid);
    tc_target_close(&t);
    return armed;
}

/* Targets whose new image is to be watched, tried at each poll until its buffer is found.  The
 * image poll can see an exec's new image before sched_process_exec fires for it (the mm is
 * switched first), and that tracepoint's program takes the pid out of exec_watch: so an exec
 * seen done re-arms it too, else a second exec lost its waiting records.  Given up after 5 s
 * (an image without the library: each try reads its maps). */
static double watch_until[MAX_TARGETS]; /* tc_now() until which to try; 0: nothing pending */
static double watch_tried[MAX_TARGETS];

static void maybe_snapshot(pid_t pid)
{
    int i = target_index(pid);
    if (i < 0) {
        if (!binary_path || pid <= 0)
            return;
        /* A process found through -b: snapshot on its first event, then once a second; from
         * its first event (and its first after an exec) its records waiting at an exec are
         * taken too. */
        uint64_t now_ms = (uint64_t)((tc_now() - t_start) * 1000) + 1;
        bool created;
        uint64_t *last = tc_map64_put(&pid_snap, (uint64_t)pid, &created);
        bool execd = tc_map64_del(&pid_execd, (uint64_t)pid, NULL);
        if (!last || (!created && !execd && now_ms - *last < 1000))
            return;
        *last = now_ms;
        if (tc_pid_alive(pid)) {
            if (created) {
                uint64_t *start = tc_map64_put(&pid_start, (uint64_t)pid, NULL);
                if (start)
                    *start = tc_proc_start_time(pid);
            }
            tc_sym_snapshot(sym, pid, binary_path);
            if (created || execd)
                watch_exec(pid);
        }
        return;
    }
    double now = tc_now();
    if (tc_hold_ready(&targets[i])) {
        tc_sym_snapshot(sym, pid, tc_target_file(&targets[i]));
        last_snap[i] = now;
        watch_exec(pid);
        tc_hold_release(&targets[i]);
        return;
    }
    /* Often at first (libraries still being loaded), then once a second. */
    double every = now - t_start < 2.0 ? 0.1 : 1.0;
    if (now - last_snap[i] < every || !targets[i].alive)
        return;
    last_snap[i] = now;
    tc_sym_snapshot(sym, pid, tc_target_file(&targets[i]));
}

/* -b: a process gone for a second (its last batches and reordered events are in) has its
 * stacks resolved now and its files closed: over many short-lived processes the open files ran
 * the tool out of descriptors, and later processes were not symbolised. */
static struct tc_map64 pid_dead; /* -b: pid -> ms since start when first seen gone */

static void release_gone(void)
{
    uint64_t now_ms = (uint64_t)((tc_now() - t_start) * 1000) + 1;
    pid_t gone[64];
    int ngone = 0;
    for (size_t i = 0; i < pid_snap.cap && ngone < 64; i++) {
        pid_t pid = (pid_t)pid_snap.keys[i];
        if (!pid)
            continue;
        if (tc_pid_alive(pid)) {
            /* the PID taken by another process within the second: the one seen is gone */
            uint64_t *start = tc_map64_get(&pid_start, (uint64_t)pid);
            /* 0: gone between the two reads, which the next look handles with its grace */
            uint64_t now_start = start && *start ? tc_proc_start_time(pid) : 0;
            if (!now_start || now_start == *start)
                continue;
            unwatch_exec(pid);
            gone[ngone++] = pid;
            continue;
        }
        bool created;
        uint64_t *since = tc_map64_put(&pid_dead, (uint64_t)pid, &created);
        if (!since)
            continue;
        if (created) {
            *since = now_ms;
            /* its exec watch goes now: a process reusing the pid and exec'ing in the second
             * before its release would be taken for it (its live blocks dropped) */
            unwatch_exec(pid);
        } else if (now_ms - *since >= 1000) {
            gone[ngone++] = pid;
        }
    }
    for (int g = 0; g < ngone; g++) {
        for (size_t i = 0; i < nstacks; i++)
            if (stacks[i].sym_pid == gone[g])
                for (unsigned k = 0; k < stacks[i].depth; k++)
                    tc_sym_resolve(sym, gone[g], stacks[i].frames[k]);
        pid_t key = tc_sym_retire(sym, gone[g]);
        for (size_t i = 0; i < nstacks; i++)
            if (stacks[i].sym_pid == gone[g])
                stacks[i].sym_pid = key;
        /* its live blocks stay counted under the key its stacks now have */
        uint64_t lives_n;
        if (tc_map64_del(&pid_lives, (uint64_t)(uint32_t)gone[g] + 1, &lives_n)) {
            uint64_t *n = tc_map64_put(&pid_lives, (uint64_t)(uint32_t)key + 1, NULL);
            if (n)
                *n = lives_n;
            else
                pid_lives_incomplete = true;
        }
        uint64_t *gen = tc_map64_put(&pid_gen, (uint64_t)gone[g], NULL);
        if (gen)
            ++*gen;
        tc_map64_del(&pid_start, (uint64_t)gone[g], NULL);
        tc_map64_del(&pid_snap, (uint64_t)gone[g], NULL);
        tc_map64_del(&pid_dead, (uint64_t)gone[g], NULL);
        tc_map64_del(&pid_execd, (uint64_t)gone[g], NULL);
    }
}

static uint32_t stack_of(const struct snoop_event *e)
{
    uint64_t h = tc_hash64(0x5eed, (uint64_t)e->pid);
    uint64_t *gen = binary_path ? tc_map64_get(&pid_gen, (uint64_t)e->pid) : NULL;
    if (gen) /* not the stacks of an earlier process with this PID */
        h = tc_hash64(h, *gen);
    if (e->depth)
        for (unsigned i = 0; i < e->depth; i++)
            h = tc_hash64(h, e->frames[i]);
    else
        h = tc_hash64(h, e->stack_id);
    h |= 1;
    bool created;
    uint64_t *v = tc_map64_put(&stack_idx, h, &created);
    if (!v)
        tc_die("out of memory");
    if (!created)
        return (uint32_t)(*v - 1);
    if (nstacks == capstacks) {
        capstacks = capstacks ? capstacks * 2 : 256;
        stacks = realloc(stacks, capstacks * sizeof(*stacks));
        if (!stacks)
            tc_die("out of memory");
    }
    struct stack_agg *s = &stacks[nstacks];
    memset(s, 0, sizeof(*s));
    s->pid = s->sym_pid = (pid_t)e->pid;
    s->depth = e->depth;
    if (e->depth) {
        s->frames = malloc(e->depth * sizeof(uint64_t));
        if (!s->frames)
            tc_die("out of memory");
        memcpy(s->frames, e->frames, e->depth * sizeof(uint64_t));
    }
    *v = ++nstacks;
    return (uint32_t)(nstacks - 1);
}

/* A block's key: its address (below 2^47, 16-aligned) with the pid's low 17 bits above it and
 * its next 4 in the alignment's zero bits, so that two processes' blocks at one address (fork
 * children share their parent's layout) differ unless their pids do by a multiple of 2^21.
 * With the pid's low 17 bits alone, pids 131072 apart collided (pid_max is 4194304 under
 * systemd), and one process's block retired the other's.  Never 0: no block is at 0. */
static uint64_t live_key(uint32_t pid, uint64_t ptr)
{
    return (ptr ^ ((uint64_t)pid << 47)) ^ ((pid >> 17) & 15);
}

/* pid_lives: pid -> its sampled and large blocks live (by the sym_pid of the block's stack,
 * which is what drop_live_of scans for): an exec scans every process's blocks only for a
 * process that has some.  With -b over an exec-heavy host (a build), each exec of a process
 * that had sent an event scanned all the others' blocks.  pid_lives_incomplete: a count was
 * lost, every exec scans. */
static void pid_lives_add(uint32_t pid, int delta)
{
    uint64_t key = (uint64_t)pid + 1;
    uint64_t *n = delta > 0 ? tc_map64_put(&pid_lives, key, NULL) : tc_map64_get(&pid_lives, key);
    if (!n || (delta < 0 && *n < (uint64_t)-delta)) {
        pid_lives_incomplete = true; /* out of memory, or a count that drifted: scan */
        return;
    }
    *n += (uint64_t)(int64_t)delta;
    if (!*n)
        tc_map64_del(&pid_lives, key, NULL);
}

static void track_sample(const struct snoop_event *e)
{
    uint32_t si = stack_of(e);
    struct stack_agg *s = &stacks[si];
    double w = (double)e->weight;
    double objs = e->size ? w / (double)e->size : 1.0;
    s->samples++;
    s->alloc_space += w;
    s->alloc_objects += objs;
    s->inuse_space += w;
    s->inuse_objects += objs;
    s->live_samples++;
    pid_lives_add(s->sym_pid, 1);
    uint32_t li;
    if (free_live != UINT32_MAX) {
        li = free_live;
        free_live = lives[li].next_free;
    } else {
        if (nlives == caplives) {
            caplives = caplives ? caplives * 2 : 1024;
            lives = realloc(lives, caplives * sizeof(*lives));
            if (!lives)
                tc_die("out of memory");
        }
        li = (uint32_t)nlives++;
    }
    lives[li] = (struct live_rec){si, UINT32_MAX, w, objs, e->ts_ns};
    uint64_t key = live_key(e->pid, e->ptr), old;
    if (tc_map64_del(&live_idx, key, &old)) {
        /* A sampled pointer reused without a sample_free seen (event lost): retire the old. */
        struct live_rec *o = &lives[old - 1];
        stacks[o->stack].inuse_space -= o->weight;
        stacks[o->stack].inuse_objects -= o->objects;
        stacks[o->stack].live_samples--;
        pid_lives_add(stacks[o->stack].sym_pid, -1);
        o->next_free = free_live;
        free_live = (uint32_t)(old - 1);
    }
    *tc_map64_put(&live_idx, key, NULL) = li + 1;
}

static void track_free(const struct snoop_event *e)
{
    uint64_t li;
    if (!tc_map64_del(&live_idx, live_key(e->pid, e->ptr), &li))
        return; /* sampled before we attached */
    struct live_rec *r = &lives[li - 1];
    struct stack_agg *s = &stacks[r->stack];
    s->inuse_space -= r->weight;
    s->inuse_objects -= r->objects;
    s->live_samples--;
    pid_lives_add(s->sym_pid, -1);
    r->next_free = free_live;
    free_live = (uint32_t)(li - 1);
}

/* Large blocks are not sampled: every one is an event, so what is still live is exact. */
static void track_large(const struct snoop_event *e)
{
    uint64_t key = live_key(e->pid, e->ptr), old;
    if (e->kind == SNOOP_LARGE_ALLOC) {
        uint32_t si = stack_of(e);
        uint64_t sz = e->usable & ((1ull << 40) - 1);
        if (tc_map64_del(&large_idx, key, &old)) { /* lost large_free: retire the old block */
            stacks[old >> 40].large_live_bytes -= old & ((1ull << 40) - 1);
            stacks[old >> 40].large_live_count--;
            pid_lives_add(stacks[old >> 40].sym_pid, -1);
        }
        stacks[si].large_live_bytes += sz;
        stacks[si].large_live_count++;
        pid_lives_add(stacks[si].sym_pid, 1);
        uint64_t *v = tc_map64_put(&large_idx, key, NULL);
        if (v)
            *v = (uint64_t)si << 40 | sz;
        if ((v = tc_map64_put(&large_ts, key, NULL)))
            *v = e->ts_ns;
    } else if (tc_map64_del(&large_idx, key, &old)) {
        stacks[old >> 40].large_live_bytes -= old & ((1ull << 40) - 1);
        stacks[old >> 40].large_live_count--;
        pid_lives_add(stacks[old >> 40].sym_pid, -1);
        tc_map64_del(&large_ts, key, NULL);
    }
}

/* The process exec'd: the old image's memory is gone, and its blocks with it; they were reported
 * as still live at exit. */
static void drop_live_of(pid_t pid)
{
    if (!tc_map64_get(&pid_lives, (uint64_t)(uint32_t)pid + 1) && !pid_lives_incomplete)
        return;
    uint64_t *keys = malloc((live_idx.len + large_idx.len + 1) * sizeof(*keys));
    if (!keys)
        return; /* the count stays: the next exec scans again */
    tc_map64_del(&pid_lives, (uint64_t)(uint32_t)pid + 1, NULL);
    size_t n = 0;
    for (size_t i = 0; i < live_idx.cap; i++)
        if (live_idx.keys[i] && stacks[lives[live_idx.vals[i] - 1].stack].sym_pid == pid)
            keys[n++] = live_idx.keys[i];
    for (size_t k = 0; k < n; k++) {
        uint64_t li;
        if (!tc_map64_del(&live_idx, keys[k], &li))
            continue;
        struct live_rec *r = &lives[li - 1];
        stacks[r->stack].inuse_space -= r->weight;
        stacks[r->stack].inuse_objects -= r->objects;
        stacks[r->stack].live_samples--;
        r->next_free = free_live;
        free_live = (uint32_t)(li - 1);
    }
    n = 0;
    for (size_t i = 0; i < large_idx.cap; i++)
        if (large_idx.keys[i] && stacks[large_idx.vals[i] >> 40].sym_pid == pid)
            keys[n++] = large_idx.keys[i];
    for (size_t k = 0; k < n; k++) {
        uint64_t old;
        if (!tc_map64_del(&large_idx, keys[k], &old))
            continue;
        stacks[old >> 40].large_live_bytes -= old & ((1ull << 40) - 1);
        stacks[old >> 40].large_live_count--;
        tc_map64_del(&large_ts, keys[k], NULL);
    }
    free(keys);
}

static void print_stack_text(pid_t pid, const uint64_t *frames, unsigned depth, const char *indent, unsigned max)
{
    unsigned first = opt.all_frames ? 0 : tc_first_user_frame(sym, pid, frames, depth);
    for (unsigned i = first, k = 0; i < depth && k < max; i++, k++) {
        char tmp[PATH_MAX + 64];
        printf("%s#%-2u %s\n", indent, k, tc_frame_str(tc_sym_resolve(sym, pid, frames[i]), tmp, sizeof(tmp)));
    }
    if (!depth)
        printf("%s[no stack]\n", indent);
}

static void print_stack_json(pid_t pid, const uint64_t *frames, unsigned depth)
{
    unsigned first = opt.all_frames ? 0 : tc_first_user_frame(sym, pid, frames, depth);
    fputc('[', stdout);
    for (unsigned i = first; i < depth; i++) {
        char tmp[PATH_MAX + 64];
        if (i > first)
            fputc(',', stdout);
        tc_json_str(stdout, tc_frame_str(tc_sym_resolve(sym, pid, frames[i]), tmp, sizeof(tmp)));
    }
    fputc(']', stdout);
}

static struct tc_map64 pid_last_ts; /* pid -> time of its newest event */
static struct tc_map64 pid_exit_ts; /* pid -> when its last thread exited (SNOOP_PROCESS_EXIT) */

static void note_exit(uint32_t pid, uint64_t ts)
{
    uint64_t *v = tc_map64_put(&pid_exit_ts, (uint64_t)pid + 1, NULL);
    if (v && *v < ts) /* the newest: a process that reused the pid exited after the first */
        *v = ts;
}

static void process_event(struct snoop_event *e)
{
    counts[e->kind]++;
    uint64_t *last_ts = tc_map64_put(&pid_last_ts, (uint64_t)e->pid + 1, NULL);
    if (last_ts && *last_ts < e->ts_ns)
        *last_ts = e->ts_ns;
    maybe_snapshot((pid_t)e->pid);
    if (e->kind == SNOOP_SAMPLE)
        track_sample(e);
    else if (e->kind == SNOOP_SAMPLE_FREE)
        track_free(e);
    else if (e->kind == SNOOP_LARGE_ALLOC || e->kind == SNOOP_LARGE_FREE)
        track_large(e);
    if (opt.quiet)
        return;
    double ts = start_ns && e->ts_ns > start_ns ? (double)(e->ts_ns - start_ns) * 1e-9 : 0;
    uint32_t tid = e->tid;
    if (e->kind == SNOOP_THREAD_START || e->kind == SNOOP_THREAD_EXIT)
        tid = (uint32_t)tc_host_tid(&tidmap, (pid_t)e->pid, (pid_t)e->arg2);
    if (opt.json) {
        printf("{\"type\":\"event\",\"ts\":%.6f,\"pid\":%u,\"tid\":%u,\"event\":\"%s\",\"size\":%llu,\"usable\":%llu,"
               "\"ptr\":\"0x%llx\",\"weight\":%llu",
               ts, e->pid, tid, kind_names[e->kind], (unsigned long long)e->size, (unsigned long long)e->usable,
               (unsigned long long)e->ptr, (unsigned long long)e->weight);
        if (e->kind == SNOOP_FAILURE)
            printf(",\"alignment\":%llu,\"errno\":%llu", (unsigned long long)e->arg, (unsigned long long)e->arg2);
        else if (e->kind == SNOOP_PURGE) /* LUM_PURGE_* */
            printf(",\"reason\":%llu", (unsigned long long)e->arg);
        else if (e->kind == SNOOP_PRESSURE)
            printf(",\"stall_us\":%llu", (unsigned long long)e->arg);
        else if (e->kind == SNOOP_THREAD_START || e->kind == SNOOP_THREAD_EXIT)
            printf(",\"counters\":\"0x%llx\"", (unsigned long long)e->arg);
        if (opt.stacks_out && e->depth) {
            printf(",\"stack\":");
            print_stack_json((pid_t)e->pid, e->frames, e->depth);
        }
        printf("}\n");
        return;
    }
    char extra[96] = "";
    if (e->kind == SNOOP_SAMPLE || e->kind == SNOOP_SAMPLE_FREE)
        snprintf(extra, sizeof(extra), "weight=%llu", (unsigned long long)e->weight);
    else if (e->kind == SNOOP_FAILURE)
        snprintf(extra, sizeof(extra), "align=%llu errno=%llu", (unsigned long long)e->arg,
                 (unsigned long long)e->arg2);
    else if (e->kind == SNOOP_PURGE)
        snprintf(extra, sizeof(extra), "reason=%llu", (unsigned long long)e->arg);
    else if (e->kind == SNOOP_PRESSURE)
        snprintf(extra, sizeof(extra), "stall_us=%llu", (unsigned long long)e->arg);
    printf("%-12.6f %-7u %-7u %-13s %12llu 0x%-14llx %s\n", ts, e->pid, tid, kind_names[e->kind],
           (unsigned long long)e->size, (unsigned long long)e->ptr, extra);
    if (opt.stacks_out && e->depth)
        print_stack_text((pid_t)e->pid, e->frames, e->depth, "        ", 64);
}

/* Batched samples reach us later than the events of other probes, so with batching on those
 * wait here, in timestamp order, until they can be placed: an event at time t goes out once a
 * batch of its process published after t has been read (the library publishes every record
 * written before a publication: earlier records are all in that batch or before it), or once
 * REORDER_WAIT_NS have passed (the library's flusher publishes every LUM_BATCH_FLUSH_MS; the
 * wait also covers our 100 ms poll). */
#define REORDER_WAIT_NS 500000000ull
static bool reorder;             /* some target sends samples through sample_batch */
static struct tc_map64 batch_seen; /* pid -> every record up to this time has been read */
static struct snoop_event **pend;
static size_t npend, cappend, pend_head;

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void pend_push(const struct snoop_event *e)
{
    if (pend_head && pend_head == npend)
        pend_head = npend = 0;
    if (npend == cappend) {
        if (pend_head) { /* reuse the room of what went out */
            memmove(pend, pend + pend_head, (npend - pend_head) * sizeof(*pend));
            npend -= pend_head;
            pend_head = 0;
        }
        if (npend == cappend) {
            cappend = cappend ? cappend * 2 : 64;
            pend = realloc(pend, cappend * sizeof(*pend));
            if (!pend)
                tc_die("out of memory");
        }
    }
    size_t sz = SNOOP_HDR_SIZE + e->depth * sizeof(uint64_t);
    struct snoop_event *c = malloc(sizeof(*c));
    if (!c)
        tc_die("out of memory");
    memcpy(c, e, sz);
    /* Nearly sorted already (ring order): insert from the back. */
    size_t i = npend;
    while (i > pend_head && pend[i - 1]->ts_ns > c->ts_ns) {
        pend[i] = pend[i - 1];
        i--;
    }
    pend[i] = c;
    npend++;
}

/* Lets out, oldest first, the waiting events that can be placed (all of them with force). */
static void pend_release(uint64_t now, bool force)
{
    while (pend_head < npend) {
        struct snoop_event *e = pend[pend_head];
        uint64_t *seen = tc_map64_get(&batch_seen, (uint64_t)e->pid + 1);
        if (!force && !(seen && *seen >= e->ts_ns) && (now < e->ts_ns || now - e->ts_ns < REORDER_WAIT_NS))
            break;
        pend_head++;
        process_event(e);
        free(e);
    }
}

static void note_batch_time(uint32_t pid, uint64_t ts)
{
    uint64_t *v = tc_map64_put(&batch_seen, (uint64_t)pid + 1, NULL);
    if (v && *v < ts)
        *v = ts;
}

/* One sample_batch firing: its records become the events the per-event probes would have
 * sent, in the library's order.  Kind and size filters apply here (the BPF side copies the
 * batch whole). */
static struct tc_map64 rec_seen; /* pid -> timestamp of the newest batched record read + 1 */

static void handle_batch(const struct snoop_batch *b, size_t len, bool at_exec)
{
    if (!at_exec)
        batches++;
    uint64_t *newest = tc_map64_put(&rec_seen, (uint64_t)b->pid + 1, NULL);
    size_t bytes = len - SNOOP_BATCH_HDR_SIZE;
    if (b->bytes < bytes)
        bytes = b->bytes;
    const char *p = (const char *)b->data, *end = p + bytes;
    uint32_t seen = 0;
    struct snoop_event e;
    while (seen < b->nrecords && end - p >= LUM_BATCH_REC_SIZE) {
        struct lum_batch_rec_v1 r;
        memcpy(&r, p, sizeof(r));
        if (r.size < LUM_BATCH_REC_SIZE || (r.size & 7) || r.size > (size_t)(end - p))
            break;
        seen++;
        const char *rec = p;
        p += r.size;
        /* Records come out in the library's order: one at or before the newest already read was
         * published by the process between the exec's entry and its point of no return. */
        if (at_exec && newest && *newest && r.ts_ns < *newest)
            continue;
        if (newest && *newest < r.ts_ns + 1)
            *newest = r.ts_ns + 1;
        exec_records += at_exec;
        uint32_t kind;
        if (r.kind == LUM_BATCH_SAMPLE)
            kind = SNOOP_SAMPLE;
        else if (r.kind == LUM_BATCH_FREE)
            kind = SNOOP_SAMPLE_FREE;
        else
            continue; /* a later version's kind */
        if (!(opt.kinds & (1u << kind)) || r.requested_size < opt.min_size)
            continue;
        uint32_t depth = r.depth;
        if (depth > LUM_MAX_FRAMES || depth * sizeof(uint64_t) > r.size - LUM_BATCH_REC_SIZE)
            depth = 0;
        e.ts_ns = r.ts_ns;
        e.pid = b->pid;
        e.tid = (uint32_t)tc_host_tid(&tidmap, (pid_t)b->pid, (pid_t)r.tid); /* the library's: its namespace's */
        e.kind = kind;
        e.depth = depth;
        e.ptr = r.ptr;
        e.size = r.requested_size;
        e.usable = r.usable_size;
        e.weight = r.weight_bytes;
        e.stack_id = r.stack_id;
        e.arg = e.arg2 = 0;
        memcpy(e.frames, rec + r.size - depth * sizeof(uint64_t), depth * sizeof(uint64_t));
        if (npend > pend_head) { /* what happened before this record goes first */
            note_batch_time(b->pid, r.ts_ns);
            pend_release(mono_ns(), false);
        }
        process_event(&e);
    }
    batch_malformed += b->nrecords - seen;
    note_batch_time(b->pid, b->ts_ns);
    pend_release(mono_ns(), false);
}

/* Batches taken at an execve's entry, waiting for its outcome. */
struct exec_held {
    uint32_t pid, tid;
    size_t len;
    struct snoop_batch *b;
};
static struct exec_held *held;
static size_t nheld;

static void exec_hold(const struct snoop_batch *b, size_t len)
{
    struct exec_held *nh = realloc(held, (nheld + 1) * sizeof(*nh));
    void *copy = malloc(len);
    if (!nh || !copy)
        tc_die("out of memory");
    held = nh;
    memcpy(copy, b, len);
    held[nheld++] = (struct exec_held){b->pid, b->tid, len, copy};
}

/* The exec of thread tid of pid succeeded (ret 0) or failed.  On success every batch of the
 * process taken at an exec's entry is used, in the order they were taken (threads that called
 * execve at the same time: the other calls never return), the records already published
 * skipped; then the old image's blocks are gone. */
static void exec_done(uint32_t pid, uint32_t tid, int64_t ret)
{
    size_t w = 0;
    bool used = false;
    for (size_t i = 0; i < nheld; i++) {
        struct exec_held *h = &held[i];
        if (h->pid == pid && (ret == 0 || h->tid == tid)) {
            if (ret == 0) {
                handle_batch(h->b, h->len, true);
                used = true;
            } else {
                exec_dropped += h->b->nrecords;
            }
            free(h->b);
            continue;
        }
        held[w++] = *h;
    }
    nheld = w;
    /* -b: no image poll looks at such a process (for -p and -c targets it drops their blocks);
     * the new image, if it maps the file too, is watched from its first event */
    int ti = target_index((pid_t)pid);
    if (ret == 0 && ti >= 0)
        watch_until[ti] = tc_now() + 5;
    bool found_by_b = ret == 0 && binary_path && ti < 0;
    if (used || found_by_b) {
        pend_release(0, true);
        drop_live_of((pid_t)pid);
        if (found_by_b)
            tc_map64_put(&pid_execd, (uint64_t)pid, NULL);
    }
}

static void exec_lost_all(void)
{
    for (size_t i = 0; i < nheld; i++) {
        exec_lost += held[i].b->nrecords;
        free(held[i].b);
    }
    nheld = 0;
}

static int handle_event(void *ctx, void *data, size_t len)
{
    (void)ctx;
    if (len < SNOOP_HDR_SIZE)
        return 0;
    struct snoop_event *e = data;
    if (e->kind == SNOOP_BATCH && len >= SNOOP_BATCH_HDR_SIZE) {
        handle_batch(data, len, false);
        return 0;
    }
    if (e->kind == SNOOP_BATCH_EXEC && len >= SNOOP_BATCH_HDR_SIZE) {
        exec_hold(data, len);
        return 0;
    }
    if (e->kind == SNOOP_EXEC_DONE) {
        exec_done(e->pid, e->tid, (int64_t)e->arg);
        return 0;
    }
    if (e->kind == SNOOP_PROCESS_EXIT) {
        note_exit(e->pid, e->ts_ns);
        return 0;
    }
    if (e->kind >= SNOOP_NKINDS)
        return 0;
    if (len < SNOOP_HDR_SIZE + e->depth * sizeof(uint64_t))
        e->depth = 0;
    if (reorder) {
        pend_push(e);
        pend_release(mono_ns(), false);
    } else {
        process_event(e);
    }
    return 0;
}

static void lost_counts(struct allocsnoop_bpf *skel, uint64_t out[SNOOP_LOST_MAX])
{
    tc_sum_percpu(bpf_map__fd(skel->maps.lost), out, SNOOP_LOST_MAX);
}

static int cmp_inuse(const void *a, const void *b)
{
    double x = stacks[*(const uint32_t *)a].shown_space, y = stacks[*(const uint32_t *)b].shown_space;
    return x < y ? 1 : (x > y ? -1 : 0);
}

static int cmp_large(const void *a, const void *b)
{
    uint64_t x = stacks[*(const uint32_t *)a].shown_large_bytes, y = stacks[*(const uint32_t *)b].shown_large_bytes;
    return x < y ? 1 : (x > y ? -1 : 0);
}

/* When ages in pid's blocks are taken: now while it lives; for a process gone, when its last
 * thread exited (its memory went then), as the kernel said.  Where that is not known (the ring
 * was full, the exit program does not load, or over 1024 processes sending events pushed it out
 * of the BPF side's `seen`), its last event: the tool may see it gone a while after its exit on a
 * loaded machine (1.7 s in a test), but a process quiet before its exit has its blocks' ages
 * understated by that quiet time (tools_exit_age: 3 s old blocks shown 0.004 s old).  An exit
 * older than the pid's last event was an earlier process's with that pid; a newer one says this
 * process is gone even if another, untraced, has taken the pid since. */
static uint64_t age_ref(pid_t pid, uint64_t now)
{
    uint64_t *last = tc_map64_get(&pid_last_ts, (uint64_t)pid + 1);
    uint64_t *gone = tc_map64_get(&pid_exit_ts, (uint64_t)pid + 1);
    if (gone && (!last || *gone >= *last) && *gone < now)
        return *gone;
    return last && *last < now && !tc_pid_alive(pid) ? *last : now;
}

/* The live reports' figures for each stack, as of now: every live block, or with --older only
 * those allocated at least that long ago (memleak's -o: what a program has held for a while,
 * not the working set it is about to free), and when the oldest was allocated.  --heap's
 * figures are the profile's own, with no times.  ref[i]: when stack i's ages are taken. */
static void live_figures(bool traced, uint64_t now, uint64_t *ref)
{
    for (size_t i = 0; i < nstacks; i++) {
        struct stack_agg *s = &stacks[i];
        bool all = !traced;
        s->shown_space = all ? s->inuse_space : 0;
        s->shown_objects = all ? s->inuse_objects : 0;
        s->shown_samples = all ? s->live_samples : 0;
        s->shown_large_bytes = all ? s->large_live_bytes : 0;
        s->shown_large_count = all ? s->large_live_count : 0;
        s->oldest_ns = s->large_oldest_ns = 0;
        /* stacks are per process: one look a process (its stacks are mostly in a row) */
        ref[i] = all ? now : i && s->pid == stacks[i - 1].pid ? ref[i - 1] : age_ref(s->pid, now);
    }
    if (!traced)
        return;
    for (size_t i = 0; i < live_idx.cap; i++) {
        if (!live_idx.keys[i])
            continue;
        const struct live_rec *r = &lives[live_idx.vals[i] - 1];
        uint64_t at = ref[r->stack];
        if (opt.older_ns && (r->ts_ns > at || at - r->ts_ns < opt.older_ns))
            continue;
        struct stack_agg *s = &stacks[r->stack];
        s->shown_space += r->weight;
        s->shown_objects += r->objects;
        s->shown_samples++;
        if (!s->oldest_ns || r->ts_ns < s->oldest_ns)
            s->oldest_ns = r->ts_ns;
    }
    for (size_t i = 0; i < large_idx.cap; i++) {
        if (!large_idx.keys[i])
            continue;
        uint64_t v = large_idx.vals[i], *ts = tc_map64_get(&large_ts, large_idx.keys[i]);
        uint64_t t = ts ? *ts : 0, at = ref[v >> 40];
        if (opt.older_ns && (!t || t > at || at - t < opt.older_ns))
            continue;
        struct stack_agg *s = &stacks[v >> 40];
        s->shown_large_bytes += v & ((1ull << 40) - 1);
        s->shown_large_count++;
        if (t && (!s->large_oldest_ns || t < s->large_oldest_ns))
            s->large_oldest_ns = t;
    }
}

/* The age at `now` of a block allocated at t in fmt (one %f: seconds), or nothing when its time
 * is not known. */
static const char *age_str(const char *fmt, uint64_t t, uint64_t now, char *buf, size_t len)
{
    if (!t || t > now)
        return "";
    snprintf(buf, len, fmt, (double)(now - t) * 1e-9);
    return buf;
}

struct site_sum {
    const char *name;
    pid_t pid, sym_pid; /* two processes given the same PID are two sites */
    double bytes, objects;
    uint64_t samples;
};

static int cmp_site(const void *a, const void *b)
{
    double x = ((const struct site_sum *)a)->bytes, y = ((const struct site_sum *)b)->bytes;
    return x < y ? 1 : (x > y ? -1 : 0);
}

/* Returns 1 when a report file could not be written, else 0.  skel NULL: --heap, whose figures
 * are the processes' own profiles (heap_main printed what they are). */
static int reports(struct allocsnoop_bpf *skel)
{
    int failed = 0;
    uint64_t lost[SNOOP_LOST_MAX] = {0};
    if (skel)
        lost_counts(skel, lost);
    /* A batch the target's memory would not give up, or records it could not be parsed into. */
    uint64_t lost_batch = lost[SNOOP_LOST_BATCH] + batch_malformed + exec_lost;
    double elapsed = (t_end ? t_end : tc_now()) - t_start;

    /* Top sites: first frame outside the allocator. */
    struct site_sum *sites = calloc(nstacks ? nstacks : 1, sizeof(*sites));
    size_t nsites = 0;
    double total = 0;
    for (size_t i = 0; i < nstacks && sites; i++) {
        struct stack_agg *s = &stacks[i];
        if (!s->samples)
            continue; /* only large blocks or failures from it: no sampled bytes to rank */
        const char *name = "[no stack]";
        if (s->depth) {
            unsigned f = tc_first_user_frame(sym, s->sym_pid, s->frames, s->depth);
            name = tc_sym_resolve(sym, s->sym_pid, s->frames[f])->name;
        }
        total += s->alloc_space;
        size_t k;
        for (k = 0; k < nsites; k++)
            if (sites[k].sym_pid == s->sym_pid && !strcmp(sites[k].name, name))
                break;
        if (k == nsites)
            sites[nsites++] = (struct site_sum){name, s->pid, s->sym_pid, 0, 0, 0};
        sites[k].bytes += s->alloc_space;
        sites[k].objects += s->alloc_objects;
        sites[k].samples += s->samples;
    }
    if (nsites)
        qsort(sites, nsites, sizeof(*sites), cmp_site);

    /* ages as of when tracing stopped (a report of processes that exited is as of then) */
    uint64_t now = t_end ? (uint64_t)(t_end * 1e9) : mono_ns();
    char age[48];
    uint64_t *ref = calloc(nstacks ? nstacks : 1, sizeof(*ref));
    if (!ref)
        tc_die("out of memory");
    live_figures(skel != NULL, now, ref);
    uint32_t *order = malloc((nstacks ? nstacks : 1) * sizeof(*order));
    size_t nlive = 0;
    for (size_t i = 0; i < nstacks && order; i++)
        if (stacks[i].shown_samples > 0)
            order[nlive++] = (uint32_t)i;
    if (nlive)
        qsort(order, nlive, sizeof(*order), cmp_inuse);
    bool leak_valid = (opt.kinds & (1u << SNOOP_SAMPLE)) && (opt.kinds & (1u << SNOOP_SAMPLE_FREE));
    bool large_valid = (opt.kinds & (1u << SNOOP_LARGE_ALLOC)) && (opt.kinds & (1u << SNOOP_LARGE_FREE));
    uint32_t *lorder = malloc((nstacks ? nstacks : 1) * sizeof(*lorder));
    size_t nlarge = 0;
    for (size_t i = 0; i < nstacks && lorder; i++)
        if (stacks[i].shown_large_count > 0)
            lorder[nlarge++] = (uint32_t)i;
    if (nlarge)
        qsort(lorder, nlarge, sizeof(*lorder), cmp_large);

    if (opt.json) {
        if (skel) {
            printf("{\"type\":\"summary\",\"duration\":%.3f,\"events\":{", elapsed);
            for (int k = 0; k < SNOOP_NKINDS; k++)
                printf("%s\"%s\":%llu", k ? "," : "", kind_names[k], (unsigned long long)counts[k]);
            printf("},\"batches\":%llu,\"exec_records\":%llu,\"lost\":{\"ringbuf\":%llu,\"stack\":%llu,\"batch\":%llu,"
                   "\"args\":%llu}}\n",
                   (unsigned long long)batches, (unsigned long long)exec_records,
                   (unsigned long long)lost[SNOOP_LOST_RINGBUF], (unsigned long long)lost[SNOOP_LOST_STACK],
                   (unsigned long long)lost_batch, (unsigned long long)lost[SNOOP_LOST_ARGS]);
        }
        for (size_t k = 0; k < nsites; k++) {
            printf("{\"type\":\"site\",\"pid\":%d,\"function\":", (int)sites[k].pid);
            tc_json_str(stdout, sites[k].name);
            printf(",\"bytes\":%.0f,\"objects\":%.0f,\"samples\":%llu,\"share\":%.4f}\n", sites[k].bytes,
                   sites[k].objects, (unsigned long long)sites[k].samples, total > 0 ? sites[k].bytes / total : 0);
        }
        for (size_t k = 0; leak_valid && k < nlive && (int)k < opt.leaks; k++) {
            struct stack_agg *s = &stacks[order[k]];
            printf("{\"type\":\"live\",\"pid\":%d,\"bytes\":%.0f,\"objects\":%.0f,\"samples\":%llu,",
                   (int)s->pid, s->shown_space, s->shown_objects, (unsigned long long)s->shown_samples);
            uint64_t at = ref[order[k]];
            if (s->oldest_ns && s->oldest_ns <= at)
                printf("\"oldest_s\":%.3f,", (double)(at - s->oldest_ns) * 1e-9);
            printf("\"stack\":");
            print_stack_json(s->sym_pid, s->frames, s->depth);
            printf("}\n");
        }
        for (size_t k = 0; large_valid && k < nlarge && (int)k < opt.leaks; k++) {
            struct stack_agg *s = &stacks[lorder[k]];
            printf("{\"type\":\"live_large\",\"pid\":%d,\"bytes\":%llu,\"blocks\":%llu,", (int)s->pid,
                   (unsigned long long)s->shown_large_bytes, (unsigned long long)s->shown_large_count);
            uint64_t at = ref[lorder[k]];
            if (s->large_oldest_ns && s->large_oldest_ns <= at)
                printf("\"oldest_s\":%.3f,", (double)(at - s->large_oldest_ns) * 1e-9);
            printf("\"stack\":");
            print_stack_json(s->sym_pid, s->frames, s->depth);
            printf("}\n");
        }
    } else if (skel) {
        fprintf(stdout, "\n=== allocsnoop: %.1f s", elapsed);
        for (int k = 0; k < SNOOP_NKINDS; k++)
            if (counts[k])
                printf(", %s %llu", kind_names[k], (unsigned long long)counts[k]);
        printf("\nlost events: ring buffer %llu, stacks unreadable %llu", (unsigned long long)lost[SNOOP_LOST_RINGBUF],
               (unsigned long long)lost[SNOOP_LOST_STACK]);
        if (lost_batch)
            printf(", batched records unreadable %llu", (unsigned long long)lost_batch);
        if (lost[SNOOP_LOST_ARGS])
            printf(", arguments unreadable %llu", (unsigned long long)lost[SNOOP_LOST_ARGS]);
        printf("\n");
        if (exec_records)
            printf("batched records taken at an exec (the process could not publish them): %llu\n",
                   (unsigned long long)exec_records);
    }
    if (!opt.json) {
        if (nsites) {
            printf("\nTop allocation sites (sampled bytes%s):\n", skel ? "" : " since the process started");
            for (size_t k = 0; k < nsites && k < 15; k++)
                printf("  %5.1f%%  %12.0f B  %10.0f objs  %7llu samples  %s (pid %d)\n",
                       total > 0 ? 100 * sites[k].bytes / total : 0, sites[k].bytes, sites[k].objects,
                       (unsigned long long)sites[k].samples, sites[k].name, (int)sites[k].pid);
        }
        if (!leak_valid) {
            printf("\n(live-bytes report needs both sample and sample_free events)\n");
        } else {
            double live_total = 0;
            for (size_t k = 0; k < nlive; k++)
                live_total += stacks[order[k]].shown_space;
            char older[64] = "";
            if (opt.older_ns)
                snprintf(older, sizeof older, ", allocated over %.3g s before", (double)opt.older_ns * 1e-9);
            printf(skel ? "\nLive (not freed) bytes at exit%s, estimated from samples: %.0f B in %zu stacks\n"
                        : "\nLive heap now%s, estimated from samples: %.0f B in %zu stacks\n",
                   older, live_total, nlive);
            for (size_t k = 0; k < nlive && (int)k < opt.leaks; k++) {
                struct stack_agg *s = &stacks[order[k]];
                printf("\n%.0f bytes in ~%.0f objects (%llu samples%s) still live, pid %d, allocated from:\n",
                       s->shown_space, s->shown_objects, (unsigned long long)s->shown_samples,
                       age_str(", oldest %.1f s", s->oldest_ns, ref[order[k]], age, sizeof age), (int)s->pid);
                print_stack_text(s->sym_pid, s->frames, s->depth, "    ", 16);
            }
        }
    }
    if (!opt.json && large_valid && nlarge) {
        uint64_t lt = 0, lc = 0;
        for (size_t k = 0; k < nlarge; k++)
            lt += stacks[lorder[k]].shown_large_bytes, lc += stacks[lorder[k]].shown_large_count;
        printf("\nLive large blocks at exit (exact, allocated while attached%s): %llu B in %llu blocks\n",
               opt.older_ns ? " and long enough ago" : "", (unsigned long long)lt, (unsigned long long)lc);
        for (size_t k = 0; k < nlarge && (int)k < opt.leaks; k++) {
            struct stack_agg *s = &stacks[lorder[k]];
            printf("\n%llu bytes in %llu large blocks%s still live, pid %d, allocated from:\n",
                   (unsigned long long)s->shown_large_bytes, (unsigned long long)s->shown_large_count,
                   age_str(" (oldest %.1f s)", s->large_oldest_ns, ref[lorder[k]], age, sizeof age), (int)s->pid);
            print_stack_text(s->sym_pid, s->frames, s->depth, "    ", 16);
        }
    }
    free(ref);
    free(lorder);
    free(order);
    free(sites);

    if (opt.folded || opt.pprof) {
        struct tc_prof_stack *ps = calloc(nstacks ? nstacks : 1, sizeof(*ps));
        if (!ps)
            tc_die("out of memory");
        for (size_t i = 0; i < nstacks; i++) {
            ps[i].pid = stacks[i].sym_pid;
            ps[i].depth = stacks[i].depth;
            ps[i].frames = stacks[i].frames;
            ps[i].values[0] = llround(stacks[i].alloc_objects);
            ps[i].values[1] = llround(stacks[i].alloc_space);
            ps[i].values[2] = llround(stacks[i].inuse_objects);
            ps[i].values[3] = llround(stacks[i].inuse_space);
        }
        int r;
        /* --heap: what the flame graph is for there is what holds the memory now */
        if (opt.folded && (r = tc_write_folded(opt.folded, sym, ps, nstacks, skel ? 1 : 3))) {
            tc_warn("cannot write %s: %s", opt.folded, strerror(-r));
            failed = 1;
        }
        int64_t period = 0;
        if (opt.pprof && (r = tc_write_pprof(opt.pprof, sym, ps, nstacks, skel ? (int64_t)(elapsed * 1e9) : 0, period))) {
            tc_warn("cannot write %s: %s", opt.pprof, strerror(-r));
            failed = 1;
        }
        free(ps);
    }
    fflush(stdout);
    return failed;
}

/* One record of a process's own profile, as a stack of the reports. */
static void add_profile_stack(pid_t pid, const struct tc_heap_stack *h)
{
    if (nstacks == capstacks) {
        capstacks = capstacks ? capstacks * 2 : 256;
        stacks = realloc(stacks, capstacks * sizeof(*stacks));
        if (!stacks)
            tc_die("out of memory");
    }
    const struct lum_profile_stack_v1 *r = &h->rec;
    uint64_t *frames = NULL;
    if (r->depth) {
        if (!(frames = malloc(r->depth * sizeof(uint64_t))))
            tc_die("out of memory");
        memcpy(frames, h->frames, r->depth * sizeof(uint64_t));
    }
    stacks[nstacks++] = (struct stack_agg){
        .pid = pid,
        .sym_pid = pid,
        .depth = r->depth,
        .frames = frames,
        .alloc_objects = r->alloc_objects,
        .alloc_space = (double)r->alloc_bytes,
        .inuse_objects = r->live_objects,
        .inuse_space = (double)r->live_bytes,
        .samples = r->samples,
        .live_samples = r->live_samples,
    };
}

/* --heap: each process's live heap and allocations by stack, as lumalloc's own profile there has
 * them (every sample since it started), read from its memory: no probe, no BPF, no stop.  Every
 * process is read before anything is printed: one that cannot be leaves no half report. */
struct heap_read {
    struct lum_profile_v1 hdr;
    struct tc_heap_stack *v;
    size_t n;
    bool truncated;
    uint64_t interval;
    char comm[64];
};

static void heap_read_one(struct tc_target *t, struct heap_read *h)
{
    pid_t pid = t->pid;
    char err[512], maps[64];
    if (kill(pid, 0) && errno == ESRCH)
        tc_die("no such process: %d", (int)pid);
    /* maps first: a process we may not read says so here, before tc_target_locate's less
     * telling "cannot read /proc/N/maps" */
    snprintf(maps, sizeof(maps), "/proc/%d/maps", (int)pid);
    /* open, not access: the file's mode lets anyone read it, the kernel's ptrace check at open
     * does not */
    int fd = open(maps, O_RDONLY | O_CLOEXEC), r = fd < 0 && errno == EACCES ? -EACCES : 0;
    if (fd >= 0)
        close(fd);
    if (!r && tc_target_locate(t, err, sizeof(err)))
        tc_die("%s", err);
    if (!r)
        r = tc_profile_read(t, &h->hdr, &h->v, &h->n, &h->truncated);
    if (r == -ENOENT && strstr(tc_no_symbol_reason(t, "lumalloc_profile", err, sizeof(err)), " is stripped:"))
        tc_die("pid %d: %s", (int)pid, err);
    if (r == -ENOENT || r == -ENODATA)
        tc_die("pid %d %s: trace it with allocsnoop -p %d", (int)pid, tc_profile_strerror(r), (int)pid);
    if (r)
        tc_die("pid %d: %s", (int)pid, tc_profile_strerror(r));
    struct lum_registry_v1 reg = {0};
    struct tc_thread *threads = NULL;
    size_t nthreads = 0;
    tc_registry_read(t, &reg, &threads, &nthreads);
    free(threads);
    h->interval = reg.sample_interval;
    snprintf(h->comm, sizeof(h->comm), "?");
    tc_read_comm(pid, pid, h->comm, sizeof(h->comm));
    tc_sym_snapshot(sym, pid, tc_target_file(t));
}

static int heap_main(int npids, const pid_t *pids, const char *command)
{
    if (command || binary_path || !npids)
        tc_die("--heap reads processes that are running: give -p PID (not -c or -b)");
    sym = tc_sym_new();
    struct heap_read *hr = calloc((size_t)npids, sizeof(*hr));
    if (!hr)
        tc_die("out of memory");
    for (int i = 0; i < npids; i++) {
        struct tc_target *t = &targets[ntargets++];
        t->pid = pids[i];
        t->alive = true;
        heap_read_one(t, &hr[i]);
    }
    for (int i = 0; i < npids; i++) {
        struct heap_read *h = &hr[i];
        pid_t pid = pids[i];
        double live = 0;
        for (size_t k = 0; k < h->n; k++) {
            add_profile_stack(pid, &h->v[k]);
            live += (double)h->v[k].rec.live_bytes;
        }
        if (h->truncated)
            tc_warn("warning: pid %d: the profile's list could not be read to its end (the process exiting, "
                    "or a record this allocsnoop cannot read): %zu stacks shown",
                    (int)pid, h->n);
        if (opt.json) {
            printf("{\"type\":\"heap\",\"pid\":%d,\"comm\":", (int)pid);
            tc_json_str(stdout, h->comm);
            printf(",\"sample_interval\":%llu,\"stacks\":%zu,\"dropped\":%llu,\"live_bytes\":%.0f,"
                   "\"truncated\":%s}\n",
                   (unsigned long long)h->interval, h->n, (unsigned long long)h->hdr.dropped, live,
                   h->truncated ? "true" : "false");
        } else {
            printf("=== allocsnoop --heap: pid %d (%s), lumalloc's in-process profile: every sample since "
                   "the process started\n",
                   (int)pid, h->comm);
            if (h->interval)
                printf("sampling every %llu bytes on average", (unsigned long long)h->interval);
            else
                printf("sampling off now (LUMALLOC_SAMPLE_INTERVAL=0)");
            printf("; %zu stacks recorded; live heap %.0f B (estimated)\n", h->n, live);
            if (h->hdr.dropped)
                printf("%llu samples are in no stack (the profile's table was full)\n",
                       (unsigned long long)h->hdr.dropped);
        }
        tc_profile_free(h->v, h->n);
        tc_target_close(&targets[i]);
    }
    free(hr);
    int failed = reports(NULL);
    tc_sym_free(sym);
    for (size_t i = 0; i < nstacks; i++)
        free(stacks[i].frames);
    free(stacks);
    return failed;
}

static void attach_probes(struct allocsnoop_bpf *skel, struct tc_target *t)
{
    static const struct {
        const char *probe;
        int kind;
    } probes[] = {{"sample", SNOOP_SAMPLE},           {"sample_free", SNOOP_SAMPLE_FREE},
                  {"large_alloc", SNOOP_LARGE_ALLOC}, {"large_free", SNOOP_LARGE_FREE},
                  {"alloc_failure", SNOOP_FAILURE},   {"thread_start", SNOOP_THREAD_START},
                  {"thread_exit", SNOOP_THREAD_EXIT}, {"purge", SNOOP_PURGE},
                  {"pressure", SNOOP_PRESSURE}};
    struct bpf_program *progs[] = {skel->progs.on_sample,        skel->progs.on_sample_free,
                                   skel->progs.on_large_alloc,   skel->progs.on_large_free,
                                   skel->progs.on_alloc_failure, skel->progs.on_thread_start,
                                   skel->progs.on_thread_exit,   skel->progs.on_purge,
                                   skel->progs.on_pressure};
    int attached = 0;
    /* Samples and their frees come batched where the library has sample_batch (one probe hit
     * per few hundred events), one by one from older libraries. */
    bool batched = false;
    if ((opt.kinds & (1u << SNOOP_SAMPLE | 1u << SNOOP_SAMPLE_FREE)) && !opt.no_batch &&
        tc_attach_usdt(t, skel->progs.on_sample_batch, "sample_batch", true) == 0) {
        batched = true;
        reorder = true;
        attached++;
    }
    if (tc_verbose)
        fprintf(stderr, "allocsnoop: pid %d: samples through %s\n", (int)t->pid,
                batched ? "sample_batch" : "sample/sample_free");
    for (size_t i = 0; i < sizeof(probes) / sizeof(probes[0]); i++) {
        if (!(opt.kinds & (1u << probes[i].kind)))
            continue;
        if (batched && (probes[i].kind == SNOOP_SAMPLE || probes[i].kind == SNOOP_SAMPLE_FREE))
            continue;
        /* Only `sample` is mandatory: older or partial libraries may lack the others. */
        bool required = probes[i].kind == SNOOP_SAMPLE && !batched;
        if (tc_attach_usdt(t, progs[i], probes[i].probe, !required) == 0)
            attached++;
        else if (required && !t->reattach) {
            tc_die_if_exited(t);
            tc_die("cannot attach to the lumalloc probes of pid %d (%s)", (int)t->pid, tc_target_file(t));
        }
    }
    if (!attached && !t->reattach)
        tc_die_if_exited(t);
    if (!attached && !t->reattach)
        tc_die("none of the requested lumalloc probes exist in %s", tc_target_file(t));
}

static void attach_target(struct allocsnoop_bpf *skel, struct tc_target *t)
{
    attach_probes(skel, t);
    /* The thread attached through exited while we attached (the later probes went through
     * another): the probes attached before it are dead, all are attached again, now. */
    for (int again = 0; again < 4 && tc_target_moved(t); again++) {
        tc_detach(t);
        t->reattach = true;
        attach_probes(skel, t);
    }
}

int main(int argc, char **argv)
{
    tc_prog = "allocsnoop";
    const char *command = NULL, *preload = NULL;
    pid_t pids[MAX_TARGETS];
    int npids = 0;
    enum { OPT_PRELOAD = 256, OPT_FOLDED, OPT_PPROF, OPT_LEAKS, OPT_ALLFRAMES, OPT_RINGBUF, OPT_NOBATCH };
    long ringbuf_kib = 0;
    static const struct option lopts[] = {
        {"pid", required_argument, 0, 'p'},         {"command", required_argument, 0, 'c'},
        {"binary", required_argument, 0, 'b'},
        {"preload", required_argument, 0, OPT_PRELOAD}, {"events", required_argument, 0, 'e'},
        {"min-size", required_argument, 0, 'm'},    {"duration", required_argument, 0, 'd'},
        {"stacks", no_argument, 0, 'U'},            {"quiet", no_argument, 0, 'q'},
        {"json", no_argument, 0, 'j'},              {"folded", required_argument, 0, OPT_FOLDED},
        {"pprof", required_argument, 0, OPT_PPROF}, {"leaks", required_argument, 0, OPT_LEAKS},
        {"all-frames", no_argument, 0, OPT_ALLFRAMES}, {"verbose", no_argument, 0, 'v'},
        {"ringbuf-kib", required_argument, 0, OPT_RINGBUF}, {"no-batch", no_argument, 0, OPT_NOBATCH},
        {"heap", no_argument, 0, 'H'},             {"older", required_argument, 0, 'o'},
        {"help", no_argument, 0, 'h'},              {0, 0, 0, 0}};
    int c;
    opterr = 0; /* tc_usage_error says it in one line */
    while ((c = getopt_long(argc, argv, ":p:c:b:B:e:m:d:o:UqjvhH", lopts, NULL)) != -1) {
        switch (c) {
        case 'p': npids += tc_parse_pids(optarg, pids, npids, MAX_TARGETS); break;
        case 'c': command = optarg; break;
        case 'b':
        case 'B': binary_path = optarg; break;
        case OPT_PRELOAD: preload = optarg; break;
        case 'e': opt.kinds = parse_kinds(optarg); break;
        case 'm': opt.min_size = parse_size(optarg); break;
        case 'd': opt.duration = tc_parse_double("duration", optarg, 0.001, 1e9); break;
        case 'U': opt.stacks_out = true; break;
        case 'q': opt.quiet = true; break;
        case 'j': opt.json = true; break;
        case OPT_FOLDED: opt.folded = check_writable(optarg); break;
        case OPT_PPROF: opt.pprof = check_writable(optarg); break;
        case OPT_LEAKS: opt.leaks = (int)tc_parse_long("leak report size", optarg, 0, 1000000); break;
        case OPT_ALLFRAMES: opt.all_frames = true; break;
        case OPT_RINGBUF:
            /* Power of two, at least a page: the kernel's rule for ring buffers. */
            ringbuf_kib = tc_parse_long("ring buffer size", optarg, 4, 1 << 20);
            if (ringbuf_kib & (ringbuf_kib - 1))
                tc_die("--ringbuf-kib must be a power of two from 4 to 1048576");
            break;
        case OPT_NOBATCH: opt.no_batch = true; break;
        case 'H': opt.heap = true; break;
        case 'o': opt.older_ns = (uint64_t)(tc_parse_double("--older", optarg, 0, 1e7) * 1e9); break;
        case 'v': tc_verbose++; break;
        case 'h': usage(stdout); return 0;
        default: tc_usage_error(c, argv);
        }
    }
    if (optind < argc)
        tc_die("unexpected argument '%s' (see --help)", argv[optind]);
    if (opt.heap) {
        /* what a trace would filter or how long it would run: nothing of it applies to a reading */
        if (opt.kinds != 0xffffffff || opt.min_size || opt.duration || opt.stacks_out || opt.quiet ||
            opt.no_batch || ringbuf_kib || opt.older_ns)
            tc_die("--heap takes -p, -j, --leaks, --folded, --pprof and --all-frames (not -e, -m, -d, -o, -U, "
                   "-q, --no-batch, --ringbuf-kib)");
        return heap_main(npids, pids, command);
    }
    /* A batch is up to LUM_BATCH_BYTES in one ring record: a ring of a few batches loses most
     * of them while the reader drains it (64 KiB: 156 samples delivered of 38000).  Said, not
     * refused: the losses are counted and shown, and a tiny ring is how to test that. */
    if (ringbuf_kib && ringbuf_kib < 4 * LUM_BATCH_BYTES / 1024 && !opt.no_batch &&
        (opt.kinds & (1u << SNOOP_SAMPLE | 1u << SNOOP_SAMPLE_FREE)))
        tc_warn("warning: --ringbuf-kib %ld is small for batched samples (a batch is up to %d KiB): "
                "most will be lost; use at least %d, or --no-batch",
                ringbuf_kib, LUM_BATCH_BYTES / 1024, 4 * LUM_BATCH_BYTES / 1024);
    tc_need_one_target(npids, command, binary_path);
    tc_check_environment();
    static char binary_real[PATH_MAX];
    if (binary_path) {
        tc_resolve_probed_binary(binary_path, binary_real);
        binary_path = binary_real;
        tc_warn_old_copy_users(binary_path);
        struct tc_target *t = &targets[ntargets++];
        t->pid = -1; /* all processes: the uprobes follow the file */
        t->alive = true;
        snprintf(t->probe_path, sizeof(t->probe_path), "%s", binary_real);
    }
    tc_libbpf_quiet();
    for (int i = 0; i < npids; i++) {
        struct tc_target *t = &targets[ntargets++];
        t->pid = pids[i];
        t->alive = true;
        char err[512];
        if (kill(pids[i], 0) && errno == ESRCH)
            tc_die("no such process: %d", (int)pids[i]);
        if (tc_target_locate(t, err, sizeof(err)))
            tc_die("%s", err);
    }
    if (command)
        tc_launch_prepare(&targets[ntargets++], command, preload);

    sym = tc_sym_new();
    struct allocsnoop_bpf *skel = NULL;
    /* The exec programs serve the batched samples only; where they do not load or attach (no
     * tracefs mounted), records waiting at an exec are lost as before. */
    bool exec_progs = !opt.no_batch && (opt.kinds & (1u << SNOOP_SAMPLE | 1u << SNOOP_SAMPLE_FREE));
    /* The exit program dates the exits of processes gone (their blocks' ages stop there); where
     * it does not load or attach, their last events do, as before. */
    bool exit_prog = true;
    /* Every optional program, then without the exit program, without the exec programs, and
     * with neither: one that does not load (an older verifier, a kernel without the
     * tracepoint's BTF) costs only its own use, whichever it is. */
    const bool want_exec = exec_progs;
    const bool tries[][2] = {{true, true}, {true, false}, {false, true}, {false, false}}; /* exec, exit */
    int load_err = 0;
    for (size_t attempt = 0; attempt < sizeof(tries) / sizeof(tries[0]) && !skel; attempt++) {
        exec_progs = want_exec && tries[attempt][0];
        exit_prog = tries[attempt][1];
        if (!want_exec && !tries[attempt][0])
            continue; /* the exec programs were never asked for: the first two tries were these */
        skel = allocsnoop_bpf__open();
        if (!skel)
            tc_die("cannot open the BPF programs: %s", strerror(errno));
        skel->rodata->kind_mask = opt.kinds;
        skel->rodata->min_size = opt.min_size;
        if (ringbuf_kib)
            bpf_map__set_max_entries(skel->maps.events, (uint32_t)ringbuf_kib * 1024);
        skel->rodata->wakeup_bytes = bpf_map__max_entries(skel->maps.events) / 4;
        struct bpf_program *ep[] = {skel->progs.on_execve, skel->progs.on_execveat, skel->progs.on_execve_ret,
                                    skel->progs.on_execveat_ret, skel->progs.on_exec};
        for (size_t k = 0; k < sizeof(ep) / sizeof(ep[0]); k++)
            bpf_program__set_autoload(ep[k], exec_progs);
        bpf_program__set_autoload(skel->progs.on_process_exit, exit_prog);
        if (allocsnoop_bpf__load(skel) == 0)
            break;
        load_err = errno;
        allocsnoop_bpf__destroy(skel);
        skel = NULL;
    }
    if (!skel)
        tc_die("cannot load the BPF programs: %s", strerror(load_err));
    if (tc_verbose && want_exec && !exec_progs)
        tc_warn("records waiting at an exec will be lost: the exec programs do not load");
    if (tc_verbose && !exit_prog)
        tc_warn("a process gone will have its blocks aged at its last event: the exit program does not load");
    if (exec_progs) {
        struct bpf_program *ep[] = {skel->progs.on_execve, skel->progs.on_execveat, skel->progs.on_execve_ret,
                                    skel->progs.on_execveat_ret, skel->progs.on_exec};
        bool ok = true;
        for (size_t k = 0; k < sizeof(ep) / sizeof(ep[0]) && ok; k++)
            ok = bpf_program__attach(ep[k]) != NULL; /* the skeleton's links go with it */
        if (ok)
            exec_watch_fd = bpf_map__fd(skel->maps.exec_watch);
        else if (tc_verbose)
            tc_warn("records waiting at an exec will be lost: cannot attach to the execve tracepoints (is "
                    "tracefs mounted on /sys/kernel/tracing?): %s", strerror(errno));
    }
    /* before the probes: every process that sends an event has its exit seen */
    if (exit_prog && !(skel->links.on_process_exit = bpf_program__attach(skel->progs.on_process_exit)) &&
        tc_verbose)
        tc_warn("a process gone will have its blocks aged at its last event: cannot attach to "
                "sched_process_exit: %s", strerror(errno));
    /* The clock starts before the probes are attached: an event that fires in between is
     * stamped with its time since then, not with 0. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    start_ns = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    t_start = tc_now();
    for (int i = 0; i < ntargets; i++) {
        attach_target(skel, &targets[i]);
        if (!targets[i].launched)
            watch_exec(targets[i].pid);
    }
    struct ring_buffer *rb = ring_buffer__new(bpf_map__fd(skel->maps.events), handle_event, NULL, NULL);
    if (!rb)
        tc_die("cannot create the ring buffer: %s", strerror(errno));
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGPIPE, SIG_IGN);

    if (command) {
        tc_hold_arm(&targets[ntargets - 1], bpf_map__fd(skel->maps.hold));
        skel->bss->hold_active = 1;
        tc_launch_go(&targets[ntargets - 1]);
    }
    for (int i = 0; i < ntargets; i++)
        if (!targets[i].launched && targets[i].pid > 0) {
            tc_sym_snapshot(sym, targets[i].pid, tc_target_file(&targets[i]));
            last_snap[i] = tc_now();
        }
    if (!opt.quiet && !opt.json)
        printf("%-12s %-7s %-7s %-13s %12s %-16s %s\n", "TIME(s)", "PID", "TID", "EVENT", "SIZE", "ADDR", "");

    double last_release = tc_now();
    while (!stop) {
        int r = ring_buffer__poll(rb, 100);
        if (r < 0 && r != -EINTR)
            break;
        /* ring_buffer__poll reads only a ring that woke it, and sample events do not wake the
         * reader until the ring is a quarter full: without this, a live trace showed them in
         * bursts seconds apart (every 4 MiB of events), and `| head` waited as long. */
        if (r == 0)
            ring_buffer__consume(rb);
        if (npend > pend_head)
            pend_release(mono_ns(), false);
        if (opt.duration && tc_now() - t_start >= opt.duration)
            break;
        if (binary_path && tc_now() - last_release >= 1.0) {
            release_gone();
            last_release = tc_now();
        }
        bool any_alive = false;
        for (int i = 0; i < ntargets; i++) {
            if (targets[i].pid < 0) { /* -b: runs until -d or ^C */
                any_alive = true;
                continue;
            }
            maybe_snapshot(targets[i].pid);
            tc_target_poll(&targets[i]);
            uint64_t image = targets[i].alive ? tc_image_id(targets[i].pid) : 0;
            if (image && image_seen[i] && image != image_seen[i] && !tc_hold_ready(&targets[i])) {
                /* what came before the exec is in: place it, then forget the old image's blocks */
                ring_buffer__consume(rb);
                pend_release(0, true);
                drop_live_of(targets[i].pid);
                watch_until[i] = tc_now() + 5;
            }
            /* a try reads the image's maps: a few a second (the poll returns at every event) */
            if (watch_until[i] && tc_now() - watch_tried[i] >= 0.2) {
                watch_tried[i] = tc_now();
                if (!targets[i].alive || watch_tried[i] > watch_until[i] || watch_exec(targets[i].pid))
                    watch_until[i] = 0;
            }
            if (image)
                image_seen[i] = image;
            if (tc_target_moved(&targets[i])) {
                /* Events between the thread's exit and now are lost; a failure (the process
                 * exiting, or the new thread too) is retried at the next poll. */
                tc_detach(&targets[i]);
                targets[i].reattach = true;
                attach_target(skel, &targets[i]);
            }
            any_alive |= targets[i].alive;
        }
        if (!any_alive) {
            ring_buffer__consume(rb); /* drain what the target sent before exiting */
            pend_release(0, true);
            break;
        }
        if (tc_stdout_failed())
            break; /* the reader is gone (| head): stop, detaching the probes */
    }
    ring_buffer__consume(rb);
    exec_lost_all();
    if (tc_verbose && exec_dropped)
        fprintf(stderr, "allocsnoop: %llu records taken at failed execs were left to the process\n",
                (unsigned long long)exec_dropped);
    pend_release(0, true);
    t_end = tc_now();
    /* Reports first: unregistering a uprobe waits for RCU grace periods (~0.1 s per probe on
     * this kind of machine), the user should not wait for that to see the results. */
    int report_failed = tc_stdout_failed() ? 0 : reports(skel);
    for (int i = 0; i < ntargets; i++) {
        tc_detach(&targets[i]);
        tc_target_close(&targets[i]);
    }
    int status = 0;
    for (int i = 0; i < ntargets; i++)
        if (targets[i].launched && !targets[i].alive)
            status = tc_exit_status(targets[i].exit_status);
    if (report_failed && !status)
        status = 1;
    ring_buffer__free(rb);
    allocsnoop_bpf__destroy(skel);
    tc_sym_free(sym);
    for (size_t i = 0; i < nstacks; i++)
        free(stacks[i].frames);
    free(stacks);
    free(lives);
    tc_map64_free(&stack_idx);
    tc_map64_free(&live_idx);
    tc_map64_free(&large_idx);
    tc_map64_free(&large_ts);
    tc_map64_free(&pid_last_ts);
    tc_map64_free(&pid_exit_ts);
    tc_map64_free(&pid_snap);
    tc_map64_free(&pid_execd);
    tc_map64_free(&pid_dead);
    tc_map64_free(&pid_start);
    tc_map64_free(&pid_gen);
    tc_tidmap_free(&tidmap);
    tc_map64_free(&batch_seen);
    tc_map64_free(&pid_lives);
    tc_map64_free(&rec_seen);
    free(held);
    free(pend);
    return status;
}
