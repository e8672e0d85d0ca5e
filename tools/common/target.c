#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>
#include <wordexp.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "tc.h"

/* Pipe pair used to hold a -c child before exec: it blocks on go[0] until tc_launch_go. */
static int go_pipe[2] = {-1, -1};
static int err_pipe[2] = {-1, -1};

/* Where liblumalloc.so probably is, for the "start it with LD_PRELOAD=..." hint. */
static const char *suggest_lib(void)
{
    static char buf[PATH_MAX];
    const char *env = getenv("LUMALLOC_LIB");
    if (env && *env && realpath(env, buf))
        return buf;
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n > 0) {
        self[n] = 0;
        char *slash = strrchr(self, '/');
        if (slash) {
            *slash = 0;
            /* build tree (build/tools/alloctop/alloctop -> build/lib) or install (sbin -> lib) */
            static const char *const rel[] = {"/../../lib", "/../lib", "/../lib/x86_64-linux-gnu"};
            for (size_t i = 0; i < sizeof(rel) / sizeof(rel[0]); i++) {
                char cand[PATH_MAX + 64], dir[PATH_MAX];
                snprintf(cand, sizeof(cand), "%s%s", self, rel[i]);
                if (!realpath(cand, dir))
                    continue;
                snprintf(buf, sizeof(buf), "%.4000s/liblumalloc.so", dir);
                if (access(buf, R_OK) == 0)
                    return buf;
            }
        }
    }
    static const char *const std[] = {"/usr/local/lib/liblumalloc.so", "/usr/lib/x86_64-linux-gnu/liblumalloc.so",
                                      "/usr/lib/liblumalloc.so"};
    for (size_t i = 0; i < sizeof(std) / sizeof(std[0]); i++)
        if (access(std[i], R_OK) == 0)
            return std[i];
    return "/path/to/liblumalloc.so";
}

int tc_target_locate(struct tc_target *t, char *err, size_t errlen)
{
    struct tc_map *maps;
    size_t n;
    int r = tc_read_maps(t->pid, &maps, &n);
    if (r) {
        if (r == -ENOENT || r == -ESRCH)
            snprintf(err, errlen, "no such process: %d", (int)t->pid);
        else
            snprintf(err, errlen, "cannot read /proc/%d/maps: %s", (int)t->pid, strerror(-r));
        return -1;
    }
    /* Prefer a library whose name says lumalloc, then any executable mapping that carries the
     * lumalloc USDT notes (static link, or a test double).  The files are opened as mapped
     * (tc_map_open), never by a path alone: that may name the upgraded file that replaced the
     * one mapped, or the host's file of a container's path, and the probes would be attached
     * to a file the process does not run, silently. */
    const struct tc_map *found = NULL;
    int found_fd = -1;
    for (int pass = 0; pass < 2 && !found; pass++) {
        for (size_t i = 0; i < n && !found; i++) {
            if (maps[i].path[0] != '/' || maps[i].perms[2] != 'x')
                continue;
            if (pass == 0 && !strstr(maps[i].path, "liblumalloc"))
                continue;
            int fd = tc_map_open(t->pid, &maps[i], NULL, 0);
            if (fd < 0)
                continue;
            char fdpath[64];
            snprintf(fdpath, sizeof(fdpath), "/proc/self/fd/%d", fd);
            if (tc_elf_has_lumalloc_probes(fdpath)) {
                found = &maps[i];
                found_fd = fd;
            } else {
                close(fd);
            }
        }
    }
    if (!found) {
        char comm[64] = "?";
        tc_read_comm(t->pid, t->pid, comm, sizeof(comm));
        /* an exited process not yet reaped, or a kernel thread, maps nothing: not a matter of
         * LD_PRELOAD */
        if (!tc_proc_task(t->pid) && kill(t->pid, 0) && errno == ESRCH)
            snprintf(err, errlen, "no such process: %d", (int)t->pid); /* gone since its maps were read */
        else if (!tc_proc_task(t->pid))
            snprintf(err, errlen, "process %d has exited (a zombie its parent has not reaped yet)", (int)t->pid);
        else if (tc_is_kernel_thread(t->pid))
            snprintf(err, errlen, "process %d (%s) is a kernel thread: it cannot use lumalloc", (int)t->pid, comm);
        else
            snprintf(err, errlen,
                     "process %d does not use lumalloc (no liblumalloc.so or lumalloc probes mapped); "
                     "start it with LD_PRELOAD=%s",
                     (int)t->pid, suggest_lib());
        free(maps);
        return -1;
    }
    /* The probes are attached through our own descriptor of the file: a /proc/PID/... name
     * would die with the thread it goes through (a leader that left with pthread_exit), and
     * the path with the next upgrade.  libbpf and the kernel's uprobe lookup follow the link. */
    tc_target_close(t);
    t->image = tc_image_id(t->pid);
    t->probe_fd = found_fd + 1;
    snprintf(t->probe_path, sizeof(t->probe_path), "/proc/self/fd/%d", found_fd);
    snprintf(t->map_path, sizeof(t->map_path), "%.4095s", found->path);
    uint64_t sym, bias;
    t->registry_addr = t->batch_addr = t->profile_addr = 0;
    if (tc_elf_load_bias(t->probe_path, found, maps, n, &bias) == 0) {
        if (tc_elf_symbol(t->probe_path, "lumalloc_registry", &sym) == 0)
            t->registry_addr = sym + bias;
        if (tc_elf_symbol(t->probe_path, "lumalloc_batch", &sym) == 0)
            t->batch_addr = sym + bias;
        if (tc_elf_symbol(t->probe_path, "lumalloc_profile", &sym) == 0)
            t->profile_addr = sym + bias;
    }
    free(maps);
    return 0;
}

