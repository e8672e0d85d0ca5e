/* The sample_batch probe's buffer (batch.c): sampled allocations and their frees, written as
 * struct lum_batch_rec_v1 records while a tracer holds the probe's semaphore, handed to it a
 * batch at a time.  Contract: include/lumalloc_probes.h. */
#ifndef LUM_BATCH_H
#define LUM_BATCH_H
#include "obs_internal.h"
#include "probes.h"

/* Records waiting in the buffer.  Written under lum_prof_lock; read without it only as a hint
 * (is there anything to flush?). */
extern LUM_HIDDEN uint32_t lum_batch_count;

/* Under lum_prof_lock.  Each returns true when the caller must call lum_batch_start_flusher()
 * once it has dropped the lock (the flusher thread is not running yet). */
bool lum_batch_add_sample(uint64_t ptr, uint64_t requested, uint64_t usable, uint64_t weight,
                          uint64_t stack_id, const uint64_t *frames, uint32_t depth);
bool lum_batch_add_free(uint64_t ptr, uint64_t requested, uint64_t usable, uint64_t weight,
                        uint64_t stack_id);
/* Without lum_prof_lock. */
void lum_batch_start_flusher(void);

/* Flushes what is waiting (without lum_prof_lock held).  Does nothing in a fork child whose
 * buffer still holds the parent's records. */
void lum_batch_sync(void);

/* Before firing any other probe: a tracer of both sees the batched events that came first. */
static inline void lum_batch_before_probe(void)
{
    if (LUM_PROBE_ON(sample_batch) && __atomic_load_n(&lum_batch_count, __ATOMIC_RELAXED))
        lum_batch_sync();
}

/* For unit tests: called with each batch as it is published (under lum_prof_lock), and a way
 * to keep the flusher thread from starting so that the other flushes can be told apart. */
extern void (*lum_batch_test_hook)(const void *buf, uint64_t bytes, uint32_t nrecords);
extern LUM_HIDDEN bool lum_batch_test_no_flusher;

#endif
