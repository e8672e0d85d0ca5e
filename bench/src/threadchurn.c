/* threadchurn: many short-lived threads (a thread-per-request server, or a pool that
 * shrinks and grows).  Waves of W threads each allocate a few hundred mixed objects, free
 * most of them, and hand the rest to the main thread, which frees them after the join.
 * Thread start/exit cost, abandoned-heap handling and RSS growth per thread are measured.
 * usage: threadchurn [threads=4000] [wave=4] [allocs=500] */
#include "bench_common.h"
#include <pthread.h>
struct arg { long allocs; uint64_t seed; void *keep[16]; unsigned long long check; };
static void *run(void *p) {
  struct arg *a = p;
  uint64_t s = a->seed;
  void *tmp[64] = {0};
  for (long i = 0; i < a->allocs; i++) {
    int k = (int)(i & 63);
    free(tmp[k]);
    size_t sz = size_mixed(&s, 4096);
    tmp[k] = malloc(sz);
    touch(tmp[k], sz, (unsigned char)i);
  }
  for (int k = 0; k < 64; k++) {
    if (k < 16) a->keep[k] = tmp[k]; /* outlives the thread, freed by main */
    else { a->check += ((unsigned char *)tmp[k])[0]; free(tmp[k]); }
  }
  return NULL;
}
int main(int argc, char **argv) {
  long threads = arg_long(argc, argv, 1, 4000);
  int wave = (int)arg_long(argc, argv, 2, 4);
  long allocs = arg_long(argc, argv, 3, 500);
  struct arg *a = calloc((size_t)wave, sizeof *a);
  pthread_t *th = calloc((size_t)wave, sizeof *th);
  unsigned long long check = 0;
  bench_gate();
  double t0 = bench_start();
  for (long done = 0; done < threads; done += wave) {
    for (int t = 0; t < wave; t++) {
      a[t].allocs = allocs; a[t].seed = (uint64_t)(done + t + 1) * 2654435761u;
      pthread_create(&th[t], NULL, run, &a[t]);
    }
    for (int t = 0; t < wave; t++) {
      pthread_join(th[t], NULL);
      check += a[t].check; a[t].check = 0;
      for (int k = 0; k < 16; k++) free(a[t].keep[k]);
    }
  }
  printf("rss_end_kib=%ld\n", rss_kib());
  bench_report(t0, check);
  free(a); free(th);
  return 0;
}
