/* Shared internals of the observability side (sampler, profiler tables, reports, failure tools,
 * probes).  Nothing here may allocate through malloc: these run inside the allocator. */
#ifndef LUM_OBS_INTERNAL_H
#define LUM_OBS_INTERNAL_H
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include <pthread.h>
#include "cold_text.h"
#include "hidden.h"
#include "lock.h"
#include "lumalloc_probes.h"
#include "observe.h"

#define LUM_EXPORT __attribute__((visibility("default")))
#define LUM_TLS __attribute__((tls_model("initial-exec")))

/* Set while this thread runs profiler/diagnostics code: allocations made by anything we call
 * (dladdr, the ELF symbol reader, stdio in reports) must not re-enter sampling, warnings or
 * diagnostics. */
extern __thread int lum_obs_busy LUM_TLS;

/* ---- mmap-backed internal memory (obs_arena.c) ---- */
/* Zeroed, 16-byte aligned, never returned except through lum_obs_free_pages. */
void *lum_obs_alloc(size_t size);
/* The same, at an address that is a multiple of align (a power of two, at most 4096). */
void *lum_obs_alloc_aligned(size_t size, size_t align);
/* Page-granular buffers for reports (mmap/munmap directly). */
void *lum_obs_pages(size_t size);
void lum_obs_free_pages(void *p, size_t size);
/* Zeroed hash-table arrays that grow by doubling: under a page from the arena (a small program
 * then adds no page of its own for a table; a grown-out one stays in the arena, less than a
 * page per table in all), a page or more in their own mapping, unmapped when replaced. */
