/* USDT probes of provider `lumalloc` (contract: include/lumalloc_probes.h).  Every probe has a
 * semaphore that tracers increment while attached, so callers test LUM_PROBE_ON(name) before
 * doing tracer-only work (unwinding, building arguments) and the disabled cost is one load. */
#ifndef LUM_PROBES_INTERNAL_H
#define LUM_PROBES_INTERNAL_H

#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
#include "hidden.h"
/* sdt.h's 1-byte nop at each probe site, on purpose.  A 5-byte one lets kernels with optimized
 * uprobes (x86-64, 6.16+) patch in a call to a trampoline instead of trapping (~1.0 against
 * ~1.27 us a hit), but on 6.18 a child forked while a tracer is attached inherits that call
 * without the trampoline's mapping and dies of SIGSEGV at its first probe site.  With
 * sample_batch a tracer takes a few hits a second, so the trap costs nothing that matters. */

#define LUM_PROBE_LIST(X) \
    X(sample) X(sample_free) X(large_alloc) X(large_free) X(alloc_failure) \
    X(thread_start) X(thread_exit) X(purge) X(pressure) X(sample_batch)

/* Hidden (tracers find them by the stapsdt notes' addresses, not by symbol): a test reads the
 * semaphore off %rip, where a default-visibility declaration had the compiler take its address
 * from the GOT first (a lea once the linker relaxes it), an instruction more a test. */
#define LUM_SEM_DECL(name) extern LUM_HIDDEN volatile unsigned short lumalloc_##name##_semaphore;
LUM_PROBE_LIST(LUM_SEM_DECL)
#undef LUM_SEM_DECL

#define LUM_PROBE_ON(name) __builtin_expect(lumalloc_##name##_semaphore != 0, 0)
/* Either of two, or-ed: one branch. */
#define LUM_PROBE_EITHER_ON(a, b) \
    __builtin_expect((lumalloc_##a##_semaphore | lumalloc_##b##_semaphore) != 0, 0)

/* Casts keep the argument widths of the contract whatever the caller's types. */
#define LUM_U64(x) ((uint64_t)(uintptr_t)(x))
#define LUM_U32(x) ((uint32_t)(x))

#endif
