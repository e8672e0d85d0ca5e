/* The background thread: returns decayed memory while the program is idle, and releases every
 * cache at once when the kernel reports memory pressure (a PSI trigger).
 *
 * It starts lazily, the first time lumalloc has mapped LUM_BG_START_BYTES or has
 * LUM_BG_START_LARGE in large blocks: short-lived and small processes never get a thread, and
 * nothing is started while both LUMALLOC_PSI and LUMALLOC_BACKGROUND_PURGE are off. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>
#include "internal.h"
#include "lumalloc.h"
#include "observe.h"
#include "options.h"

/* some 100 ms of stall in any 1 s window (2 s for unprivileged processes, as the kernel demands) */
#define PSI_TRIGGER "some 100000 1000000"
#define PSI_TRIGGER_UNPRIVILEGED "some 150000 2000000"

static _Atomic int bg_state;      /* 0 not started, 1 starting/running, 2 failed: never retry */
static _Atomic int bg_running;    /* the thread exists: wake() may write to its eventfd */
/* eventfd: new dirty memory, or a pressure request.  Published only once the thread runs and
 * never closed while it does (a fork child, single-threaded, resets it): a writer on another
 * thread can never hit a descriptor number the application has reused. */
static _Atomic int lumalloc_bg_wake_fd = -1;
static int psi_fd = -1;           /* owned by the background thread once it runs */
/* Who our descriptors are: a program that closes every descriptor it did not open (a daemon's
 * closefrom(3)) and then gets the same numbers back (1000 open files, a dup2) had the thread
 * write counters into its files and sockets, read its data away, close its descriptors and
 * spin on a regular file.  A descriptor is used only after it is checked to be ours still. */
static uint64_t wake_fd_id;       /* the eventfd's "eventfd-id" (fdinfo), 0 if the kernel has none */
static dev_t wake_dev;            /* its inode, by fstat: the one every anonymous-inode file shares */
static ino_t wake_ino;
static dev_t psi_dev;
static ino_t psi_ino;
static _Atomic int dirty;         /* free memory not yet purged since the thread last looked */
static _Atomic int pressure_requested;
static char psi_path[256];

/* The cgroup's own memory.pressure when the process sits in a cgroup v2 group (that is the
 * limit that will bite), else the system-wide file. */
static void choose_psi_path(void)
{
    char cg[200] = "";
    int fd = open("/proc/self/cgroup", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char buf[1024];
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n > 0) {
            buf[n] = 0;
            char *line = strstr(buf, "0::");
            if (line && (line == buf || line[-1] == '\n')) {
                line += 3;
                size_t len = strcspn(line, "\n");
                if (len < sizeof cg) { memcpy(cg, line, len); cg[len] = 0; }
            }
        }
    }
    /* "/": the host's root group, or a container's own group seen through its cgroup
     * namespace; the root has no memory.pressure (the system-wide file below serves), a
     * container's does */
    const char *roots[] = { "/sys/fs/cgroup", "/sys/fs/cgroup/unified" };
    if (cg[0])
        for (size_t i = 0; i < 2; i++) {
            snprintf(psi_path, sizeof psi_path, "%s%s/memory.pressure", roots[i], strcmp(cg, "/") ? cg : "");
            if (access(psi_path, W_OK) == 0) return;
        }
    snprintf(psi_path, sizeof psi_path, "/proc/pressure/memory");
}

