/* Deduplicated stack table: one entry per distinct unwound stack, keyed by its hash, carrying
 * the per-site estimates the reports print.  Entries live for the process (sites are few and a
 * report must be able to name a site whose blocks were all freed). */
#include <string.h>
#include "obs_internal.h"

#define NBUCKETS (1u << 16)
/* Bounds metadata if a program has pathological numbers of distinct stacks (JIT code, deep
 * recursion): beyond this, samples are still counted per thread but not per stack. */
#define MAX_STACKS (1u << 20)

pthread_mutex_t lum_prof_lock = PTHREAD_MUTEX_INITIALIZER;
uint64_t lum_stacktab_dropped;

static struct lum_stack **buckets;
static struct lum_stack *all;
static uint64_t nstacks;

struct lum_stack *lum_stacktab_get(const uint64_t *frames, uint32_t depth, uint64_t id)
{
    if (!buckets) {
        buckets = lum_obs_alloc(NBUCKETS * sizeof *buckets);
        if (!buckets) {
            lum_stacktab_dropped++;
            return NULL;
        }
    }
    struct lum_stack **b = &buckets[(id ^ (id >> 29)) & (NBUCKETS - 1)];
    for (struct lum_stack *s = *b; s; s = s->hnext)
        if (s->id == id && s->depth == depth && !memcmp(s->frames, frames, depth * sizeof *frames))
            return s;
    if (nstacks >= MAX_STACKS) {
        lum_stacktab_dropped++;
        return NULL;
    }
    struct lum_stack *s = lum_obs_alloc(sizeof *s + depth * sizeof *frames);
    if (!s) {
        lum_stacktab_dropped++;
        return NULL;
    }
    s->id = id;
    s->depth = depth;
    memcpy(s->frames, frames, depth * sizeof *frames);
    s->hnext = *b;
    *b = s;
    s->anext = all;
    /* Publish last: reports walk `all` under the same lock, but keep the order sane anyway. */
    __atomic_store_n(&all, s, __ATOMIC_RELEASE);
    nstacks++;
    return s;
}

struct lum_stack *lum_stacktab_first(void)
{
    return __atomic_load_n(&all, __ATOMIC_ACQUIRE);
}

uint64_t lum_stacktab_count(void)
{
    return nstacks;
}

void lum_stacktab_reset_cumulative(void)
{
    for (struct lum_stack *s = all; s; s = s->anext) {
        s->samples = 0;
        s->alloc_bytes = 0;
        s->alloc_objects = 0;
    }
}
