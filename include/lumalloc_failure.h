/* lumalloc failure tools, after Seastar's: an allocation-failure injector, a sweep that fails
 * each allocation of a function in turn, critical allocation scopes, a diagnostics report on
 * failure with an application-supplied section, and abort-on-failure.
 *
 * Injected failures look like real ones to the program (NULL, errno = ENOMEM), fire the
 * `alloc_failure` probe and count in the thread's `failures`, but never abort.
 *
 * While any injector is armed (either kind, in any thread), every allocation of every thread
 * takes the slow path, where the injector counts it, and none is sampled: the profile has no
 * samples from that time, and allocations cost about twice as much.  A thread's own injector
 * (lum_fail_after) is cancelled when the thread exits. */
#ifndef LUMALLOC_FAILURE_H
#define LUMALLOC_FAILURE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Process-wide: the n-th allocation from now (1 = the next one), in any thread, fails; once.
 * 0 disarms.  LUMALLOC_FAIL_NTH=n does this at start-up (counting from the first allocation).
 * When armed at run time, the calling thread counts at once; other threads join the count at
 * their next slow-path allocation (at most one sampling interval or 4 MiB of their
 * allocations later, whichever is less; with sampling off, 4 MiB). */
void lum_fail_nth(uint64_t n);

/* Calling thread: n allocations succeed, then the next one fails; once.  Disarms itself. */
void lum_fail_after(uint64_t n);
void lum_fail_cancel(void);
/* Whether an injection happened in this thread since the last lum_fail_after. */
bool lum_fail_fired(void);
/* Allocations this thread made since the last lum_fail_after. */
uint64_t lum_fail_count(void);

/* Allocations of this thread between enter and leave are never injected (nests). */
void lum_fail_suppress_enter(void);
void lum_fail_suppress_leave(void);

/* Runs fn(arg) repeatedly in the calling thread, failing its first allocation, then its second,
 * and so on, until a run reaches no injected failure.  Returns the number of runs: a function
 * that makes k allocations on its successful path runs k + 1 times.  fn must clean up after a
 * failed allocation (that is what the sweep tests). */
unsigned long lum_with_allocation_failures(void (*fn)(void *arg), void *arg);

/* Critical allocation scopes (nest, per thread): with diagnostics mode "critical" (the default,
 * LUMALLOC_DIAG), a failure inside a scope prints the diagnostics report. */
void lum_critical_scope_enter(void);
void lum_critical_scope_leave(void);
bool lum_in_critical_scope(void);

/* Diagnostics mode: none, critical, all (LUMALLOC_DIAG). */
enum lum_diagnostics_mode { LUM_DIAGNOSTICS_NONE = 0, LUM_DIAGNOSTICS_CRITICAL = 1,
                            LUM_DIAGNOSTICS_ALL = 2 };
void lum_set_diagnostics_mode(enum lum_diagnostics_mode mode);

/* The application's section of the report.  The producer is called from inside the failing
 * allocation: it must not rely on allocating (it may, but allocations may fail), and writes
 * its text through `write`, which may be called any number of times. */
typedef void (*lum_diagnostics_writer)(const char *text, size_t len);
typedef void (*lum_diagnostics_producer)(lum_diagnostics_writer write, void *arg);
void lum_set_diagnostics_producer(lum_diagnostics_producer producer, void *arg);

/* Where the report goes (default 2, stderr). */
void lum_set_diagnostics_fd(int fd);

/* Writes the report now, as a failure's (stack, thread and process figures, sampled sites, the
 * application's section), for tests and for applications that want it on their own triggers.
 * Its first line says it was requested, not that an allocation failed, and gives `size` as
 * passed. */
void lum_diagnostics_report(size_t size);

/* abort() on a (non-injected) allocation failure; LUMALLOC_ABORT_ON_FAILURE. */
void lum_set_abort_on_failure(bool on);
bool lum_get_abort_on_failure(void);

#ifdef __cplusplus
}
#endif
#endif
