/* Large allocations: the large_alloc/large_free probes and the large-allocation warning, printed
 * once per call site (stack hash) with its symbolised stack, like Seastar's large allocation
 * warning.  Runs inside malloc, so the report is built in an mmap buffer and written with
 * write(2); symbols come from the loader's index and .dynsym only (LUM_SYM_INSIDE: no loader
 * lock, no ELF reading inside the allocator). */
#include <stdio.h>
#include "batch.h"
#include "obs_internal.h"
#include "observe.h"
#include "options.h"
#include "probes.h"

#define WARNED_SLOTS 4096 /* sites warned about; beyond that, further sites are not reported */

pthread_mutex_t lum_warn_lock = PTHREAD_MUTEX_INITIALIZER;
#define warn_lock lum_warn_lock
static uint64_t *warned;
static unsigned nwarned;
uint64_t lum_large_warnings;

/* true when id is new (and is now remembered). */
static bool first_time(uint64_t id)
{
    bool fresh = false;
    /* 0 marks a free slot: the sites without a stack (id 0) share key 1, or each of their
     * warnings took a slot, warned every time, and filled the table, silencing every site */
    if (!id)
        id = 1;
    lum_mutex_lock(&warn_lock);
    if (!warned)
        warned = lum_obs_alloc(WARNED_SLOTS * sizeof *warned);
    if (warned && nwarned < WARNED_SLOTS / 2) {
        unsigned i = (unsigned)(id * 0x9e3779b97f4a7c15ULL >> 52) & (WARNED_SLOTS - 1);
        while (warned[i] && warned[i] != id)
            i = (i + 1) & (WARNED_SLOTS - 1);
        if (!warned[i]) {
            warned[i] = id;
            nwarned++;
            fresh = true;
        }
    }
    lum_mutex_unlock(&warn_lock);
    return fresh;
}

LUM_COLD_TEXT static void warn(size_t requested, const uint64_t *frames, uint32_t depth)
{
    struct lum_buf b = {0};
    char name[320];
    lum_buf_printf(&b, "lumalloc: large allocation of %zu bytes (warning threshold %llu) at:\n",
                   requested, (unsigned long long)lum_opt.large_warn);
    for (uint32_t i = 0; i < depth; i++) {
        lum_symbolize((uintptr_t)frames[i] - 1, name, sizeof name, LUM_SYM_OFFSET | LUM_SYM_MODULE | LUM_SYM_INSIDE);
        lum_buf_printf(&b, "  #%-2u 0x%016llx %s\n", i, (unsigned long long)frames[i], name);
    }
    if (!depth)
        lum_buf_puts(&b, "  (no stack)\n");
    if (b.len)
        lum_write_all(2, b.data, b.len);
    lum_buf_free(&b);
    __atomic_fetch_add(&lum_large_warnings, 1, __ATOMIC_RELAXED);
}

/* Unwinds (unless nested in profiler code), warns once per site.  Returns the depth. */
LUM_COLD_TEXT static uint32_t stack_and_warn(size_t requested, bool warning, uintptr_t hook_ret,
                               uint64_t *frames, uint64_t *id)
{
    uint32_t depth = 0;
    *id = 0;
    if (lum_obs_busy)
        return 0;
    lum_obs_busy = 1;
    if (lum_opt.prof_depth || warning) {
        depth = lum_unwind(frames, lum_opt.prof_depth ? lum_opt.prof_depth : 16, hook_ret);
        *id = depth ? lum_stack_hash(frames, depth) : 0; /* no stack: 0, as the contract says */
    }
    if (warning && first_time(*id))
        warn(requested, frames, depth);
    lum_obs_busy = 0;
    return depth;
}

void lum_on_large_alloc(struct lum_thread_counters_v1 *tc, void *ptr, size_t requested, size_t usable)
{
    bool probe = LUM_PROBE_ON(large_alloc);
    bool warning = lum_warns_large(requested);
    if (!probe && !warning)
        return;
    uint64_t frames[LUM_MAX_FRAMES], id;
    uint32_t depth = stack_and_warn(requested, warning, (uintptr_t)__builtin_return_address(0),
                                    frames, &id);
    if (probe) {
        lum_batch_before_probe();
        STAP_PROBE7(lumalloc, large_alloc, LUM_U64(ptr), LUM_U64(requested), LUM_U64(usable),
                    LUM_U64(frames), LUM_U32(depth), LUM_U64(id), LUM_U64(tc));
    }
}

void lum_on_large_warn(size_t requested)
{
    if (!lum_warns_large(requested))
        return;
    uint64_t frames[LUM_MAX_FRAMES], id;
    stack_and_warn(requested, true, (uintptr_t)__builtin_return_address(0), frames, &id);
}

void lum_on_large_free(void *ptr, size_t usable)
{
    if (LUM_PROBE_ON(large_free)) {
        lum_batch_before_probe();
        STAP_PROBE2(lumalloc, large_free, LUM_U64(ptr), LUM_U64(usable));
    }
}