void *lum_obs_table(size_t size);
void lum_obs_free_table(void *p, size_t size);
/* Growable byte buffer over mmap: used by report encoders. */
struct lum_buf {
    char *data;
    size_t len, cap;
    bool failed; /* an mmap failed: the output is truncated */
};
void lum_buf_put(struct lum_buf *b, const void *p, size_t n);
void lum_buf_puts(struct lum_buf *b, const char *s);
void lum_buf_printf(struct lum_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void lum_buf_free(struct lum_buf *b);
/* write(2) the whole buffer, retrying on EINTR/short writes.  0 or -errno. */
int lum_write_all(int fd, const void *p, size_t n);

/* ---- unwinding (unwind.c) ---- */
/* Unwinds the caller's stack into frames[] (innermost first), dropping lumalloc's own frames.
 * hook_ret is __builtin_return_address(0) of the lum_on_* hook the core called.  Returns the
 * depth.  Must be called with lum_obs_busy set. */
uint32_t lum_unwind(uint64_t *frames, uint32_t max, uintptr_t hook_ret);
/* Looks up lumalloc's own code range; from the constructor, outside any malloc. */
void lum_unwind_preload(void);
int lum_obs_thread_start(void *(*fn)(void *), size_t stack, const char *name);
extern LUM_HIDDEN pthread_rwlock_t lum_unwind_fork_lock;
/* The same from a frame of the caller's caller known without unwinding: its code address, and
 * rsp and rbp as they were there (see lum_on_sample).  Skips the context capture and the walk
 * through the innermost frames.  *same (when not NULL) is set to a nonzero value naming the
 * frames stored when this thread's next call with the same max may store exactly these again:
 * a call that sets it to the same value stored the same frames; otherwise to 0. */
uint32_t lum_unwind_from(uint64_t *frames, uint32_t max, uintptr_t ip, uintptr_t sp, uintptr_t bp,
                         uintptr_t hook_ret, uint64_t *same);
uint64_t lum_stack_hash(const uint64_t *frames, uint32_t depth);
/* Cumulative unwinding cost, for lum_prof_get_stats: the unwinds (and their frames) counted with
 * atomic additions, plus those the core's sampling path took from the memo under
 * lum_sampled_lock, counted there with plain ones (unwind_memo.h). */
extern LUM_HIDDEN uint64_t lum_unwind_count, lum_unwind_ns, lum_unwind_frames;
extern LUM_HIDDEN uint64_t lum_unwind_hits_locked, lum_unwind_hit_frames_locked;

/* ---- DWARF call frame information (cfi.c) ---- */
/* How to get from a frame to its caller (x86-64): CFA = (rbp if cfa_rbp, else rsp) + cfa_off,
 * the return address at CFA - 8, rbp saved at CFA + rbp_off (0: unchanged). */
struct lum_cfi_rule {
    int32_t cfa_off;
    int16_t rbp_off;
    bool cfa_rbp;
};
#define LUM_CFI_OK 1
#define LUM_CFI_LAST 0  /* the outermost frame (return address undefined) */
#define LUM_CFI_NONE -1 /* no rule of that form: no tables, signal frame, expressions */
/* The rule of the frame whose code address is the return address ra (looked up at ra - 1).
 * Takes lum_unwind_fork_lock for reading and lum_cfi_lock; no malloc.  Where glibc has
 * _dl_find_object (>= 2.35), never the loader's lock; else dl_iterate_phdr's, and in a fork
 * child no rule is derived (LUM_CFI_NONE). */
int lum_cfi_rule(uintptr_t ra, struct lum_cfi_rule *out);
/* The object file a walk's lookups read its tables from: the rules one walk derives in an
 * object take one open of its file, not one each (bench python: a new stack derives a dozen in
 * the interpreter's binary; an open, with its fstat, build-id read and close, costs ~4 us).
 * Closed by lum_cfi_files_close when the walk ends: a descriptor kept for longer could take a
 * number the program means to get (a daemon closes 0-2 and opens /dev/null as 0).  The
 * lookups hold lum_unwind_fork_lock for reading from the first to the close, so that no fork
 * child inherits the descriptor (a child made without the handlers, by _Fork or a raw clone,
 * still may; a program thread's closefrom meanwhile can take the number away for the rest of
 * the walk, as it could for one lookup before). */
struct lum_cfi_files {
    uintptr_t text_lo, map_lo;
    const void *hdr, *lm;
    uint64_t build; /* the file's build (cfi.c, struct src) */
    int fd;         /* -1: the mapping is read */
    bool locked;    /* lum_unwind_fork_lock held for reading */
};
#define LUM_CFI_FILES_INIT {0, 0, NULL, NULL, 0, -1, false}
int lum_cfi_rule_with(struct lum_cfi_files *files, uintptr_t ra, struct lum_cfi_rule *out);
void lum_cfi_files_close(struct lum_cfi_files *files);
/* A count that moves when an object that rules were derived from is unloaded (or replaced by
 * another at its address): code addresses may mean other code once it moves.  With
 * _dl_find_object, a few lock-free lookups (lum_cfi_lock tried, never waited for); else the
 * loader's unload count, by a dl_iterate_phdr callback that waits for the loader's lock (never
 * call it then holding a lock a free can take: a dlclose frees under the loader's lock), and
 * in a fork child the last count seen.  Not thorough, a look with _dl_find_object compares the
 * objects' bytes (a system call) only if the last look to do so was over 10 ms ago. */
uint64_t lum_cfi_unloads(bool thorough);
/* Whether glibc's _dl_find_object is there to ask (and the program dynamically loaded). */
bool lum_cfi_index_usable(void);
/* The program headers of the object holding pc, by _dl_find_object (no loader lock): false
 * when there is no such object or no _dl_find_object. */
struct dl_phdr_info;
bool lum_cfi_object_info(uintptr_t pc, struct dl_phdr_info *info);
/* The object cache's lock (fork's prepare handler takes it), and the fork child's reset. */
extern LUM_HIDDEN lum_lock_t lum_cfi_lock;
extern LUM_HIDDEN bool lum_cfi_forked;
void lum_cfi_after_fork_child(void);
extern LUM_HIDDEN uint64_t lum_cfi_object_scans;
/* Read the tables from the objects' files where they can (default); false: always through
 * the mapping (tests that damage the tables in memory).  lum_cfi_file_lookups counts the
 * lookups that read the file, lum_cfi_file_opens and lum_cfi_file_reads its opens and reads
 * (tests). */
extern LUM_HIDDEN bool lum_cfi_read_files;
extern LUM_HIDDEN uint64_t lum_cfi_file_lookups, lum_cfi_file_opens, lum_cfi_file_reads;

/* ---- stack table (stacktab.c), all under lum_prof_lock ----
 * except the figures a sample or a sampled free changes (a stack's samples, alloc_* and live_*,
 * lum_prof_samples, lum_prof_sample_frees, lum_records.slot_live and the records in sampled
 * blocks' slots): those are written under the core's lum_sampled_lock, which the core's sampling
 * path and sampled free hold anyway for the sampled block (one lock a sample instead of two).
 * Whoever holds lum_prof_lock takes lum_sampled_lock inside it, never the other way round: the
 * order fork's handlers take them in (ours run before the core's). */
extern LUM_HIDDEN lum_lock_t lum_sampled_lock;
/* The figures a sample and a sampled free change, and the id a sample reads, first, in a
 * 64-aligned record (lum_stacktab_get): one line a sample and one a free, where they straddled
 * two (bench ring under callgrind --cache-sim: ~1 D1 miss a sample and its free less). */
struct lum_stack {
    uint64_t samples;          /* cumulative samples */
    uint64_t alloc_bytes;      /* sum of weights: estimated bytes allocated */
    double alloc_objects;      /* sum of weight/size: estimated objects allocated */
    uint64_t live_samples;
    int64_t live_bytes;
    double live_objects;
    uint64_t id;
    uint32_t depth;
    struct lum_stack *hnext;   /* hash chain */
    struct lum_stack *anext;   /* list of all stacks, for reports */
    uint64_t frames[];
};
extern LUM_HIDDEN lum_lock_t lum_prof_lock;
/* Finds or inserts; NULL when the table or memory is exhausted (counted as dropped). */
struct lum_stack *lum_stacktab_get(const uint64_t *frames, uint32_t depth, uint64_t id);
/* The table's exported root (include/lumalloc_probes.h): head, count, dropped samples. */
extern struct lum_profile_v1 lumalloc_profile;
struct lum_stack *lum_stacktab_first(void);
uint64_t lum_stacktab_count(void);
void lum_stacktab_reset_cumulative(void);

/* ---- live sampled allocations (prof_records.c), all under lum_prof_lock ---- */
struct lum_rec {
    struct lum_rec *next;
    uintptr_t ptr;
    struct lum_sample_rec s;
};
/* Adding, taking and giving back a record: inline, in prof_records.h.  Live: the table's and the
 * records kept in sampled blocks' slots (lum_sample_rec). */
uint64_t lum_records_live(void);
extern LUM_HIDDEN uint64_t lum_records_dropped;

/* ---- sampler (sampler.c) ---- */
double lum_sample_weight(uint64_t size, uint64_t interval);
extern LUM_HIDDEN uint64_t lum_prof_samples, lum_prof_sample_frees;

/* ---- symbolisation (symbolize.c): outside the allocator, or with LUM_SYM_INSIDE ---- */
#define LUM_SYM_OFFSET 1 /* "func+0x1a" rather than "func" */
#define LUM_SYM_DEEP 2   /* may read the object's ELF symbol tables (slower, opens files) */
#define LUM_SYM_MODULE 4 /* append " (libfoo.so)" */
#define LUM_SYM_INSIDE 8 /* inside malloc: no loader lock (no dladdr, no DEEP); exported names
                          * by _dl_find_object and .dynsym, else object+offset, else the address */
/* Writes a function name (or "module+0xoff", or "0xaddr") for the code address addr. */
void lum_symbolize(uintptr_t addr, char *buf, size_t len, unsigned flags);
/* The closest function at or below addr by its object's .symtab/.dynsym (elfsym.c). */
bool lum_elf_proc_name(uintptr_t addr, char *name, size_t len, uint64_t *off);

/* ---- failure tools ---- */
/* The failure report (diagnostics.c): written with write(2) to the diagnostics fd. */
void lum_diag_report(struct lum_thread_counters_v1 *tc, size_t size, size_t alignment, int err,
                     bool injected, const uint64_t *frames, uint32_t depth);
bool lum_fail_in_critical(void);
void lum_failure_init(void);
/* In a fork child: lum_fail_armed counts only the injectors that survived. */
void lum_failure_after_fork_child(void);
void lum_prof_dump_after_fork_child(void);

/* ---- thread list (observe.c): counters blocks seen by lum_on_thread_start ---- */
/* Calls fn for each known thread counters block (registry list if the core exports it). */
void lum_threads_foreach(void (*fn)(const struct lum_thread_counters_v1 *, void *), void *arg);

/* ---- reports (prof_report.c, pprof_encode.c): run outside the allocator ---- */
/* A copy of the stack table taken under lum_prof_lock, so that writers (which symbolise and may
 * allocate through stdio) never hold it. */
struct lum_snap {
    void *mem;
    size_t memsz;
    struct lum_stack **v;
    size_t n;
    uint64_t interval;
};
int lum_snap_take(struct lum_snap *sn);
void lum_snap_free(struct lum_snap *sn);
/* Symbol cache for one report: addr -> name. */
struct lum_symcache;
struct lum_symcache *lum_symcache_new(void);
const char *lum_symcache_get(struct lum_symcache *c, uintptr_t addr, unsigned flags);
void lum_symcache_free(struct lum_symcache *c);
/* Renders a whole profile in format f (enum lum_prof_format, not AUTO) into b. */
int lum_prof_render(struct lum_buf *b, int f);
int lum_pprof_encode(struct lum_buf *out, const struct lum_snap *sn, struct lum_symcache *sc);

/* ---- profile dumping (prof_dump.c) ---- */
void lum_prof_dump_init(void);

#endif
