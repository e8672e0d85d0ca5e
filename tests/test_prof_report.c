/* Profile reports parsed back: folded stacks (flamegraph.pl format), pprof profile.proto (decoded
 * by a small protobuf reader below), text, per-site iteration, dumps by extension. */
#define _GNU_SOURCE 1
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <cmocka.h>
#include "observe.h"
#include "options.h"
#include "obs_internal.h"
#include "lumalloc_prof.h"

/* Sites: distinct functions whose samples the reports must keep apart. */
static char blocks_a[8][32], blocks_b[3][32];
/* volatile bounds: no unrolling, so each site has one call instruction and one stack. */
static volatile int n_alpha = 8, n_beta = 3;

static __attribute__((noinline)) void take_sample(void *p, size_t s)
{
    static struct lum_thread_counters_v1 tc;
    lum_on_sample(&tc, p, s, s);
    __asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void report_site_alpha(void)
{
    for (int i = 0; i < n_alpha; i++)
        take_sample(blocks_a[i], 100);
    __asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void report_site_beta(void)
{
    for (int i = 0; i < n_beta; i++)
        take_sample(blocks_b[i], 3000);
    __asm__ volatile("" ::: "memory");
}

static double w100, w3000;

static int setup(void **state)
{
    (void)state;
    lum_prof_reset();
    report_site_alpha();
    report_site_beta();
    w100 = (double)(uint64_t)(lum_sample_weight(100, lum_opt.sample_interval) + 0.5);
    w3000 = (double)(uint64_t)(lum_sample_weight(3000, lum_opt.sample_interval) + 0.5);
    return 0;
}

static char *folded(enum lum_prof_kind kind)
{
    static char *s;
    static size_t n;
    s = NULL;
    FILE *f = open_memstream(&s, &n);
    assert_int_equal(lum_prof_write_folded(f, kind), 0);
    fclose(f);
    return s;
}

/* Sums the counts of folded lines whose stack contains `fn` as a frame. */
static double folded_sum(const char *text, const char *fn, int *lines)
{
    double total = 0;
    *lines = 0;
    const char *p = text;
    while (*p) {
        const char *eol = strchr(p, '\n');
        assert_non_null(eol); /* every line ends with a newline */
        const char *sp = eol;
        while (sp > p && sp[-1] != ' ')
            sp--;
        assert_true(sp > p); /* "stack count" */
        char *end;
        double v = strtod(sp, &end);
        assert_true(end == eol);
        assert_true(v > 0);
        /* frames are ';'-separated and contain no spaces */
        for (const char *c = p; c < sp - 1; c++)
            assert_true(*c != ' ');
        bool match = fn == NULL;
        size_t fl = fn ? strlen(fn) : 0;
        for (const char *c = p; fn && c < sp - 1;) {
            const char *e = c;
            while (e < sp - 1 && *e != ';')
                e++;
            if ((size_t)(e - c) == fl && !memcmp(c, fn, fl))
                match = true;
            c = e + 1;
        }
        if (match) {
            total += v;
            (*lines)++;
        }
        p = eol + 1;
    }
    return total;
}

static void test_folded(void **state)
{
    (void)state;
    int lines;
    char *cum = folded(LUM_PROF_CUMULATIVE);
    assert_true(fabs(folded_sum(cum, "report_site_alpha", &lines) - 8 * w100) < 1);
    assert_int_equal(lines, 1);
    assert_true(fabs(folded_sum(cum, "report_site_beta", &lines) - 3 * w3000) < 1);
    assert_int_equal(lines, 1);
    /* Outermost first: main comes before the site in the line. */
    const char *a = strstr(cum, "report_site_alpha");
    const char *line = a;
    while (line > cum && line[-1] != '\n')
        line--;
    const char *m = strstr(line, "main;");
    assert_true(m != NULL && m < a);
    free(cum);

    /* Live: free alpha's blocks; only beta stays. */
    for (int i = 0; i < 8; i++)
        lum_on_sample_free(blocks_a[i], 32);
    char *live = folded(LUM_PROF_LIVE);
    assert_true(folded_sum(live, "report_site_alpha", &lines) == 0);
    assert_int_equal(lines, 0);
    assert_true(fabs(folded_sum(live, "report_site_beta", &lines) - 3 * w3000) < 1);
    free(live);
    /* Cumulative figures are unchanged by frees. */
    cum = folded(LUM_PROF_CUMULATIVE);
    assert_true(fabs(folded_sum(cum, "report_site_alpha", &lines) - 8 * w100) < 1);
    free(cum);
    report_site_alpha(); /* restore the live set for the next tests */
}

/* ---- a minimal protobuf reader ---- */

struct pb {
    const uint8_t *p, *end;
};

static uint64_t rd_varint(struct pb *b)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        assert_true(b->p < b->end);
        uint8_t c = *b->p++;
        v |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80))
            return v;
    }
    fail_msg("varint too long");
    return 0;
}

