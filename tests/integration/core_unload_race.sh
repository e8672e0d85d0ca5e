#!/usr/bin/env bash
# The unwinder's look for unloaded objects runs with no loader lock (_dl_find_object): an object
# the index has just named can be unmapped by another thread's dlclose before its bytes are read
# (SIGSEGV inside malloc, found in review).  The program below holds that window open: it
# exports its own _dl_find_object, which, once the sampling thread asks about the plugin, lets
# the main thread finish dlclose before it answers.  The look must then see the object gone.
# Usage: core_unload_race.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
lib=$(realpath "$1")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
cat > "$work/plugin.c" << 'EOF'
#include <stdlib.h>
__attribute__((noinline)) void *plugin_inner(size_t n) { void *p = malloc(n); __asm__ volatile("" ::: "memory"); return p; }
void *plugin_alloc(size_t n) { void *p = plugin_inner(n); __asm__ volatile("" ::: "memory"); return p; }
EOF
cat > "$work/main.c" << 'EOF'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static int (*real)(void *, struct dl_find_object *);
static volatile uintptr_t target;
static volatile pid_t sampler_tid;
static volatile int fired;
static sem_t go, done;
int _dl_find_object(void *pc, struct dl_find_object *r)
{
    if (!real) real = (int (*)(void *, struct dl_find_object *))dlsym(RTLD_NEXT, "_dl_find_object");
    int rc = real(pc, r);
    if (target && (uintptr_t)pc == target && gettid() == sampler_tid && !fired) {
        fired = 1; /* the index said yes: the object goes before the answer does */
        sem_post(&go);
        sem_wait(&done);
    }
    return rc;
}
static void *sampler(void *arg)
{
    (void)arg;
    sampler_tid = gettid();
    for (;;) {
        void *p = malloc(64);
        __asm__ volatile("" ::"r"(p) : "memory");
        free(p);
    }
}
int main(int argc, char **argv)
{
    (void)argc;
    sem_init(&go, 0, 0);
    sem_init(&done, 0, 0);
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) return fprintf(stderr, "%s\n", dlerror()), 2;
    void *(*alloc)(size_t) = (void *(*)(size_t))dlsym(h, "plugin_alloc");
    for (int i = 0; i < 2000; i++) free(alloc(64)); /* its rules learnt: a seen object */
    struct dl_find_object fo;
    real = (int (*)(void *, struct dl_find_object *))dlsym(RTLD_NEXT, "_dl_find_object");
    if (real((void *)alloc, &fo)) return 3;
    target = (uintptr_t)fo.dlfo_map_start;
    pthread_t t;
    pthread_create(&t, NULL, sampler, NULL);
    alarm(30);
    sem_wait(&go);
    dlclose(h);
    sem_post(&done);
    usleep(500 * 1000);
    puts("survived");
    return 0;
}
EOF
cc -shared -fPIC -O1 -o "$work/plugin.so" "$work/plugin.c"
cc -O1 -o "$work/main" "$work/main.c" -ldl -lpthread
out=$(LD_PRELOAD=$lib LUMALLOC_SAMPLE_INTERVAL=1 "$work/main" "$work/plugin.so" 2>&1) || fail "status $?: $out"
[ "$out" = survived ] || fail "$out"
echo "ok: an object unloaded under the look is seen gone"
