/*
 * alloctop: top for a process's allocations.  Per-thread figures are exact: they are read from
 * the library's registry (lumalloc_registry, one counters block per thread) with
 * process_vm_readv each interval, which costs the target nothing.  The BPF side (bpf/alloctop.bpf.c)
 * adds what the counters cannot: allocation sites from `sample` stacks, thread lifecycle, and
 * lost-event counts.
 *
 * Figures:
 *   ALLOC/s, FREE/s   usable bytes allocated / freed by the thread per second
 *   ALLOCS/s          allocations per second
 *   LIVE              bytes allocated minus bytes freed by this thread (can be negative for a
 *                     thread that frees what others allocated)
 *   LARGE, FAIL       large-path allocations and failed allocations since the thread started
 *   active            sum of LIVE over all threads (incl. folded-in exited ones)
 *   frag              1 - active/min(resident, anonymous RSS): the share of the allocator's
 *                     resident memory that holds no live block (free slots, partially used
 *                     pages, metadata); resident is lumalloc's share of RSS to 4 KiB, and the
 *                     process's anonymous RSS (all of an allocator's memory is anonymous)
 *                     caps it, as a guard
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "alloctop.h"
#include "alloctop.skel.h"
#include "tc.h"

#define MAX_TARGETS 64

enum sort_key { SORT_ALLOC, SORT_FREE, SORT_ALLOCS, SORT_LIVE, SORT_LARGE, SORT_FAIL, SORT_TID };
static const char *const sort_names[] = {"alloc", "free", "allocs", "live", "large", "fail", "tid"};

struct comm_entry {
    pid_t tid;
    char comm[17];
};

struct row {
    pid_t tid;
    const char *comm;
    bool exited;
    double alloc_bps, free_bps, allocs_ps, frees_ps;
    int64_t live;
    const struct lum_thread_counters_v1 *c;
};

struct tstate {
    struct tc_target t;
    char comm[17];
    bool located, have_reg, final_done;
    bool final_truncated; /* the exit-time reading missed threads: final_carried are older */
    size_t final_carried;
    uint32_t final_beyond; /* threads past the reading's bound (TOP_FINAL_MAX_THREADS) */
    /* the exit-time reading as its records come (struct top_final, one per TOP_FINAL_CHUNK
     * threads), applied at its last record, or as far as it came once the process is gone */
    struct tc_thread *fin;
    size_t nfin;
    uint32_t fin_next;    /* the record expected next */
    bool fin_pending, fin_gap;
    struct lum_registry_v1 fin_reg;
    struct lum_registry_v1 reg;
    struct tc_thread *cur, *prev;
    size_t ncur, nprev;
    double t_cur, t_prev;
    uint64_t rss, rss_anon;
    struct comm_entry *comms;
    size_t ncomms;
    double last_snapshot, first_seen;
    struct bpf_link *sample_link;
    bool registered; /* registry address handed to the BPF exit hook */
    bool via_binary; /* found by -B: the probes are attached to the file, not to this pid */
    bool shown_dead; /* reported once as exited (then dropped, with -B) */
    bool execd;      /* has exec'd since it was first located */
    char why_nothing[PATH_MAX + 256]; /* why nothing of it is shown (an image without lumalloc, or
                                       * stripped of its registry), or "" */
    /* -H: the process's own profile by site, this reading and the one before (sorted by site) */
    struct tc_heap_site *heap, *heap_prev;
    size_t nheap, nheap_prev;
    double heap_t, heap_t_prev;
    int heap_err; /* 0, or why there is no reading (tc_profile_read's error) */
    bool heap_cut; /* the last reading was cut short */
};

static struct tstate targets[MAX_TARGETS];
static int ntargets;
static const char *binary_path; /* -B */
static dev_t binary_dev;         /* -B: the file the probes are on */
static ino_t binary_ino;
static struct tstate bin_state;  /* -B: the attachment to the file (pid -1) */
static struct alloctop_bpf *skel;
static struct bpf_link *exit_link;
static struct tc_symbolizer *sym;
static struct tc_tidmap tidmap; /* the library's thread IDs (a container's) -> ours */
static volatile sig_atomic_t stop;
static struct termios saved_tio;
static bool tio_saved;

static struct {
    double interval;
    long count;
    enum sort_key sort;
    int rows;
    bool no_clear, batch, json, sites, no_bpf, heap;
    int site_rows;
} opt = {.interval = 1.0, .rows = 20, .site_rows = 10};

static void on_signal(int sig) { (void)sig, stop = 1; }

static void restore_tty(void)
{
    if (tio_saved)
        tcsetattr(0, TCSANOW, &saved_tio);
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: alloctop [options] [interval [count]]\n"
            "  -p, --pid PID[,PID...]   attach to running processes (repeatable)\n"
            "  -c, --command 'CMD ARGS' start CMD with the probes attached from its first instruction\n"
            "  -B, --binary PATH        every process that maps PATH (liblumalloc.so or static executable)\n"
            "      --preload PATH       LD_PRELOAD this liblumalloc.so into CMD (default: $LUMALLOC_LIB)\n"
            "  -s, --sort KEY           alloc|free|allocs|live|large|fail|tid (default alloc)\n"
            "  -r, --rows N             threads shown per process (default 20)\n"
            "  -C, --no-clear           do not clear the screen between intervals\n"
            "  -b, --batch              batch mode (default when stdout is not a terminal)\n"
            "  -j, --json               one JSON object per interval\n"
            "  -S, --sites              show the top allocation sites (key 's' toggles); attaches the\n"
            "                           frequent `sample` probe, the table alone does not\n"
            "  -H, --heap               show the sites holding the most live memory, from lumalloc's own\n"
            "                           profile in the process (every sample since it started), and how\n"
            "                           fast each grows (key 'h' toggles); read from its memory, no probe\n"
            "      --no-bpf             registry counters only (no sites, no lost counts)\n"
            "  -v, --verbose            libbpf diagnostics\n"
            "interval in seconds (default 1), count intervals (default: until the targets exit)\n"
            "keys: q quit, s sites, h heap, a/f/n/l/g/e/t sort by alloc/free/allocs/live/large/fail/tid\n");
}

static const char *hsize(double v, char *buf, size_t n)
{
    const char *u = " KMGTP";
    int i = 0;
    double a = v < 0 ? -v : v;
    while (a >= 1024 && i < 5)
        a /= 1024, v /= 1024, i++;
    if (i == 0)
        snprintf(buf, n, "%.0f", v);
    else
        snprintf(buf, n, "%.1f%c", v, u[i]);
    return buf;
}

static const char *comm_of(struct tstate *s, pid_t tid)
{
    for (size_t i = 0; i < s->ncomms; i++)
        if (s->comms[i].tid == tid)
            return s->comms[i].comm;
    return "?";
}

static void set_comm(struct tstate *s, pid_t tid, const char *c)
{
    for (size_t i = 0; i < s->ncomms; i++)
        if (s->comms[i].tid == tid) {
            snprintf(s->comms[i].comm, sizeof(s->comms[i].comm), "%.16s", c);
            return;
        }
    struct comm_entry *nc = realloc(s->comms, (s->ncomms + 1) * sizeof(*nc));
    if (!nc)
        return;
    s->comms = nc;
    s->comms[s->ncomms].tid = tid;
    snprintf(s->comms[s->ncomms].comm, sizeof(s->comms[0].comm), "%.16s", c);
    s->ncomms++;
}

static void remember_comm(struct tstate *s, pid_t tid)
{
    char c[64];
    if (tc_read_comm(s->t.pid, tid, c, sizeof(c)) == 0)
        set_comm(s, tid, c);
}

