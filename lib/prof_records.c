/* Live sampled allocations, keyed by address: a free of a sampled block finds its weight and
 * stack here, so live-heap estimates and the sample_free probe carry the same figures as the
 * sample.  Chained hash over a fixed bucket array, nodes recycled through a free list. */
#include <string.h>
#include "obs_internal.h"

#define NBUCKETS (1u << 16)

uint64_t lum_records_dropped;
static struct lum_rec **buckets;
static struct lum_rec *free_nodes;
static uint64_t live;

static inline size_t bucket_of(uintptr_t p)
{
    uint64_t h = (uint64_t)p * 0x9e3779b97f4a7c15ULL;
    return (size_t)(h >> 48) & (NBUCKETS - 1);
}

bool lum_records_insert(const struct lum_rec *r)
{
    if (!buckets) {
        buckets = lum_obs_alloc(NBUCKETS * sizeof *buckets);
        if (!buckets) {
            lum_records_dropped++;
            return false;
        }
    }
    struct lum_rec *n = free_nodes;
    if (n) {
        free_nodes = n->next;
    } else {
        n = lum_obs_alloc(sizeof *n);
        if (!n) {
            lum_records_dropped++;
            return false;
        }
    }
    *n = *r;
    struct lum_rec **b = &buckets[bucket_of(r->ptr)];
    n->next = *b;
    *b = n;
    live++;
    return true;
}

bool lum_records_remove(uintptr_t ptr, struct lum_rec *out)
{
    if (!buckets)
        return false;
    for (struct lum_rec **pp = &buckets[bucket_of(ptr)]; *pp; pp = &(*pp)->next) {
        struct lum_rec *n = *pp;
        if (n->ptr != ptr)
            continue;
        *pp = n->next;
        *out = *n;
        n->next = free_nodes;
        free_nodes = n;
        live--;
        return true;
    }
    return false;
}

uint64_t lum_records_live(void)
{
    return live;
}
