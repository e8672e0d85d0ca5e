/* The option table: every tunable in one place (name, type, default, variable, description),
 * read from the environment at start-up and printable with current values.
 *
 * lum_options_init runs during malloc bootstrap, so the parser only uses getenv, plain string
 * scanning and write(2) on a stack buffer: no allocation, no stdio. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <sys/auxv.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "internal.h"
#include "options.h"
#include "obs_internal.h"
#include "lumalloc_options.h"

extern struct lum_registry_v1 lumalloc_registry __attribute__((weak));
/* The core re-draws a thread's next sample point (weak: unit tests of this side link without it). */
void lum_heap_interval_changed(void) __attribute__((weak));
void lum_size_limits_apply(void) __attribute__((weak)); /* the same, for the size limits */
void lum_fail_nth(uint64_t n) __attribute__((weak));

/* 64-aligned: the fields every sample reads (the first four) on one line wherever the linker
 * puts it. */
struct lum_options lum_opt __attribute__((aligned(64))) = {
    .sample_interval = 512 * 1024, .prof_depth = 32, .prof = true,
    .large_threshold = 256 * 1024, .large_cache = 128u << 20,
    .diag = LUM_DIAG_CRITICAL, .decay_ms = 1000, .purge_mode = LUM_PURGE_DONTNEED, .psi = true,
    .unwind_files = true,
};

enum opt_type { T_SIZE, T_UINT, T_BOOL, T_ENUM, T_PATH, T_SIGNAL };

struct opt {
    const char *name;
    const char *env;
    enum opt_type type;
    size_t off;               /* offsetof in struct lum_options */
    unsigned width;           /* sizeof the field, for T_SIZE/T_UINT/T_ENUM */
    const char *def;          /* default, in the same text form a user would write */
    uint64_t max;             /* T_SIZE/T_UINT: larger values are invalid (0: no limit) */
    bool zero_is_off;         /* T_SIZE/T_UINT: "off"/"none" accepted for 0 */
    const char *const *words; /* T_ENUM: names, index = value */
    const char *desc;
};

/* Documented clamps, not errors: a valid value outside [lo, hi] is brought to the nearer end. */
static const struct { size_t off; uint64_t lo, hi; } clamps[] = {
    {offsetof(struct lum_options, prof_depth), 0, LUM_MAX_FRAMES},
    /* pages serve sizes up to LUM_SMALL_MAX, and 1 KiB and less never leave malloc's size
     * slots for the large path */
    {offsetof(struct lum_options, large_threshold), LUM_SMALL_TABLE_MAX, LUM_SMALL_MAX},
};

static uint64_t clamped(const struct opt *o, uint64_t v)
{
    for (size_t i = 0; i < sizeof clamps / sizeof clamps[0]; i++)
        if (clamps[i].off == o->off)
            return v < clamps[i].lo ? clamps[i].lo : v > clamps[i].hi ? clamps[i].hi : v;
    return v;
}

static const char *const diag_words[] = {"none", "critical", "all", NULL};
static const char *const purge_words[] = {"dontneed", "free", NULL};
static const char *const fmt_words[] = {"auto", "text", "folded", "folded-alloc", "pprof", NULL};

#define F(field) offsetof(struct lum_options, field), sizeof(((struct lum_options *)0)->field)
/* What each option does: printed only when asked (LUMALLOC_VERBOSE, lum_options_print), so the
 * text lies in the library's cold read-only mapping (lib/cold_text.ld), not with the names
 * getenv looks up at every start. */
static const char desc_sample_interval[] LUM_COLD_RODATA =
    "mean bytes between Poisson samples of allocations (0/off: no sampling)";
static const char desc_prof[] LUM_COLD_RODATA =
    "unwind sampled allocations and keep in-process profiles";
static const char desc_prof_depth[] LUM_COLD_RODATA = "frames unwound per sample (at most 64)";
static const char desc_prof_dump[] LUM_COLD_RODATA =
    "write the profile to this path at exit (format by extension; %p: the process ID)";