static void register_registry(struct tstate *s)
{
    if (!skel || !s->t.registry_addr || s->registered)
        return;
    uint32_t pid = (uint32_t)s->t.pid;
    uint64_t addr = s->t.registry_addr;
    if (bpf_map_update_elem(bpf_map__fd(skel->maps.registries), &pid, &addr, BPF_ANY) == 0)
        s->registered = true;
}

/* The registry as the BPF side read it when the process began to exit: the exact last figures.
 * complete: its last record came and no record was missing. */
static void apply_final(struct tstate *s, bool complete, uint32_t beyond)
{
    size_t nf = s->nfin;
    struct tc_thread *nt = calloc(nf + s->ncur + 1, sizeof(*nt));
    if (!nt)
        return;
    if (nf)
        memcpy(nt, s->fin, nf * sizeof(*nt));
    size_t n = nf;
    if (!complete) {
        /* Threads the exit-time reading does not hold (past its bound, in a record the ring
         * had no room for, or after an unreadable one) keep the last interval's figures, and
         * the report says so. */
        for (size_t i = 0; i < s->ncur; i++) {
            bool found = false;
            for (size_t k = 0; k < nf && !found; k++)
                found = nt[k].addr == s->cur[i].addr && nt[k].c.tid == s->cur[i].c.tid;
            if (!found)
                nt[n++] = s->cur[i];
        }
        s->final_carried = n - nf;
        s->final_truncated = true;
        s->final_beyond = beyond;
    }
    free(s->fin);
    s->fin = NULL;
    s->nfin = 0;
    s->fin_pending = false;
    free(s->prev);
    s->prev = s->cur, s->nprev = s->ncur, s->t_prev = s->t_cur;
    s->cur = nt, s->ncur = n, s->t_cur = tc_now();
    s->reg = s->fin_reg;
    s->have_reg = true;
    s->final_done = true;
}

/* A reading whose last record never came (the ring had no room for it): what came is applied
 * once the process is gone, the rest marked as older. */
static void apply_final_partial(struct tstate *s)
{
    if (s->fin_pending && !s->final_done)
        apply_final(s, false, 0);
}

static void add_final(const struct top_final *f)
{
    for (int i = 0; i < ntargets; i++) {
        struct tstate *s = &targets[i];
        if (s->t.pid != (pid_t)f->pid || f->reg.magic != LUM_REGISTRY_MAGIC || s->final_done)
            continue;
        if (f->chunk == 0) {
            free(s->fin);
            s->fin = NULL;
            s->nfin = 0;
            s->fin_next = 0;
            s->fin_gap = false;
        }
        s->fin_reg = f->reg; /* in every record (the BPF side stops at a record it has no room for) */
        s->fin_pending = true;
        if (f->chunk != s->fin_next)
            s->fin_gap = true;
        s->fin_next = f->chunk + 1;
        uint32_t nf = f->nthreads < TOP_FINAL_CHUNK ? f->nthreads : TOP_FINAL_CHUNK;
        struct tc_thread *nt = realloc(s->fin, (s->nfin + nf + 1) * sizeof(*nt));
        if (!nt) {
            s->fin_gap = true;
        } else {
            s->fin = nt;
            for (uint32_t k = 0; k < nf; k++) {
                struct tc_thread *t = &s->fin[s->nfin++];
                t->addr = f->threads[k].addr;
                t->c = f->threads[k].c;
                t->c.tid = (uint32_t)tc_host_tid(&tidmap, s->t.pid, (pid_t)t->c.tid);
            }
        }
        if (f->last)
            apply_final(s, !f->truncated && !s->fin_gap, f->beyond);
    }
}

static int handle_event(void *ctx, void *data, size_t len)
{
    (void)ctx;
    if (len < sizeof(struct top_event))
        return 0;
    const struct top_event *e = data;
    if (e->kind == TOP_FINAL && len >= sizeof(struct top_final)) {
        add_final(data);
        return 0;
    }
    for (int i = 0; i < ntargets; i++)
        if (targets[i].t.pid == (pid_t)e->pid && (e->kind == TOP_THREAD_START || e->kind == TOP_THREAD_EXIT)) {
            char c[17];
            memcpy(c, e->comm, 16);
            c[16] = 0;
            set_comm(&targets[i], tc_host_tid(&tidmap, (pid_t)e->pid, (pid_t)e->tid), c);
        }
    return 0;
}

static void lost_counts(uint64_t out[TOP_LOST_MAX])
{
    memset(out, 0, sizeof(uint64_t) * TOP_LOST_MAX);
    if (skel)
        tc_sum_percpu(bpf_map__fd(skel->maps.lost), out, TOP_LOST_MAX);
}

/* The `sample` probe is the only frequent one, and only the sites view needs it: attach it
 * only while sites are shown, so the default table costs the target (almost) nothing — the
 * per-thread figures come from the registry. */
static void set_sample_probe(struct tstate *s, bool on)
{
    if (!skel || on == (s->sample_link != NULL) || !s->t.alive || s->via_binary)
        return;
    if (!on) {
        bpf_link__destroy(s->sample_link);
        s->sample_link = NULL;
        return;
    }
    s->sample_link = tc_attach_usdt_link(&s->t, skel->progs.on_sample, "sample");
    if (!s->sample_link && !s->t.reattach) {
        int e = errno;
        tc_die_if_exited(&s->t);
        errno = e;
        tc_die("cannot attach to lumalloc:sample in %s (pid %d): %s", tc_target_file(&s->t), (int)s->t.pid,
               strerror(errno));
    }
}

static void attach_probes(struct tstate *s)
{
    int ok = 0;
    ok += tc_attach_usdt(&s->t, skel->progs.on_thread_start, "thread_start", true) == 0;
    ok += tc_attach_usdt(&s->t, skel->progs.on_thread_exit, "thread_exit", true) == 0;
    set_sample_probe(s, opt.sites);
    if (!ok && !s->sample_link && !s->t.reattach) {
        int e = errno;
        tc_die_if_exited(&s->t);
        tc_die("cannot attach to the lumalloc probes of pid %d (%s): %s", (int)s->t.pid, tc_target_file(&s->t),
               strerror(e));
    }
    /* Large allocations and failures are counted per thread in the registry: no probe here,
     * each would cost the target a uprobe hit for figures it already has. */
}

static void detach_target(struct tstate *s)
{
    tc_detach(&s->t);
    bpf_link__destroy(s->sample_link);
    s->sample_link = NULL;
}

static void attach_target(struct tstate *s)
{
    if (!skel)
        return;
    attach_probes(s);
    /* The thread attached through exited while we attached (the later probes went through
     * another): the probes attached before it are dead, all are attached again, now. */
    for (int again = 0; again < 4 && tc_target_moved(&s->t); again++) {
        detach_target(s);
        s->t.reattach = true;
        attach_probes(s);
    }
}

static void attach_target(struct tstate *s);

static bool is_target(pid_t pid);

/* Keys of pid in the sites and stacks maps (pid -1: of every process gone that is not shown): a
 * process gone (or exec'd) leaves them behind, and with -B over short-lived processes they filled
 * the maps, so later processes got no sites. */
