/* The live records' table (prof_records.c): its common operations inline, for the sample and
 * its free (three calls there were ~15 of a sample's instructions).  All under lum_prof_lock. */
#ifndef LUM_PROF_RECORDS_H
#define LUM_PROF_RECORDS_H
#include "obs_internal.h"

struct lum_records {
    /* records in sampled blocks' slots (lum_sample_rec), not in the table: under
     * lum_sampled_lock, like the slots (see obs_internal.h).  First: every sample and sampled
     * free changes it, and the struct comes last in .data.lum_sample (LUM_SAMPLE_DATA_TAIL),
     * so that it ends the line of the section's other variables and the rest of the struct,
     * which no sample reads, goes on the next. */
    uint64_t slot_live;
    struct lum_rec **buckets;
    unsigned bits;
    struct lum_rec *free_nodes;
    uint64_t live;
};
extern LUM_HIDDEN struct lum_records lum_records;
/* First use, growth, no recycled node: out of line. */
__attribute__((cold)) struct lum_rec *lum_records_add_slow(uintptr_t ptr);

static inline size_t lum_records_bucket(uintptr_t p, unsigned b)
{
    return (size_t)(((uint64_t)p * 0x9e3779b97f4a7c15ULL) >> (64 - b));
}

static inline struct lum_rec *lum_records_link(struct lum_rec *n, uintptr_t ptr)
{
    struct lum_rec **b = &lum_records.buckets[lum_records_bucket(ptr, lum_records.bits)];
    n->ptr = ptr;
    n->next = *b;
    *b = n;
    lum_records.live++;
    return n;
}

/* A record for ptr, linked, every other field left for the caller to fill (no copy of a
 * record built elsewhere); NULL when memory is exhausted (counted as dropped). */
static inline struct lum_rec *lum_records_add(uintptr_t ptr)
{
    struct lum_rec *n = lum_records.free_nodes;
    if (!n || !lum_records.buckets || lum_records.live >= (uint64_t)1 << lum_records.bits)
        return lum_records_add_slow(ptr);
    lum_records.free_nodes = n->next;
    return lum_records_link(n, ptr);
}

/* Unlinks the record of ptr, NULL when ptr was not recorded; the caller reads it, then gives it
 * back with lum_records_put. */
static inline struct lum_rec *lum_records_take(uintptr_t ptr)
{
    if (!lum_records.buckets)
        return NULL;
    for (struct lum_rec **pp = &lum_records.buckets[lum_records_bucket(ptr, lum_records.bits)]; *pp;
         pp = &(*pp)->next) {
        struct lum_rec *n = *pp;
        if (n->ptr != ptr)
            continue;
        *pp = n->next;
        lum_records.live--;
        return n;
    }
    return NULL;
}

static inline void lum_records_put(struct lum_rec *n)
{
    n->next = lum_records.free_nodes;
    lum_records.free_nodes = n;
}
#endif
