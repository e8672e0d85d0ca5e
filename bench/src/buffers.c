/* buffers: a ring of I/O buffers, 16-256 KiB, each written whole when it is taken (a server's
 * receive and compression buffers, a pipeline's queue of chunks).  Pages of such blocks hold a
 * handful of them, so every swing in how many are live empties a page or needs one: an
 * allocator that gives memory back at once and faults it in again shows it here.
 * usage: buffers [ops=200k] [live=256] */
#include "bench_common.h"
static const size_t sizes[] = {16384, 24576, 32768, 65536, 100000, 131072, 200000, 262144};
int main(int argc, char **argv) {
  long ops = arg_long(argc, argv, 1, 200000L);
  long live = arg_long(argc, argv, 2, 256);
  uint64_t s = 4242;
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
    size_t sz = sizes[rng_below(&s, sizeof sizes / sizeof sizes[0])];
    ring[k] = malloc(sz);
    memset(ring[k], (int)i, sz);
  }
  for (long k = 0; k < live; k++) free(ring[k]);
  free(ring);
  bench_report(t0, check);
  return 0;
}