static void drop_bpf_sites(pid_t pid)
{
    if (!skel)
        return;
    int sfd = bpf_map__fd(skel->maps.sites), stfd = bpf_map__fd(skel->maps.stacks);
    struct top_site_key k, nk;
    /* Deleting while walking restarts the walk at the key after a deleted one's successor:
     * collect first. */
    struct top_site_key *del = NULL;
    size_t n = 0, cap = 0;
    void *prevk = NULL;
    while (bpf_map_get_next_key(sfd, prevk, &nk) == 0) {
        k = nk;
        prevk = &k;
        if (pid >= 0 ? (pid_t)k.pid != pid
                     : is_target((pid_t)k.pid) || !(kill((pid_t)k.pid, 0) && errno == ESRCH))
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            struct top_site_key *nd = realloc(del, cap * sizeof(*nd));
            if (!nd)
                break;
            del = nd;
        }
        del[n++] = k;
    }
    for (size_t i = 0; i < n; i++) {
        bpf_map_delete_elem(sfd, &del[i]);
        bpf_map_delete_elem(stfd, &del[i]);
    }
    free(del);
}

/* The process exec'd: what was read and located belongs to the old image (its registry address,
 * its threads, its sites); the probes go on whatever file the new image maps. */
static void follow_exec(struct tstate *s)
{
    free(s->fin);
    s->fin = NULL;
    s->nfin = 0;
    s->fin_pending = false;
    free(s->cur);
    free(s->prev);
    s->cur = s->prev = NULL;
    s->ncur = s->nprev = 0;
    s->t_cur = s->t_prev = 0;
    s->have_reg = s->located = false;
    s->ncomms = 0;
    s->t.registry_addr = 0;
    if (skel) {
        uint32_t pid = (uint32_t)s->t.pid;
        bpf_map_delete_elem(bpf_map__fd(skel->maps.registries), &pid);
    }
    s->registered = false;
    s->execd = true;
    drop_bpf_sites(s->t.pid);
    char err[512];
    if (tc_target_locate(&s->t, err, sizeof(err)) || !s->t.registry_addr) {
        tc_detach(&s->t);
        bpf_link__destroy(s->sample_link);
        s->sample_link = NULL;
        return; /* not (yet) lumalloc: sample_target looks again */
    }
    s->located = true;
    if (skel && !s->via_binary) {
        tc_detach(&s->t);
        bpf_link__destroy(s->sample_link);
        s->sample_link = NULL;
        s->t.reattach = true;
        s->t.attach_task = 0;
        attach_target(s);
    }
}

/* -H: a reading of the process's own profile, by site; the one before it stays for the growth. */
static void read_heap(struct tstate *s)
{
    struct lum_profile_v1 hdr;
    struct tc_heap_stack *v;
    size_t n;
    bool cut; /* a reading cut short (the process exiting): shown, but no base for growth */
    int r = tc_profile_read(&s->t, &hdr, &v, &n, &cut);
    if (r == -ESRCH || r == -EFAULT)
        return; /* gone (or going) with its memory: the final report keeps the last reading */
    s->heap_err = r;
    if (r)
        return;
    /* the reading before stays the base while the last one was cut short: the sites missing
     * from that one would count whole as growth */
    if (s->heap_cut) {
        free(s->heap);
    } else {
        free(s->heap_prev);
        s->heap_prev = s->heap, s->nheap_prev = s->nheap, s->heap_t_prev = s->heap_t;
    }
    s->nheap = tc_heap_sites(sym, s->t.pid, v, n, &s->heap);
    s->heap_t = tc_now();
    s->heap_cut = cut;
    tc_profile_free(v, n);
}

/* The growth of site h (bytes a second, live and allocated) since the reading before. */
static void heap_growth(const struct tstate *s, const struct tc_heap_site *h, double *live_ps, double *alloc_ps)
{
    *live_ps = *alloc_ps = 0;
    double dt = s->heap_t - s->heap_t_prev;
    if (!s->heap_prev || dt <= 0)
        return;
    const struct tc_heap_site *p = tc_heap_site_find(s->heap_prev, s->nheap_prev, h);
    *live_ps = (h->live - (p ? p->live : 0)) / dt;
    *alloc_ps = (h->alloc - (p ? p->alloc : 0)) / dt;
}

static int cmp_heap_live(const void *a, const void *b, void *sites)
{
    const struct tc_heap_site *h = sites;
    double x = h[*(const uint32_t *)a].live, y = h[*(const uint32_t *)b].live;
    return x < y ? 1 : (x > y ? -1 : 0);
}

/* The sites in order of live bytes (indexes into s->heap, malloc'd); its total in *live. */
static uint32_t *heap_order(const struct tstate *s, double *live)
{
    uint32_t *o = malloc((s->nheap ? s->nheap : 1) * sizeof(*o));
    *live = 0;
    if (!o)
        return NULL;
    for (size_t i = 0; i < s->nheap; i++)
        o[i] = (uint32_t)i, *live += s->heap[i].live;
    qsort_r(o, s->nheap, sizeof(*o), cmp_heap_live, (void *)s->heap);
    return o;
}

/* A process that exec'd into an image without lumalloc: said once, and in place of its table
 * (it showed "waiting for lumalloc's registry..." at every interval until it exited).  Its
 * libraries are all mapped a moment after the exec: before that, nothing is said. */
static void note_why_nothing(struct tstate *s)
{
    if (!s->execd || s->why_nothing[0] || !s->t.alive)
        return;
    struct tc_map *maps;
    size_t n;
    if (tc_read_maps(s->t.pid, &maps, &n))
        return;
    bool libc = false;
    for (size_t i = 0; i < n && !libc; i++)
        libc = strstr(maps[i].path, "/libc.so") || strstr(maps[i].path, "/libc-");
    free(maps);
    char exe[64], path[PATH_MAX] = "";
    pid_t task = tc_proc_task(s->t.pid);
    snprintf(exe, sizeof(exe), "/proc/%d/exe", (int)(task ? task : s->t.pid));
    ssize_t len = readlink(exe, path, sizeof(path) - 1);
    if (len <= 0)
        return;
    path[len] = 0;
    /* a dynamic image still being loaded (no libc yet) may yet map lumalloc */
    if (!libc && tc_elf_needs(path, "libc.so", exe, sizeof(exe)))
        return;
    snprintf(s->why_nothing, sizeof(s->why_nothing), "exec'd into %s, which does not use lumalloc", path);
    tc_warn("pid %d %s: nothing to show of it unless it execs again", (int)s->t.pid, s->why_nothing);
}

/* Probes found but no registry (a stripped executable: -c, -B, or after an exec): said once, and
 * in place of its table, rather than "waiting for lumalloc's registry..." at every interval. */
static void note_no_registry(struct tstate *s)
{
    if (s->why_nothing[0])
        return;
    tc_no_symbol_reason(&s->t, "lumalloc_registry", s->why_nothing, sizeof(s->why_nothing));
    tc_warn("pid %d: %s", (int)s->t.pid, s->why_nothing);
}

