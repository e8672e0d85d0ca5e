/* A small "service" to watch: worker threads with different appetites, a few call sites, a
 * slow leak and the occasional large buffer.  Runs for argv[1] seconds (default 20). */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static _Atomic int stop;
static void *(*volatile alloc)(size_t) = malloc;

__attribute__((noinline)) static char *parse_request(size_t n) { char *p = alloc(n); memset(p, 1, n); return p; }
__attribute__((noinline)) static char *build_response(size_t n) { char *p = alloc(n); memset(p, 2, n); return p; }
__attribute__((noinline)) static void cache_insert(size_t n) { char *p = alloc(n); memset(p, 3, n); /* never freed: the leak */ }
__attribute__((noinline)) static char *load_blob(size_t n) { char *p = alloc(n); memset(p, 4, 4096); return p; }

static void *worker(void *arg)
{
    int weight = (int)(long)arg;
    unsigned r = (unsigned)weight * 2654435761u;
    char *ring[64] = { 0 };
    long i = 0;
    while (!stop) {
        for (int k = 0; k < weight * 100; k++, i++) {
            r = r * 1103515245u + 12345u;
            free(ring[i & 63]);
            ring[i & 63] = (r & 1) ? parse_request(32 + r % 480) : build_response(64 + r % 4000);
            if (i % 5000 == 0) cache_insert(4096);
            if (i % 50000 == 0) free(load_blob(2u << 20));
        }
        usleep(1000);
    }
    for (int k = 0; k < 64; k++) free(ring[k]);
    return NULL;
}

int main(int argc, char **argv)
{
    int seconds = argc > 1 ? atoi(argv[1]) : 20;
    pthread_t t[3];
    for (long w = 0; w < 3; w++) {
        pthread_create(&t[w], NULL, worker, (void *)(w + 1));
        char name[16];
        snprintf(name, sizeof name, "worker-%ld", w + 1);
        pthread_setname_np(t[w], name);
    }
    printf("demo_workload: pid %d running %d s (3 workers, weights 1:2:3, a slow leak)\n", getpid(), seconds);
    fflush(stdout);
    sleep((unsigned)seconds);
    stop = 1;
    for (int w = 0; w < 3; w++) pthread_join(t[w], NULL);
    return 0;
}
