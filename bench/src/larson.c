/* larson: server-style object hand-off between generations of threads (Larson & Krishnan).
 * Each round starts T threads; each inherits the slot array of a thread of the previous
 * round (whose objects it frees: remote frees of a dead thread's memory) and replaces random
 * slots with new objects of random size.  Models a server whose worker threads come and go
 * while the data they allocated outlives them.
 * usage: larson [rounds=30] [threads=4] [slots=4000] [ops_per_thread=100000] [max=1024] */
#include "bench_common.h"
#include <pthread.h>
struct worker { void **slots; long nslots, ops; size_t maxsz; uint64_t seed; unsigned long long check; };
static void *run(void *arg) {
  struct worker *w = arg;
  uint64_t s = w->seed;
  for (long i = 0; i < w->ops; i++) {
    long k = (long)rng_below(&s, (uint64_t)w->nslots);
    if (w->slots[k]) { w->check += ((unsigned char *)w->slots[k])[0]; free(w->slots[k]); }
    size_t sz = 8 + rng_below(&s, w->maxsz - 7);
    w->slots[k] = malloc(sz);
    touch(w->slots[k], sz, (unsigned char)i);
  }
  return NULL;
}
int main(int argc, char **argv) {
  long rounds = arg_long(argc, argv, 1, 30);
  int threads = (int)arg_long(argc, argv, 2, 4);
  long nslots = arg_long(argc, argv, 3, 4000);
  long ops = arg_long(argc, argv, 4, 100000);
  size_t maxsz = (size_t)arg_long(argc, argv, 5, 1024);
  struct worker *w = calloc((size_t)threads, sizeof *w);
  pthread_t *th = calloc((size_t)threads, sizeof *th);
  for (int t = 0; t < threads; t++) w[t].slots = calloc((size_t)nslots, sizeof(void *));
  bench_gate();
  double t0 = bench_start();
  unsigned long long check = 0;
  for (long r = 0; r < rounds; r++) {
    /* rotate slot arrays: thread t gets the array thread t-1 filled last round */
    void **first = w[threads - 1].slots;
    for (int t = threads - 1; t > 0; t--) w[t].slots = w[t - 1].slots;
    w[0].slots = first;
    for (int t = 0; t < threads; t++) {
      w[t].nslots = nslots; w[t].ops = ops; w[t].maxsz = maxsz;
      w[t].seed = 0xabcdef + (uint64_t)(r * threads + t);
      pthread_create(&th[t], NULL, run, &w[t]);
    }
    for (int t = 0; t < threads; t++) pthread_join(th[t], NULL);
  }
  for (int t = 0; t < threads; t++) {
    check += w[t].check;
    for (long k = 0; k < nslots; k++) free(w[t].slots[k]);
    free(w[t].slots);
  }
  bench_report(t0, check);
  free(w); free(th);
  return 0;
}
