/* tools/common: what alloctop and allocsnoop share (targets, registry, symbols, output). */
#ifndef LUMALLOC_TOOLS_COMMON_H
#define LUMALLOC_TOOLS_COMMON_H
#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include "lumalloc_probes.h"

struct bpf_program;
struct bpf_link;

/* ---- errors and environment ---------------------------------------------------------------- */
extern const char *tc_prog;
extern int tc_verbose;
/* One clear line on stderr, exit status 1. */
__attribute__((noreturn, format(printf, 1, 2))) void tc_die(const char *fmt, ...);
__attribute__((format(printf, 1, 2))) void tc_warn(const char *fmt, ...);
/* Opens a report file for writing: created 0644 under the invoking user's umask, so a report
 * is never world-writable whatever the umask (tools run as root). */
FILE *tc_open_report(const char *path);
/* Could a report be written at path?  0 or -errno; an existing file is left as it is. */
int tc_check_report_path(const char *path);
/* Sums a per-CPU array map's n counters over the possible CPUs into out[0..n). */
void tc_sum_percpu(int map_fd, uint64_t *out, uint32_t n);
/* Root or CAP_BPF+CAP_PERFMON(+CAP_SYS_PTRACE), BTF, uprobes: dies with the reason if missing. */
void tc_check_environment(void);
/* libbpf messages only with -v: the tools print their own one-line errors. */
void tc_libbpf_quiet(void);
double tc_now(void); /* CLOCK_MONOTONIC seconds */
void tc_json_str(FILE *f, const char *s);
/* Parse "1,2" lists into pids; returns count appended (max cap). Dies on garbage.  A thread ID
 * becomes its process's ID (with a warning), and a PID already listed is not added again: each
 * would attach the probes twice and count every event twice. */
int tc_parse_pids(const char *arg, pid_t *pids, int n, int cap);
/* A number option or argument, whole string, finite, in [min, max]: else one line naming
 * `what` and exit 1 (atof took "nan" and "abc" as numbers). */
double tc_parse_double(const char *what, const char *s, double min, double max);
long tc_parse_long(const char *what, const char *s, long min, long max);
/* getopt_long (with opterr = 0 and a ':' first in optstring) returned c for a bad option or a
 * missing value: one line naming it, exit 1. */
__attribute__((noreturn)) void tc_usage_error(int c, char **argv);
/* Exactly one of -p, -c, -B: else one line and exit 1. */
void tc_need_one_target(int npids, const char *command, const char *binary);
/* fflush(stdout); true once a write has failed or stdout is a pipe whose reader has gone (a
 * reader such as `head`: SIGPIPE is ignored so that the probes are detached on the way out, so
 * the tool must stop by itself, with or without something to write). */
bool tc_stdout_failed(void);
/* A -c command's wait status as the tool's exit status: its code, or 128 + the signal that
 * killed it, as a shell reports it. */
int tc_exit_status(int wait_status);

/* ---- /proc ----------------------------------------------------------------------------------- */
struct tc_map {
    uint64_t start, end, offset, inode, dev;
    char perms[5];
    bool deleted; /* the maps line said " (deleted)": path no longer names this file */
    char path[PATH_MAX]; /* as the process sees it, without " (deleted)" */
};
int tc_read_maps(pid_t pid, struct tc_map **out, size_t *n); /* -errno */
/* Alive while any of its threads is: the leader may have left with pthread_exit. */
bool tc_pid_alive(pid_t pid);
/* An ID to use for /proc/ID/{maps,map_files,root,exe} and process_vm_readv: pid itself, or a
 * live thread of it while its leader is a zombie; 0 when no thread is left. */
pid_t tc_proc_task(pid_t pid);
bool tc_task_alive(pid_t pid, pid_t tid); /* thread tid of process pid runs (not a zombie) */
bool tc_is_kernel_thread(pid_t pid);
/* When the process started (field 22 of /proc/PID/stat, clock ticks since boot), 0 if gone:
 * tells a process from a later one given the same PID. */
uint64_t tc_proc_start_time(pid_t pid);
/* Changes when the process execs (its address space's layout and executable), 0 if gone. */
uint64_t tc_image_id(pid_t pid);
/* Processes (other than us) that map a file once at `path`, deleted since (an upgrade replaced
 * it), not the file dev/ino there now; *example: one of them. */
