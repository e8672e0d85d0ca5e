/* Profile writers: pprof (uncompressed profile.proto, hand-encoded: four message types do not
 * justify a protobuf dependency; `go tool pprof` and most readers accept uncompressed input)
 * and folded stacks for flamegraph.pl / inferno / speedscope. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "tc.h"

struct buf {
    uint8_t *p;
    size_t len, cap;
};

static void put(struct buf *b, const void *d, size_t n)
{
    if (b->len + n > b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 4096;
        while (nc < b->len + n)
            nc *= 2;
        uint8_t *np = realloc(b->p, nc);
        if (!np)
            abort();
        b->p = np;
        b->cap = nc;
    }
    memcpy(b->p + b->len, d, n);
    b->len += n;
}

static void varint(struct buf *b, uint64_t v)
{
    uint8_t t[10];
    int n = 0;
    do {
        t[n] = v & 0x7f;
        v >>= 7;
        if (v)
            t[n] |= 0x80;
        n++;
    } while (v);
    put(b, t, n);
}

static void key(struct buf *b, unsigned field, unsigned wire) { varint(b, (uint64_t)field << 3 | wire); }
static void f_varint(struct buf *b, unsigned field, uint64_t v)
{
    key(b, field, 0);
    varint(b, v);
}
static void f_bytes(struct buf *b, unsigned field, const void *d, size_t n)
{
    key(b, field, 2);
    varint(b, n);
    put(b, d, n);
}
static void f_msg(struct buf *b, unsigned field, struct buf *m)
{
    f_bytes(b, field, m->p, m->len);
    m->len = 0;
}

/* String table: index by a map from string hash to index, with collision check. */
struct strtab {
    char **s;
    size_t n, cap;
    struct tc_map64 idx; /* hash -> index+1 */
};

static uint64_t str_hash(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return h ? h : 1;
}

static uint64_t intern(struct strtab *t, const char *s)
{
    uint64_t k = str_hash(s);
    for (;;) {
        uint64_t *v = tc_map64_get(&t->idx, k);
        if (!v)
            break;
        if (!strcmp(t->s[*v - 1], s))
            return *v - 1;
        k = tc_hash64(k, 1) | 1; /* hash collision: probe on */
    }
    if (t->n == t->cap) {
        t->cap = t->cap ? t->cap * 2 : 256;
        t->s = realloc(t->s, t->cap * sizeof(*t->s));
        if (!t->s)
            abort();
    }
    t->s[t->n] = strdup(s);
    *tc_map64_put(&t->idx, k, NULL) = t->n + 1;
    return t->n++;
}

