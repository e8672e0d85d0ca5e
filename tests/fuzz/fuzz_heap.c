/* libFuzzer harness for lumalloc: the input is a program of allocation operations over a table of
 * live blocks.  Every block is filled with a pattern derived from its own seed and checked when it
 * is reallocated or freed; results are checked against the API's promises (alignment, usable size
 * at least the request, calloc zeroed, realloc keeps the prefix, impossible sizes give NULL and
 * ENOMEM, bad alignments EINVAL), and lum_heap_check() must find nothing, periodically and after
 * every input (when the table is empty again).  Any violation calls abort(), which libFuzzer
 * reports with the input that caused it.
 *
 * Built by tests/integration/core_fuzz.sh (short CI run) and scripts/fuzz.sh (long runs) with
 * clang -fsanitize=fuzzer,undefined, the allocator's sources compiled into the same executable
 * with -fsanitize=fuzzer-no-link,undefined (coverage-guided inside the allocator).  The harness
 * calls the lum_* API; since the allocator's objects also define malloc/free, libFuzzer's own
 * allocations go through lumalloc as well (the process allocator is lumalloc).
 *
 * Input format: a sequence of records, each an opcode byte followed by the bytes its operands
 * need (missing bytes read as zero). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lumalloc.h"
#include "lumalloc_options.h"

#define SLOTS 64
#define LIVE_LIMIT (96u << 20) /* total requested bytes live at once */

struct slot {
    unsigned char *p;
    size_t n, usable, align;
    uint64_t seed;
    int aligned_alloc; /* made by aligned_alloc: free_aligned_sized allowed */
};

static struct slot slots[SLOTS];
static size_t live;
static uint64_t seed_counter;

struct in { const uint8_t *d; size_t n, i; };
static unsigned u8(struct in *in) { return in->i < in->n ? in->d[in->i++] : 0; }
static unsigned u16(struct in *in) { unsigned a = u8(in); return a | u8(in) << 8; }

#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "fuzz_heap: " __VA_ARGS__); fputc('\n', stderr); abort(); } } while (0)

static inline unsigned char pat(uint64_t seed, size_t i) { return (unsigned char)((seed >> (i & 31)) + i * 131 + (i >> 8)); }

/* Large blocks: pattern on the first and last 4 KiB and one byte per 4 KiB in between. */
static void fill(struct slot *s, size_t from)
{
    size_t n = s->usable;
    for (size_t i = from; i < n; i++) {
        if (i >= 4096 && i + 4096 < n && (i & 4095)) { i |= 4095; continue; }
        s->p[i] = pat(s->seed, i);
    }
}

static void verify(const struct slot *s, size_t upto)
{
    for (size_t i = 0; i < upto; i++) {
        if (i >= 4096 && i + 4096 < s->usable && (i & 4095)) { i |= 4095; continue; }
        CHECK(s->p[i] == pat(s->seed, i), "block %p (size %zu) corrupt at byte %zu", (void *)s->p, s->n, i);
    }
}

static size_t decode_size(struct in *in)
{
    unsigned k = u8(in);
    unsigned v = u16(in);
    switch (k % 16) {
    case 0: case 1: case 2: case 3: case 4: return v % 129;        /* tiny */
    case 5: case 6: case 7: case 8: return v % 8193;               /* small */
    case 9: case 10: return (size_t)v * 4;                         /* up to 256 KiB */
    case 11: return (256u << 10) - 64 + v % 128;                   /* around the large threshold */
    case 12: return (size_t)v * 64;                                /* up to 4 MiB */
    case 13: return ((size_t)1 << (v % 23)) + (v >> 8) % 3 - 1;    /* powers of two, +-1 */
    case 14: return 0;
    default: return (size_t)-1 - v;                                /* impossible */
    }
}

static size_t decode_align(struct in *in)
{
    unsigned a = u8(in);
    if (a >= 240) return (size_t)a * 3;        /* not a power of two (or 720...) */
    return (size_t)1 << (a % 21);              /* 1 B .. 1 MiB */
}

static int is_pow2(size_t a) { return a && !(a & (a - 1)); }

static void drop(struct slot *s, unsigned how)
{
    if (!s->p) return;
    verify(s, s->usable);
    if (how == 1 && !s->aligned_alloc && !s->align) lum_free_sized(s->p, s->n);
    else if (how == 1 && s->aligned_alloc) lum_free_aligned_sized(s->p, s->align, s->n);
    else lum_free(s->p);
    live -= s->n;
    memset(s, 0, sizeof *s);
}

