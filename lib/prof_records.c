/* Live sampled allocations, keyed by address: a free of a sampled block finds its weight and
 * stack here, so live-heap estimates and the sample_free probe carry the same figures as the
 * sample.  Chained hash, nodes recycled through a free list.  The bucket array is sized to what
 * is live (one bucket per record at most, from 64 buckets, 512 bytes in the arena) and doubled
 * as it fills: a fixed 64k-bucket array cost every process up to 512 KiB of RSS, touched at
 * random, and a first table of 4 KiB a page in a program that has a few samples live.  The
 * common operations are inline (prof_records.h); the rare ones here. */
#include <string.h>
#include "prof_records.h"

#define MIN_BITS 6
#define MAX_BITS 24

uint64_t lum_records_dropped;
LUM_SAMPLE_DATA_TAIL struct lum_records lum_records __attribute__((aligned(8)));

/* Moves every record to a table of 2^nb buckets; keeps the old one if mmap fails. */
static void rehash(unsigned nb)
{
    struct lum_records *t = &lum_records;
    struct lum_rec **nbk = lum_obs_table(sizeof *nbk << nb);
    if (!nbk)
        return;
    for (size_t i = 0; t->buckets && i < (size_t)1 << t->bits; i++) {
        for (struct lum_rec *n = t->buckets[i], *next; n; n = next) {
            next = n->next;
            struct lum_rec **b = &nbk[lum_records_bucket(n->ptr, nb)];
            n->next = *b;
            *b = n;
        }
    }
    if (t->buckets)
        lum_obs_free_table(t->buckets, sizeof *t->buckets << t->bits);
    t->buckets = nbk;
    t->bits = nb;
}

struct lum_rec *lum_records_add_slow(uintptr_t ptr)
{
    struct lum_records *t = &lum_records;
    if (!t->buckets || (t->live >= (uint64_t)1 << t->bits && t->bits < MAX_BITS))
        rehash(t->buckets ? t->bits + 1 : MIN_BITS);
    struct lum_rec *n = t->free_nodes;
    if (n)
        t->free_nodes = n->next;
    else
        n = lum_obs_alloc(sizeof *n);
    if (!t->buckets || !n) {
        if (n)
            lum_records_put(n);
        lum_records_dropped++;
        return NULL;
    }
    return lum_records_link(n, ptr);
}

uint64_t lum_records_live(void)
{
    return lum_records.live + lum_records.slot_live;
}