/* Read the registry; the previous reading becomes the base of the rates. */
static void sample_target(struct tstate *s)
{
    if (!s->t.alive)
        apply_final_partial(s);
    if (!s->t.alive || s->final_done)
        return;
    if (s->located && s->t.image) {
        uint64_t image = tc_image_id(s->t.pid);
        if (image && image != s->t.image)
            follow_exec(s);
    }
    if (!s->located) {
        char err[512];
        int lr = tc_target_locate(&s->t, err, sizeof(err));
        if (lr == 0 && s->t.registry_addr) {
            s->located = true;
            s->why_nothing[0] = 0;
            if (skel && !s->via_binary && s->t.reattach && !s->t.nlinks)
                attach_target(s); /* exec'd into an image that maps lumalloc only now */
        } else {
            if (lr == 0)
                note_no_registry(s);
            else
                note_why_nothing(s);
            return;
        }
    }
    register_registry(s);
    struct lum_registry_v1 reg;
    struct tc_thread *nt = NULL;
    size_t nn = 0;
    int r = tc_registry_read(&s->t, &reg, &nt, &nn);
    if (r == -EPROTO)
        tc_die("pid %d: lumalloc_registry has magic %#llx version %u counters size %u; this alloctop reads "
               "version %d",
               (int)s->t.pid, (unsigned long long)reg.magic, reg.version, reg.counters_size, LUM_PROBES_VERSION);
    if (r == -EPERM || r == -EACCES)
        tc_die("cannot read the memory of pid %d (process_vm_readv: %s): needs CAP_SYS_PTRACE or the same user",
               (int)s->t.pid, strerror(-r));
    if (r != 0) {
        /* the last complete reading stays (a list cut short by an exit is no reading) */
        if (tc_verbose)
            tc_warn("pid %d: thread list not read this interval (%s): the last one is shown", (int)s->t.pid, strerror(-r));
        free(nt);
        return;
    }
    for (size_t i = 0; i < nn; i++)
        nt[i].c.tid = (uint32_t)tc_host_tid(&tidmap, s->t.pid, (pid_t)nt[i].c.tid);
    free(s->prev);
    s->prev = s->cur, s->nprev = s->ncur, s->t_prev = s->t_cur;
    s->cur = nt, s->ncur = nn, s->t_cur = tc_now();
    if (!s->have_reg)
        s->t_prev = 0;
    s->reg = reg;
    s->have_reg = true;
    s->rss = tc_read_rss(s->t.pid, &s->rss_anon);
    char c[64];
    if (tc_read_comm(s->t.pid, s->t.pid, c, sizeof(c)) == 0)
        snprintf(s->comm, sizeof(s->comm), "%.16s", c);
    for (size_t i = 0; i < s->ncur; i++)
        if (s->cur[i].c.state == LUM_THREAD_LIVE)
            remember_comm(s, (pid_t)s->cur[i].c.tid);
    if (sym && s->t_cur - s->last_snapshot > (s->t_cur - s->first_seen < 2.0 ? 0.2 : 2.0)) {
        tc_sym_snapshot(sym, s->t.pid, tc_target_file(&s->t));
        s->last_snapshot = s->t_cur;
    }
    if (opt.heap)
        read_heap(s);
}

/* Locate the registry and snapshot the mappings as soon as the library is mapped, so a
 * short-lived command is still symbolised and counted from its start. */
static void locate_early(struct tstate *s)
{
    char err[512];
    if (tc_target_locate(&s->t, err, sizeof(err)))
        return;
    if (!s->t.registry_addr) {
        note_no_registry(s);
        return;
    }
    s->located = true;
    s->first_seen = tc_now();
    if (sym) {
        tc_sym_snapshot(sym, s->t.pid, tc_target_file(&s->t));
        s->last_snapshot = tc_now();
    }
    sample_target(s);
}

static const struct lum_thread_counters_v1 *prev_of(struct tstate *s, uint64_t addr, uint32_t tid)
{
    for (size_t i = 0; i < s->nprev; i++)
        if (s->prev[i].addr == addr && s->prev[i].c.tid == tid)
            return &s->prev[i].c;
    return NULL;
}

static double row_key(const struct row *r)
{
    switch (opt.sort) {
    case SORT_ALLOC: return r->alloc_bps;
    case SORT_FREE: return r->free_bps;
    case SORT_ALLOCS: return r->allocs_ps;
    case SORT_LIVE: return (double)r->live;
    case SORT_LARGE: return (double)r->c->large_count;
    case SORT_FAIL: return (double)r->c->failures;
    case SORT_TID: return -(double)r->tid;
    }
    return 0;
}

static int cmp_rows(const void *a, const void *b)
{
    double ka = row_key(a), kb = row_key(b);
    if (ka != kb)
        return ka < kb ? 1 : -1;
    return ((const struct row *)a)->tid - ((const struct row *)b)->tid;
}

static size_t build_rows(struct tstate *s, struct row **out)
{
    struct row *rows = calloc(s->ncur ? s->ncur : 1, sizeof(*rows));
    if (!rows)
        return 0;
    double dt = s->t_prev > 0 ? s->t_cur - s->t_prev : 0;
    for (size_t i = 0; i < s->ncur; i++) {
        const struct lum_thread_counters_v1 *c = &s->cur[i].c, *p = prev_of(s, s->cur[i].addr, c->tid);
        struct row *r = &rows[i];
        r->tid = (pid_t)c->tid;
        r->comm = comm_of(s, r->tid);
        r->exited = c->state == LUM_THREAD_EXITED;
        r->c = c;
        r->live = (int64_t)(c->alloc_bytes - c->free_bytes);
        if (dt > 0) {
            /* A reused counters block (new tid) has no previous figures: rate from zero. */
            r->alloc_bps = (double)(c->alloc_bytes - (p ? p->alloc_bytes : 0)) / dt;
            r->free_bps = (double)(c->free_bytes - (p ? p->free_bytes : 0)) / dt;
            r->allocs_ps = (double)(c->alloc_count - (p ? p->alloc_count : 0)) / dt;
            r->frees_ps = (double)(c->free_count - (p ? p->free_count : 0)) / dt;
        }
    }
    qsort(rows, s->ncur, sizeof(*rows), cmp_rows);
    *out = rows;
    return s->ncur;
}

static void process_totals(struct tstate *s, int64_t *active, double *frag)
{
    int64_t a = (int64_t)(s->reg.global.exited_alloc_bytes - s->reg.global.exited_free_bytes);
    for (size_t i = 0; i < s->ncur; i++)
        a += (int64_t)(s->cur[i].c.alloc_bytes - s->cur[i].c.free_bytes);
    *active = a;
    /* registry.global.resident is what lumalloc touched, to 4 KiB: a page of a size class
     * counts the pages it carved, not its slices (it did once, and with a few threads touching
     * many classes read several times the whole process's RSS: the demo, 14 MiB against 3.8
     * MiB, frag 97% where the heap is small).  It can still pass the RSS: a large block counts
     * whole once handed out (and while cached after its free), written or not, a page's slices
     * count whole with LUMALLOC_THP=on, and the two are read at different moments; so the
     * tighter of the two is used.  Of the RSS, only its anonymous part: the program's and the
     * libraries' text and read-only data are file-backed, and counted in, they made a small
     * heap look fragmented (the demo: 1.6 MiB of its 3.6 MiB RSS file-backed, frag 93% -> 88%). */
    uint64_t cap = s->rss_anon ? s->rss_anon : s->rss;
    uint64_t resident = s->reg.global.resident_bytes;
    if (cap && cap < resident) resident = cap;
    double f = 0;
    if (resident)
        f = 1.0 - (double)a / (double)resident;
    *frag = f < 0 ? 0 : (f > 1 ? 1 : f);
}

/* Sites: per pid, aggregated by the symbolised allocation site (first frame outside the
 * allocator) and its caller. */
struct site {
    char name[512];
    char caller[512];
    uint64_t count, weight;
    uint64_t stack_id;
};

static int cmp_sites(const void *a, const void *b)
{
    const struct site *x = a, *y = b;
    return x->weight < y->weight ? 1 : (x->weight > y->weight ? -1 : 0);
}

