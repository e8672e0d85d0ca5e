#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>

#include "tc.h"

/* The fields of a stat file (/proc/ID/stat, /proc/PID/task/ID/stat) after the comm, from the
 * state letter on, read into buf; NULL if the task is gone. */
static char *stat_fields(const char *stat_path, char *buf, size_t size)
{
    int fd = open(stat_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n <= 0)
        return NULL;
    buf[n] = 0;
    char *rp = strrchr(buf, ')');
    return rp && rp[1] == ' ' ? rp + 2 : NULL;
}

/* A task's state letter, 0 if it is gone. */
static char task_state(const char *stat_path)
{
    char buf[512], *f = stat_fields(stat_path, buf, sizeof buf);
    return f ? f[0] : 0;
}

bool tc_task_alive(pid_t pid, pid_t tid)
{
    char path[96];
    snprintf(path, sizeof(path), "/proc/%d/task/%d/stat", (int)pid, (int)tid);
    char st = task_state(path);
    return st && st != 'Z' && st != 'X';
}

pid_t tc_proc_task(pid_t pid)
{
    char path[96];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    char st = task_state(path);
    if (!st)
        return 0;
    if (st != 'Z' && st != 'X')
        return pid;
    /* A leader that left with pthread_exit stays a zombie while the other threads run, and its
     * maps, mm and map_files are gone: any other live thread stands for the process. */
    snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    if (!d)
        return 0;
    pid_t found = 0;
    struct dirent *de;
    while (!found && (de = readdir(d))) {
        char *end;
        long tid = strtol(de->d_name, &end, 10);
        if (*end || tid <= 0 || tid == pid)
            continue;
        snprintf(path, sizeof(path), "/proc/%d/task/%ld/stat", (int)pid, tid);
        st = task_state(path);
        if (st && st != 'Z' && st != 'X')
            found = (pid_t)tid;
    }
    closedir(d);
    return found;
}

/* Field n of /proc/PID/stat (1-based as proc(5) numbers them; 3, the state, and on), as a
 * number; 0 when the process is gone or the field is missing. */
static uint64_t stat_number(pid_t pid, int n)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    char *p = stat_fields(path, buf, sizeof buf);
    for (int k = 3; p && k < n; k++) {
        p = strchr(p, ' ');
        if (p)
            p++;
    }
    return p ? strtoull(p, NULL, 10) : 0;
}

bool tc_is_kernel_thread(pid_t pid)
{
    return stat_number(pid, 9) & 0x00200000; /* flags: PF_KTHREAD */
}

uint64_t tc_proc_start_time(pid_t pid)
{
    return stat_number(pid, 22); /* starttime */
}

uint64_t tc_image_id(pid_t pid)
{
    pid_t task = tc_proc_task(pid);
    if (!task)
        return 0;
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)task);
    /* After the comm: field 3 is the state; 26 startcode and 28 startstack are the address
     * space's, laid out anew (randomised) by each exec. */
    char *p = stat_fields(path, buf, sizeof buf);
    if (!p)
        return 0;
    unsigned long long v[26] = {0};
    int k = 0;
    for (; *p && k < 26; k++) {
        v[k] = strtoull(p, &p, 10);
        while (*p && *p != ' ')
            p++;
        if (*p == ' ')
            p++;
    }
    /* An exiting process has no address space left: the kernel gives 0 for both fields, and
     * its exe no longer resolves.  That is no new image (taken for an exec, it dropped the
     * leak report at exit): unknown, 0. */
    if (k != 26 || !v[23] || !v[25])
        return 0;
    uint64_t h = tc_hash64(v[23], v[25]);
    struct stat st;
    snprintf(path, sizeof(path), "/proc/%d/exe", (int)task);
    if (stat(path, &st) != 0)
        return 0;
    h = tc_hash64(tc_hash64(h, st.st_dev), st.st_ino);
    return h | 1;
}

void tc_strip_deleted(char *path)
{
    static const char suffix[] = " (deleted)";
    size_t n = strlen(path), k = sizeof(suffix) - 1;
    if (n > k && !strcmp(path + n - k, suffix))
        path[n - k] = 0;
}