const char *tc_no_symbol_reason(const struct tc_target *t, const char *what, char *buf, size_t n)
{
    /* liblumalloc.so exports them (.dynsym, which strip keeps) */
    if (!strstr(tc_target_file(t), "liblumalloc") && !tc_elf_has_symtab(t->probe_path)) {
        snprintf(buf, n,
                 "%s is stripped: %s was in its symbol table; run a copy stripped with "
                 "--keep-symbol=lumalloc_registry --keep-symbol=lumalloc_batch --keep-symbol=lumalloc_profile, "
                 "or not stripped",
                 tc_target_file(t), what);
        return buf;
    }
    snprintf(buf, n, "%s does not export %s (a lumalloc from before it?)", tc_target_file(t), what);
    return buf;
}

/* pid: a live task of the target (tc_proc_task): a zombie leader has no memory to read. */
static int read_mem(pid_t pid, uint64_t addr, void *buf, size_t len)
{
    ssize_t r = tc_read_mem(pid, addr, buf, len);
    if (r < 0)
        return (int)r;
    return (size_t)r == len ? 0 : -EFAULT;
}

/* One walk of the thread list: the registry header, then each counters block. */
static int registry_walk(const struct tc_target *t, pid_t task, struct lum_registry_v1 *reg,
                         struct tc_thread **threads, size_t *cap, size_t *n)
{
    int r = read_mem(task, t->registry_addr, reg, sizeof(*reg));
    if (r)
        return r;
    if (reg->magic == 0)
        return -EAGAIN; /* not initialised yet (library constructor still to run) */
    if (reg->magic != LUM_REGISTRY_MAGIC || reg->version != LUM_PROBES_VERSION ||
        reg->counters_size < sizeof(struct lum_thread_counters_v1))
        return -EPROTO;
    size_t len = 0;
    uint64_t a = reg->threads_head;
    /* Bounded walk: a list caught mid-update must not loop forever. */
    for (int guard = 0; a && guard < 100000; guard++) {
        struct lum_thread_counters_v1 c;
        /* A record that cannot be read ends the reading, not the list: records are never freed,
         * so it means the task read through lost its address space (the process exiting: ESRCH
         * from the 3644th of 4201 records, seen).  Taken as the whole list, the newest threads
         * alone would replace the last complete reading, and alloctop's final report, which
         * keeps that reading's figures for the threads past its exit-time bound (the oldest,
         * at the list's end), would drop them. */
        r = read_mem(task, a, &c, sizeof(c));
        if (r)
            return r;
        if (len == *cap || !*threads) {
            size_t nc = *cap ? *cap * 2 : 64;
            struct tc_thread *nt = realloc(*threads, nc * sizeof(**threads));
            if (!nt)
                return -ENOMEM;
            *threads = nt;
            *cap = nc;
        }
        (*threads)[len].addr = a;
        (*threads)[len].c = c;
        len++;
        a = c.next;
    }
    *n = len;
    return 0;
}