static const char desc_prof_format[] LUM_COLD_RODATA =
    "dump format: auto (.folded/.pb/.txt), text, folded, folded-alloc, pprof";
static const char desc_prof_signal[] LUM_COLD_RODATA =
    "signal that dumps the profile, e.g. USR2 (off: none)";
static const char desc_large_threshold[] LUM_COLD_RODATA =
    "allocations larger than this get their own mapping";
static const char desc_large_warn[] LUM_COLD_RODATA =
    "warn once per call site, with its stack, at or above this size (off: never)";
static const char desc_large_cache[] LUM_COLD_RODATA =
    "bytes of freed large blocks kept resident for reuse";
static const char desc_fail_nth[] LUM_COLD_RODATA =
    "inject a failure into the N-th allocation of the process (off: never)";
static const char desc_diag[] LUM_COLD_RODATA =
    "diagnostics report on allocation failure: none, critical (in critical scopes), all";
static const char desc_abort_on_failure[] LUM_COLD_RODATA =
    "abort() when an allocation fails (injected failures excepted)";
static const char desc_decay_ms[] LUM_COLD_RODATA =
    "free pages are returned to the OS after this many milliseconds";
static const char desc_purge[] LUM_COLD_RODATA =
    "how pages are returned: dontneed (MADV_DONTNEED) or free (MADV_FREE)";
static const char desc_background_purge[] LUM_COLD_RODATA = "purge from a background thread";
static const char desc_psi[] LUM_COLD_RODATA =
    "release free memory at once on a /proc/pressure/memory trigger (all but live threads' own pages)";
static const char desc_thp[] LUM_COLD_RODATA = "MADV_HUGEPAGE on segments";
static const char desc_harden[] LUM_COLD_RODATA =
    "abort on a free lumalloc can tell is invalid (a large block freed twice, an address in its "
    "segments that no allocation returned); the full checks are liblumalloc-hardened.so";
static const char desc_verbose[] LUM_COLD_RODATA = "print the options on stderr at start-up";
static const char desc_unwind_files[] LUM_COLD_RODATA =
    "read unwind tables from the objects' files (off: through their mappings, no open at a sample)";

static const struct opt table[] = {
    {"sample_interval", "LUMALLOC_SAMPLE_INTERVAL", T_SIZE, F(sample_interval), "512k",
     (uint64_t)1 << 40, true, NULL,
     desc_sample_interval},
    {"prof", "LUMALLOC_PROF", T_BOOL, F(prof), "on", 0, false, NULL,
     desc_prof},
    {"prof_depth", "LUMALLOC_PROF_DEPTH", T_UINT, F(prof_depth), "32", 1024, false, NULL,
     desc_prof_depth},
    {"prof_dump", "LUMALLOC_PROF_DUMP", T_PATH, offsetof(struct lum_options, prof_dump), 0, "",
     0, false, NULL, desc_prof_dump},
    {"prof_format", "LUMALLOC_PROF_FORMAT", T_ENUM, F(prof_format), "auto", 0, false, fmt_words,
     desc_prof_format},
    {"prof_signal", "LUMALLOC_PROF_SIGNAL", T_SIGNAL, F(prof_signal), "off", 0, false, NULL,
     desc_prof_signal},
    {"large_threshold", "LUMALLOC_LARGE_THRESHOLD", T_SIZE, F(large_threshold), "256k",
     (uint64_t)1 << 40, false, NULL, desc_large_threshold},
    {"large_warn", "LUMALLOC_LARGE_WARN", T_SIZE, F(large_warn), "off", 0, true, NULL,
     desc_large_warn},
    {"large_cache", "LUMALLOC_LARGE_CACHE", T_SIZE, F(large_cache), "128m", 0, true, NULL,
     desc_large_cache},
    {"fail_nth", "LUMALLOC_FAIL_NTH", T_UINT, F(fail_nth), "off", 0, true, NULL,
     desc_fail_nth},
    {"diag", "LUMALLOC_DIAG", T_ENUM, F(diag), "critical", 0, false, diag_words,
     desc_diag},
    {"abort_on_failure", "LUMALLOC_ABORT_ON_FAILURE", T_BOOL, F(abort_on_failure), "off", 0,
     false, NULL, desc_abort_on_failure},
    {"decay_ms", "LUMALLOC_DECAY_MS", T_UINT, F(decay_ms), "1000", 0, false, NULL,
     desc_decay_ms},
    {"purge", "LUMALLOC_PURGE", T_ENUM, F(purge_mode), "dontneed", 0, false, purge_words,
     desc_purge},
    {"background_purge", "LUMALLOC_BACKGROUND_PURGE", T_BOOL, F(background_purge), "off", 0,
     false, NULL, desc_background_purge},
    {"psi", "LUMALLOC_PSI", T_BOOL, F(psi), "on", 0, false, NULL,
     desc_psi},
    {"thp", "LUMALLOC_THP", T_BOOL, F(thp), "off", 0, false, NULL,
     desc_thp},
    {"harden", "LUMALLOC_HARDEN", T_BOOL, F(harden), "off", 0, false, NULL,
     desc_harden},
    {"verbose", "LUMALLOC_VERBOSE", T_BOOL, F(verbose), "off", 0, false, NULL,
     desc_verbose},
    {"unwind_files", "LUMALLOC_UNWIND_FILES", T_BOOL, F(unwind_files), "on", 0, false, NULL,
     desc_unwind_files},
};
#undef F
#define NOPT (sizeof table / sizeof table[0])

