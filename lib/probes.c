/* Semaphores of the lumalloc USDT probes.  They live in the .probes section, where sys/sdt.h
 * semaphores are expected (tools find them through the stapsdt notes, which record their
 * addresses), and are 16-bit counters incremented by each attached tracer. */
#include <string.h>
#include "obs_internal.h"
#include "probes.h"

#define LUM_SEM_DEF(name) \
    volatile unsigned short lumalloc_##name##_semaphore __attribute__((section(".probes"), used));
LUM_PROBE_LIST(LUM_SEM_DEF)
#undef LUM_SEM_DEF

LUM_EXPORT int lum_probe_semaphore(const char *name)
{
#define LUM_SEM_GET(n) if (name && !strcmp(name, #n)) return lumalloc_##n##_semaphore;
    LUM_PROBE_LIST(LUM_SEM_GET)
#undef LUM_SEM_GET
    return -1;
}