int tc_write_pprof(const char *path, struct tc_symbolizer *sym, const struct tc_prof_stack *stacks, size_t n,
                   int64_t duration_ns, int64_t sample_period)
{
    FILE *f = tc_open_report(path);
    if (!f)
        return -errno;
    struct buf out = {0}, m = {0}, sub = {0};
    struct strtab st = {0};
    intern(&st, "");
    static const char *const types[4][2] = {
        {"alloc_objects", "count"}, {"alloc_space", "bytes"}, {"inuse_objects", "count"}, {"inuse_space", "bytes"}};
    uint64_t period_type = intern(&st, "space"), period_unit = intern(&st, "bytes");
    uint64_t default_type = intern(&st, "inuse_space");
    for (int i = 0; i < 4; i++) {
        f_varint(&m, 1, intern(&st, types[i][0]));
        f_varint(&m, 2, intern(&st, types[i][1]));
        f_msg(&out, 1, &m);
    }
    /* Locations keyed by (pid, address); functions by name. */
    struct tc_map64 locs = {0}, funcs = {0};
    uint64_t nloc = 0, nfunc = 0;
    struct buf locbuf = {0}, funcbuf = {0};
    for (size_t i = 0; i < n; i++) {
        const struct tc_prof_stack *s = &stacks[i];
        struct buf ids = {0};
        for (unsigned d = 0; d < s->depth; d++) {
            uint64_t lk = tc_hash64(tc_hash64(0, (uint64_t)s->pid), s->frames[d]) | 1;
            bool created;
            uint64_t *lid = tc_map64_put(&locs, lk, &created);
            if (created) {
                *lid = ++nloc;
                char tmp[PATH_MAX + 64];
                const struct tc_frame *fr = tc_sym_resolve(sym, s->pid, s->frames[d]);
                const char *name = tc_frame_str(fr, tmp, sizeof(tmp));
                uint64_t sidx = intern(&st, name);
                /* a function is its name in its module: two modules' same-named functions
                 * (static helpers, plugins) are two, each with its own filename */
                uint64_t midx = fr->module ? intern(&st, fr->module) : 0;
                uint64_t *fid = tc_map64_put(&funcs, tc_hash64(sidx + 1, midx) | 1, &created);
                if (created) {
                    *fid = ++nfunc;
                    f_varint(&m, 1, *fid);
                    f_varint(&m, 2, sidx);
                    f_varint(&m, 3, sidx);
                    if (fr->module)
                        f_varint(&m, 4, midx);
                    f_msg(&funcbuf, 5, &m);
                }
                f_varint(&sub, 1, *fid);
                f_varint(&m, 1, *lid);
                f_varint(&m, 3, s->frames[d]);
                f_msg(&m, 4, &sub);
                f_msg(&locbuf, 4, &m);
            }
            varint(&ids, *lid);
        }
        if (ids.len)
            f_bytes(&m, 1, ids.p, ids.len);
        struct buf vals = {0};
        for (int k = 0; k < 4; k++)
            varint(&vals, (uint64_t)s->values[k]);
        f_bytes(&m, 2, vals.p, vals.len);
        f_msg(&out, 2, &m);
        free(ids.p);
        free(vals.p);
    }
    put(&out, locbuf.p, locbuf.len);
    put(&out, funcbuf.p, funcbuf.len);
    for (size_t i = 0; i < st.n; i++)
        f_bytes(&out, 6, st.s[i], strlen(st.s[i]));
    f_varint(&out, 10, (uint64_t)duration_ns);
    f_varint(&m, 1, period_type);
    f_varint(&m, 2, period_unit);
    f_msg(&out, 11, &m);
    f_varint(&out, 12, (uint64_t)sample_period);
    f_varint(&out, 14, default_type);
    size_t w = fwrite(out.p, 1, out.len, f);
    int err = (w != out.len || fclose(f)) ? -EIO : 0;
    for (size_t i = 0; i < st.n; i++)
        free(st.s[i]);
    free(st.s);
    tc_map64_free(&st.idx);
    tc_map64_free(&locs);
    tc_map64_free(&funcs);
    free(out.p);
    free(m.p);
    free(sub.p);
    free(locbuf.p);
    free(funcbuf.p);
    return err;
}

int tc_write_folded(const char *path, struct tc_symbolizer *sym, const struct tc_prof_stack *stacks, size_t n,
                    int value_index)
{
    FILE *f = tc_open_report(path);
    if (!f)
        return -errno;
    for (size_t i = 0; i < n; i++) {
        const struct tc_prof_stack *s = &stacks[i];
        if (s->values[value_index] <= 0)
            continue;
        for (int d = (int)s->depth - 1; d >= 0; d--) {
            char tmp[PATH_MAX + 64];
            const char *name = tc_frame_str(tc_sym_resolve(sym, s->pid, s->frames[d]), tmp, sizeof(tmp));
            /* ';' separates frames and ' ' the count: keep them out of names. */
            for (const char *c = name; *c; c++)
                fputc(*c == ';' ? ':' : (*c == '\n' ? ' ' : *c), f);
            if (d)
                fputc(';', f);
        }
        if (!s->depth)
            fputs("[no stack]", f);
        fprintf(f, " %lld\n", (long long)s->values[value_index]);
    }
    return fclose(f) ? -errno : 0;
}