static bool reported[NOPT];
#define PATH_BYTES 4096

/* ---- parsing: pure functions on the text, no allocation ---- */

static bool parse_u64(const char *s, uint64_t *out, const char **end)
{
    if (*s < '0' || *s > '9')
        return false;
    uint64_t v = 0;
    for (; *s >= '0' && *s <= '9'; s++) {
        if (v > (UINT64_MAX - (uint64_t)(*s - '0')) / 10)
            return false;
        v = v * 10 + (uint64_t)(*s - '0');
    }
    *out = v;
    *end = s;
    return true;
}

/* strcasecmp's and strncasecmp's work for the ASCII words options take (the C locale's, the
 * only one at start-up): libc's run in code (its vector versions near the end of its text) and
 * read a table (in its read-only data) that a program may never touch, each a 64 KiB window of
 * libc made resident by the first option given.  n: the bytes of word to compare, or
 * SIZE_MAX for the whole of both. */
static bool same_word(const char *s, const char *word, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char a = (unsigned char)s[i], b = (unsigned char)word[i];
        if ((unsigned)(a - 'A') < 26u) a += 'a' - 'A';
        if ((unsigned)(b - 'A') < 26u) b += 'a' - 'A';
        if (a != b) return false;
        if (!a) return true;
    }
    return true;
}
#define same_ci(s, word) same_word(s, word, SIZE_MAX)

static bool is_off_word(const char *s)
{
    return same_ci(s, "off") || same_ci(s, "none") || same_ci(s, "no") || same_ci(s, "false") ||
           same_ci(s, "disabled");
}

static bool parse_size(const char *s, bool zero_is_off, uint64_t *out)
{
    if (zero_is_off && is_off_word(s)) {
        *out = 0;
        return true;
    }
    uint64_t v;
    const char *e;
    if (!parse_u64(s, &v, &e))
        return false;
    unsigned shift = 0;
    switch (*e) {
    case 'k': case 'K': shift = 10; e++; break;
    case 'm': case 'M': shift = 20; e++; break;
    case 'g': case 'G': shift = 30; e++; break;
    case 't': case 'T': shift = 40; e++; break;
    }
    /* 512k, 512kb, 512KiB and 4096b are all accepted: people write all of them. */
    if (shift && (*e == 'i' || *e == 'I'))
        e++;
    if (*e == 'b' || *e == 'B')
        e++;
    if (*e)
        return false;
    if (shift && v > (UINT64_MAX >> shift))
        return false;
    *out = v << shift;
    return true;
}