/* Next field: returns false at the end; sub is set for length-delimited fields. */
static bool rd_field(struct pb *b, unsigned *field, unsigned *wt, uint64_t *val, struct pb *sub)
{
    if (b->p >= b->end)
        return false;
    uint64_t key = rd_varint(b);
    *field = (unsigned)(key >> 3);
    *wt = (unsigned)(key & 7);
    if (*wt == 0) {
        *val = rd_varint(b);
    } else if (*wt == 2) {
        uint64_t n = rd_varint(b);
        assert_true(n <= (uint64_t)(b->end - b->p));
        sub->p = b->p;
        sub->end = b->p + n;
        b->p += n;
    } else {
        fail_msg("unexpected wire type %u", *wt);
    }
    return true;
}

#define MAXN 4096
struct prof {
    char *strings[MAXN];
    unsigned nstrings;
    uint64_t st_type[8], st_unit[8];
    unsigned nst;
    uint64_t loc_id[MAXN], loc_map[MAXN], loc_addr[MAXN], loc_func[MAXN];
    unsigned nloc;
    uint64_t fn_id[MAXN], fn_name[MAXN];
    unsigned nfn;
    uint64_t map_id[MAXN], map_lo[MAXN], map_hi[MAXN], map_file[MAXN];
    unsigned nmap;
    uint64_t s_locs[MAXN][LUM_MAX_FRAMES];
    unsigned s_depth[MAXN];
    int64_t s_val[MAXN][4];
    unsigned ns;
    uint64_t period, period_type, period_unit, time_nanos;
};

static void decode(const uint8_t *data, size_t len, struct prof *pr)
{
    memset(pr, 0, sizeof *pr);
    struct pb b = {data, data + len}, sub, s2, s3;
    unsigned f, wt, f2, wt2, f3, wt3;
    uint64_t v, v2, v3;
    while (rd_field(&b, &f, &wt, &v, &sub)) {
        switch (f) {
        case 1: /* ValueType */
            assert_int_equal(wt, 2);
            while (rd_field(&sub, &f2, &wt2, &v2, &s2)) {
                if (f2 == 1) pr->st_type[pr->nst] = v2;
                if (f2 == 2) pr->st_unit[pr->nst] = v2;
            }
            pr->nst++;
            break;
        case 2: { /* Sample */
            unsigned i = pr->ns++;
            unsigned nv = 0;
            while (rd_field(&sub, &f2, &wt2, &v2, &s2)) {
                if (f2 == 1 && wt2 == 2)
                    while (s2.p < s2.end)
                        pr->s_locs[i][pr->s_depth[i]++] = rd_varint(&s2);
                else if (f2 == 1)
                    pr->s_locs[i][pr->s_depth[i]++] = v2;
                else if (f2 == 2 && wt2 == 2)
                    while (s2.p < s2.end)
                        pr->s_val[i][nv++] = (int64_t)rd_varint(&s2);
                else if (f2 == 2)
                    pr->s_val[i][nv++] = (int64_t)v2;
            }
            assert_int_equal(nv, 4);
            break;
        }
        case 3: /* Mapping */
            while (rd_field(&sub, &f2, &wt2, &v2, &s2)) {
                if (f2 == 1) pr->map_id[pr->nmap] = v2;
                if (f2 == 2) pr->map_lo[pr->nmap] = v2;
                if (f2 == 3) pr->map_hi[pr->nmap] = v2;
                if (f2 == 5) pr->map_file[pr->nmap] = v2;
            }
            pr->nmap++;
            break;
        case 4: /* Location */
            while (rd_field(&sub, &f2, &wt2, &v2, &s2)) {
                if (f2 == 1) pr->loc_id[pr->nloc] = v2;
                if (f2 == 2) pr->loc_map[pr->nloc] = v2;
                if (f2 == 3) pr->loc_addr[pr->nloc] = v2;
                if (f2 == 4)
                    while (rd_field(&s2, &f3, &wt3, &v3, &s3))
                        if (f3 == 1) pr->loc_func[pr->nloc] = v3;
            }
            pr->nloc++;
            break;
        case 5: /* Function */
            while (rd_field(&sub, &f2, &wt2, &v2, &s2)) {
                if (f2 == 1) pr->fn_id[pr->nfn] = v2;
                if (f2 == 2) pr->fn_name[pr->nfn] = v2;
            }
            pr->nfn++;
            break;
        case 6: /* string */
            assert_int_equal(wt, 2);
            pr->strings[pr->nstrings++] = strndup((const char *)sub.p, (size_t)(sub.end - sub.p));
            break;
        case 9: pr->time_nanos = v; break;
        case 11:
            while (rd_field(&sub, &f2, &wt2, &v2, &s2)) {
                if (f2 == 1) pr->period_type = v2;
                if (f2 == 2) pr->period_unit = v2;
            }
            break;
        case 12: pr->period = v; break;
        default: fail_msg("unexpected Profile field %u", f);
        }
        assert_true(pr->ns < MAXN && pr->nloc < MAXN && pr->nfn < MAXN && pr->nstrings < MAXN &&
                    pr->nmap < MAXN);
    }
}

