/* USDT probes of provider `lumalloc` (contract: include/lumalloc_probes.h).  Every probe has a
 * semaphore that tracers increment while attached, so callers test LUM_PROBE_ON(name) before
 * doing tracer-only work (unwinding, building arguments) and the disabled cost is one load. */
#ifndef LUM_PROBES_INTERNAL_H
#define LUM_PROBES_INTERNAL_H

#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
#if defined(__x86_64__)
/* A 5-byte nop at each probe site instead of sdt.h's 1-byte one: kernels with optimized
 * uprobes (x86-64, 6.16+) then patch in a call to the uprobe trampoline instead of trapping on
 * an int3, which is most of what an attached tracer costs per event.  Older kernels and other
 * tracers still put their int3 on the first byte of the nop, as before. */
#undef _SDT_NOP
#define _SDT_NOP .nops 5
#endif

#define LUM_PROBE_LIST(X) \
    X(sample) X(sample_free) X(large_alloc) X(large_free) X(alloc_failure) \
    X(thread_start) X(thread_exit) X(purge) X(pressure) X(sample_batch)

#define LUM_SEM_DECL(name) extern volatile unsigned short lumalloc_##name##_semaphore;
LUM_PROBE_LIST(LUM_SEM_DECL)
#undef LUM_SEM_DECL

#define LUM_PROBE_ON(name) __builtin_expect(lumalloc_##name##_semaphore != 0, 0)

/* Casts keep the argument widths of the contract whatever the caller's types. */
#define LUM_U64(x) ((uint64_t)(uintptr_t)(x))
#define LUM_U32(x) ((uint32_t)(x))

#endif