static int open_psi_trigger(void)
{
    choose_psi_path();
    int fd = open(psi_path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -1; /* no PSI in this kernel: degrade to decay only */
    if (write(fd, PSI_TRIGGER, strlen(PSI_TRIGGER) + 1) < 0 &&
        write(fd, PSI_TRIGGER_UNPRIVILEGED, strlen(PSI_TRIGGER_UNPRIVILEGED) + 1) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Total "some" stall time (µs) of the pressure file, to report how bad it was. */
static uint64_t psi_total_us(void)
{
    int fd = open(psi_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    char buf[256];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *t = strstr(buf, "total=");
    return t ? strtoull(t + 6, NULL, 10) : 0;
}

static size_t release_everything(uint32_t reason)
{
    size_t released = lum_large_cache_purge();
    lum_sampled_purge(true);
    lum_abandoned_reclaim(true); /* to the segments' free slices: the purge below counts them */
    released += lum_segments_purge(true, reason);
    return released;
}

/* Whether fd is an eventfd, by its fdinfo: 1 (and *id: its "eventfd-id", 0 where the kernel
 * gives none), 0 when it is not, -1 when its fdinfo could not be read (the descriptor limit
 * reached, no /proc, a descriptor closed): not known either way.  Plain reads and no allocation, and errno as it
 * was: this runs inside free(). */
static int eventfd_id(int fd, uint64_t *id)
{
    char path[48], buf[512];
    int saved = errno, is = -1;
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
    int f = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t n = f < 0 ? -1 : read(f, buf, sizeof buf - 1);
    if (f >= 0) close(f);
    if (n > 0) {
        buf[n] = 0;
        const char *at = strstr(buf, "eventfd-id:");
        is = strstr(buf, "eventfd-count:") != NULL;
        *id = at ? strtoull(at + 11, NULL, 10) : 0;
    }
    errno = saved;
    return is;
}

/* Whether fd is still our eventfd: 1, 0, or -1 for not known.  First by fstat, which needs no
 * descriptor and no /proc: a closed descriptor, or any file but an anonymous-inode one (the
 * program's files, sockets, pipes), is not ours.  Then by its fdinfo, where it can be read:
 * an eventfd of our id (any eventfd, where the kernel gives no id).  Where it cannot (the
 * descriptor limit reached, no /proc), not known: an anonymous-inode file at our descriptor
 * number, ours unless the program closed ours and made an eventfd, epoll, timerfd or the like
 * there, to which a write of a count is refused or at worst one spurious wake-up; reading one
 * could take the program's count, which the thread therefore does not. */
static int wake_fd_ours(int fd)
{
    struct stat st;
    int saved = errno;
    bool anon = fstat(fd, &st) == 0 && st.st_dev == wake_dev && st.st_ino == wake_ino;
    errno = saved;
    if (!anon) return 0;
    uint64_t id = 0;
    int is = eventfd_id(fd, &id);
    return is <= 0 ? is : id == wake_fd_id;
}

/* Whether psi_fd is the pressure file we opened. */
static bool psi_fd_ours(int fd)
{
    struct stat st;
    return fd >= 0 && fstat(fd, &st) == 0 && st.st_dev == psi_dev && st.st_ino == psi_ino;
}

/* The thread's descriptors live high (from LUM_BG_FD_MIN, or as opened when the limit is lower):
 * open() takes the lowest free number, so a program that closes descriptors it does not own
 * (a closefrom(3) sweep, a double close) does not then find its own files behind ours.  At
 * fd 3 and 4, the program's next files were written to by wake(), polled by the thread (a
 * regular file is always readable: it spun) and closed in every fork child. */
#define LUM_BG_FD_MIN 1000
static int fd_high(int fd)
{
    if (fd < 0 || fd >= LUM_BG_FD_MIN) return fd;
    int h = fcntl(fd, F_DUPFD_CLOEXEC, LUM_BG_FD_MIN);
    if (h < 0) return fd;
    close(fd);
    return h;
}

static void *bg_main(void *arg)
{
    (void)arg;
    int wake_fd = atomic_load(&lumalloc_bg_wake_fd);
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* never steal the application's signals */
    uint64_t last_total = psi_fd >= 0 ? psi_total_us() : 0;
    for (;;) {
        wake_fd = atomic_load(&lumalloc_bg_wake_fd); /* -1 once wake() found it was not ours */
        struct pollfd fds[2] = { { .fd = wake_fd, .events = POLLIN }, { .fd = psi_fd, .events = POLLPRI } };
        /* without a wake-up, look every second; with one, still every 10 s: a poll started on
         * our eventfd sleeps on, unwoken, once the program has closed it */
        int timeout = wake_fd >= 0 ? 10000 : 1000;
        if (atomic_load(&dirty)) {
            uint64_t half = lum_opt.decay_ms / 2;
            timeout = half < 10 ? 10 : half > 60000 ? 60000 : (int)half;
        }
        int n = poll(fds, psi_fd >= 0 ? 2 : 1, timeout);
        if (n < 0 && errno != EINTR) break;
        /* A descriptor the program closed (a negative one poll skips): no longer ours to use. */
        if (n > 0 && (fds[0].revents & POLLNVAL)) {
            atomic_store(&lumalloc_bg_wake_fd, -1);
            wake_fd = -1;
        }
        if (n > 0 && psi_fd >= 0 && (fds[1].revents & POLLNVAL)) __atomic_store_n(&psi_fd, -1, __ATOMIC_RELAXED);
        if (n > 0 && (fds[0].revents & POLLIN)) {
            uint64_t v;
            /* not known counts as not ours here: a read could take the count of an eventfd
             * or timerfd the program made at this number; the thread then looks every second */
            if (wake_fd_ours(wake_fd) != 1) {
                atomic_store(&lumalloc_bg_wake_fd, -1);
                wake_fd = -1;
            } else if (read(wake_fd, &v, sizeof v) < 0) { /* nothing to do: a spurious wake */ }
        }
        if (n > 0 && psi_fd >= 0 && (fds[1].revents & (POLLPRI | POLLERR | POLLHUP)) && !psi_fd_ours(psi_fd)) {
            __atomic_store_n(&psi_fd, -1, __ATOMIC_RELAXED); /* the program's now: left alone */
            fds[1].revents = 0;
        }
        bool pressure = atomic_exchange(&pressure_requested, 0);
        uint64_t stall = 0;
        if (n > 0 && psi_fd >= 0 && (fds[1].revents & POLLPRI)) {
            pressure = true;
            uint64_t total = psi_total_us();
            stall = total - last_total;
            last_total = total;
        }
        if (n > 0 && psi_fd >= 0 && (fds[1].revents & (POLLERR | POLLHUP))) {
            close(psi_fd); /* the cgroup went away: decay keeps working */
            __atomic_store_n(&psi_fd, -1, __ATOMIC_RELAXED);
        }
        if (pressure) {
            /* Clean before the release: a free meanwhile marks it dirty again, and wakes the
             * thread (cleared after, its memory waited for the next free, for good if none). */
            atomic_store(&dirty, 0);
            size_t released = release_everything(LUM_PURGE_PRESSURE);
            lum_count_global(&lumalloc_registry.global.pressure_events, 1);
            lum_on_pressure(stall, released);
            continue;
        }
        /* decay: what has been free for decay_ms goes back; look again while any is left */
        atomic_store(&dirty, 0);
        lum_abandoned_reclaim(false); /* pages of exited threads emptied since, or unused */
        lum_sampled_purge(false);
        lum_segments_purge(false, LUM_PURGE_DECAY);
        lum_large_cache_decay();
        lum_segments_collapse();
        if (lum_segments_dirty() || lum_large_cache_bytes() || !lum_abandoned_idle()) atomic_store(&dirty, 1);
    }
    atomic_store(&bg_running, 0);
    atomic_store(&bg_state, 2);
    return NULL;
}

static void bg_start(void)
{
    int expected = 0;
    if (!atomic_compare_exchange_strong(&bg_state, &expected, 1)) return;
    int fd = fd_high(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (fd < 0) { atomic_store(&bg_state, 2); return; }
    psi_fd = lum_opt.psi ? fd_high(open_psi_trigger()) : -1;
    struct stat st;
    if (psi_fd >= 0 && fstat(psi_fd, &st) == 0) {
        psi_dev = st.st_dev;
        psi_ino = st.st_ino;
    }
    if (eventfd_id(fd, &wake_fd_id) != 1) wake_fd_id = 0;
    if (fstat(fd, &st) == 0) {
        wake_dev = st.st_dev;
        wake_ino = st.st_ino;
    }
    atomic_store(&lumalloc_bg_wake_fd, fd); /* read by bg_main; wake() waits for bg_running */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_t t;
    int err = pthread_create(&t, &attr, bg_main, NULL);
    /* glibc puts static TLS inside the stack: with 64 KiB of it a 64 KiB stack is EINVAL */
    if (err == EINVAL) err = pthread_create(&t, NULL, bg_main, NULL);
    if (err != 0) {
        /* EPERM: a sandbox that forbids threads (seccomp on clone), the program's policy, not a
         * fault: nothing on its stderr, which glibc's malloc would not write either */
        if (err != EPERM || lum_opt.verbose) {
            char msg[160];
            snprintf(msg, sizeof msg, "lumalloc: no background thread (pthread_create: %s): freed memory decays "
                     "only as the program allocates, and memory pressure goes unheard\n", strerror(err));
            lum_write_err(msg);
        }
        /* never started: state 2 keeps wake() away from fd before it is closed */
        atomic_store(&bg_state, 2);
        atomic_store(&lumalloc_bg_wake_fd, -1);
        close(fd);
        if (psi_fd >= 0) close(psi_fd);
        psi_fd = -1;
    } else {
        pthread_setname_np(t, "lumalloc-bg");
        atomic_store(&bg_running, 1);
    }
    pthread_attr_destroy(&attr);
}

/* From the malloc slow path: cheap unless this is the moment to start. */
void lum_background_maybe_start(size_t more_large)
{
    if (LUM_LIKELY(atomic_load_explicit(&bg_state, memory_order_relaxed) != 0)) return;
    if (!lum_opt.psi && !lum_opt.background_purge) return;
    if (!lum_background_due(more_large)) return;
    bg_start();
}

static void wake(void)
{
    if (!atomic_load_explicit(&bg_running, memory_order_acquire)) return;
    int fd = atomic_load_explicit(&lumalloc_bg_wake_fd, memory_order_relaxed);
    uint64_t one = 1;
    if (fd < 0) return;
    if (wake_fd_ours(fd) == 0) {
        atomic_store(&lumalloc_bg_wake_fd, -1); /* the thread looks every second from now on */
        return;
    }
    int saved = errno; /* free() keeps the program's errno */
    if (write(fd, &one, sizeof one) < 0) { /* counter full: the thread is awake anyway */ }
    errno = saved;
}

/* Free memory appeared that decay should return later: wake the thread once per clean state. */
void lum_background_note_dirty(void)
{
    if (atomic_load_explicit(&dirty, memory_order_relaxed)) return;
    if (atomic_exchange(&dirty, 1) == 0) wake();
}

LUM_EXPORT size_t lum_memory_pressure(void)
{
    if (atomic_load(&bg_running)) {
        atomic_store(&pressure_requested, 1);
        wake();
        return 0;
    }
    /* no thread: do the work here, synchronously */
    size_t released = release_everything(LUM_PURGE_PRESSURE);
    lum_count_global(&lumalloc_registry.global.pressure_events, 1);
    lum_on_pressure(0, released);
    return released;
}

LUM_EXPORT int lum_background_running(void)
{
    if (!atomic_load(&bg_running)) return 0;
    return 1 | (__atomic_load_n(&psi_fd, __ATOMIC_RELAXED) >= 0 ? 2 : 0);
}

/* Freed memory kept resident for reuse may not outgrow the live heap: before lumalloc maps
 * more, anything over max(LUM_DIRTY_FLOOR, live / 8) is returned at once.  Decay alone would
 * let a program whose working set changes shape (small blocks, then large ones) hold both
 * for the decay time, and a cgroup limit kills it before PSI can say anything (no swap, no
 * stall). */

size_t lum_dirty_limit(size_t dirty)
{
    /* the coarse figure this was tuned with (whole slices for pages): lum_committed_bytes */
    uint64_t resident = __atomic_load_n(&lum_committed_bytes, __ATOMIC_RELAXED);
    size_t live = resident > dirty ? (size_t)(resident - dirty) : 0;
    return live / 8 > LUM_DIRTY_FLOOR ? live / 8 : LUM_DIRTY_FLOOR;
}

/* What of the memory over the limit may stay: what was freed in the last LUM_DIRTY_HOT_MS, as
 * long as the freed memory is under LUM_DIRTY_HARD times the limit.  A ring of buffers whose
 * count swings frees memory and takes it again within milliseconds, and over the limit every
 * fresh large mapping emptied the large cache and purged the free spans, to be faulted in
 * again: bench buffers (256 buffers of 16-256 KiB, each written) took 0.34 s and 80k faults
 * where the peers took 0.10-0.14 s and ~10k; 0.13-0.15 s and 20k now, at +3 MiB of peak RSS
 * (of 43).  A program that changes shape (small blocks freed, large ones taken) frees far
 * more than that, at once, and still has all of it given back.  The ages are lum_now_ms's,
 * a coarse clock (4 ms ticks at HZ=250): the window is 2-3 of its ticks. */
uint64_t lum_dirty_min_age(size_t dirty, size_t limit)
{
    if (dirty > limit * LUM_DIRTY_HARD) return 0;
    /* never longer than decay would keep it (a decay time under the window; 0: at once) */
    return lum_opt.decay_ms < LUM_DIRTY_HOT_MS ? lum_opt.decay_ms : LUM_DIRTY_HOT_MS;
}

/* Before new memory is mapped: for a large block (large == true) neither the cache (nothing in
 * it fitted) nor free slices can serve, so what of both is older than lum_dirty_min_age goes
 * if over the limit; for a page, free slices are about to be reused, so only the cache goes
 * (segment.c checks itself before mapping a new segment). */
void lum_dirty_limit_check(bool large)
{
    size_t seg_dirty = large ? lum_segments_dirty_resident() : 0, cached = lum_large_cache_bytes();
    size_t dirty = seg_dirty + cached;
    if (LUM_LIKELY(dirty <= LUM_DIRTY_FLOOR)) return;
    size_t limit = lum_dirty_limit(dirty);
    if (dirty <= limit) return;
    uint64_t min_age = lum_dirty_min_age(dirty, limit);
    if (cached) lum_large_cache_purge_idle(min_age);
    if (seg_dirty) lum_segments_purge_excess(limit / 2, min_age);
}

/* A fork child has no background thread: let it start its own when it needs one. */
uint64_t lum_bg_start_bytes = LUM_BG_START_BYTES, lum_bg_start_large = LUM_BG_START_LARGE;

void lum_background_after_fork_child(void)
{
    /* A child starts its own thread only once it has grown by the thresholds itself: most fork
     * children exec or exit soon, and one with a second thread can no longer unshare a user
     * namespace (EINVAL) or rely on being single-threaded; the parent's figures made every
     * child of a large process start one at its first slow-path allocation. */
    const struct lum_global_counters_v1 *g = &lumalloc_registry.global;
    lum_bg_start_bytes = __atomic_load_n(&g->mapped_bytes, __ATOMIC_RELAXED) + LUM_BG_START_BYTES;
    lum_bg_start_large = __atomic_load_n(&g->large_live_bytes, __ATOMIC_RELAXED) +
                         __atomic_load_n(&lum_large_cached, __ATOMIC_RELAXED) + LUM_BG_START_LARGE;
    /* whatever the parent's thread was doing (even half started), the child has none */
    int fd = atomic_exchange(&lumalloc_bg_wake_fd, -1);
    if (fd >= 0 && wake_fd_ours(fd) == 1) close(fd);
    if (psi_fd_ours(psi_fd)) close(psi_fd);
    psi_fd = -1;
    atomic_store(&bg_running, 0);
    atomic_store(&dirty, 0);
    atomic_store(&bg_state, 0);
}
