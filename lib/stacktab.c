/* Deduplicated stack table: one entry per distinct unwound stack, keyed by its hash, carrying
 * the per-site estimates the reports print.  Entries live for the process (sites are few and a
 * report must be able to name a site whose blocks were all freed). */
#include <string.h>
#include "obs_internal.h"

/* The bucket array starts at 64 buckets (512 bytes, in the arena with the stacks) and doubles
 * when the stacks outnumber the buckets: a fixed 64k-bucket array cost every process up to
 * 512 KiB of RSS, and a first table in a mapping of its own a page. */
#define MIN_BITS 6
/* Bounds metadata if a program has pathological numbers of distinct stacks (JIT code, deep
 * recursion): beyond this, samples are still counted per thread but not per stack. */
#define MAX_STACKS (1u << 20)

lum_lock_t lum_prof_lock = LUM_LOCK_INIT;

/* The stacks are the in-process profile a tool reads from a live process (allocsnoop --heap):
 * the list's head and count live in this exported record, and a stack's record is laid out as
 * the contract's (include/lumalloc_probes.h). */
LUM_EXPORT struct lum_profile_v1 lumalloc_profile = {
    .magic = LUM_PROFILE_MAGIC,
    .version = 1,
    .stack_size = LUM_PROFILE_STACK_SIZE,
};
#define PUB(field, pub) \
    _Static_assert(offsetof(struct lum_stack, field) == offsetof(struct lum_profile_stack_v1, pub), #field)
PUB(samples, samples);
PUB(alloc_bytes, alloc_bytes);
PUB(alloc_objects, alloc_objects);
PUB(live_samples, live_samples);
PUB(live_bytes, live_bytes);
PUB(live_objects, live_objects);
PUB(id, stack_id);
PUB(depth, depth);
PUB(hnext, library_private);
PUB(anext, older);
_Static_assert(offsetof(struct lum_stack, frames) == LUM_PROFILE_STACK_SIZE &&
                   sizeof(struct lum_profile_stack_v1) == LUM_PROFILE_STACK_SIZE,
               "a stack's frames start where the contract says");
#undef PUB

static struct lum_stack **buckets;
static unsigned bits;

static inline struct lum_stack *newest(void)
{
    return (struct lum_stack *)(uintptr_t)__atomic_load_n(&lumalloc_profile.stacks, __ATOMIC_ACQUIRE);
}

static inline size_t bucket_of(uint64_t id, unsigned b)
{
    return (size_t)((id * 0x9e3779b97f4a7c15ULL) >> (64 - b));
}

/* Moves every stack to a table of 2^nb buckets; keeps the old one if mmap fails. */
static void rehash(unsigned nb)
{
    struct lum_stack **nbk = lum_obs_table(sizeof *nbk << nb);
    if (!nbk)
        return;
    for (struct lum_stack *s = newest(); s; s = s->anext) {
        struct lum_stack **b = &nbk[bucket_of(s->id, nb)];
        s->hnext = *b;
        *b = s;
    }
    if (buckets)
        lum_obs_free_table(buckets, sizeof *buckets << bits);
    buckets = nbk;
    bits = nb;
}

static inline bool same_frames(const uint64_t *a, const uint64_t *b, uint32_t depth)
{
    /* a few words: an inline loop beats a call to memcmp */
    for (uint32_t i = 0; i < depth; i++)
        if (a[i] != b[i])
            return false;
    return true;
}

struct lum_stack *lum_stacktab_get(const uint64_t *frames, uint32_t depth, uint64_t id)
{
    if (buckets) {
        for (struct lum_stack *s = buckets[bucket_of(id, bits)]; s; s = s->hnext)
            if (s->id == id && s->depth == depth && same_frames(s->frames, frames, depth))
                return s;
    }
    /* a new stack: grow the table first if the stacks outnumber its buckets */
    if (!buckets || (lumalloc_profile.nstacks >= (uint64_t)1 << bits && (1ull << bits) < MAX_STACKS))
        rehash(buckets ? bits + 1 : MIN_BITS);
    if (!buckets) {
        lumalloc_profile.dropped++;
        return NULL;
    }
    struct lum_stack **b = &buckets[bucket_of(id, bits)];
    if (lumalloc_profile.nstacks >= MAX_STACKS) {
        lumalloc_profile.dropped++;
        return NULL;
    }
    struct lum_stack *s = lum_obs_alloc_aligned(sizeof *s + depth * sizeof *frames, 64);
    if (!s) {
        lumalloc_profile.dropped++;
        return NULL;
    }
    s->id = id;
    s->depth = depth;
    memcpy(s->frames, frames, depth * sizeof *frames);
    s->hnext = *b;
    *b = s;
    s->anext = newest();
    /* Published whole, and counted first: reports walk the list under the same lock, but a
     * tool reads it from outside at any moment (the contract: a record is complete before the
     * list names it, and the count read after a walk covers what the walk saw). */
    __atomic_store_n(&lumalloc_profile.nstacks, lumalloc_profile.nstacks + 1, __ATOMIC_RELAXED);
    __atomic_store_n(&lumalloc_profile.stacks, (uint64_t)(uintptr_t)s, __ATOMIC_RELEASE);
    return s;
}

struct lum_stack *lum_stacktab_first(void)
{
    return newest();
}

uint64_t lum_stacktab_count(void)
{
    return lumalloc_profile.nstacks;
}

void lum_stacktab_reset_cumulative(void)
{
    for (struct lum_stack *s = newest(); s; s = s->anext) {
        s->samples = 0;
        s->alloc_bytes = 0;
        s->alloc_objects = 0;
    }
}
