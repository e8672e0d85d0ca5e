/* The allocation-failure sweep over a real program path: a parser for a JSON-like document that
 * builds a tree (objects are hash maps with chained buckets that grow by rehashing, arrays grow
 * with realloc, strings are copied) and then indexes it, with error handling on every allocation.
 * lum_with_allocation_failures() runs it failing its 1st, 2nd, ... allocation; every run must
 * either succeed with the right result or report failure (ENOMEM) cleanly, and leave no block
 * behind (a live-block counter), never crash.  Then the same under threads: each of 3 threads
 * runs its own sweep at once.  The heap is checked afterwards. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_failure.h"

static _Thread_local long live; /* blocks this thread holds (all frees happen in the allocating thread) */
static void *xmalloc(size_t n) { void *p = malloc(n); if (p) live++; return p; }
static void *xcalloc(size_t a, size_t b) { void *p = calloc(a, b); if (p) live++; return p; }
static void *xrealloc(void *p, size_t n) { void *q = realloc(p, n); if (q && !p) live++; return q; }
static void xfree(void *p) { if (p) { live--; free(p); } }

/* ---- values ---- */
enum vt { V_NUM, V_STR, V_ARR, V_OBJ };
struct val;
struct ent { char *key; struct val *v; struct ent *next; };
struct val {
    enum vt t;
    double num;
    char *str;
    struct val **items; size_t n, cap;            /* array */
    struct ent **buckets; size_t nb, count;       /* object */
};

static void val_free(struct val *v)
{
    if (!v) return;
    xfree(v->str);
    for (size_t i = 0; i < v->n; i++) val_free(v->items[i]);
    xfree(v->items);
    for (size_t b = 0; b < v->nb; b++)
        for (struct ent *e = v->buckets[b], *next; e; e = next) {
            next = e->next;
            xfree(e->key);
            val_free(e->v);
            xfree(e);
        }
    xfree(v->buckets);
    xfree(v);
}

static uint64_t hash(const char *s) { uint64_t h = 1469598103934665603ULL; while (*s) h = (h ^ (unsigned char)*s++) * 1099511628211ULL; return h; }

static int obj_put(struct val *o, char *key, struct val *v)
{
    if (o->count + 1 > o->nb * 3 / 4) {
        size_t nb = o->nb ? o->nb * 2 : 8;
        struct ent **nbk = xcalloc(nb, sizeof *nbk);
        if (!nbk) return -1;
        for (size_t b = 0; b < o->nb; b++)
            for (struct ent *e = o->buckets[b], *next; e; e = next) {
                next = e->next;
                size_t i = hash(e->key) & (nb - 1);
                e->next = nbk[i];
                nbk[i] = e;
            }
        xfree(o->buckets);
        o->buckets = nbk;
        o->nb = nb;
    }
    struct ent *e = xmalloc(sizeof *e);
    if (!e) return -1;
    size_t i = hash(key) & (o->nb - 1);
    *e = (struct ent){key, v, o->buckets[i]};
    o->buckets[i] = e;
    o->count++;
    return 0;
}

static struct val *obj_get(const struct val *o, const char *key)
{
    if (!o->nb) return NULL;
    for (struct ent *e = o->buckets[hash(key) & (o->nb - 1)]; e; e = e->next)
        if (!strcmp(e->key, key)) return e->v;
    return NULL;
}

static int arr_push(struct val *a, struct val *v)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 2;
        struct val **items = xrealloc(a->items, cap * sizeof *items);
        if (!items) return -1; /* a->items is still valid and owned */
        a->items = items;
        a->cap = cap;
    }
    a->items[a->n++] = v;
    return 0;
}

/* ---- parser: returns NULL with errno = ENOMEM (allocation) or EINVAL (syntax) ---- */
struct parser { const char *s; };
static void ws(struct parser *p) { while (*p->s == ' ' || *p->s == '\n') p->s++; }
static struct val *parse(struct parser *p, int depth);

static char *parse_str(struct parser *p)
{
    if (*p->s != '"') { errno = EINVAL; return NULL; }
    const char *start = ++p->s;
    while (*p->s && *p->s != '"') p->s++;
    if (!*p->s) { errno = EINVAL; return NULL; }
    size_t n = (size_t)(p->s - start);
    char *out = xmalloc(n + 1);
    if (!out) { errno = ENOMEM; return NULL; }
    memcpy(out, start, n);
    out[n] = 0;
    p->s++;
    return out;
}

