#define _GNU_SOURCE
#include <fcntl.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/capability.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "tc.h"

const char *tc_prog = "lumalloc-tool";
int tc_verbose;

static void vwarn(const char *fmt, va_list ap)
{
    fprintf(stderr, "%s: ", tc_prog);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

void tc_die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vwarn(fmt, ap);
    va_end(ap);
    exit(1);
}

FILE *tc_open_report(const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return NULL;
    FILE *f = fdopen(fd, "w");
    if (!f) close(fd);
    return f;
}

void tc_sum_percpu(int map_fd, uint64_t *out, uint32_t n)
{
    memset(out, 0, sizeof(uint64_t) * n);
    int ncpu = libbpf_num_possible_cpus();
    uint64_t *v = ncpu > 0 ? calloc((size_t)ncpu, sizeof(uint64_t)) : NULL;
    if (!v)
        return;
    for (uint32_t k = 0; k < n; k++)
        if (bpf_map_lookup_elem(map_fd, &k, v) == 0)
            for (int c = 0; c < ncpu; c++)
                out[k] += v[c];
    free(v);
}

void tc_warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vwarn(fmt, ap);
    va_end(ap);
}

#ifndef CAP_PERFMON
#define CAP_PERFMON 38
#endif
#ifndef CAP_BPF
#define CAP_BPF 39
#endif

static bool has_cap(const struct __user_cap_data_struct d[2], int cap)
{
    return d[cap / 32].effective & (1u << (cap % 32));
}

void tc_check_environment(void)
{
    struct __user_cap_header_struct h = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    struct __user_cap_data_struct d[2] = {0};
    if (syscall(SYS_capget, &h, d) == 0) {
        bool admin = has_cap(d, CAP_SYS_ADMIN);
        if (!admin && !(has_cap(d, CAP_BPF) && has_cap(d, CAP_PERFMON)))
            tc_die("need root, or CAP_BPF and CAP_PERFMON (plus CAP_SYS_PTRACE to read other users' processes)");
    }
    if (access("/sys/kernel/btf/vmlinux", R_OK) != 0)
        tc_die("kernel without BTF (/sys/kernel/btf/vmlinux missing; needs CONFIG_DEBUG_INFO_BTF=y)");
    if (access("/sys/bus/event_source/devices/uprobe", F_OK) != 0)
        tc_die("kernel without uprobes (needs CONFIG_UPROBE_EVENTS=y)");
}

static int print_fn(enum libbpf_print_level level, const char *fmt, va_list ap)
{
    if (!tc_verbose || (level == LIBBPF_DEBUG && tc_verbose < 2))
        return 0;
    return vfprintf(stderr, fmt, ap);
}

void tc_libbpf_quiet(void) { libbpf_set_print(print_fn); }

double tc_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void tc_json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; s && *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

int tc_parse_pids(const char *arg, pid_t *pids, int n, int cap)
{
    int added = 0;
    const char *p = arg;
    while (*p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v <= 0 || v > 0x3fffffff || (*end && *end != ','))
            tc_die("invalid PID list '%s'", arg);
        if (n + added >= cap)
            tc_die("too many PIDs (max %d)", cap);
        pids[n + added++] = (pid_t)v;
        p = *end ? end + 1 : end;
    }
    return added;
}