static const char *str(const struct prof *pr, uint64_t i)
{
    assert_true(i < pr->nstrings);
    return pr->strings[i];
}

static int loc_index(const struct prof *pr, uint64_t id)
{
    for (unsigned i = 0; i < pr->nloc; i++)
        if (pr->loc_id[i] == id)
            return (int)i;
    fail_msg("location %llu missing", (unsigned long long)id);
    return -1;
}

static const char *func_name(const struct prof *pr, uint64_t id)
{
    for (unsigned i = 0; i < pr->nfn; i++)
        if (pr->fn_id[i] == id)
            return str(pr, pr->fn_name[i]);
    fail_msg("function %llu missing", (unsigned long long)id);
    return NULL;
}

static uint8_t *read_all(int fd, size_t *len)
{
    struct stat st;
    assert_int_equal(fstat(fd, &st), 0);
    uint8_t *d = malloc((size_t)st.st_size + 1);
    assert_int_equal(pread(fd, d, (size_t)st.st_size, 0), st.st_size);
    *len = (size_t)st.st_size;
    return d;
}

static void test_pprof(void **state)
{
    (void)state;
    char path[] = "/tmp/lum_pprofXXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    assert_int_equal(lum_prof_write_pprof(fd), 0);
    size_t len;
    uint8_t *data = read_all(fd, &len);
    close(fd);
    assert_true(len > 0);
    static struct prof pr;
    decode(data, len, &pr);
    free(data);

    assert_true(pr.nstrings > 0);
    assert_string_equal(pr.strings[0], "");
    static const char *const types[4][2] = {{"alloc_objects", "count"}, {"alloc_space", "bytes"},
                                            {"inuse_objects", "count"}, {"inuse_space", "bytes"}};
    assert_int_equal(pr.nst, 4);
    for (int i = 0; i < 4; i++) {
        assert_string_equal(str(&pr, pr.st_type[i]), types[i][0]);
        assert_string_equal(str(&pr, pr.st_unit[i]), types[i][1]);
    }
    assert_int_equal(pr.period, lum_opt.sample_interval);
    assert_string_equal(str(&pr, pr.period_type), "space");
    assert_string_equal(str(&pr, pr.period_unit), "bytes");
    assert_true(pr.time_nanos > 0);
    assert_true(pr.nmap > 0);

    /* Every location's address lies in its mapping; every sample's locations resolve to
     * functions; the two sites carry exactly their weights. */
    for (unsigned i = 0; i < pr.nloc; i++) {
        if (!pr.loc_map[i])
            continue;
        bool ok = false;
        for (unsigned m = 0; m < pr.nmap; m++)
            if (pr.map_id[m] == pr.loc_map[i])
                ok = pr.loc_addr[i] >= pr.map_lo[m] && pr.loc_addr[i] < pr.map_hi[m];
        assert_true(ok);
    }
    double alpha_space = 0, beta_space = 0, alpha_inuse = 0, beta_inuse = 0, alpha_obj = 0;
    for (unsigned s = 0; s < pr.ns; s++) {
        bool alpha = false, beta = false;
        assert_true(pr.s_depth[s] > 0);
        for (unsigned d = 0; d < pr.s_depth[s]; d++) {
            int li = loc_index(&pr, pr.s_locs[s][d]);
            const char *fn = func_name(&pr, pr.loc_func[li]);
            alpha |= !strcmp(fn, "report_site_alpha");
            beta |= !strcmp(fn, "report_site_beta");
        }
        if (alpha) {
            alpha_obj += (double)pr.s_val[s][0];
            alpha_space += (double)pr.s_val[s][1];
            alpha_inuse += (double)pr.s_val[s][3];
        }
        if (beta) {
            beta_space += (double)pr.s_val[s][1];
            beta_inuse += (double)pr.s_val[s][3];
        }
    }
    /* alpha was sampled 16 times in all (setup + test_folded), 8 still live. */
    assert_true(fabs(alpha_space - 16 * w100) < 1);
    assert_true(fabs(alpha_inuse - 8 * w100) < 1);
    assert_true(fabs(alpha_obj - 16 * w100 / 100) <= 1);
    assert_true(fabs(beta_space - 3 * w3000) < 1);
    assert_true(fabs(beta_inuse - 3 * w3000) < 1);
    for (unsigned i = 0; i < pr.nstrings; i++)
        free(pr.strings[i]);
}