static size_t collect_sites(pid_t pid, struct site **out, uint64_t *total)
{
    *out = NULL;
    *total = 0;
    if (!skel)
        return 0;
    int sfd = bpf_map__fd(skel->maps.sites), stfd = bpf_map__fd(skel->maps.stacks);
    struct top_site_key k, nk;
    struct site *v = NULL;
    size_t n = 0, cap = 0;
    void *prevk = NULL;
    while (bpf_map_get_next_key(sfd, prevk, &nk) == 0) {
        k = nk;
        prevk = &k;
        if ((pid_t)k.pid != pid)
            continue;
        struct top_site_val val;
        if (bpf_map_lookup_elem(sfd, &k, &val))
            continue;
        *total += val.weight;
        struct top_stack st = {0};
        char nb[512] = "[no stack]", cb[512] = "";
        if (k.stack_id && bpf_map_lookup_elem(stfd, &k, &st) == 0 && st.depth) {
            unsigned d = st.depth > LUM_MAX_FRAMES ? LUM_MAX_FRAMES : st.depth;
            tc_site_names(sym, pid, st.frames, d, nb, sizeof(nb), cb, sizeof(cb));
        } else if (k.stack_id) {
            snprintf(nb, sizeof(nb), "[stack not stored]");
        }
        size_t i;
        for (i = 0; i < n; i++)
            if (!strcmp(v[i].name, nb) && !strcmp(v[i].caller, cb))
                break;
        if (i == n) {
            if (n == cap) {
                cap = cap ? cap * 2 : 64;
                struct site *nv = realloc(v, cap * sizeof(*nv));
                if (!nv)
                    break;
                v = nv;
            }
            memset(&v[n], 0, sizeof(v[n]));
            snprintf(v[n].name, sizeof(v[n].name), "%s", nb);
            snprintf(v[n].caller, sizeof(v[n].caller), "%s", cb);
            v[n].stack_id = k.stack_id;
            n++;
        }
        v[i].count += val.count;
        v[i].weight += val.weight;
    }
    if (n)
        qsort(v, n, sizeof(*v), cmp_sites);
    *out = v;
    return n;
}

static void print_json(bool final)
{
    uint64_t lost[TOP_LOST_MAX];
    lost_counts(lost);
    printf("{\"ts\":%.3f,\"interval\":%.3f,\"final\":%s,\"processes\":[", (double)time(NULL), opt.interval,
           final ? "true" : "false");
    bool first = true;
    for (int i = 0; i < ntargets; i++) {
        struct tstate *s = &targets[i];
        if (!s->have_reg)
            continue;
        int64_t active;
        double frag;
        process_totals(s, &active, &frag);
        printf("%s{\"pid\":%d,\"comm\":", first ? "" : ",", (int)s->t.pid);
        first = false;
        tc_json_str(stdout, s->comm);
        const struct lum_global_counters_v1 *g = &s->reg.global;
        printf(",\"alive\":%s,\"rss\":%llu,\"rss_anon\":%llu,\"mapped\":%llu,\"resident\":%llu,\"active\":%lld,\"metadata\":%llu,"
               "\"retained\":%llu,\"large_live\":%llu,\"fragmentation\":%.4f,\"sample_interval\":%llu,"
               "\"truncated\":%s,\"threads\":[",
               s->t.alive ? "true" : "false", (unsigned long long)s->rss, (unsigned long long)s->rss_anon,
               (unsigned long long)g->mapped_bytes,
               (unsigned long long)g->resident_bytes, (long long)active, (unsigned long long)g->metadata_bytes,
               (unsigned long long)g->retained_bytes, (unsigned long long)g->large_live_bytes, frag,
               (unsigned long long)s->reg.sample_interval, s->final_truncated ? "true" : "false");
        struct row *rows;
        size_t n = build_rows(s, &rows);
        for (size_t r = 0; r < n; r++) {
            const struct lum_thread_counters_v1 *c = rows[r].c;
            printf("%s{\"tid\":%d,\"comm\":", r ? "," : "", (int)rows[r].tid);
            tc_json_str(stdout, rows[r].comm);
            printf(",\"state\":\"%s\",\"alloc_bytes\":%llu,\"free_bytes\":%llu,\"alloc_count\":%llu,"
                   "\"free_count\":%llu,\"alloc_bps\":%.0f,\"free_bps\":%.0f,\"allocs_ps\":%.1f,\"frees_ps\":%.1f,"
                   "\"live_bytes\":%lld,\"large\":%llu,\"large_bytes\":%llu,\"failures\":%llu,\"sampled\":%llu,"
                   "\"sampled_bytes\":%llu}",
                   rows[r].exited ? "exited" : "live", (unsigned long long)c->alloc_bytes,
                   (unsigned long long)c->free_bytes, (unsigned long long)c->alloc_count,
                   (unsigned long long)c->free_count, rows[r].alloc_bps, rows[r].free_bps, rows[r].allocs_ps,
                   rows[r].frees_ps, (long long)rows[r].live, (unsigned long long)c->large_count,
                   (unsigned long long)c->large_bytes, (unsigned long long)c->failures,
                   (unsigned long long)c->sampled_count, (unsigned long long)c->sampled_bytes);
        }
        free(rows);
        printf("]");
        if (opt.sites) {
            struct site *sv;
            uint64_t total;
            size_t ns = collect_sites(s->t.pid, &sv, &total);
            printf(",\"sites\":[");
            for (size_t k = 0; k < ns && (int)k < opt.site_rows; k++) {
                printf("%s{\"function\":", k ? "," : "");
                tc_json_str(stdout, sv[k].name);
                printf(",\"caller\":");
                tc_json_str(stdout, sv[k].caller);
                printf(",\"samples\":%llu,\"bytes\":%llu,\"share\":%.4f}", (unsigned long long)sv[k].count,
                       (unsigned long long)sv[k].weight, total ? (double)sv[k].weight / (double)total : 0.0);
            }
            printf("]");
            free(sv);
        }
        if (opt.heap && s->heap_err) {
            printf(",\"heap\":{\"error\":");
            tc_json_str(stdout, tc_profile_strerror(s->heap_err));
            printf("}");
        } else if (opt.heap) {
            double live;
            uint32_t *o = heap_order(s, &live);
            printf(",\"heap\":{\"live_bytes\":%.0f,\"truncated\":%s,\"sites\":[", live,
                   s->heap_cut ? "true" : "false");
            for (size_t k = 0; o && k < s->nheap && (int)k < opt.site_rows; k++) {
                const struct tc_heap_site *h = &s->heap[o[k]];
                double live_ps, alloc_ps;
                heap_growth(s, h, &live_ps, &alloc_ps);
                printf("%s{\"function\":", k ? "," : "");
                tc_json_str(stdout, h->name);
                printf(",\"caller\":");
                tc_json_str(stdout, h->caller);
                printf(",\"live_bytes\":%.0f,\"live_objects\":%.0f,\"growth_bps\":%.0f,\"alloc_bps\":%.0f,"
                       "\"alloc_bytes\":%.0f,\"samples\":%llu}",
                       h->live, h->live_objects, live_ps, alloc_ps, h->alloc, (unsigned long long)h->samples);
            }
            printf("]}");
            free(o);
        }
        printf("}");
    }
    printf("],\"lost\":{\"ringbuf\":%llu,\"sites_full\":%llu,\"stacks_full\":%llu,\"final\":%llu,"
           "\"final_threads\":%llu}}\n",
           (unsigned long long)lost[TOP_LOST_RINGBUF], (unsigned long long)lost[TOP_LOST_SITES_FULL],
           (unsigned long long)lost[TOP_LOST_STACKS_FULL], (unsigned long long)lost[TOP_LOST_FINAL],
           (unsigned long long)lost[TOP_LOST_FINAL_THREADS]);
    fflush(stdout);
}