static struct val *parse(struct parser *p, int depth)
{
    ws(p);
    if (depth > 64) { errno = EINVAL; return NULL; }
    struct val *v = xcalloc(1, sizeof *v);
    if (!v) { errno = ENOMEM; return NULL; }
    if (*p->s == '"') {
        v->t = V_STR;
        if (!(v->str = parse_str(p))) goto fail;
    } else if (*p->s == '[') {
        v->t = V_ARR;
        p->s++;
        for (ws(p); *p->s != ']'; ) {
            struct val *item = parse(p, depth + 1);
            if (!item) goto fail;
            if (arr_push(v, item)) { val_free(item); errno = ENOMEM; goto fail; }
            ws(p);
            if (*p->s == ',') { p->s++; ws(p); } else if (*p->s != ']') { errno = EINVAL; goto fail; }
        }
        p->s++;
    } else if (*p->s == '{') {
        v->t = V_OBJ;
        p->s++;
        for (ws(p); *p->s != '}'; ) {
            char *key = parse_str(p);
            if (!key) goto fail;
            ws(p);
            if (*p->s++ != ':') { xfree(key); errno = EINVAL; goto fail; }
            struct val *item = parse(p, depth + 1);
            if (!item) { xfree(key); goto fail; }
            if (obj_put(v, key, item)) { xfree(key); val_free(item); errno = ENOMEM; goto fail; }
            ws(p);
            if (*p->s == ',') { p->s++; ws(p); } else if (*p->s != '}') { errno = EINVAL; goto fail; }
        }
        p->s++;
    } else {
        char *end;
        v->t = V_NUM;
        v->num = strtod(p->s, &end);
        if (end == p->s) { errno = EINVAL; goto fail; }
        p->s = end;
    }
    return v;
fail: {
        int e = errno;
        val_free(v);
        errno = e;
        return NULL;
    }
}

/* ---- the document and its expected digest ---- */
static char *doc;
static double expected_sum;
static size_t expected_keys;

static void make_doc(void)
{
    size_t cap = 1 << 16, len = 0;
    doc = lum_malloc(cap); /* not counted: outside the sweep */
    len += (size_t)sprintf(doc + len, "{\"users\": [");
    expected_sum = 0;
    for (int i = 0; i < 40; i++) {
        len += (size_t)sprintf(doc + len, "%s{\"id\": %d, \"name\": \"user%d\", \"tags\": [\"a%d\", \"b\"], \"score\": %d.5}",
                               i ? ", " : "", i, i, i % 5, i * 3);
        expected_sum += i + i * 3 + 0.5;
    }
    len += (size_t)sprintf(doc + len, "], \"index\": {");
    for (int i = 0; i < 30; i++)
        len += (size_t)sprintf(doc + len, "%s\"k%d\": [%d, %d, {\"deep\": \"v%d\"}]", i ? ", " : "", i, i, i * i, i);
    sprintf(doc + len, "}}");
    expected_keys = 30;
}

static double sum_users(const struct val *root)
{
    const struct val *users = obj_get(root, "users");
    double s = 0;
    for (size_t i = 0; users && i < users->n; i++)
        s += obj_get(users->items[i], "id")->num + obj_get(users->items[i], "score")->num;
    return s;
}

struct run { unsigned long runs, ok, enomem, other, leaks, wrong; };

static void parse_doc(void *arg)
{
    struct run *r = arg;
    long before = live;
    r->runs++;
    struct parser p = {doc};
    errno = 0;
    struct val *root = parse(&p, 0);
    if (!root) {
        if (errno == ENOMEM) r->enomem++; else r->other++;
    } else {
        /* the tree is usable: look things up, then copy part of it (more allocations) */
        const struct val *index = obj_get(root, "index");
        int good = index && index->count == expected_keys && sum_users(root) == expected_sum;
        for (int i = 0; good && i < 30; i++) {
            char k[16];
            snprintf(k, sizeof k, "k%d", i);
            const struct val *a = obj_get(index, k);
            good = a && a->n == 3 && a->items[1]->num == i * i;
        }
        char *copy = xmalloc(strlen(doc) + 1);
        if (copy) { strcpy(copy, doc); xfree(copy); }
        if (good && copy) r->ok++; else if (!copy) r->enomem++; else r->wrong++;
        val_free(root);
    }
    if (live != before) r->leaks++;
}

static void sweep_parser(void **state)
{
    (void)state;
    make_doc();
    struct run r = {0};
    unsigned long runs = lum_with_allocation_failures(parse_doc, &r);
    printf("# %lu runs: %lu succeeded, %lu failed with ENOMEM\n", runs, r.ok, r.enomem);
    assert_int_equal(runs, r.runs);
    assert_true(runs > 300);              /* one run per allocation of the successful path, + 1 */
    assert_int_equal(r.ok, 1);            /* only the run without an injected failure succeeds */
    assert_int_equal(r.enomem, runs - 1); /* every other run reports the failure */
    assert_int_equal(r.other, 0);
    assert_int_equal(r.wrong, 0);
    assert_int_equal(r.leaks, 0);
    assert_int_equal(live, 0);
    assert_int_equal(lum_heap_check(1), 0);
}

static void *sweep_thread(void *arg)
{
    struct run *r = arg;
    lum_with_allocation_failures(parse_doc, r);
    return NULL;
}

static void sweep_in_threads(void **state)
{
    (void)state;
    if (!doc) make_doc();
    pthread_t t[3];
    struct run r[3] = {{0}};
    for (int i = 0; i < 3; i++) assert_int_equal(pthread_create(&t[i], NULL, sweep_thread, &r[i]), 0);
    for (int i = 0; i < 3; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < 3; i++) {
        assert_true(r[i].runs > 300);
        assert_int_equal(r[i].ok, 1);
        assert_int_equal(r[i].enomem, r[i].runs - 1);
        assert_int_equal(r[i].other + r[i].wrong, 0);
    }
    printf("# 3 threads, %lu + %lu + %lu runs\n", r[0].runs, r[1].runs, r[2].runs);
    assert_int_equal(live, 0);
    assert_int_equal(lum_heap_check(1), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(sweep_parser),
        cmocka_unit_test(sweep_in_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