int tc_old_copy_users(const char *path, uint64_t dev, uint64_t ino, pid_t *example);
/* -B/-b PATH: the probes follow the file now at path; a process started before an upgrade maps
 * the old one, and would be missing with no word: one warning line naming how many and one. */
void tc_warn_old_copy_users(const char *path);
/* Removes a trailing " (deleted)" (maps lines, /proc/PID/exe). */
void tc_strip_deleted(char *path);
/* Opens the file mapping m of process pid maps: through /proc/PID/map_files, else through its
 * path (in the process's mount namespace, then ours) if that still is the same dev/inode.  path
 * (n bytes, may be NULL) receives a name for it that others (libbpf) can open.  fd or -1. */
int tc_map_open(pid_t pid, const struct tc_map *m, char *path, size_t n);
/* The process a thread belongs to (Tgid in /proc/TID/status), or 0 if unknown (no such task). */
pid_t tc_tgid_of(pid_t tid);
int tc_read_comm(pid_t pid, pid_t tid, char *buf, size_t n);
/* process_vm_readv of len bytes at addr in task pid (a live task: tc_proc_task): the bytes
 * read (fewer at the end of a mapping), or -errno when none could be. */
ssize_t tc_read_mem(pid_t pid, uint64_t addr, void *buf, size_t len);
/* bytes, 0 if unknown; *anon (if given): its anonymous part (RSS less file-backed and shmem) */
uint64_t tc_read_rss(pid_t pid, uint64_t *anon);

/* ---- ELF --------------------------------------------------------------------------------------- */
int tc_elf_symbol(const char *path, const char *name, uint64_t *value); /* 0 if found */
bool tc_elf_has_lumalloc_probes(const char *path);
bool tc_elf_has_symtab(const char *path);
/* alloctop -B, allocsnoop -b PATH: its real path in `real` (PATH_MAX bytes), or a one-line
 * error and exit when the file is missing or has no lumalloc probes. */
void tc_resolve_probed_binary(const char *path, char *real);
bool tc_elf_is_dyn(const char *path);
/* Load bias of the ELF file at `path` (opened), mapped as `file` (the same dev/inode as it) in a
 * process's mappings. */
int tc_elf_load_bias(const char *path, const struct tc_map *file, const struct tc_map *maps, size_t n, uint64_t *bias);
/* DT_NEEDED entry containing "lumalloc", if any. */
bool tc_elf_needs(const char *path, const char *substr, char *out, size_t outlen);

/* ---- targets ------------------------------------------------------------------------------------ */
struct tc_target {
    pid_t pid;
    bool launched;           /* started by us with -c (we reap it) */
    bool alive;
    bool held;               /* hold armed, not yet released */
    int exit_status;
    char probe_path[PATH_MAX + 32]; /* liblumalloc.so or the executable holding the probes, as we
                                       open it (maybe /proc/PID/map_files/...) */
    char map_path[PATH_MAX + 32];   /* the same file as the target's maps name it (symbols) */
    int probe_fd;                   /* fd + 1 of the probed file when located, else 0 */
    bool reattach;                  /* attaching again: a failure is returned, not fatal */
    uint64_t registry_addr;  /* 0 until located */
    uint64_t batch_addr;     /* lumalloc_batch (struct lum_batch_info_v1); 0: none, or an older library */
    uint64_t profile_addr;   /* lumalloc_profile (the in-process heap profile); 0 if none */
    pid_t attach_task;       /* the thread the next probes are attached through (tc_attach_pid) */
    pid_t links_task;        /* the thread the first of the live links went through; 0: none */
    uint64_t image;          /* tc_image_id when located: another one means it exec'd since */
    struct bpf_link *links[16];
    int nlinks;
};

/* Find the lumalloc probes and registry in a running process.  Returns 0, or -1 with a message. */
int tc_target_locate(struct tc_target *t, char *err, size_t errlen);
/* Why a located target has no registry_addr (or symbol `what`, e.g. lumalloc_profile), in one
 * line for tc_die: a stripped executable (strip keeps the probe notes, not the symbol table the
 * data symbols of a static link are in), or a library too old to export it. */
const char *tc_no_symbol_reason(const struct tc_target *t, const char *what, char *buf, size_t n);
/* Read the registry header and the thread list.  threads is realloc'd. 0 or -errno: a walk that
 * could not follow the list to its end (the process exiting) is an error, never a shorter list. */
struct tc_thread {
    uint64_t addr;
    struct lum_thread_counters_v1 c;
};
int tc_registry_read(const struct tc_target *t, struct lum_registry_v1 *reg, struct tc_thread **threads,
                     size_t *n);

