/* pprof output: an uncompressed profile.proto (github.com/google/pprof/proto/profile.proto),
 * encoded by hand (varints and length-delimited fields) into mmap buffers.
 *
 *   Profile { sample_type=1, sample=2, mapping=3, location=4, function=5, string_table=6,
 *             time_nanos=9, period_type=11, period=12 }
 *   ValueType { type=1, unit=2 }            Sample { location_id=1 (packed), value=2 (packed) }
 *   Mapping { id=1, memory_start=2, memory_limit=3, file_offset=4, filename=5, has_functions=7 }
 *   Location { id=1, mapping_id=2, address=3, line=4 }     Line { function_id=1 }
 *   Function { id=1, name=2, system_name=3 }
 *
 * Location addresses are call instructions (return address - 1) so that pprof's own
 * symbolisation lands on the calling line. */
#include <fcntl.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "obs_internal.h"

/* Estimated counts are non-negative doubles (libm's llround would be lumalloc's only use of
 * libm): round half up, clamp at zero. */
static uint64_t round_count(double x)
{
    return x > 0 ? (uint64_t)(x + 0.5) : 0;
}

/* ---- protobuf primitives ---- */

struct pbw { /* small fixed buffer for one nested message */
    uint8_t d[2048];
    size_t n;
};

static void pb_varint(struct pbw *w, uint64_t v)
{
    while (v >= 0x80 && w->n < sizeof w->d) {
        w->d[w->n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    if (w->n < sizeof w->d)
        w->d[w->n++] = (uint8_t)v;
}

static void pb_field_varint(struct pbw *w, unsigned field, uint64_t v)
{
    pb_varint(w, (uint64_t)field << 3);
    pb_varint(w, v);
}

static void buf_varint(struct lum_buf *b, uint64_t v)
{
    uint8_t t[10];
    size_t n = 0;
    while (v >= 0x80) {
        t[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    t[n++] = (uint8_t)v;
    lum_buf_put(b, t, n);
}

static void buf_bytes_field(struct lum_buf *b, unsigned field, const void *p, size_t n)
{
    buf_varint(b, (uint64_t)field << 3 | 2);
    buf_varint(b, n);
    lum_buf_put(b, p, n);
}

static void buf_msg(struct lum_buf *b, unsigned field, const struct pbw *w)
{
    buf_bytes_field(b, field, w->d, w->n);
}

/* ---- u64 -> u64 map (open addressing, key 0 reserved) ---- */

struct map {
    uint64_t *k, *v;
    size_t cap; /* power of two */
    size_t n;
};

static bool map_init(struct map *m, size_t want)
{
    m->cap = 1024;
    while (m->cap < want * 2)
        m->cap *= 2;
    m->k = lum_obs_pages(m->cap * 2 * sizeof(uint64_t));
    m->v = m->k ? m->k + m->cap : NULL;
    m->n = 0;
    return m->k != NULL;
}

static void map_free(struct map *m)
{
    lum_obs_free_pages(m->k, m->cap * 2 * sizeof(uint64_t));
}

/* Returns the slot for key (found or empty). */
static size_t map_slot(const struct map *m, uint64_t key)
{
    size_t i = (size_t)((key * 0x9e3779b97f4a7c15ULL) >> 20) & (m->cap - 1);
    while (m->k[i] && m->k[i] != key)
        i = (i + 1) & (m->cap - 1);
    return i;
}

/* ---- string table ---- */

struct strtab {
    struct lum_buf enc;  /* encoded string_table fields, in index order */
    struct lum_buf raw;  /* NUL-terminated copies, for comparisons */
    struct map byhash;   /* hash -> (index << 32 | offset in raw) + 1; collisions probe on */
    uint64_t count;
};

static uint64_t str_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ULL;
    return h ? h : 1;
}

static uint64_t intern(struct strtab *t, const char *s)
{
    uint64_t h = str_hash(s);
    /* Linear probing over hash+k: equal hashes of different strings take the next key. */
    for (uint64_t k = h;; k = k + 1 ? k + 1 : 1) {
        size_t i = map_slot(&t->byhash, k);
        if (!t->byhash.k[i]) {
            if (t->byhash.n >= t->byhash.cap / 2)
                return 0; /* full: "" */
            uint64_t off = t->raw.len;
            lum_buf_put(&t->raw, s, strlen(s) + 1);
            t->byhash.k[i] = k;
            t->byhash.v[i] = (t->count << 32 | off) + 1;
            t->byhash.n++;
            buf_bytes_field(&t->enc, 6, s, strlen(s));
            return t->count++;
        }
        uint64_t v = t->byhash.v[i] - 1;
        if (!t->raw.failed && !strcmp(t->raw.data + (uint32_t)v, s))
            return v >> 32;
    }
}

/* ---- mappings from /proc/self/maps ---- */

struct mapping {
    uint64_t start, end, offset, name;
};

static size_t read_maps(struct lum_buf *b)
{
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    char tmp[4096];
    ssize_t n;
    while ((n = read(fd, tmp, sizeof tmp)) > 0)
        lum_buf_put(b, tmp, (size_t)n);
    close(fd);
    return b->failed ? 0 : b->len;
}

static uint64_t hexnum(const char **p)
{
    uint64_t v = 0;
    for (;; (*p)++) {
        char c = **p;
        if (c >= '0' && c <= '9')
            v = v * 16 + (uint64_t)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v = v * 16 + (uint64_t)(c - 'a' + 10);
        else
            return v;
    }
}

/* Parses executable mappings into out[]; returns how many. */
static size_t parse_maps(struct lum_buf *raw, struct mapping *out, size_t max, struct strtab *st)
{
    size_t n = 0;
    char *p = raw->data, *end = raw->data + raw->len;
    while (p < end && n < max) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl)
            nl = end;
        *nl = 0;
        const char *c = p;
        uint64_t lo = hexnum(&c);
        if (*c == '-')
            c++;
        uint64_t hi = hexnum(&c);
        while (*c == ' ')
            c++;
        bool exec = c[0] && c[1] && c[2] == 'x';
        while (*c && *c != ' ')
            c++; /* perms */
        while (*c == ' ')
            c++;
        uint64_t off = hexnum(&c);
        /* dev and inode, then the path (may be absent) */
        for (int field = 0; field < 2; field++) {
            while (*c == ' ')
                c++;
            while (*c && *c != ' ')
                c++;
        }
        while (*c == ' ')
            c++;
        if (exec && *c) {
            out[n].start = lo;
            out[n].end = hi;
            out[n].offset = off;
            out[n].name = intern(st, c);
            n++;
        }
        p = nl + 1;
    }
    return n;
}

static uint64_t mapping_of(const struct mapping *m, size_t n, uint64_t addr)
{
    for (size_t i = 0; i < n; i++)
        if (addr >= m[i].start && addr < m[i].end)
            return i + 1;
    return 0;
}

#define MAX_MAPPINGS 4096

int lum_pprof_encode(struct lum_buf *out, const struct lum_snap *sn, struct lum_symcache *sc)
{
    size_t frames = 1;
    for (size_t i = 0; i < sn->n; i++)
        frames += sn->v[i]->depth;
    struct strtab st = {0};
    struct map locs = {0}, funcs = {0};
    struct lum_buf samples = {0}, mappings = {0}, locations = {0}, functions = {0}, maps = {0};
    struct mapping *mt = lum_obs_pages(MAX_MAPPINGS * sizeof *mt);
    int rc = -12; /* -ENOMEM */
    if (!mt || !map_init(&st.byhash, frames + MAX_MAPPINGS + 64) || !map_init(&locs, frames) ||
        !map_init(&funcs, frames))
        goto out;

    intern(&st, ""); /* index 0 must be the empty string */
    uint64_t s_alloc_objects = intern(&st, "alloc_objects"), s_count = intern(&st, "count");
    uint64_t s_alloc_space = intern(&st, "alloc_space"), s_bytes = intern(&st, "bytes");
    uint64_t s_inuse_objects = intern(&st, "inuse_objects");
    uint64_t s_inuse_space = intern(&st, "inuse_space"), s_space = intern(&st, "space");

    size_t nmap = read_maps(&maps) ? parse_maps(&maps, mt, MAX_MAPPINGS, &st) : 0;
    for (size_t i = 0; i < nmap; i++) {
        struct pbw w = {.n = 0};
        pb_field_varint(&w, 1, i + 1);
        pb_field_varint(&w, 2, mt[i].start);
        pb_field_varint(&w, 3, mt[i].end);
        pb_field_varint(&w, 4, mt[i].offset);
        pb_field_varint(&w, 5, mt[i].name);
        pb_field_varint(&w, 7, 1); /* has_functions */
        buf_msg(&mappings, 3, &w);
    }

    uint64_t nloc = 0, nfunc = 0;
    for (size_t i = 0; i < sn->n; i++) {
        const struct lum_stack *s = sn->v[i];
        double live_b = s->live_bytes > 0 ? (double)s->live_bytes : 0;
        double live_o = s->live_objects > 0 ? s->live_objects : 0;
        if (!s->samples && live_b <= 0)
            continue;
        /* Location ids of this stack; [unknown] stands in for a stack that was not taken. */
        uint64_t ids[LUM_MAX_FRAMES];
        uint32_t d = s->depth ? s->depth : 1;
        for (uint32_t f = 0; f < d; f++) {
            uint64_t addr = s->depth ? s->frames[f] - 1 : 0;
            uint64_t key = addr + 1; /* 0 is the empty key */
            size_t slot = map_slot(&locs, key);
            if (!locs.k[slot]) {
                if (locs.n >= locs.cap / 2)
                    goto out;
                const char *name = s->depth ? lum_symcache_get(sc, (uintptr_t)addr, LUM_SYM_DEEP)
                                            : "[unknown]";
                uint64_t si = intern(&st, name);
                size_t fs = map_slot(&funcs, si + 1);
                if (!funcs.k[fs]) {
                    funcs.k[fs] = si + 1;
                    funcs.v[fs] = ++nfunc;
                    funcs.n++;
                    struct pbw w = {.n = 0};
                    pb_field_varint(&w, 1, nfunc);
                    pb_field_varint(&w, 2, si);
                    pb_field_varint(&w, 3, si);
                    buf_msg(&functions, 5, &w);
                }
                locs.k[slot] = key;
                locs.v[slot] = ++nloc;
                locs.n++;
                struct pbw line = {.n = 0};
                pb_field_varint(&line, 1, funcs.v[fs]);
                struct pbw w = {.n = 0};
                pb_field_varint(&w, 1, nloc);
                uint64_t mid = s->depth ? mapping_of(mt, nmap, addr) : 0;
                if (mid)
                    pb_field_varint(&w, 2, mid);
                pb_field_varint(&w, 3, addr);
                pb_varint(&w, 4 << 3 | 2);
                pb_varint(&w, line.n);
                memcpy(w.d + w.n, line.d, line.n);
                w.n += line.n;
                buf_msg(&locations, 4, &w);
            }
            ids[f] = locs.v[slot];
        }
        struct pbw packed = {.n = 0}, w = {.n = 0};
        for (uint32_t f = 0; f < d; f++)
            pb_varint(&packed, ids[f]);
        pb_varint(&w, 1 << 3 | 2);
        pb_varint(&w, packed.n);
        memcpy(w.d + w.n, packed.d, packed.n);
        w.n += packed.n;
        packed.n = 0;
        /* int64 values, all non-negative here, so plain varints. */
        pb_varint(&packed, round_count(s->alloc_objects));
        pb_varint(&packed, s->alloc_bytes);
        pb_varint(&packed, round_count(live_o));
        pb_varint(&packed, round_count(live_b));
        pb_varint(&w, 2 << 3 | 2);
        pb_varint(&w, packed.n);
        memcpy(w.d + w.n, packed.d, packed.n);
        w.n += packed.n;
        buf_msg(&samples, 2, &w);
    }

    uint64_t st_pairs[4][2] = {{s_alloc_objects, s_count}, {s_alloc_space, s_bytes},
                               {s_inuse_objects, s_count}, {s_inuse_space, s_bytes}};
    for (int i = 0; i < 4; i++) {
        struct pbw w = {.n = 0};
        pb_field_varint(&w, 1, st_pairs[i][0]);
        pb_field_varint(&w, 2, st_pairs[i][1]);
        buf_msg(out, 1, &w);
    }
    lum_buf_put(out, samples.data, samples.len);
    lum_buf_put(out, mappings.data, mappings.len);
    lum_buf_put(out, locations.data, locations.len);
    lum_buf_put(out, functions.data, functions.len);
    lum_buf_put(out, st.enc.data, st.enc.len);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    buf_varint(out, 9 << 3);
    buf_varint(out, (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec);
    struct pbw pt = {.n = 0};
    pb_field_varint(&pt, 1, s_space);
    pb_field_varint(&pt, 2, s_bytes);
    buf_msg(out, 11, &pt);
    buf_varint(out, 12 << 3);
    buf_varint(out, sn->interval);
    rc = (samples.failed || mappings.failed || locations.failed || functions.failed ||
          st.enc.failed || st.raw.failed) ? -12 : 0;
out:
    lum_buf_free(&samples);
    lum_buf_free(&mappings);
    lum_buf_free(&locations);
    lum_buf_free(&functions);
    lum_buf_free(&maps);
    lum_buf_free(&st.enc);
    lum_buf_free(&st.raw);
    map_free(&st.byhash);
    map_free(&locs);
    map_free(&funcs);
    lum_obs_free_pages(mt, MAX_MAPPINGS * sizeof *mt);
    return rc;
}