static void took(struct slot *s, void *p, size_t n, size_t align, int zeroed)
{
    CHECK(((uintptr_t)p & 15) == 0, "%p not 16-byte aligned", p);
    if (align > 16) CHECK(((uintptr_t)p & (align - 1)) == 0, "%p not %zu-aligned", p, align);
    size_t u = lum_malloc_usable_size(p);
    CHECK(u >= n, "usable size %zu below the request %zu", u, n);
    if (zeroed)
        for (size_t i = 0; i < n; i++) {
            if (i >= 4096 && i + 4096 < n && (i & 4095)) { i |= 4095; continue; }
            CHECK(((unsigned char *)p)[i] == 0, "calloc block %p not zero at %zu", p, i);
        }
    s->p = p;
    s->n = n;
    s->usable = u;
    s->align = align > 16 ? align : 0;
    s->seed = ++seed_counter * 0x9e3779b97f4a7c15ULL;
    live += n;
    fill(s, 0);
}

static int fits(size_t n) { return n <= LIVE_LIMIT && live + n <= LIVE_LIMIT; }

static void expect_enomem(void *p, size_t n)
{
    CHECK(p == NULL, "impossible size %zu gave %p", n, p);
    CHECK(errno == ENOMEM, "impossible size %zu: errno %d, not ENOMEM", n, errno);
}