static int site_cb(const struct lum_prof_site *s, void *arg)
{
    double *tot = arg;
    tot[0] += s->alloc_bytes;
    tot[1] += s->live_bytes;
    tot[2] += (double)s->samples;
    assert_true(s->stack_id != 0);
    assert_true(s->depth <= LUM_MAX_FRAMES);
    return 0;
}

static void test_foreach_and_text(void **state)
{
    (void)state;
    double tot[3] = {0};
    assert_int_equal(lum_prof_foreach_site(site_cb, tot), 0);
    assert_true(fabs(tot[0] - (16 * w100 + 3 * w3000)) < 1);
    assert_true(fabs(tot[1] - (8 * w100 + 3 * w3000)) < 1);
    assert_true(tot[2] == 19);

    static char *s;
    static size_t n;
    FILE *f = open_memstream(&s, &n);
    assert_int_equal(lum_prof_write_text(f), 0);
    fclose(f);
    assert_non_null(strstr(s, "== live heap by stack"));
    assert_non_null(strstr(s, "== cumulative allocations by stack"));
    assert_non_null(strstr(s, "== threads"));
    assert_non_null(strstr(s, "report_site_beta"));
    /* The calling thread is listed (registry of the core) with its tid. */
    char tid[32];
    snprintf(tid, sizeof tid, " %d ", (int)gettid());
    assert_non_null(strstr(strstr(s, "== threads"), tid));
    free(s);
}

static void test_dump_by_extension(void **state)
{
    (void)state;
    static const char *const exts[] = {".folded", ".pb", ".txt"};
    for (int i = 0; i < 3; i++) {
        char path[64];
        snprintf(path, sizeof path, "/tmp/lum_dump_%d%s", (int)getpid(), exts[i]);
        assert_int_equal(lum_prof_dump(path, LUM_PROF_AUTO), 0);
        int fd = open(path, O_RDONLY);
        assert_true(fd >= 0);
        size_t len;
        uint8_t *d = read_all(fd, &len);
        close(fd);
        unlink(path);
        assert_true(len > 0);
        if (i == 0) /* folded: text lines ending with a number */
            assert_true(d[len - 1] == '\n' && d[len - 2] >= '0' && d[len - 2] <= '9');
        else if (i == 1) /* pprof: starts with field 1 (sample_type), length-delimited */
            assert_int_equal(d[0], 0x0a);
        else
            assert_memory_equal(d, "lumalloc heap profile", 21);
        free(d);
    }
    assert_int_equal(lum_prof_dump("/nonexistent-dir/x.txt", LUM_PROF_AUTO), -ENOENT);
    assert_int_equal(lum_prof_dump("", LUM_PROF_AUTO), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_folded),
        cmocka_unit_test(test_pprof),
        cmocka_unit_test(test_foreach_and_text),
        cmocka_unit_test(test_dump_by_extension),
    };
    /* Only this test's samples: with one sample per TiB, the test's own allocations are
     * never sampled, and the weights stay those of the formula. */
    lum_options_set("sample_interval", "1t");
    return cmocka_run_group_tests(tests, setup, NULL);
}