static bool parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"on", "1", "yes", "true", "enable", "enabled"};
    static const char *const no[] = {"off", "0", "no", "false", "disable", "disabled"};
    for (size_t i = 0; i < sizeof yes / sizeof *yes; i++) {
        if (same_ci(s, yes[i])) {
            *out = true;
            return true;
        }
        if (same_ci(s, no[i])) {
            *out = false;
            return true;
        }
    }
    return false;
}

static const struct { const char *name; int sig; } signames[] = {
    {"HUP", SIGHUP}, {"INT", SIGINT}, {"QUIT", SIGQUIT}, {"USR1", SIGUSR1}, {"USR2", SIGUSR2},
    {"ALRM", SIGALRM}, {"TERM", SIGTERM}, {"CHLD", SIGCHLD}, {"CONT", SIGCONT},
    {"TTIN", SIGTTIN}, {"TTOU", SIGTTOU}, {"URG", SIGURG}, {"XCPU", SIGXCPU},
    {"XFSZ", SIGXFSZ}, {"VTALRM", SIGVTALRM}, {"PROF", SIGPROF}, {"WINCH", SIGWINCH},
    {"IO", SIGIO}, {"PWR", SIGPWR}, {"SYS", SIGSYS},
};

static bool parse_signal(const char *s, int *out)
{
    if (is_off_word(s)) {
        *out = 0;
        return true;
    }
    uint64_t v;
    const char *e;
    if (parse_u64(s, &v, &e)) {
        /* SIGKILL/SIGSTOP cannot be caught; synchronous fault signals must not be hijacked;
         * glibc keeps the numbers between the classic signals and SIGRTMIN (32, 33) for
         * itself and refuses a handler there. */
        if (*e || v > (uint64_t)SIGRTMAX || (v >= 32 && v < (uint64_t)SIGRTMIN) || v == SIGKILL ||
            v == SIGSTOP || v == SIGSEGV || v == SIGBUS || v == SIGFPE || v == SIGILL || v == SIGABRT ||
            v == SIGTRAP)
            return false;
        *out = (int)v;
        return true;
    }
    if (same_word(s, "SIG", 3))
        s += 3;
    for (size_t i = 0; i < sizeof signames / sizeof *signames; i++) {
        if (same_ci(s, signames[i].name)) {
            *out = signames[i].sig;
            return true;
        }
    }
    if (same_word(s, "RTMIN+", 6) && parse_u64(s + 6, &v, &e) && !*e &&
        v <= (uint64_t)(SIGRTMAX - SIGRTMIN)) {
        *out = SIGRTMIN + (int)v;
        return true;
    }
    return false;
}

static void store_uint(void *field, unsigned width, uint64_t v)
{
    switch (width) {
    case 1: *(uint8_t *)field = (uint8_t)v; break;
    case 2: *(uint16_t *)field = (uint16_t)v; break;
    case 4: *(uint32_t *)field = (uint32_t)v; break;
    default: *(uint64_t *)field = v; break;
    }
}

static uint64_t load_uint(const void *field, unsigned width)
{
    switch (width) {
    case 1: return *(const uint8_t *)field;
    case 2: return *(const uint16_t *)field;
    case 4: return *(const uint32_t *)field;
    default: return *(const uint64_t *)field;
    }
}

/* Parses text for option o and stores it in *opts only when valid.  Warm text, with the parsers
 * it calls (lib/CMakeLists.txt): every process given an option runs it, and as cold text it made
 * the cold text and read-only data mappings resident besides the warm one parse_u64 is in (bench
 * churn, LUMALLOC_SAMPLE_INTERVAL=0: liblumalloc Rss 103 -> 74 KiB, mean of 16 runs). */