static void print_table_to(FILE *out, bool final)
{
    uint64_t lost[TOP_LOST_MAX];
    lost_counts(lost);
    uint64_t lsum = 0;
    for (int k = 0; k < TOP_LOST_MAX; k++)
        lsum += lost[k];
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    fprintf(out, "alloctop %02d:%02d:%02d  interval %.1fs  sort %s  lost events %llu%s\n", tm.tm_hour, tm.tm_min,
           tm.tm_sec, opt.interval, sort_names[opt.sort], (unsigned long long)lsum, final ? "  (final)" : "");
    if (lsum)
        fprintf(out, "  lost: ringbuf %llu, sites map full %llu, stacks not stored %llu, exit readings %llu, "
                     "threads past the exit reading %llu\n",
               (unsigned long long)lost[TOP_LOST_RINGBUF], (unsigned long long)lost[TOP_LOST_SITES_FULL],
               (unsigned long long)lost[TOP_LOST_STACKS_FULL], (unsigned long long)lost[TOP_LOST_FINAL],
               (unsigned long long)lost[TOP_LOST_FINAL_THREADS]);
    for (int i = 0; i < ntargets; i++) {
        struct tstate *s = &targets[i];
        char b1[32], b2[32], b3[32], b4[32], b5[32];
        if (!s->have_reg && s->why_nothing[0]) {
            fprintf(out, "\nPID %d: %s\n", (int)s->t.pid, s->why_nothing);
            continue;
        }
        if (!s->have_reg) {
            fprintf(out, "\nPID %d: waiting for lumalloc's registry...\n", (int)s->t.pid);
            continue;
        }
        int64_t active;
        double frag;
        process_totals(s, &active, &frag);
        const struct lum_global_counters_v1 *g = &s->reg.global;
        fprintf(out, "\nPID %d (%s)%s  RSS %s (anon %s)  mapped %s  resident %s  active %s  frag %.1f%%  threads %zu\n",
               (int)s->t.pid, s->comm, s->t.alive ? "" : " [exited]", hsize((double)s->rss, b1, sizeof(b1)),
               hsize((double)s->rss_anon, b5, sizeof(b5)), hsize((double)g->mapped_bytes, b2, sizeof(b2)), hsize((double)g->resident_bytes, b3, sizeof(b3)),
               hsize((double)active, b4, sizeof(b4)), frag * 100, s->ncur);
        if (s->final_truncated && s->final_beyond)
            fprintf(out, "  the exit-time reading holds %d threads, %u more were running: %zu threads show the last "
                         "interval's figures\n",
                    TOP_FINAL_MAX_THREADS, s->final_beyond, s->final_carried);
        else if (s->final_truncated)
            fprintf(out, "  the exit-time reading is incomplete (see lost): %zu threads show the last interval's figures\n",
                    s->final_carried);
        fprintf(out, "%8s %-16s %9s %9s %9s %9s %6s %5s %7s\n", "TID", "COMM", "ALLOC/s", "FREE/s", "ALLOCS/s", "LIVE",
               "LARGE", "FAIL", "SAMPLES");
        struct row *rows;
        size_t n = build_rows(s, &rows);
        for (size_t r = 0; r < n && (int)r < opt.rows; r++) {
            const struct lum_thread_counters_v1 *c = rows[r].c;
            char cm[24];
            snprintf(cm, sizeof(cm), "%s%s", rows[r].comm, rows[r].exited ? "*" : "");
            fprintf(out, "%8d %-16.16s %9s %9s %9.0f %9s %6llu %5llu %7llu\n", (int)rows[r].tid, cm,
                   hsize(rows[r].alloc_bps, b1, sizeof(b1)), hsize(rows[r].free_bps, b2, sizeof(b2)),
                   rows[r].allocs_ps, hsize((double)rows[r].live, b5, sizeof(b5)),
                   (unsigned long long)c->large_count, (unsigned long long)c->failures,
                   (unsigned long long)c->sampled_count);
        }
        if ((int)n > opt.rows)
            fprintf(out, "  ... %zu more threads\n", n - (size_t)opt.rows);
        free(rows);
        if (opt.sites) {
            struct site *sv;
            uint64_t total;
            size_t ns = collect_sites(s->t.pid, &sv, &total);
            fprintf(out, "  top allocation sites (sampled, since attach):\n  %6s %9s %7s  %s\n", "SHARE", "BYTES",
                   "SAMPLES", "SITE <- CALLER");
            for (size_t k = 0; k < ns && (int)k < opt.site_rows; k++)
                fprintf(out, "  %5.1f%% %9s %7llu  %s%s%s\n", total ? 100.0 * (double)sv[k].weight / (double)total : 0,
                       hsize((double)sv[k].weight, b1, sizeof(b1)), (unsigned long long)sv[k].count, sv[k].name,
                       sv[k].caller[0] ? " <- " : "", sv[k].caller);
            if (!ns)
                fprintf(out, "  (no samples yet)\n");
            free(sv);
        }
        if (opt.heap && s->heap_err) {
            fprintf(out, "  heap by site: the process %s\n", tc_profile_strerror(s->heap_err));
        } else if (opt.heap) {
            double live;
            uint32_t *o = heap_order(s, &live);
            fprintf(out, "  heap by site (lumalloc's profile, since start: %s live):\n  %9s %9s %9s %7s  %s\n",
                    hsize(live, b1, sizeof(b1)), "LIVE", "GROWTH/s", "ALLOC/s", "SAMPLES", "SITE <- CALLER");
            size_t shown = 0;
            for (size_t k = 0; o && k < s->nheap && (int)shown < opt.site_rows; k++) {
                const struct tc_heap_site *h = &s->heap[o[k]];
                double live_ps, alloc_ps;
                heap_growth(s, h, &live_ps, &alloc_ps);
                if (h->live <= 0 && live_ps == 0)
                    continue; /* nothing of it live: the sites view shows what allocates */
                fprintf(out, "  %9s %9s %9s %7llu  %s%s%s\n", hsize(h->live, b1, sizeof(b1)),
                        hsize(live_ps, b2, sizeof(b2)), hsize(alloc_ps, b3, sizeof(b3)),
                        (unsigned long long)h->samples, h->name, h->caller[0] ? " <- " : "", h->caller);
                shown++;
            }
            if (!shown)
                fprintf(out, "  (no live samples)\n");
            free(o);
        }
    }
    if (!opt.batch && !final)
        fprintf(out, "\n(* exited)  keys: q quit  s sites  h heap  a/f/n/l/g/e/t sort\n");
    else
        fprintf(out, "\n");
    fflush(out);
}

/* Columns a line takes (UTF-8 continuation bytes take none). */
static size_t columns(const char *s, size_t len)
{
    size_t c = 0;
    for (size_t i = 0; i < len; i++)
        c += ((unsigned char)s[i] & 0xc0) != 0x80;
    return c;
}

static void print_table(bool final)
{
    bool clear = !opt.batch && !opt.no_clear && !final;
    struct winsize ws;
    if (!clear || ioctl(1, TIOCGWINSZ, &ws) || !ws.ws_row || !ws.ws_col) {
        if (clear)
            fputs("\033[H\033[2J", stdout);
        print_table_to(stdout, final);
        return;
    }
    /* A frame that wraps or scrolls (demangled C++ sites are hundreds of columns) loses its top
     * on every redraw: cut each line to the window's width, and the frame to its height. */
    char *buf = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&buf, &len);
    if (!m) {
        print_table_to(stdout, final);
        return;
    }
    print_table_to(m, final);
    fclose(m);
    fputs("\033[H\033[2J", stdout);
    const char *p = buf, *end = buf + len;
    for (unsigned row = 0; p < end && row + 1 < ws.ws_row; row++) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p), k = n;
        while (k && columns(p, k) > ws.ws_col)
            k--;
        while (k < n && k && ((unsigned char)p[k] & 0xc0) == 0x80)
            k--; /* not inside a character */
        fwrite(p, 1, k, stdout);
        fputc('\n', stdout);
        p = nl ? nl + 1 : end;
    }
    fflush(stdout);
    free(buf);
}