int tc_registry_read(const struct tc_target *t, struct lum_registry_v1 *reg, struct tc_thread **threads, size_t *n)
{
    if (!t->registry_addr)
        return -ENOENT;
    size_t cap = *threads ? *n : 0;
    pid_t task = tc_proc_task(t->pid);
    if (!task)
        return -ESRCH;
    /* A thread list that changed during the walk (a thread created, or an exited thread's
     * record folded into the exited totals and reused) may have been read half done: its
     * figures counted twice or not at all.  The registry's generation says so; walk again. */
    for (int attempt = 0;; attempt++) {
        int r = registry_walk(t, task, reg, threads, &cap, n);
        if (r)
            return r;
        uint64_t generation;
        if (read_mem(task, t->registry_addr + offsetof(struct lum_registry_v1, generation), &generation,
                     sizeof(generation)) ||
            generation == reg->generation || attempt == 8)
            return 0;
    }
}

static bool find_in_path(const char *cmd, char *out, size_t outlen)
{
    if (strchr(cmd, '/')) {
        if (!realpath(cmd, out))
            return false;
        return access(out, X_OK) == 0;
    }
    const char *path = getenv("PATH");
    if (!path)
        path = "/usr/local/bin:/usr/bin:/bin";
    char *dup = strdup(path), *save = NULL;
    bool ok = false;
    for (char *d = strtok_r(dup, ":", &save); d && !ok; d = strtok_r(NULL, ":", &save)) {
        char cand[PATH_MAX];
        snprintf(cand, sizeof(cand), "%s/%s", d, cmd);
        if (access(cand, X_OK) == 0 && realpath(cand, out))
            ok = true;
    }
    free(dup);
    (void)outlen;
    return ok;
}

/* Where will the dynamic linker find `needed` for `exe`?  Ask it (LD_TRACE_LOADED_OBJECTS runs
 * only the loader, not the program). */
static bool resolve_needed(const char *exe, const char *needed, char *out, size_t outlen)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC))
        return false;
    pid_t c = fork();
    if (c == 0) {
        dup2(p[1], 1);
        int dn = open("/dev/null", O_WRONLY);
        dup2(dn, 2);
        setenv("LD_TRACE_LOADED_OBJECTS", "1", 1);
        execl(exe, exe, (char *)NULL);
        _exit(127);
    }
    close(p[1]);
    FILE *f = fdopen(p[0], "r");
    char line[PATH_MAX + 64];
    bool ok = false;
    while (f && fgets(line, sizeof(line), f)) {
        char name[PATH_MAX], path[PATH_MAX];
        if (sscanf(line, " %4095s => %4095s", name, path) == 2 && strcmp(name, needed) == 0 && path[0] == '/') {
            ok = realpath(path, out) != NULL;
        }
    }
    if (f)
        fclose(f);
    waitpid(c, NULL, 0);
    (void)outlen;
    return ok;
}

