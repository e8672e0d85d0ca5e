#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tc.h"

int tc_read_maps(pid_t pid, struct tc_map **out, size_t *n)
{
    char path[64], line[PATH_MAX + 128];
    snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return -errno;
    size_t cap = 0, len = 0;
    struct tc_map *v = NULL;
    while (fgets(line, sizeof(line), f)) {
        struct tc_map m = {0};
        unsigned long long s, e, off, ino;
        int pos = 0;
        if (sscanf(line, "%llx-%llx %4s %llx %*x:%*x %llu %n", &s, &e, m.perms, &off, &ino, &pos) < 5)
            continue;
        m.start = s, m.end = e, m.offset = off, m.inode = ino;
        char *p = line + pos;
        p[strcspn(p, "\n")] = 0;
        snprintf(m.path, sizeof(m.path), "%s", p);
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

bool tc_pid_alive(pid_t pid)
{
    /* A zombie still answers kill(0): look at the state too. */
    if (kill(pid, 0) != 0 && errno == ESRCH)
        return false;
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return false;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    char *rp = strrchr(buf, ')');
    return rp && rp[1] == ' ' && rp[2] != 'Z' && rp[2] != 'X';
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
    snprintf(path, sizeof(path), "/proc/%d/statm", (int)pid);
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
