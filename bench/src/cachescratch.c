/* cachescratch: false sharing between threads (Hoard's cache-scratch and cache-thrash).
 * The main thread allocates one small object per thread and hands it over; each thread
 * frees it, then repeatedly allocates a small object, writes it many times and frees it.
 * An allocator that hands objects on the same cache line to different threads makes the
 * writes bounce the line between cores.
 * usage: cachescratch [threads=2] [iterations=200000] [size=8] [writes=100] */
#include "bench_common.h"
#include <pthread.h>
struct arg { void *given; long iters; size_t size; int writes; unsigned long long check; };
static void *run(void *p) {
  struct arg *a = p;
  free(a->given); /* scratch: a remote object's slot becomes this thread's */
  for (long i = 0; i < a->iters; i++) {
    volatile char *o = malloc(a->size);
    for (int w = 0; w < a->writes; w++)
      for (size_t j = 0; j < a->size; j++) o[j] = (char)(o[j] + w);
    a->check += (unsigned char)o[0];
    free((void *)o);
  }
  return NULL;
}
int main(int argc, char **argv) {
  int threads = (int)arg_long(argc, argv, 1, 2);
  long iters = arg_long(argc, argv, 2, 200000);
  size_t size = (size_t)arg_long(argc, argv, 3, 8);
  int writes = (int)arg_long(argc, argv, 4, 100);
  struct arg *a = calloc((size_t)threads, sizeof *a);
  pthread_t *th = calloc((size_t)threads, sizeof *th);
  for (int t = 0; t < threads; t++) {
    a[t].given = malloc(size); memset(a[t].given, 0, size);
    a[t].iters = iters; a[t].size = size; a[t].writes = writes;
  }
  bench_gate();
  double t0 = bench_start();
  for (int t = 0; t < threads; t++) pthread_create(&th[t], NULL, run, &a[t]);
  unsigned long long check = 0;
  for (int t = 0; t < threads; t++) { pthread_join(th[t], NULL); check += a[t].check; }
  bench_report(t0, check);
  free(a); free(th);
  return 0;
}
