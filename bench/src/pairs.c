/* pairs: the instruction-count microbenchmark.  A ring of 256 live objects of one size;
 * each step frees the oldest and allocates a new one (and writes a byte of it).  Run under
 * callgrind with two values of N: (Ir(N2) - Ir(N1)) / (N2 - N1) is the cost of one
 * malloc/free pair plus ~6 instructions of loop, with start-up and warm-up cancelled.
 * usage: pairs N size */
#include "bench_common.h"
#define RING 256
int main(int argc, char **argv) {
  long n = arg_long(argc, argv, 1, 1000000);
  size_t size = (size_t)arg_long(argc, argv, 2, 64);
  static void *ring[RING];
  for (int i = 0; i < RING; i++) { ring[i] = malloc(size); *(volatile char *)ring[i] = 0; }
  for (long i = 0; i < n; i++) {
    unsigned k = (unsigned)i & (RING - 1);
    free(ring[k]);
    ring[k] = malloc(size);
    *(volatile char *)ring[k] = (char)i;
  }
  for (int i = 0; i < RING; i++) free(ring[i]);
  return 0;
}
