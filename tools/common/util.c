#define _GNU_SOURCE
#include <ctype.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <math.h>
#include <poll.h>
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
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

int tc_check_report_path(const char *path)
{
    /* Anything but a regular file (a FIFO, /dev/stdout, a terminal) is left alone until the
     * report: an open and close here would end a FIFO's reader. */
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        return -EISDIR;
    if (stat(path, &st) == 0 && !S_ISREG(st.st_mode))
        return 0;
    /* Opened without O_TRUNC: the file is written over only once there is a report for it (a
     * mistyped PID cost the previous capture). */
    int fd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd >= 0) {
        close(fd);
        return 0;
    }
    if (errno == ENXIO)
        return 0;
    if (errno != ENOENT)
        return -errno;
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd >= 0) {
        close(fd);
        unlink(path);
        return 0;
    }
    if (errno != EEXIST)
        return -errno;
    /* a symbolic link to a file not made yet, which O_EXCL does not follow: made, empty */
    fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return -errno;
    close(fd);
    return 0;
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

/* Length of the well-formed UTF-8 sequence at s (RFC 3629: no overlong forms, surrogates or
 * code points past U+10FFFF), or 0. */
static int utf8_len(const unsigned char *s)
{
    unsigned char c = s[0];
    int n;
    unsigned char lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf)
        n = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        if (c == 0xe0)
            lo = 0xa0;
        else if (c == 0xed)
            hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        if (c == 0xf0)
            lo = 0x90;
        else if (c == 0xf4)
            hi = 0x8f;
    } else
        return 0;
    if (s[1] < lo || s[1] > hi)
        return 0;
    for (int i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xbf)
            return 0;
    return n;
}

void tc_json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; p && *p;) {
        unsigned char c = *p;
        if (c < 0x80) {
            if (c == '"' || c == '\\')
                fprintf(f, "\\%c", c);
            else if (c < 0x20)
                fprintf(f, "\\u%04x", c);
            else
                fputc(c, f);
            p++;
            continue;
        }
        /* Thread names and paths are bytes: the kernel cuts a comm at 15 bytes, inside a
         * character if need be.  JSON must be UTF-8, so a byte that starts no well-formed
         * character becomes U+FFFD. */
        int n = utf8_len(p);
        if (n) {
            fwrite(p, 1, (size_t)n, f);
            p += n;
        } else {
            fputs("\\ufffd", f);
            p++;
        }
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
        pid_t tgid = tc_tgid_of((pid_t)v);
        if (tgid > 0 && tgid != (pid_t)v) {
            tc_warn("%ld is a thread of process %d: watching process %d", v, (int)tgid, (int)tgid);
            v = tgid;
        }
        bool dup = false;
        for (int i = 0; i < n + added && !dup; i++)
            dup = pids[i] == (pid_t)v;
        p = *end ? end + 1 : end;
        if (dup)
            continue;
        if (n + added >= cap)
            tc_die("too many PIDs (max %d)", cap);
        pids[n + added++] = (pid_t)v;
    }
    return added;
}

double tc_parse_double(const char *what, const char *s, double min, double max)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !isfinite(v) || v < min || v > max)
        tc_die("invalid %s '%s' (a number from %g to %g)", what, s, min, max);
    return v;
}

long tc_parse_long(const char *what, const char *s, long min, long max)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < min || v > max)
        tc_die("invalid %s '%s' (a whole number from %ld to %ld)", what, s, min, max);
    return v;
}

bool tc_stdout_failed(void)
{
    if (fflush(stdout) == EOF || ferror(stdout))
        return true;
    /* A pipe whose reader has gone reports POLLERR on its write end: seen without a write, so
     * a tool with nothing to print (an idle target) stops too, its probes detached. */
    struct pollfd p = {.fd = 1, .events = 0};
    return poll(&p, 1, 0) == 1 && (p.revents & POLLERR);
}

int tc_exit_status(int wait_status)
{
    if (WIFEXITED(wait_status))
        return WEXITSTATUS(wait_status);
    if (WIFSIGNALED(wait_status))
        return 128 + WTERMSIG(wait_status);
    return 1;
}

void tc_usage_error(int c, char **argv)
{
    /* A long option is named as typed, up to its '=': optopt is then its val (256 and up for a
     * long-only option: printed with %c it was a control byte, or another option's letter). */
    const char *arg = argv[optind - 1];
    if (arg && !strncmp(arg, "--", 2) && arg[2]) {
        int len = (int)strcspn(arg, "=");
        if (c == ':')
            tc_die("option '%.*s' needs a value (see --help)", len, arg);
        if (optopt && arg[len] == '=')
            tc_die("option '%.*s' takes no value (see --help)", len, arg);
        tc_die("unknown option '%.*s' (see --help)", len, arg);
    }
    if (c == ':') {
        if (optopt > 0 && optopt < 128 && isgraph(optopt))
            tc_die("option -%c needs a value (see --help)", optopt);
        tc_die("option '%s' needs a value (see --help)", arg);
    }
    if (optopt > 0 && optopt < 128 && isgraph(optopt))
        tc_die("unknown option -%c (see --help)", optopt);
    tc_die("unknown option '%s' (see --help)", arg);
}

void tc_need_one_target(int npids, const char *command, const char *binary)
{
    int n = !!npids + !!command + !!binary;
    if (n == 0)
        tc_die("no target: give -p PID, -c 'CMD' or -B PATH (see --help)");
    if (n > 1)
        tc_die("-p, -c and -B each name the targets: give only one of them");
}