void tc_launch_prepare(struct tc_target *t, const char *cmdline, const char *preload)
{
    wordexp_t we;
    if (wordexp(cmdline, &we, WRDE_NOCMD) != 0 || we.we_wordc == 0)
        tc_die("cannot parse command '%s'", cmdline);
    char exe[PATH_MAX], needed[256];
    if (!find_in_path(we.we_wordv[0], exe, sizeof(exe)))
        tc_die("command not found: %s", we.we_wordv[0]);
    if (!preload || !*preload)
        preload = getenv("LUMALLOC_LIB");
    const char *ldp = getenv("LD_PRELOAD");
    bool set_preload = false;
    if (preload && *preload) {
        if (!realpath(preload, t->probe_path))
            tc_die("preload library not found: %s", preload);
        set_preload = true;
    } else if (tc_elf_has_lumalloc_probes(exe)) {
        snprintf(t->probe_path, sizeof(t->probe_path), "%s", exe);
    } else if (tc_elf_needs(exe, "lumalloc", needed, sizeof(needed)) &&
               resolve_needed(exe, needed, t->probe_path, sizeof(t->probe_path))) {
        /* linked with liblumalloc.so */
    } else if (ldp && strstr(ldp, "lumalloc")) {
        char *dup = strdup(ldp), *save = NULL;
        for (char *tok = strtok_r(dup, ": ", &save); tok; tok = strtok_r(NULL, ": ", &save))
            if (strstr(tok, "lumalloc") && realpath(tok, t->probe_path))
                break;
        free(dup);
    } else {
        tc_die("%s is not linked with lumalloc: use --preload %s or set LUMALLOC_LIB", exe, suggest_lib());
    }
    if (!tc_elf_has_lumalloc_probes(t->probe_path))
        tc_die("%s has no lumalloc USDT probes (.note.stapsdt)", t->probe_path);
    snprintf(t->map_path, sizeof(t->map_path), "%s", t->probe_path);

    if (pipe2(go_pipe, O_CLOEXEC) || pipe2(err_pipe, O_CLOEXEC))
        tc_die("pipe: %s", strerror(errno));
    fflush(NULL);
    pid_t c = fork();
    if (c < 0)
        tc_die("fork: %s", strerror(errno));
    if (c == 0) {
        close(go_pipe[1]);
        close(err_pipe[0]);
        /* The tool holds the command stopped at its first event while it looks at it; killed
         * then (SIGKILL runs no atexit), it would leave it stopped for good: its death sends
         * the SIGCONT instead (a running command ignores it). */
        prctl(PR_SET_PDEATHSIG, SIGCONT);
        char b;
        if (read(go_pipe[0], &b, 1) != 1)
            _exit(126); /* the tool went away before letting us run */
        if (set_preload) {
            char *v;
            if (ldp && *ldp) {
                if (asprintf(&v, "%s:%s", t->probe_path, ldp) < 0)
                    _exit(126);
            } else {
                v = t->probe_path;
            }
            setenv("LD_PRELOAD", v, 1);
        }
        signal(SIGINT, SIG_DFL);
        execv(exe, we.we_wordv);
        int e = errno;
        if (write(err_pipe[1], &e, sizeof(e))) {
        }
        _exit(127);
    }
    close(go_pipe[0]);
    close(err_pipe[1]);
    wordfree(&we);
    t->pid = c;
    t->launched = true;
    t->alive = true;
}

void tc_launch_go(struct tc_target *t)
{
    char b = 'g';
    if (write(go_pipe[1], &b, 1) != 1)
        tc_die("cannot start the command: %s", strerror(errno));
    close(go_pipe[1]);
    int e;
    /* The error pipe closes on a successful exec (CLOEXEC); data means exec failed. */
    if (read(err_pipe[0], &e, sizeof(e)) == sizeof(e)) {
        waitpid(t->pid, NULL, 0);
        tc_die("cannot execute the command: %s", strerror(e));
    }
    close(err_pipe[0]);
}

static pid_t held_pids[64];
static int nheld;

static void release_all_held(void)
{
    for (int i = 0; i < nheld; i++)
        if (held_pids[i] > 0)
            kill(held_pids[i], SIGCONT);
}

void tc_hold_arm(struct tc_target *t, int hold_map_fd)
{
    uint32_t pid = (uint32_t)t->pid;
    uint8_t one = 1;
    if (nheld >= 64 || bpf_map_update_elem(hold_map_fd, &pid, &one, BPF_ANY))
        return;
    if (nheld == 0)
        atexit(release_all_held);
    held_pids[nheld++] = t->pid;
    t->held = true;
}

static char proc_state(pid_t pid)
{
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    char *rp = strrchr(buf, ')');
    return rp && rp[1] == ' ' ? rp[2] : 0;
}

bool tc_hold_ready(struct tc_target *t)
{
    return t->held && t->alive && proc_state(t->pid) == 'T';
}

void tc_hold_release(struct tc_target *t)
{
    if (!t->held)
        return;
    kill(t->pid, SIGCONT);
    t->held = false;
    for (int i = 0; i < nheld; i++)
        if (held_pids[i] == t->pid)
            held_pids[i] = 0;
}

