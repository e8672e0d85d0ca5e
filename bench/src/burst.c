/* burst: RSS after a burst.  Allocate ~1 GiB of mixed blocks (16 B .. 1 MiB, mostly
 * small), touch them, free them all in random order, then sit idle (no allocator calls)
 * and sample RSS.  Reports the RSS before the burst, at its peak, right after the frees,
 * and after each idle interval: how much memory an idle program keeps after a spike.
 * usage: burst [bytes=1g] [idle_seconds=3] */
#include "bench_common.h"
int main(int argc, char **argv) {
  size_t bytes = (size_t)arg_long(argc, argv, 1, 1L << 30);
  double idle = (double)arg_long(argc, argv, 2, 3);
  uint64_t s = 31337;
  size_t cap = 1 << 20, n = 0, total = 0;
  void **blocks = malloc(cap * sizeof(void *));
  long rss0 = rss_kib();
  bench_gate();
  double t0 = bench_start();
  while (total < bytes) {
    uint64_t r = rng_next(&s);
    size_t sz;
    unsigned pick = (unsigned)(r & 1023);
    if (pick < 700) sz = 16 + (r >> 10) % 496;          /* small */
    else if (pick < 1000) sz = 512 + (r >> 10) % 32256;  /* medium */
    else sz = 32768 + (r >> 10) % (1u << 20);            /* large */
    if (n == cap) { cap *= 2; blocks = realloc(blocks, cap * sizeof(void *)); }
    blocks[n] = malloc(sz);
    memset(blocks[n], 1, sz);
    n++;
    total += sz;
  }
  long rss_peak = rss_kib();
  for (size_t i = n - 1; i > 0; i--) { /* shuffle, then free */
    size_t j = rng_below(&s, i + 1);
    void *t = blocks[i]; blocks[i] = blocks[j]; blocks[j] = t;
  }
  for (size_t i = 0; i < n; i++) free(blocks[i]);
  free(blocks);
  double t1 = now_s();
  long rss_freed = rss_kib();
  printf("blocks=%zu\nrss_base_kib=%ld\nrss_peak_kib=%ld\nrss_freed_kib=%ld\n", n, rss0, rss_peak, rss_freed);
  fflush(stdout);
  double marks[] = {0.5, 1, 1.5, 2, 3, 5, 10, 20, 30};
  for (unsigned m = 0; m < sizeof marks / sizeof *marks && marks[m] <= idle; m++) {
    double wait = t1 + marks[m] - now_s();
    if (wait > 0) usleep((useconds_t)(wait * 1e6));
    printf("rss_after_%gs_kib=%ld\n", marks[m], rss_kib());
    fflush(stdout);
  }
  double wait = t1 + idle - now_s();
  if (wait > 0) usleep((useconds_t)(wait * 1e6));
  printf("rss_after_kib=%ld\n", rss_kib());
  printf("burst_s=%.6f\n", t1 - t0);
  bench_report(t0, total);
  return 0;
}