static bool apply(const struct opt *o, const char *text, struct lum_options *opts)
{
    void *field = (char *)opts + o->off;
    uint64_t v;
    switch (o->type) {
    case T_SIZE:
        if (!parse_size(text, o->zero_is_off, &v) || (o->max && v > o->max))
            return false;
        store_uint(field, o->width, clamped(o, v));
        return true;
    case T_UINT: {
        const char *e;
        if (o->zero_is_off && is_off_word(text))
            v = 0;
        else if (!parse_u64(text, &v, &e) || *e)
            return false;
        if ((o->max && v > o->max) || (o->width < 8 && v >> (o->width * 8)))
            return false;
        store_uint(field, o->width, clamped(o, v));
        return true;
    }
    case T_BOOL: {
        bool b;
        if (!parse_bool(text, &b))
            return false;
        *(bool *)field = b;
        return true;
    }
    case T_ENUM:
        for (unsigned i = 0; o->words[i]; i++) {
            if (same_ci(text, o->words[i])) {
                store_uint(field, o->width, i);
                return true;
            }
        }
        return false;
    case T_PATH: {
        size_t n = strlen(text);
        if (n >= PATH_BYTES)
            return false;
        /* A copy (the environment may be changed by the program later) in metadata memory:
         * as a 4 KiB static buffer it sat among the hot variables in .bss and cost every
         * process one more resident page.  A path replaced later is not freed: a dump may
         * be reading it. */
        char *copy = NULL;
        if (n) {
            if (!(copy = lum_meta_alloc(n + 1)))
                return false;
            memcpy(copy, text, n + 1);
        }
        *(const char **)field = copy;
        return true;
    }
    case T_SIGNAL: {
        int sig;
        if (!parse_signal(text, &sig))
            return false;
        *(int *)field = sig;
        return true;
    }
    }
    return false;
}

static void accepted_forms(const struct opt *o, char *buf, size_t len)
{
    switch (o->type) {
    case T_SIZE:
        snprintf(buf, len, "a size in bytes with an optional k/m/g/t suffix (e.g. 512k, 4m)%s",
                 o->zero_is_off ? ", or off" : "");
        break;
    case T_UINT:
        if (o->max)
            snprintf(buf, len, "an integer from 0 to %llu%s", (unsigned long long)o->max,
                     o->zero_is_off ? ", or off" : "");
        else
            snprintf(buf, len, "a non-negative integer%s", o->zero_is_off ? ", or off" : "");
        break;
    case T_BOOL:
        snprintf(buf, len, "on/off, yes/no, true/false, 1/0");
        break;
    case T_ENUM: {
        size_t n = 0;
        buf[0] = 0;
        for (unsigned i = 0; o->words[i] && n < len; i++)
            n += (size_t)snprintf(buf + n, len - n, "%s%s", i ? ", " : "one of ", o->words[i]);
        break;
    }
    case T_PATH:
        snprintf(buf, len, "a file path shorter than %d bytes", PATH_BYTES);
        break;
    case T_SIGNAL:
        snprintf(buf, len, "a catchable signal name or number (e.g. USR2, SIGUSR1, 12, "
                           "RTMIN+1), or off");
        break;
    }
}