int tc_read_maps(pid_t pid, struct tc_map **out, size_t *n)
{
    char path[64], line[PATH_MAX + 128];
    pid_t task = tc_proc_task(pid);
    snprintf(path, sizeof(path), "/proc/%d/maps", (int)(task ? task : pid));
    FILE *f = fopen(path, "re");
    if (!f)
        return -errno;
    size_t cap = 0, len = 0;
    struct tc_map *v = NULL;
    while (fgets(line, sizeof(line), f)) {
        struct tc_map m = {0};
        unsigned long long s, e, off, ino;
        unsigned maj, min;
        int pos = 0;
        if (sscanf(line, "%llx-%llx %4s %llx %x:%x %llu %n", &s, &e, m.perms, &off, &maj, &min, &ino, &pos) < 7)
            continue;
        m.start = s, m.end = e, m.offset = off, m.inode = ino;
        m.dev = makedev(maj, min);
        char *p = line + pos;
        p[strcspn(p, "\n")] = 0;
        snprintf(m.path, sizeof(m.path), "%s", p);
        /* A file replaced on disk (package upgrade) or removed: the path no longer names it,
         * tc_map_open finds it by address. */
        size_t before = strlen(m.path);
        if (m.inode)
            tc_strip_deleted(m.path);
        m.deleted = strlen(m.path) != before;
        if (len == cap) {
            cap = cap ? cap * 2 : 64;
            struct tc_map *nv = realloc(v, cap * sizeof(*v));
            if (!nv) {
                free(v);
                fclose(f);
                return -ENOMEM;
            }
            v = nv;
        }
        v[len++] = m;
    }
    fclose(f);
    *out = v;
    *n = len;
    return 0;
}

int tc_old_copy_users(const char *path, uint64_t dev, uint64_t ino, pid_t *example)
{
    DIR *d = opendir("/proc");
    if (!d)
        return 0;
    int users = 0;
    size_t plen = strlen(path);
    char maps[64], line[PATH_MAX + 128];
    struct dirent *de;
    while ((de = readdir(d))) {
        char *end;
        long pid = strtol(de->d_name, &end, 10);
        if (*end || pid <= 0 || pid == getpid())
            continue;
        snprintf(maps, sizeof(maps), "/proc/%ld/maps", pid);
        FILE *f = fopen(maps, "re");
        if (!f)
            continue;
        bool old = false;
        while (!old && fgets(line, sizeof(line), f)) {
            unsigned maj, min;
            unsigned long long inode;
            int pos = 0;
            if (sscanf(line, "%*x-%*x %*s %*x %x:%x %llu %n", &maj, &min, &inode, &pos) < 3 || !pos)
                continue;
            const char *p = line + pos;
            old = !strncmp(p, path, plen) && !strcmp(p + plen, " (deleted)\n") &&
                  !(inode == ino && makedev(maj, min) == dev);
        }
        fclose(f);
        if (old && !users++ && example)
            *example = (pid_t)pid;
    }
    closedir(d);
    return users;
}

void tc_warn_old_copy_users(const char *path)
{
    struct stat st;
    pid_t example = 0;
    int n = stat(path, &st) ? 0 : tc_old_copy_users(path, st.st_dev, st.st_ino, &example);
    if (n)
        tc_warn("warning: %d process%s (pid %d%s) map%s an older, deleted %s, which the probes are not on: "
                "use -p PID",
                n, n > 1 ? "es" : "", (int)example, n > 1 ? ", ..." : "", n > 1 ? "" : "s", path);
}

bool tc_pid_alive(pid_t pid)
{
    /* A zombie still answers kill(0): look at the state too, of every thread (the leader may
     * have left alone). */
    if (kill(pid, 0) != 0 && errno == ESRCH)
        return false;
    return tc_proc_task(pid) != 0;
}

/* Does fd hold the file of mapping m (same device and inode)? */
static bool same_file(int fd, const struct tc_map *m)
{
    struct stat st;
    return fstat(fd, &st) == 0 && st.st_ino == m->inode && st.st_dev == m->dev;
}

int tc_map_open(pid_t pid, const struct tc_map *m, char *path, size_t n)
{
    char buf[PATH_MAX + 64];
    pid_t task = tc_proc_task(pid);
    if (!task)
        task = pid;
    /* map_files is the mapped file itself, whatever happened to its path since (replaced,
     * deleted, or another file at that path in our mount namespace); it needs CAP_SYS_ADMIN. */
    snprintf(buf, sizeof(buf), "/proc/%d/map_files/%llx-%llx", (int)task, (unsigned long long)m->start,
             (unsigned long long)m->end);
    int fd = open(buf, O_RDONLY | O_CLOEXEC);
    if (fd < 0 && (errno == EMFILE || errno == ENFILE)) {
        static bool warned;
        if (!warned)
            tc_warn("out of file descriptors (%s): some processes' files are not opened, their "
                    "symbols are missing; raise `ulimit -n`", strerror(errno));
        warned = true;
        return -1;
    }
    if (fd < 0) {
        /* The path in the process's mount namespace, then in ours: only if it still is the
         * mapped file (a container's path may name another file on the host). */
        snprintf(buf, sizeof(buf), "/proc/%d/root%s", (int)task, m->path);
        fd = open(buf, O_RDONLY | O_CLOEXEC);
        if (fd >= 0 && !same_file(fd, m)) {
            close(fd);
            fd = -1;
        }
    }
    if (fd < 0 && m->path[0] == '/') {
        snprintf(buf, sizeof(buf), "%s", m->path);
        fd = open(buf, O_RDONLY | O_CLOEXEC);
        if (fd >= 0 && !same_file(fd, m)) {
            close(fd);
            fd = -1;
        }
    }
    if (fd >= 0 && path)
        snprintf(path, n, "%s", buf);
    return fd;
}