static void report(bool final)
{
    if (opt.json)
        print_json(final);
    else
        print_table(final);
}

static void handle_key(int ch)
{
    switch (ch) {
    case 'q': stop = 1; break;
    case 's':
        opt.sites = !opt.sites;
        for (int i = 0; i < ntargets; i++)
            set_sample_probe(&targets[i], opt.sites);
        if (binary_path)
            set_sample_probe(&bin_state, opt.sites);
        break;
    case 'h':
        opt.heap = !opt.heap;
        for (int i = 0; i < ntargets; i++)
            if (opt.heap && targets[i].have_reg)
                read_heap(&targets[i]);
        break;
    case 'a': opt.sort = SORT_ALLOC; break;
    case 'f': opt.sort = SORT_FREE; break;
    case 'n': opt.sort = SORT_ALLOCS; break;
    case 'l': opt.sort = SORT_LIVE; break;
    case 'g': opt.sort = SORT_LARGE; break;
    case 'e': opt.sort = SORT_FAIL; break;
    case 't': opt.sort = SORT_TID; break;
    }
}

/* -B: processes that map the file, found in /proc; the uprobes already follow the file. */
static void discover_binary(void)
{
    DIR *d = opendir("/proc");
    if (!d)
        return;
    static bool warned;
    struct dirent *de;
    char path[64], line[PATH_MAX + 128];
    while ((de = readdir(d))) {
        char *end;
        long pid = strtol(de->d_name, &end, 10);
        if (*end || pid <= 0 || pid == getpid())
            continue;
        bool known = false;
        for (int i = 0; i < ntargets && !known; i++)
            known = targets[i].t.pid == (pid_t)pid;
        if (known)
            continue;
        snprintf(path, sizeof(path), "/proc/%ld/maps", pid);
        FILE *f = fopen(path, "re");
        if (!f)
            continue;
        /* By device and inode, as the uprobes are: the path may be another file in a
         * container's mount namespace, and a process started before an upgrade maps the old
         * file under the same name (" (deleted)"), which the probes are not on. */
        bool uses = false;
        while (!uses && fgets(line, sizeof(line), f)) {
            unsigned maj, min;
            unsigned long long ino;
            uses = sscanf(line, "%*x-%*x %*s %*x %x:%x %llu", &maj, &min, &ino) == 3 && ino == binary_ino &&
                   makedev(maj, min) == binary_dev;
        }
        fclose(f);
        if (!uses)
            continue;
        if (ntargets == MAX_TARGETS) {
            if (!warned)
                tc_warn("more than %d processes map %s: showing the first ones", MAX_TARGETS, binary_path);
            warned = true;
            break;
        }
        struct tstate *s = &targets[ntargets++];
        memset(s, 0, sizeof(*s));
        s->t.pid = (pid_t)pid;
        s->t.alive = true;
        s->via_binary = true;
        locate_early(s);
    }
    closedir(d);
}

static bool is_target(pid_t pid)
{
    for (int i = 0; i < ntargets; i++)
        if (targets[i].t.pid == pid)
            return true;
    return false;
}

/* -B: processes that exited and were reported once are dropped. */
static void drop_reported_dead(void)
{
    int w = 0;
    for (int i = 0; i < ntargets; i++) {
        struct tstate *s = &targets[i];
        if (s->via_binary && !s->t.alive && s->shown_dead) {
            drop_bpf_sites(s->t.pid);
            tc_sym_forget(sym, s->t.pid);
            free(s->fin);
            free(s->cur);
            free(s->prev);
            free(s->comms);
            tc_target_close(&s->t);
            continue;
        }
        if (!s->t.alive)
            s->shown_dead = true;
        if (w != i)
            targets[w] = *s;
        w++;
    }
    ntargets = w;
}