LUM_COLD_TEXT static void report_bad(size_t i, const char *text)
{
    if (reported[i])
        return;
    reported[i] = true;
    const struct opt *o = &table[i];
    char forms[256], msg[768];
    accepted_forms(o, forms, sizeof forms);
    int n = snprintf(msg, sizeof msg,
                     "lumalloc: bad value '%.64s' for %s (option %s): expected %s; "
                     "keeping the default '%s'\n",
                     text, o->env, o->name, forms, o->def);
    if (n > 0)
        lum_write_all(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
}

static void print_options_fd(int fd);

void lum_options_init(void)
{
    /* A setuid or setgid program (or one with file capabilities) runs with its caller's
     * environment: LUMALLOC_PROF_DUMP would have it create or truncate any file as its owner,
     * LUMALLOC_PROF_SIGNAL write them on demand.  As glibc does with its malloc tunables, the
     * variables are ignored there; lum_options_set still works. */
    if (getauxval(AT_SECURE))
        return;
    for (size_t i = 0; i < NOPT; i++) {
        const char *v = getenv(table[i].env);
        if (!v)
            continue;
        if (!apply(&table[i], v, &lum_opt)) {
            report_bad(i, v);
            apply(&table[i], table[i].def, &lum_opt);
        }
    }
    /* Once: init may run twice at start-up (the allocator's bootstrap and the profile dumper's
     * constructor, whichever comes first). */
    static bool printed;
    if (lum_opt.verbose && !printed) {
        printed = true;
        print_options_fd(2);
    }
}

static const struct opt *find(const char *name)
{
    for (size_t i = 0; i < NOPT; i++)
        if (!strcmp(name, table[i].name) || !strcmp(name, table[i].env))
            return &table[i];
    return NULL;
}

/* The options API (set, get, print) is cold text: a program calls it once or twice, if ever
 * (its bytes, and the failure injectors', kept the warm text within 8 pages when heap_caches_off
 * joined it). */
LUM_EXPORT LUM_COLD_TEXT int lum_options_set(const char *name, const char *value)
{
    const struct opt *o = name ? find(name) : NULL;
    if (!o)
        return -ENOENT;
    if (!value)
        return -EINVAL;
    /* Parse into a copy so a bad value changes nothing. */
    struct lum_options tmp = lum_opt;
    if (!apply(o, value, &tmp))
        return -EINVAL;
    memcpy((char *)&lum_opt + o->off, (char *)&tmp + o->off,
           o->type == T_PATH ? sizeof(char *) : o->type == T_BOOL ? sizeof(bool)
           : o->type == T_SIGNAL ? sizeof(int) : o->width);
    if (o->off == offsetof(struct lum_options, sample_interval)) {
        /* Tools read the interval from the registry to scale what they see. */
        if (&lumalloc_registry)
            __atomic_store_n(&lumalloc_registry.sample_interval, lum_opt.sample_interval,
                             __ATOMIC_RELAXED);
        /* Every thread's next sample point was drawn with the old interval: the calling
         * thread draws again at its next allocation, the others at their next point (at most
         * LUM_SAMPLE_RECHECK away) or slow-path visit, none of them sampling at the old one. */
        if (lum_heap_interval_changed)
            lum_heap_interval_changed();
    }
    /* as LUMALLOC_FAIL_NTH at start-up, counting from now (lumalloc_failure.h) */
    if (o->off == offsetof(struct lum_options, fail_nth) && lum_fail_nth)
        lum_fail_nth(lum_opt.fail_nth);
    /* which sizes malloc's fast path serves */
    if ((o->off == offsetof(struct lum_options, large_threshold) ||
         o->off == offsetof(struct lum_options, large_warn)) && lum_size_limits_apply)
        lum_size_limits_apply();
    return 0;
}

/* ---- printing ---- */

static void format_size(uint64_t v, char *buf, size_t len)
{
    static const char suf[] = "kmgt";
    int s = -1;
    while (v && (v & 1023) == 0 && s < 3) {
        v >>= 10;
        s++;
    }
    if (s >= 0)
        snprintf(buf, len, "%llu%c", (unsigned long long)v, suf[s]);
    else
        snprintf(buf, len, "%llu", (unsigned long long)v);
}

LUM_COLD_TEXT static void format_value(const struct opt *o, char *buf, size_t len)
{
    const void *field = (const char *)&lum_opt + o->off;
    switch (o->type) {
    case T_SIZE: {
        uint64_t v = load_uint(field, o->width);
        if (!v && o->zero_is_off)
            snprintf(buf, len, "off");
        else
            format_size(v, buf, len);
        break;
    }
    case T_UINT: {
        uint64_t v = load_uint(field, o->width);
        if (!v && o->zero_is_off)
            snprintf(buf, len, "off");
        else
            snprintf(buf, len, "%llu", (unsigned long long)v);
        break;
    }
    case T_BOOL:
        snprintf(buf, len, "%s", *(const bool *)field ? "on" : "off");
        break;
    case T_ENUM: {
        uint64_t v = load_uint(field, o->width);
        unsigned n = 0;
        while (o->words[n])
            n++;
        snprintf(buf, len, "%s", v < n ? o->words[v] : "?");
        break;
    }
    case T_PATH: {
        const char *p = *(const char *const *)field;
        snprintf(buf, len, "%s", p ? p : "");
        break;
    }
    case T_SIGNAL: {
        int sig = *(const int *)field;
        if (!sig) {
            snprintf(buf, len, "off");
            break;
        }
        for (size_t i = 0; i < sizeof signames / sizeof *signames; i++) {
            if (signames[i].sig == sig) {
                snprintf(buf, len, "%s", signames[i].name);
                return;
            }
        }
        snprintf(buf, len, "%d", sig);
        break;
    }
    }
}

LUM_COLD_TEXT static void format_table(struct lum_buf *b)
{
    lum_buf_printf(b, "%-18s %-28s %-12s %-10s %s\n", "option", "variable", "value", "default",
                   "description");
    for (size_t i = 0; i < NOPT; i++) {
        char val[4200];
        format_value(&table[i], val, sizeof val);
        lum_buf_printf(b, "%-18s %-28s %-12s %-10s ", table[i].name, table[i].env, val,
                       table[i].def[0] ? table[i].def : "(unset)");
        lum_buf_puts(b, table[i].desc); /* may exceed lum_buf_printf's line limit */
        lum_buf_puts(b, "\n");
    }
}

LUM_COLD_TEXT static void json_string(struct lum_buf *b, const char *s)
{
    lum_buf_puts(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            lum_buf_printf(b, "\\%c", c);
        else if (c < 0x20)
            lum_buf_printf(b, "\\u%04x", c);
        else
            lum_buf_put(b, s, 1);
    }
    lum_buf_puts(b, "\"");
}

LUM_COLD_TEXT static void format_json(struct lum_buf *b)
{
    lum_buf_puts(b, "{\"options\":[");
    for (size_t i = 0; i < NOPT; i++) {
        const struct opt *o = &table[i];
        const void *field = (const char *)&lum_opt + o->off;
        char val[4200];
        format_value(o, val, sizeof val);
        lum_buf_puts(b, i ? ",\n{" : "\n{");
        lum_buf_puts(b, "\"name\":");
        json_string(b, o->name);
        lum_buf_puts(b, ",\"env\":");
        json_string(b, o->env);
        lum_buf_puts(b, ",\"value\":");
        /* Numbers and booleans as JSON values, so scripts need no parsing of suffixes. */
        if (o->type == T_SIZE || o->type == T_UINT)
            lum_buf_printf(b, "%llu", (unsigned long long)load_uint(field, o->width));
        else if (o->type == T_BOOL)
            lum_buf_puts(b, *(const bool *)field ? "true" : "false");
        else if (o->type == T_SIGNAL)
            lum_buf_printf(b, "%d", *(const int *)field);
        else
            json_string(b, val);
        lum_buf_puts(b, ",\"text\":");
        json_string(b, val);
        lum_buf_puts(b, ",\"default\":");
        json_string(b, o->def);
        lum_buf_puts(b, ",\"description\":");
        json_string(b, o->desc);
        lum_buf_puts(b, "}");
    }
    lum_buf_puts(b, "\n]}\n");
}

static void print_options_fd(int fd)
{
    struct lum_buf b = {0};
    format_table(&b);
    if (b.len)
        lum_write_all(fd, b.data, b.len);
    lum_buf_free(&b);
}

LUM_EXPORT LUM_COLD_TEXT void lum_options_print(FILE *f)
{
    struct lum_buf b = {0};
    format_table(&b);
    fwrite(b.data, 1, b.len, f);
    lum_buf_free(&b);
}

LUM_EXPORT LUM_COLD_TEXT void lum_options_print_json(FILE *f)
{
    struct lum_buf b = {0};
    format_json(&b);
    fwrite(b.data, 1, b.len, f);
    lum_buf_free(&b);
}

LUM_EXPORT LUM_COLD_TEXT int lum_options_get(const char *name, char *buf, size_t len)
{
    const struct opt *o = name ? find(name) : NULL;
    if (!o)
        return -ENOENT;
    if (buf && len)
        format_value(o, buf, len);
    return 0;
}
