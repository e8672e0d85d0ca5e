/* The in-process heap profile of a running process (include/lumalloc_probes.h,
 * `lumalloc_profile`), read with process_vm_readv: no probe, no stop, and everything sampled
 * since the process started, where a tracer sees only what happens while it is attached. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tc.h"

/* Far more than the library keeps (MAX_STACKS in lib/stacktab.c, 2^20): a walk past this is not
 * reading a profile.  The target's own counts are not trusted for the bound: a corrupt or
 * hostile one would have the tool read (and hold) without end. */
#define PROFILE_MAX_RECORDS ((1u << 20) + 4096)
#define PROFILE_MAX_RECORD_HEAD 4096 /* stack_size beyond this is not a record's head */
#define PROFILE_MAX_FRAMES 1024

int tc_profile_read(const struct tc_target *t, struct lum_profile_v1 *hdr, struct tc_heap_stack **out, size_t *n,
                    bool *truncated)
{
    *out = NULL;
    *n = 0;
    *truncated = false;
    if (!t->profile_addr)
        return -ENOENT;
    pid_t task = tc_proc_task(t->pid);
    if (!task)
        return -ESRCH;
    ssize_t r = tc_read_mem(task, t->profile_addr, hdr, sizeof(*hdr));
    if (r < 0)
        return (int)r;
    if ((size_t)r != sizeof(*hdr))
        return -EFAULT;
    if (hdr->magic != LUM_PROFILE_MAGIC || hdr->version < 1 || hdr->stack_size < LUM_PROFILE_STACK_SIZE ||
        hdr->stack_size > PROFILE_MAX_RECORD_HEAD || hdr->max_depth > PROFILE_MAX_FRAMES)
        return -EPROTO;
    if (!hdr->enabled)
        return -ENODATA;
    /* A record and the most frames one can have, in one read: it may end short at the end of
     * the library's metadata mapping, and only the frames the record has must be there. */
    uint32_t max_frames = hdr->max_depth > LUM_MAX_FRAMES ? hdr->max_depth : LUM_MAX_FRAMES;
    size_t want = hdr->stack_size + (size_t)max_frames * sizeof(uint64_t);
    uint8_t *buf = malloc(want);
    size_t cap = 0;
    struct tc_heap_stack *v = NULL;
    struct tc_map64 seen = {0}; /* addresses walked: a cycle ends the walk */
    if (!buf)
        return -ENOMEM;
    int err = 0;
    for (uint64_t a = hdr->stacks; a; ) {
        bool created = false;
        if (*n >= PROFILE_MAX_RECORDS || !tc_map64_put(&seen, a | 1, &created) || !created) {
            err = -ELOOP;
            break;
        }
        r = tc_read_mem(task, a, buf, want);
        if (r < (ssize_t)hdr->stack_size) {
            err = r < 0 ? (int)r : -EFAULT;
            break;
        }
        struct lum_profile_stack_v1 rec;
        memcpy(&rec, buf, sizeof(rec));
        if (rec.depth > max_frames || (size_t)r < hdr->stack_size + rec.depth * sizeof(uint64_t)) {
            err = -EPROTO;
            break;
        }
        if (*n == cap) {
            cap = cap ? cap * 2 : 256;
            struct tc_heap_stack *nv = realloc(v, cap * sizeof(*v));
            if (!nv) {
                err = -ENOMEM;
                break;
            }
            v = nv;
        }
        uint64_t *frames = NULL;
        if (rec.depth && !(frames = malloc(rec.depth * sizeof(uint64_t)))) {
            err = -ENOMEM;
            break;
        }
        if (rec.depth)
            memcpy(frames, buf + hdr->stack_size, rec.depth * sizeof(uint64_t));
        v[(*n)++] = (struct tc_heap_stack){rec, frames};
        a = rec.older;
    }
    free(buf);
    tc_map64_free(&seen);
    /* A walk cut short (the process exiting, a record this tool cannot read) still gives what it
     * read, each record whole, and says so. */
    if (err && !*n) {
        free(v);
        return err;
    }
    *truncated = err != 0;
    *out = v;
    return 0;
}

const char *tc_profile_strerror(int err)
{
    switch (err) {
    case -ENOENT:
        return "has no lumalloc_profile symbol (a lumalloc from before it, or a stripped static executable)";
    case -ENODATA:
        return "keeps no in-process profile (LUMALLOC_PROF=off, or lumalloc has not started there yet)";
    case -EPERM:
    case -EACCES:
        return "its memory cannot be read (run as root, or with CAP_SYS_PTRACE)";
    case -EPROTO:
        return "its lumalloc profile is not in a format this tool reads";
    }
    return strerror(err < 0 ? -err : EIO);
}

void tc_profile_free(struct tc_heap_stack *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i].frames);
    free(v);
}

static int cmp_site_key(const void *a, const void *b)
{
    const struct tc_heap_site *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    return c ? c : strcmp(x->caller, y->caller);
}

size_t tc_heap_sites(struct tc_symbolizer *sym, pid_t pid, const struct tc_heap_stack *v, size_t n,
                     struct tc_heap_site **out)
{
    *out = NULL;
    struct tc_heap_site *s = calloc(n ? n : 1, sizeof(*s));
    if (!s)
        return 0;
    for (size_t i = 0; i < n; i++) {
        const struct lum_profile_stack_v1 *r = &v[i].rec;
        tc_site_names(sym, pid, v[i].frames, r->depth, s[i].name, sizeof(s[i].name), s[i].caller,
                      sizeof(s[i].caller));
        s[i].live = (double)r->live_bytes;
        s[i].live_objects = r->live_objects;
        s[i].alloc = (double)r->alloc_bytes;
        s[i].samples = r->samples;
        s[i].live_samples = r->live_samples;
    }
    /* sorted by site, then each run of one site summed into its first entry */
    qsort(s, n, sizeof(*s), cmp_site_key);
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (m && !cmp_site_key(&s[m - 1], &s[i])) {
            s[m - 1].live += s[i].live;
            s[m - 1].live_objects += s[i].live_objects;
            s[m - 1].alloc += s[i].alloc;
            s[m - 1].samples += s[i].samples;
            s[m - 1].live_samples += s[i].live_samples;
        } else {
            s[m++] = s[i];
        }
    }
    *out = s;
    return m;
}

const struct tc_heap_site *tc_heap_site_find(const struct tc_heap_site *sites, size_t n, const struct tc_heap_site *key)
{
    return bsearch(key, sites, n, sizeof(*sites), cmp_site_key);
}
