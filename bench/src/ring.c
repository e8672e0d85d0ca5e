/* ring: a ring of live objects of mixed sizes.  Each step frees the oldest object and
 * allocates a new one of a skewed mixed size (mostly < 128 B, tail to 256 KiB): a cache or
 * queue in steady state, where every free returns to a page that is still in use.
 * usage: ring [ops=10M] [live=20000] [max_size=16384] */
#include "bench_common.h"
int main(int argc, char **argv) {
  long ops = arg_long(argc, argv, 1, 10000000L);
  long live = arg_long(argc, argv, 2, 20000);
  size_t maxsz = (size_t)arg_long(argc, argv, 3, 16384);
  uint64_t s = 12345;
  void **ring = calloc((size_t)live, sizeof(void *));
  unsigned long long check = 0;
  bench_gate();
  double t0 = bench_start();
  for (long i = 0; i < ops; i++) {
    long k = i % live;
    if (ring[k]) {
      check += ((unsigned char *)ring[k])[0];
      free(ring[k]);
    }
    size_t sz = size_mixed(&s, maxsz);
    ring[k] = malloc(sz);
    touch(ring[k], sz, (unsigned char)i);
  }
  for (long k = 0; k < live; k++) free(ring[k]);
  free(ring);
  bench_report(t0, check);
  return 0;
}