int tc_read_comm(pid_t pid, pid_t tid, char *buf, size_t n)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/task/%d/comm", (int)pid, (int)tid);
    FILE *f = fopen(path, "re");
    if (!f)
        return -errno;
    if (!fgets(buf, (int)n, f)) {
        fclose(f);
        return -EIO;
    }
    fclose(f);
    buf[strcspn(buf, "\n")] = 0;
    return 0;
}

uint64_t tc_read_rss(pid_t pid, uint64_t *anon)
{
    char path[64];
    pid_t task = tc_proc_task(pid);
    snprintf(path, sizeof(path), "/proc/%d/statm", (int)(task ? task : pid));
    if (anon)
        *anon = 0;
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    unsigned long long size, rss, shared;
    int n = fscanf(f, "%llu %llu %llu", &size, &rss, &shared);
    fclose(f);
    if (n < 2)
        return 0;
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    /* statm's third field is the file-backed and shmem part: the rest is anonymous memory,
     * where all of an allocator's memory is */
    if (anon && n == 3 && shared <= rss)
        *anon = (rss - shared) * page;
    return rss * page;
}

pid_t tc_tgid_of(pid_t tid)
{
    char path[64], line[256];
    snprintf(path, sizeof(path), "/proc/%d/status", (int)tid);
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    long tgid = 0;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "Tgid: %ld", &tgid) == 1)
            break;
    fclose(f);
    return (pid_t)tgid;
}

/* NSpid of /proc/PID[/task/TID]/status: the ID in our namespace (first) and in the process's own
 * (last); returns how many there are, 0 if unreadable. */
static int read_nspid(const char *status_path, long *outer, long *inner)
{
    FILE *f = fopen(status_path, "re");
    if (!f)
        return 0;
    char line[256];
    int n = 0;
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, "NSpid:", 6))
            continue;
        char *p = line + 6, *end;
        for (;;) {
            long v = strtol(p, &end, 10);
            if (end == p)
                break;
            if (n++ == 0)
                *outer = v;
            *inner = v;
            p = end;
        }
        break;
    }
    fclose(f);
    return n;
}

pid_t tc_host_tid(struct tc_tidmap *tm, pid_t pid, pid_t tid)
{
    if (pid <= 0 || tid <= 0)
        return tid;
    uint64_t *ns = tc_map64_get(&tm->other_ns, (uint64_t)pid);
    if (!ns) {
        char path[64];
        long outer = 0, inner = 0;
        snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
        int n = read_nspid(path, &outer, &inner);
        if (!n)
            return tid;
        ns = tc_map64_put(&tm->other_ns, (uint64_t)pid, NULL);
        if (!ns)
            return tid;
        *ns = n > 1 ? 2 : 1;
    }
    if (*ns == 1)
        return tid;
    uint64_t key = (uint64_t)pid << 32 | (uint32_t)tid;
    uint64_t *host = tc_map64_get(&tm->host, key);
    if (host)
        return (pid_t)*host;
    /* Not seen yet: read every thread's NSpid again, at most twice a second per process. */
    uint64_t now_ms = (uint64_t)(tc_now() * 1000) + 1;
    bool created;
    uint64_t *last = tc_map64_put(&tm->scanned, (uint64_t)pid, &created);
    if (!last || (!created && now_ms - *last < 500))
        return tid;
    *last = now_ms;
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    if (!d)
        return tid;
    struct dirent *de;
    while ((de = readdir(d))) {
        char *end;
        long t = strtol(de->d_name, &end, 10);
        if (*end || t <= 0)
            continue;
        char sp[96];
        long outer = 0, inner = 0;
        snprintf(sp, sizeof(sp), "/proc/%d/task/%ld/status", (int)pid, t);
        if (read_nspid(sp, &outer, &inner) > 1) {
            uint64_t *v = tc_map64_put(&tm->host, (uint64_t)pid << 32 | (uint32_t)inner, NULL);
            if (v)
                *v = (uint64_t)outer;
        }
    }
    closedir(d);
    host = tc_map64_get(&tm->host, key);
    return host ? (pid_t)*host : tid;
}

void tc_tidmap_free(struct tc_tidmap *tm)
{
    tc_map64_free(&tm->host);
    tc_map64_free(&tm->other_ns);
    tc_map64_free(&tm->scanned);
}

ssize_t tc_read_mem(pid_t pid, uint64_t addr, void *buf, size_t len)
{
    struct iovec l = {buf, len}, rm = {(void *)(uintptr_t)addr, len};
    ssize_t r = process_vm_readv(pid, &l, 1, &rm, 1, 0);
    return r < 0 ? -errno : r;
}
