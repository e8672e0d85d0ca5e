/* ring: a ring of live objects of mixed sizes.  Each step frees the oldest object and
 * allocates a new one of a skewed mixed size (mostly < 128 B, tail to 256 KiB): a cache or
 * queue in steady state, where every free returns to a page that is still in use.
 * usage: ring [ops=10M] [live=20000] [max_size=16384] */
#include "bench_common.h"
int main(int argc, char **argv) {
  long ops = arg_long(argc, argv, 1, 10000000L);
  long live = arg_long(argc, argv, 2, 20000);
  size_t maxsz = (size_t)arg_long(argc, argv, 3, 16384);
  ring_run(ops, live, 12345, size_mixed, maxsz, 0);
  return 0;
}
