/* Live sampled allocations, keyed by address: a free of a sampled block finds its weight and
 * stack here, so live-heap estimates and the sample_free probe carry the same figures as the
 * sample.  Chained hash, nodes recycled through a free list.  The bucket array is sized to what
 * is live (one bucket per record at most, from 512 buckets, 4 KiB) and doubled as it fills:
 * a fixed 64k-bucket array cost every process up to 512 KiB of RSS, touched at random. */
#include <string.h>
#include "obs_internal.h"

#define MIN_BITS 9
#define MAX_BITS 24

uint64_t lum_records_dropped;
static struct lum_rec **buckets;
static unsigned bits;
static struct lum_rec *free_nodes;
static uint64_t live;

static inline size_t bucket_of(uintptr_t p, unsigned b)
{
    return (size_t)(((uint64_t)p * 0x9e3779b97f4a7c15ULL) >> (64 - b));
}

/* Moves every record to a table of 2^nb buckets; keeps the old one if mmap fails. */
static void rehash(unsigned nb)
{
    struct lum_rec **nbk = lum_obs_pages(sizeof *nbk << nb);
    if (!nbk)
        return;
    for (size_t i = 0; buckets && i < (size_t)1 << bits; i++) {
        for (struct lum_rec *n = buckets[i], *next; n; n = next) {
            next = n->next;
            struct lum_rec **b = &nbk[bucket_of(n->ptr, nb)];
            n->next = *b;
            *b = n;
        }
    }
    if (buckets)
        lum_obs_free_pages(buckets, sizeof *buckets << bits);
    buckets = nbk;
    bits = nb;
}

static inline void link_node(struct lum_rec *n, const struct lum_rec *r)
{
    *n = *r;
    struct lum_rec **b = &buckets[bucket_of(r->ptr, bits)];
    n->next = *b;
    *b = n;
    live++;
}

/* The rare cases out of line (first use, growth, no recycled node), so that the common insert
 * is a leaf that saves no registers. */
static __attribute__((noinline, cold)) bool insert_slow(const struct lum_rec *r)
{
    if (!buckets || (live >= (uint64_t)1 << bits && bits < MAX_BITS))
        rehash(buckets ? bits + 1 : MIN_BITS);
    struct lum_rec *n = free_nodes;
    if (n)
        free_nodes = n->next;
    else
        n = lum_obs_alloc(sizeof *n);
    if (!buckets || !n) {
        if (n) {
            n->next = free_nodes;
            free_nodes = n;
        }
        lum_records_dropped++;
        return false;
    }
    link_node(n, r);
    return true;
}

bool lum_records_insert(const struct lum_rec *r)
{
    struct lum_rec *n = free_nodes;
    if (!n || !buckets || live >= (uint64_t)1 << bits)
        return insert_slow(r);
    free_nodes = n->next;
    link_node(n, r);
    return true;
}

bool lum_records_remove(uintptr_t ptr, struct lum_rec *out)
{
    if (!buckets)
        return false;
    for (struct lum_rec **pp = &buckets[bucket_of(ptr, bits)]; *pp; pp = &(*pp)->next) {
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
