/* churn: single-thread small-object churn.  Batches of small objects (16..256 B) are
 * allocated, touched and freed, alternating LIFO and FIFO order, with interleaved
 * immediate malloc/free pairs -- the "parser building and dropping small nodes" pattern.
 * usage: churn [iterations=20M] */
#include "bench_common.h"
#define BATCH 128
int main(int argc, char **argv) {
  long iters = arg_long(argc, argv, 1, 20000000L);
  uint64_t s = 0x9E3779B97F4A7C15ULL;
  void *batch[BATCH];
  unsigned long long check = 0;
  bench_gate();
  double t0 = bench_start();
  for (long i = 0; i < iters;) {
    for (int j = 0; j < BATCH; j++, i++) {
      size_t sz = 16 + (rng_next(&s) & 0xF0);
      batch[j] = malloc(sz);
      touch(batch[j], sz, (unsigned char)j);
      void *tmp = malloc(sz / 2 + 8); /* immediate pair */
      touch(tmp, 8, 1);
      check += (uintptr_t)tmp & 0xff;
      free(tmp);
    }
    if ((i / BATCH) & 1)
      for (int j = 0; j < BATCH; j++) free(batch[j]);
    else
      for (int j = BATCH - 1; j >= 0; j--) free(batch[j]);
  }
  bench_report(t0, check);
  return 0;
}
