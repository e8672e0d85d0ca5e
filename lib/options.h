/* The option table's values.  Defaults are static initialisers (options.c), so the allocator is
 * usable before lum_options_init() has read the environment. */
#ifndef LUM_OPTIONS_H
#define LUM_OPTIONS_H
#include <stdint.h>
#include <stdbool.h>
#include "hidden.h"

enum lum_diag_mode { LUM_DIAG_NONE = 0, LUM_DIAG_CRITICAL = 1, LUM_DIAG_ALL = 2 };
enum lum_purge_mode { LUM_PURGE_DONTNEED = 0, LUM_PURGE_FREE = 1 };
/* Same values as LUM_PROF_* in include/lumalloc_prof.h. */
enum lum_prof_fmt { LUM_FMT_AUTO = 0, LUM_FMT_TEXT = 1, LUM_FMT_FOLDED = 2,
                       LUM_FMT_FOLDED_ALLOC = 3, LUM_FMT_PPROF = 4 };

struct lum_options {
    uint64_t sample_interval;   /* LUMALLOC_SAMPLE_INTERVAL, bytes, 0 = off (512k) */
    uint32_t prof_depth;        /* LUMALLOC_PROF_DEPTH (32), clamped to LUM_MAX_FRAMES */
    bool prof;                  /* LUMALLOC_PROF: keep in-process sample records (on) */
    /* Here, beside the three above: every sample reads these four, and they were on two cache
     * lines (large_warn at offset 40), each a miss at every sample (bench ring, callgrind). */
    uint64_t large_warn;        /* LUMALLOC_LARGE_WARN: warn once per site at/above (0 = off) */
    const char *prof_dump;      /* LUMALLOC_PROF_DUMP: path written at exit (unset) */
    int prof_signal;            /* LUMALLOC_PROF_SIGNAL: signal that dumps the profile (0 = none) */
    enum lum_prof_fmt prof_format; /* LUMALLOC_PROF_FORMAT: dump format (auto: by extension) */
    uint64_t large_threshold;   /* LUMALLOC_LARGE_THRESHOLD: own mapping above (256k) */
    uint64_t large_cache;       /* LUMALLOC_LARGE_CACHE: bytes of freed large mappings kept (128m) */
    uint64_t fail_nth;          /* LUMALLOC_FAIL_NTH: fail the N-th allocation (0 = off) */
    enum lum_diag_mode diag;    /* LUMALLOC_DIAG: report on failure none/critical/all (critical) */
    bool abort_on_failure;      /* LUMALLOC_ABORT_ON_FAILURE (off) */
    uint64_t decay_ms;          /* LUMALLOC_DECAY_MS: free pages purged after this delay (1000) */
    enum lum_purge_mode purge_mode; /* LUMALLOC_PURGE: dontneed|free (dontneed) */
    bool background_purge;      /* LUMALLOC_BACKGROUND_PURGE: purger thread (off) */
    bool psi;                   /* LUMALLOC_PSI: purge on memory pressure (on) */
    bool thp;                   /* LUMALLOC_THP: MADV_HUGEPAGE on segments (off) */
    bool harden;                /* LUMALLOC_HARDEN: runtime hardening checks (off) */
    bool verbose;               /* LUMALLOC_VERBOSE: print options at start-up (off) */
    bool unwind_files;          /* LUMALLOC_UNWIND_FILES: unwind tables read from files (on) */
};

extern LUM_HIDDEN struct lum_options lum_opt;

/* A request at or above LUMALLOC_LARGE_WARN, which is 0 when off: large_warn - 1 wraps to the
 * largest value then, so one compare answers both. */
static inline bool lum_warns_large(uint64_t requested)
{
    return requested > lum_opt.large_warn - 1;
}

/* Reads LUMALLOC_* from the environment.  Runs during bootstrap: must not allocate.  A bad
 * value is reported once per option on stderr (write(2)) and the default is kept.  May be
 * called again (tests): it re-reads the environment. */
void lum_options_init(void);

/* Sets one option by name ("sample_interval") or variable ("LUMALLOC_SAMPLE_INTERVAL") from its
 * text form.  0, -ENOENT (unknown name) or -EINVAL (bad value: nothing changed, nothing
 * printed).  Public as lum_options_set in lumalloc_options.h. */
int lum_options_set(const char *name, const char *value);

#endif
