/* LUM_HIDDEN on the declaration of a variable the library shares between its files.  The
 * library is built with -fvisibility=hidden, so the definitions are hidden already, but a file
 * that only sees the declaration must assume the variable may live in another module and
 * reads its address from the GOT first (relaxed by the linker to a lea, still an instruction).
 * Declared hidden, it is addressed straight off %rip: `mov lum_opt+40(%rip)` instead of a lea
 * and a load.  lumalloc_registry, the one exported variable, stays without. */
#ifndef LUM_HIDDEN_H
#define LUM_HIDDEN_H
#define LUM_HIDDEN __attribute__((visibility("hidden")))
/* On the definition of a variable every sample reads or writes (the sampled pages' lock, the
 * sample counters, the record table's slot count, the unwinder's counters and generation, the
 * failure-injection flag, the sampling interval's epoch, the sampled pages' release_due, which
 * every sampled free reads): lib/cold_text.ld gathers them in one 64-aligned output section, one
 * cache line with LUM_SAMPLE_DATA_TAIL's first field (nm: 0x38 bytes), where .bss had them on five lines among variables nothing else on the sampling
 * path reads.  A sample comes every 512 KiB, so its lines are out of L1 each time: every line
 * it touches is a miss, and evicts a line of the ordinary paths (callgrind --cache-sim). */
#define LUM_SAMPLE_DATA __attribute__((section(".data.lum_sample")))
/* The same for the 4-byte variables, placed first so that no 8-byte one leaves a hole after
 * one of them: with these 4-byte ones first the section fits one line. */
#define LUM_SAMPLE_DATA4 __attribute__((section(".data.lum_sample.4")))
/* The same, placed after every LUM_SAMPLE_DATA variable (lum_records, whose first field alone is
 * the samples', defined aligned(8): GCC gives a 40-byte variable 32 by default, which put that
 * field on the next line): with it, what a sample and a sampled free touch there is on one
 * line, where the failure flag and the unwinder's atomic counters had a line of their own. */
#define LUM_SAMPLE_DATA_TAIL __attribute__((section(".data.lum_sample.tail")))
#endif
