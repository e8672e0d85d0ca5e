#ifndef LUM_COLD_TEXT_H
#define LUM_COLD_TEXT_H

/* Code an ordinary program never runs (reports, options given, fork child, failure injection,
 * tracer paths): lib/cold_text.ld puts it in a mapping of its own after the read-only data, so
 * the kernel's fault-around on the hot text never makes it resident.  Not for code that merely
 * runs rarely: one call faults the whole cold mapping in. */
#define LUM_COLD_TEXT __attribute__((noinline, cold, section(".text.lum_cold")))
/* Read-only data only such code reads (report texts): in the cold read-only mapping. */
#define LUM_COLD_RODATA __attribute__((section(".rodata.lum_cold")))

#endif