/* The in-process heap profile (include/lumalloc_probes.h), read without stopping the process:
 * its header, and every stack record with its frames (malloc'd in *out, n of them).  0, or
 * -ENOENT (no lumalloc_profile symbol), -ENODATA (no profile kept: LUMALLOC_PROF=off, or not
 * started), -EPROTO (not a profile this tool reads), -errno of the read (-EPERM: not allowed to
 * read the process's memory).  *truncated: the walk stopped early
 * (the process exiting, a record it could not read, a cycle); the records read are whole. */
struct tc_heap_stack {
    struct lum_profile_stack_v1 rec;
    uint64_t *frames; /* rec.depth of them (NULL when 0) */
};
int tc_profile_read(const struct tc_target *t, struct lum_profile_v1 *hdr, struct tc_heap_stack **out, size_t *n,
                    bool *truncated);
void tc_profile_free(struct tc_heap_stack *v, size_t n);
/* What a tc_profile_read error means, in words for "pid N: <this>". */
const char *tc_profile_strerror(int err);
struct tc_symbolizer;
/* The records by allocation site (first frame outside the allocator) and its caller, summed;
 * sorted by site (tc_heap_site_find), malloc'd in *out.  Returns how many. */
struct tc_heap_site {
    char name[256], caller[256];
    double live, live_objects, alloc; /* estimated bytes and objects: live now, allocated since start */
    uint64_t samples, live_samples;
};
size_t tc_heap_sites(struct tc_symbolizer *sym, pid_t pid, const struct tc_heap_stack *v, size_t n,
                     struct tc_heap_site **out);
const struct tc_heap_site *tc_heap_site_find(const struct tc_heap_site *sites, size_t n, const struct tc_heap_site *key);

/* -c: fork the command stopped before exec; fills t->pid and t->probe_path (the library to
 * preload or the executable holding the probes).  tc_launch_go lets it exec. */
void tc_launch_prepare(struct tc_target *t, const char *cmdline, const char *preload);
void tc_launch_go(struct tc_target *t);
/* -c hold protocol (see maybe_hold in the bpf/ programs): the BPF side stops a launched command at its
 * first event; the tool snapshots it, then tc_hold_release continues it.  tc_hold_arm inserts
 * the pid into the `hold` map; an atexit hook continues held commands if the tool exits first. */
void tc_hold_arm(struct tc_target *t, int hold_map_fd);
/* True if t is held and now stopped: the caller does its work, then calls tc_hold_release. */
bool tc_hold_ready(struct tc_target *t);
void tc_hold_release(struct tc_target *t);
/* Reap/poll: updates t->alive.  Returns true if the state changed to dead. */
bool tc_target_poll(struct tc_target *t);

/* USDT attach of one program to one probe of a target; optional probes may be missing.
 * Returns 0, or -errno (message printed unless optional). */
int tc_attach_usdt(struct tc_target *t, struct bpf_program *prog, const char *probe, bool optional);
/* The same, for a link the caller keeps (and destroys) itself: NULL with errno.  When the thread
 * attached through has exited, another live thread of the process is taken (ESRCH only once no
 * thread is left); the links made before through the exited one are then reported by
 * tc_target_moved. */
struct bpf_link *tc_attach_usdt_link(struct tc_target *t, struct bpf_program *prog, const char *probe);
/* Destroys the links of tc_attach_usdt (a caller's own links are the caller's to destroy, before
 * tc_target_moved is asked again). */
void tc_detach(struct tc_target *t);
/* The pid to attach a target's probes with: a live thread of it (perf_event_open refuses a
 * zombie leader, and a uprobe keeps to the mm of the task it was attached through). */
pid_t tc_attach_pid(struct tc_target *t);
/* True once the thread the probes were attached through has exited while the process lives on
 * (its leader left with pthread_exit), before the attach or during it (the later probes then
 * went through another thread): the caller detaches every link and attaches again. */
bool tc_target_moved(struct tc_target *t);
/* When t's process has exited (while the probes were being attached): one line saying so, exit 1. */
void tc_die_if_exited(const struct tc_target *t);
/* Closes the located file (tc_target_locate keeps it open for the probes). */
void tc_target_close(struct tc_target *t);
/* The probed file's name for messages and symbols (map_path, else probe_path). */
const char *tc_target_file(const struct tc_target *t);