bool tc_target_poll(struct tc_target *t)
{
    if (!t->alive)
        return false;
    if (t->launched) {
        int st;
        pid_t r = waitpid(t->pid, &st, WNOHANG);
        if (r == t->pid) {
            t->alive = false;
            t->exit_status = st;
            return true;
        }
        return false;
    }
    if (!tc_pid_alive(t->pid)) {
        t->alive = false;
        return true;
    }
    return false;
}

pid_t tc_attach_pid(struct tc_target *t)
{
    if (t->pid <= 0)
        return t->pid;
    if (!t->attach_task) {
        pid_t task = tc_proc_task(t->pid);
        t->attach_task = task ? task : t->pid;
    }
    return t->attach_task;
}

bool tc_target_moved(struct tc_target *t)
{
    if (t->pid <= 0 || !t->alive)
        return false;
    /* with no link (every attach failed), the task tried: gone, the attach is tried again */
    pid_t through = t->links_task ? t->links_task : t->attach_task;
    if (!through || (through == t->attach_task && tc_task_alive(t->pid, through)))
        return false;
    if (!tc_proc_task(t->pid))
        return false;
    /* A uprobe attached through a task filters on that task's mm (the kernel compares
     * event->hw.target->mm with the hitting task's), and an exited task has none: every hit in
     * the process's other threads then removes the breakpoint.  Links made through a thread
     * that has exited are dead, whichever thread the later ones went through.  (The PID is no
     * process-wide filter either: it names the leader's task, refused once that is a zombie.) */
    if (!tc_task_alive(t->pid, t->attach_task))
        t->attach_task = 0;
    return true;
}

struct bpf_link *tc_attach_usdt_link(struct tc_target *t, struct bpf_program *prog, const char *probe)
{
    /* The task chosen may exit before or during the attach (perf_event_open: ESRCH; ENOENT from
     * a /proc/TID a libbpf without BPF cookies reads the maps of): another live thread of the
     * process serves as well.  Bounded: threads exiting one after the other, each as it is
     * chosen, would otherwise keep us here. */
    for (int attempt = 0;; attempt++) {
        pid_t task = tc_attach_pid(t);
        struct bpf_link *l = bpf_program__attach_usdt(prog, task, t->probe_path, "lumalloc", probe, NULL);
        if (l) {
            if (!t->links_task)
                t->links_task = task;
            return l;
        }
        int e = errno;
        if ((e != ESRCH && e != ENOENT) || t->pid <= 0 || attempt == 8 || tc_task_alive(t->pid, task)) {
            errno = e;
            return NULL;
        }
        pid_t next = tc_proc_task(t->pid);
        if (!next) {
            errno = ESRCH; /* the process itself is gone */
            return NULL;
        }
        /* The links made through the exited task before this one are dead: links_task still
         * names it, so tc_target_moved says so. */
        t->attach_task = next;
    }
}

int tc_attach_usdt(struct tc_target *t, struct bpf_program *prog, const char *probe, bool optional)
{
    if (t->nlinks >= (int)(sizeof(t->links) / sizeof(t->links[0])))
        return -E2BIG;
    struct bpf_link *l = tc_attach_usdt_link(t, prog, probe);
    if (!l) {
        int e = errno;
        if ((!optional || e == EACCES || e == EPERM) && !t->reattach) {
            tc_die_if_exited(t);
            tc_die("cannot attach to lumalloc:%s in %s (pid %d): %s%s", probe, tc_target_file(t), (int)t->pid,
                   strerror(e), e == EACCES || e == EPERM ? " (run as root)" : "");
        }
        return -e;
    }
    t->links[t->nlinks++] = l;
    return 0;
}

void tc_die_if_exited(const struct tc_target *t)
{
    if (t->pid > 0 && !tc_pid_alive(t->pid))
        tc_die("pid %d exited while %s was attaching", (int)t->pid, tc_prog);
}

void tc_target_close(struct tc_target *t)
{
    if (t->probe_fd > 0)
        close(t->probe_fd - 1);
    t->probe_fd = 0;
}

const char *tc_target_file(const struct tc_target *t)
{
    return t->map_path[0] ? t->map_path : t->probe_path;
}

void tc_detach(struct tc_target *t)
{
    for (int i = 0; i < t->nlinks; i++)
        bpf_link__destroy(t->links[i]);
    t->nlinks = 0;
    t->links_task = 0;
}
