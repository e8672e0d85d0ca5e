/* Minimal implementation of the observability seam; the profiler replaces it. */
#include <stdint.h>
#include "observe.h"
#include "options.h"

volatile int lum_fail_armed;

void lum_observe_init(void) {}
int64_t lum_sampler_next_interval(uint64_t *rng) { (void)rng; return INT64_MAX; }
void lum_on_sample(struct lum_thread_counters_v1 *tc, void *p, size_t r, size_t u) { (void)tc; (void)p; (void)r; (void)u; }
void lum_on_sample_free(void *p, size_t u) { (void)p; (void)u; }
void lum_on_large_alloc(struct lum_thread_counters_v1 *tc, void *p, size_t r, size_t u) { (void)tc; (void)p; (void)r; (void)u; }
void lum_on_large_free(void *p, size_t u) { (void)p; (void)u; }
bool lum_fail_should_inject(size_t s) { (void)s; return false; }
void lum_on_alloc_failure(struct lum_thread_counters_v1 *tc, size_t s, size_t a, int e) { (void)tc; (void)s; (void)a; (void)e; }
void lum_on_thread_start(struct lum_thread_counters_v1 *tc) { (void)tc; }
void lum_on_thread_exit(struct lum_thread_counters_v1 *tc) { (void)tc; }
void lum_on_purge(uint64_t b, uint32_t r) { (void)b; (void)r; }
void lum_on_pressure(uint64_t s, uint64_t b) { (void)s; (void)b; }