int main(int argc, char **argv)
{
    tc_prog = "alloctop";
    const char *command = NULL, *preload = NULL;
    pid_t pids[MAX_TARGETS];
    int npids = 0;
    enum { OPT_PRELOAD = 256, OPT_NOBPF };
    static const struct option lopts[] = {
        {"pid", required_argument, 0, 'p'},       {"command", required_argument, 0, 'c'},
        {"binary", required_argument, 0, 'B'},
        {"preload", required_argument, 0, OPT_PRELOAD}, {"sort", required_argument, 0, 's'},
        {"rows", required_argument, 0, 'r'},      {"no-clear", no_argument, 0, 'C'},
        {"batch", no_argument, 0, 'b'},           {"json", no_argument, 0, 'j'},
        {"sites", no_argument, 0, 'S'},           {"no-bpf", no_argument, 0, OPT_NOBPF},
        {"heap", no_argument, 0, 'H'},
        {"verbose", no_argument, 0, 'v'},         {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int c;
    opterr = 0; /* tc_usage_error says it in one line */
    while ((c = getopt_long(argc, argv, ":p:c:B:s:r:CbjSHvh", lopts, NULL)) != -1) {
        switch (c) {
        case 'p': npids += tc_parse_pids(optarg, pids, npids, MAX_TARGETS); break;
        case 'c': command = optarg; break;
        case 'B': binary_path = optarg; break;
        case OPT_PRELOAD: preload = optarg; break;
        case 's': {
            int k;
            for (k = 0; k < (int)(sizeof(sort_names) / sizeof(sort_names[0])); k++)
                if (!strcmp(optarg, sort_names[k]))
                    break;
            if (k == (int)(sizeof(sort_names) / sizeof(sort_names[0])))
                tc_die("unknown sort key '%s' (alloc|free|allocs|live|large|fail|tid)", optarg);
            opt.sort = (enum sort_key)k;
            break;
        }
        case 'r': opt.rows = (int)tc_parse_long("row count", optarg, 1, 1000000); break;
        case 'C': opt.no_clear = true; break;
        case 'b': opt.batch = true; break;
        case 'j': opt.json = true; break;
        case 'S': opt.sites = true; break;
        case 'H': opt.heap = true; break;
        case OPT_NOBPF: opt.no_bpf = true; break;
        case 'v': tc_verbose++; break;
        case 'h': usage(stdout); return 0;
        default: tc_usage_error(c, argv);
        }
    }
    if (optind < argc)
        opt.interval = tc_parse_double("interval", argv[optind++], 0.01, 86400);
    if (optind < argc)
        opt.count = tc_parse_long("count", argv[optind++], 1, LONG_MAX);
    if (optind < argc)
        tc_die("unexpected argument '%s' (see --help)", argv[optind]);
    tc_need_one_target(npids, command, binary_path);
    static char binary_real[PATH_MAX];
    if (binary_path) {
        tc_resolve_probed_binary(binary_path, binary_real);
        binary_path = binary_real;
        struct stat st;
        if (stat(binary_real, &st))
            tc_die("cannot stat %s: %s", binary_real, strerror(errno));
        binary_dev = st.st_dev;
        binary_ino = st.st_ino;
        bin_state.t.pid = -1;
        bin_state.t.alive = true;
        snprintf(bin_state.t.probe_path, sizeof(bin_state.t.probe_path), "%s", binary_real);
    }
    if (!isatty(1))
        opt.batch = true;
    if (opt.json)
        opt.batch = true;

    if (!opt.no_bpf)
        tc_check_environment();
    tc_libbpf_quiet();

    for (int i = 0; i < npids; i++) {
        struct tstate *s = &targets[ntargets++];
        s->t.pid = pids[i];
        s->t.alive = true;
        char err[512];
        if (kill(pids[i], 0) && errno == ESRCH)
            tc_die("no such process: %d", (int)pids[i]);
        if (tc_target_locate(&s->t, err, sizeof(err)))
            tc_die("%s", err);
        if (!s->t.registry_addr)
            tc_die("%s", tc_no_symbol_reason(&s->t, "lumalloc_registry", err, sizeof(err)));
        s->located = true;
    }
    if (command) {
        struct tstate *s = &targets[ntargets++];
        tc_launch_prepare(&s->t, command, preload);
    }

    sym = tc_sym_new();
    struct ring_buffer *rb = NULL;
    if (!opt.no_bpf) {
        skel = alloctop_bpf__open_and_load();
        bool exit_hook = true;
        if (!skel) {
            /* Older kernels (no group_dead argument): run without the exit-time reading. */
            skel = alloctop_bpf__open();
            if (skel) {
                bpf_program__set_autoload(skel->progs.on_do_exit, false);
                exit_hook = false;
                if (alloctop_bpf__load(skel)) {
                    alloctop_bpf__destroy(skel);
                    skel = NULL;
                }
            }
        }
        if (!skel)
            tc_die("cannot load the BPF programs: %s", strerror(errno));
        if (exit_hook && !(exit_link = bpf_program__attach(skel->progs.on_do_exit)) && tc_verbose)
            tc_warn("no exit-time registry reading (tp_btf/sched_process_exit): %s", strerror(errno));
        for (int i = 0; i < ntargets; i++)
            attach_target(&targets[i]);
        if (binary_path)
            attach_target(&bin_state);
        rb = ring_buffer__new(bpf_map__fd(skel->maps.events), handle_event, NULL, NULL);
        if (!rb)
            tc_die("cannot create the ring buffer: %s", strerror(errno));
    }
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGPIPE, SIG_IGN);
    if (command) {
        if (skel) {
            tc_hold_arm(&targets[ntargets - 1].t, bpf_map__fd(skel->maps.hold));
            skel->bss->hold_active = 1;
        }
        tc_launch_go(&targets[ntargets - 1].t);
    }

    if (binary_path) {
        tc_warn_old_copy_users(binary_path);
        discover_binary();
    }
    for (int i = 0; i < ntargets; i++) {
        sample_target(&targets[i]); /* baseline for the first interval's rates */
        if (targets[i].located) {
            tc_sym_snapshot(sym, targets[i].t.pid, tc_target_file(&targets[i].t));
            targets[i].last_snapshot = tc_now();
        }
    }

    bool interactive = !opt.batch && isatty(0);
    if (interactive && tcgetattr(0, &saved_tio) == 0) {
        struct termios t = saved_tio;
        t.c_lflag &= ~(ICANON | ECHO);
        t.c_cc[VMIN] = 0;
        t.c_cc[VTIME] = 0;
        tio_saved = true;
        atexit(restore_tty);
        tcsetattr(0, TCSANOW, &t);
    }

    double next = tc_now() + opt.interval;
    long done = 0;
    bool count_reached = false;
    while (!stop) {
        struct pollfd pfd[2];
        int nfd = 0;
        if (rb)
            pfd[nfd++] = (struct pollfd){.fd = ring_buffer__epoll_fd(rb), .events = POLLIN};
        if (interactive)
            pfd[nfd++] = (struct pollfd){.fd = 0, .events = POLLIN};
        double wait = next - tc_now();
        /* Poll at least every 100 ms so a target's exit is noticed promptly. */
        int ms = wait <= 0 ? 0 : (int)(wait * 1000 > 100 ? 100 : wait * 1000 + 1);
        poll(pfd, (nfds_t)nfd, ms);
        if (rb)
            ring_buffer__consume(rb);
        if (interactive) {
            char ch;
            bool redraw = false;
            while (read(0, &ch, 1) == 1) {
                handle_key(ch);
                redraw = true;
            }
            if (redraw && !stop)
                report(false);
            if (redraw && tc_stdout_failed())
                break;
        }
        bool any_alive = false, any_died = false;
        for (int i = 0; i < ntargets; i++) {
            if (tc_hold_ready(&targets[i].t)) {
                /* Stopped at its first event: libraries are mapped, the registry exists. */
                locate_early(&targets[i]);
                tc_hold_release(&targets[i].t);
            } else if (!targets[i].located && targets[i].t.alive) {
                locate_early(&targets[i]); /* -c: the library appears once ld.so has run */
            }
            if (tc_target_poll(&targets[i].t))
                any_died = true;
            if (skel && !targets[i].via_binary && tc_target_moved(&targets[i].t)) {
                /* a failure (the process exiting, or the new thread too) is retried next poll */
                tc_detach(&targets[i].t);
                bpf_link__destroy(targets[i].sample_link);
                targets[i].sample_link = NULL;
                targets[i].t.reattach = true;
                attach_target(&targets[i]);
            }
            any_alive |= targets[i].t.alive;
        }
        if (any_died && !any_alive && !binary_path)
            break;
        if (tc_stdout_failed())
            break; /* the reader is gone (| head), between two tables too: stop, detaching the probes */
        if (tc_now() >= next) {
            if (binary_path)
                discover_binary();
            for (int i = 0; i < ntargets; i++)
                sample_target(&targets[i]);
            report(false);
            if (tc_stdout_failed())
                break; /* the reader is gone (| head): stop, detaching the probes */
            if (binary_path) {
                drop_reported_dead();
                if (opt.sites)
                    drop_bpf_sites(-1); /* also processes gone before they were found */
            }
            done++;
            if (opt.count && done >= opt.count) {
                count_reached = true; /* the last table was just printed: no separate final one */
                break;
            }
            next += opt.interval;
            if (next < tc_now())
                next = tc_now() + opt.interval;
        }
    }
    restore_tty();
    if (rb)
        ring_buffer__consume(rb); /* exit-time registry readings */
    /* Final report from a fresh reading of the targets still running (the last interval's
     * would show rates of the interval before, or none at all before the first), symbolised
     * from the snapshots if the target is gone; exact exit-time figures when the BPF exit hook
     * caught the exit. */
    if (!count_reached && !tc_stdout_failed()) {
        for (int i = 0; i < ntargets; i++) {
            if (targets[i].t.alive && tc_pid_alive(targets[i].t.pid) && tc_now() - targets[i].t_cur >= 0.1)
                sample_target(&targets[i]);
            else if (!targets[i].t.alive)
                apply_final_partial(&targets[i]);
        }
        report(true);
    }
    int status = 0;
    for (int i = 0; i < ntargets; i++) {
        if (targets[i].t.launched && targets[i].t.alive) {
            /* The tool was stopped first: leave the command running, as `perf stat -p` would. */
        }
        tc_detach(&targets[i].t);
        bpf_link__destroy(targets[i].sample_link);
        if (targets[i].t.launched && !targets[i].t.alive)
            status = tc_exit_status(targets[i].t.exit_status);
        free(targets[i].fin);
        free(targets[i].cur);
        free(targets[i].prev);
        free(targets[i].comms);
        tc_target_close(&targets[i].t);
    }
    tc_detach(&bin_state.t);
    bpf_link__destroy(bin_state.sample_link);
    ring_buffer__free(rb);
    bpf_link__destroy(exit_link);
    alloctop_bpf__destroy(skel);
    tc_sym_free(sym);
    tc_tidmap_free(&tidmap);
    return status;
}
