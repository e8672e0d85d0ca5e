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

static inline struct lum_rec *link_node(struct lum_rec *n, uintptr_t ptr)
{
    struct lum_rec **b = &buckets[bucket_of(ptr, bits)];
    n->ptr = ptr;
    n->next = *b;
    *b = n;
    live++;
    return n;
}

/* The rare cases out of line (first use, growth, no recycled node), so that the common insert
 * is a leaf that saves no registers. */
static __attribute__((noinline, cold)) struct lum_rec *add_slow(uintptr_t ptr)
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
        return NULL;
    }
    return link_node(n, ptr);
}

struct lum_rec *lum_records_add(uintptr_t ptr)
{
    struct lum_rec *n = free_nodes;
    if (!n || !buckets || live >= (uint64_t)1 << bits)
        return add_slow(ptr);
    free_nodes = n->next;
    return link_node(n, ptr);
}

struct lum_rec *lum_records_take(uintptr_t ptr)
{
    if (!buckets)
        return NULL;
    for (struct lum_rec **pp = &buckets[bucket_of(ptr, bits)]; *pp; pp = &(*pp)->next) {
        struct lum_rec *n = *pp;
        if (n->ptr != ptr)
            continue;
        *pp = n->next;
        live--;
        return n;
    }
    return NULL;
}

void lum_records_put(struct lum_rec *n)
{
    n->next = free_nodes;
    free_nodes = n;
}

uint64_t lum_records_live(void)
{
    return live;
}