/* ---- symbols -------------------------------------------------------------------------------- */
struct tc_symbolizer;
struct tc_frame {
    const char *name;   /* function (demangled), or "[unknown]" */
    const char *module; /* module path, or NULL */
    uint64_t offset;    /* module-relative address when name is unknown */
    bool alloc_frame;   /* inside the allocator (library module or malloc-family symbol) */
};
struct tc_symbolizer *tc_sym_new(void);
void tc_sym_free(struct tc_symbolizer *s);
/* Snapshot /proc/PID/maps and open its ELF files; later snapshots add new modules.  Call while
 * the process is alive; symbolisation keeps working after it exits. */
void tc_sym_snapshot(struct tc_symbolizer *s, pid_t pid, const char *alloc_module);
/* A process gone: close its files (a tool over many short-lived processes ran out of file
 * descriptors) and move what was resolved of it to the key returned (negative: no process has
 * it), where addresses resolved before still answer and others are "[unknown]".  pid itself is
 * free for the next process to get that PID, which is symbolised afresh. */
pid_t tc_sym_retire(struct tc_symbolizer *s, pid_t pid);
/* Release and forget everything of pid (nothing of it will be resolved again). */
void tc_sym_forget(struct tc_symbolizer *s, pid_t pid);
/* Resolve a return address (looked up at addr-1).  The result is cached and owned by s. */
const struct tc_frame *tc_sym_resolve(struct tc_symbolizer *s, pid_t pid, uint64_t addr);
/* Format "name" or "[unknown] (module+0xoff)" into buf. */
const char *tc_frame_str(const struct tc_frame *f, char *buf, size_t n);
/* First frame outside the allocator (index), or 0. */
unsigned tc_first_user_frame(struct tc_symbolizer *s, pid_t pid, const uint64_t *frames, unsigned depth);
/* An allocation site: the first frame outside the allocator into name, the one that called it
 * into caller ("" if none); "[no stack]" for depth 0. */
void tc_site_names(struct tc_symbolizer *s, pid_t pid, const uint64_t *frames, unsigned depth, char *name,
                   size_t name_len, char *caller, size_t caller_len);

char *tc_demangle(const char *mangled); /* malloc'd, or NULL if not a C++ name */

/* ---- containers -------------------------------------------------------------------------- */
/* u64 -> u64 open-addressing map (key 0 is reserved). */
struct tc_map64 {
    uint64_t *keys, *vals;
    size_t cap, len;
};
uint64_t *tc_map64_get(struct tc_map64 *m, uint64_t key);
uint64_t *tc_map64_put(struct tc_map64 *m, uint64_t key, bool *created);
bool tc_map64_del(struct tc_map64 *m, uint64_t key, uint64_t *val);
void tc_map64_free(struct tc_map64 *m);
uint64_t tc_hash64(uint64_t h, uint64_t v);

/* ---- PID namespaces -------------------------------------------------------------------------- */
/* The library reports thread IDs as its process sees them (gettid): in a container's PID
 * namespace those are not ours.  Maps them through NSpid in /proc/PID/task/TID/status. */
struct tc_tidmap {
    struct tc_map64 host;     /* pid << 32 | namespace tid -> our tid */
    struct tc_map64 other_ns; /* pid -> 1: in our namespace, 2: in another */
    struct tc_map64 scanned;  /* pid -> ms of the last scan of its threads */
};
/* Our TID for thread `tid` as process pid numbers it; tid itself when the process is in our
 * namespace, or when that thread is not found (exited before it was seen). */
pid_t tc_host_tid(struct tc_tidmap *tm, pid_t pid, pid_t tid);
void tc_tidmap_free(struct tc_tidmap *tm);

/* ---- profiles ------------------------------------------------------------------------------- */
/* A stack with its four pprof values: alloc_objects, alloc_space, inuse_objects, inuse_space. */
struct tc_prof_stack {
    pid_t pid;
    unsigned depth;
    const uint64_t *frames; /* innermost first */
    int64_t values[4];
};
/* Uncompressed profile.proto.  0 or -errno. */
int tc_write_pprof(const char *path, struct tc_symbolizer *sym, const struct tc_prof_stack *stacks, size_t n,
                   int64_t duration_ns, int64_t sample_period);
/* Brendan Gregg's folded format, outermost first; value index into values[]. */
int tc_write_folded(const char *path, struct tc_symbolizer *sym, const struct tc_prof_stack *stacks, size_t n,
                    int value_index);

#endif