static int options_changed;
static char initial_interval[32];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!initial_interval[0])
        CHECK(lum_options_get("sample_interval", initial_interval, sizeof initial_interval) == 0, "sample_interval unreadable");
    struct in in = {data, size, 0};
    unsigned ops = 0;
    while (in.i < in.n && ops < 4096) {
        unsigned op = u8(&in);
        struct slot *s = &slots[u8(&in) % SLOTS];
        ops++;
        switch (op % 12) {
        case 0: case 1: { /* malloc */
            size_t n = decode_size(&in);
            if (!fits(n)) {
                if (n > PTRDIFF_MAX) { errno = 0; expect_enomem(lum_malloc(n), n); }
                break;
            }
            drop(s, 0);
            void *p = lum_malloc(n);
            CHECK(p, "malloc(%zu) failed", n);
            took(s, p, n, 0, 0);
            break; }
        case 2: { /* calloc */
            size_t n = decode_size(&in), m = 1 + u8(&in) % 24;
            if (u8(&in) == 255) { /* overflowing product */
                errno = 0;
                expect_enomem(lum_calloc(SIZE_MAX / 2 + 1 + n, 2 + m), n);
                break;
            }
            if (n / m == 0 && n) n = m;
            size_t count = n / m;
            if (!fits(count * m)) break;
            drop(s, 0);
            void *p = lum_calloc(count, m);
            CHECK(p, "calloc(%zu, %zu) failed", count, m);
            took(s, p, count * m, 0, 1);
            break; }
        case 3: case 4: { /* realloc: keeps the prefix */
            size_t n = decode_size(&in);
            if (s->align) break; /* realloc guarantees only 16-byte alignment */
            if (n > PTRDIFF_MAX) {
                errno = 0;
                void *q = lum_realloc(s->p, n);
                expect_enomem(q, n); /* and the old block is untouched */
                if (s->p) verify(s, s->usable);
                break;
            }
            if (!fits(n + s->n)) break;
            if (n == 0 && s->p) { verify(s, s->usable); break; } /* realloc(p, 0) frees: tested below */
            if (s->p) verify(s, s->usable);
            void *q = lum_realloc(s->p, n);
            CHECK(q, "realloc(%p, %zu) failed", (void *)s->p, n);
            struct slot old = *s;
            size_t keep = old.n < n ? old.n : n;
            s->p = q;
            if (old.p) verify(s, keep);
            live -= old.n;
            memset(s, 0, sizeof *s);
            took(s, q, n, 0, 0);
            break; }
        case 5: { /* aligned_alloc */
            size_t a = decode_align(&in), n = decode_size(&in);
            if (!fits(n) && n <= PTRDIFF_MAX) break;
            errno = 0;
            void *p = lum_aligned_alloc(a, n);
            if (!is_pow2(a)) { CHECK(!p && errno == EINVAL, "aligned_alloc(%zu, %zu): %p errno %d", a, n, p, errno); break; }
            if (n > PTRDIFF_MAX) { expect_enomem(p, n); break; }
            CHECK(p, "aligned_alloc(%zu, %zu) failed", a, n);
            drop(s, 0);
            took(s, p, n, a, 0);
            s->aligned_alloc = 1;
            s->align = a;
            break; }
        case 6: { /* posix_memalign */
            size_t a = decode_align(&in), n = decode_size(&in);
            if (!fits(n) && n <= PTRDIFF_MAX) break;
            void *p = (void *)1;
            int rc = lum_posix_memalign(&p, a, n);
            if (!is_pow2(a) || a < sizeof(void *)) {
                CHECK(rc == EINVAL && p == (void *)1, "posix_memalign(%zu): rc %d", a, rc);
                break;
            }
            if (n > PTRDIFF_MAX) { CHECK(rc == ENOMEM, "posix_memalign(%zu, %zu): rc %d", a, n, rc); break; }
            CHECK(rc == 0 && p, "posix_memalign(%zu, %zu): rc %d", a, n, rc);
            drop(s, 0);
            took(s, p, n, a, 0);
            break; }
        case 7: { /* memalign / valloc */
            size_t a = decode_align(&in), n = decode_size(&in);
            if (!is_pow2(a) || !fits(n)) break;
            void *p = (op & 16) ? lum_valloc(n) : lum_memalign(a, n);
            if (op & 16) a = 4096;
            CHECK(p, "memalign/valloc(%zu, %zu) failed", a, n);
            drop(s, 0);
            took(s, p, n, a, 0);
            break; }
        case 8: /* free */
            drop(s, 0);
            break;
        case 9: /* free_sized / free_aligned_sized */
            drop(s, 1);
            break;
        case 10: /* usable size, write the whole usable area, realloc(p, 0) */
            if (!s->p) break;
            CHECK(lum_malloc_usable_size(s->p) == s->usable, "usable size of %p changed", (void *)s->p);
            if ((op & 48) == 48 && !s->align) {
                verify(s, s->usable);
                CHECK(lum_realloc(s->p, 0) == NULL, "realloc(p, 0) did not return NULL");
                live -= s->n;
                memset(s, 0, sizeof *s);
            } else {
                s->seed ^= 0x5555;
                fill(s, 0);
            }
            break;
        default: /* heap check, and a purge (op & 64), a burst freed with no malloc between
                  * (op & 192 == 128), or options changed at run time (op & 192 == 192) */
            if ((op & 192) == 192) {
                /* where sizes leave the pages for the large path, and how often a block is
                 * sampled: a sampled block realloc'd into a smaller class on its slices, which
                 * realloc's padding hides at the default threshold, crashed at 200k */
                static const char *const thresholds[] = {"64k", "128k", "200k", "256k", "1m"};
                static const char *const intervals[] = {"0", "1k", "16k", "128k", "512k"};
                unsigned v = u8(&in);
                CHECK(lum_options_set("large_threshold", thresholds[v % 5]) == 0, "large_threshold refused");
                CHECK(lum_options_set("sample_interval", intervals[v / 5 % 5]) == 0, "sample_interval refused");
                options_changed = 1;
            } else if ((op & 192) == 128) {
                /* 300-1323 blocks of one size up to 4 KiB freed in a row: hundreds of frees past
                 * a full cache with no malloc turn the thread's caches off (heap.c:
                 * heap_caches_off), and the ops after turn them on again */
                static void *burst[1324];
                unsigned k = 300 + u8(&in) * 4, sz = 1 + u16(&in) % 4096, order = u8(&in);
                unsigned m = 0;
                while (m < k && (burst[m] = lum_malloc(sz)) != NULL) {
                    ((unsigned char *)burst[m])[0] = (unsigned char)m;
                    ((unsigned char *)burst[m])[sz - 1] = (unsigned char)m;
                    m++;
                }
                for (unsigned j = 0; j < 2 * m; j++) { /* the second pass: what a stride missed */
                    unsigned at = j >= m ? j - m : order & 1 ? m - 1 - j : order & 2 ? (j * 7919u) % m : j;
                    unsigned char *b = burst[at];
                    if (!b) continue;
                    CHECK(b[0] == (unsigned char)at && b[sz - 1] == (unsigned char)at, "burst block %p overwritten", (void *)b);
                    lum_free(b);
                    burst[at] = NULL;
                }
            } else if (op & 64) {
                lum_purge();
            }
            CHECK(lum_heap_check(1) == 0, "heap check failed mid-input");
            break;
        }
        if ((ops & 63) == 0) CHECK(lum_heap_check(1) == 0, "periodic heap check failed");
    }
    for (int i = 0; i < SLOTS; i++) drop(&slots[i], (unsigned)i & 1);
    if (options_changed) { /* each input starts from the same options */
        CHECK(lum_options_set("large_threshold", "256k") == 0, "large_threshold refused");
        CHECK(lum_options_set("sample_interval", initial_interval) == 0, "sample_interval refused");
        options_changed = 0;
    }
    CHECK(live == 0, "live byte accounting");
    CHECK(lum_heap_check(1) == 0, "heap check failed after the input");
    return 0;
}
