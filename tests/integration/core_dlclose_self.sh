#!/usr/bin/env bash
# liblumalloc.so dlopen'ed (a plugin linked with it, or loaded by hand) and dlclose'd while a
# thread that allocated through it lives on: the library must stay mapped (-z nodelete), or the
# thread's heap teardown (a pthread-key destructor in the library) ran unmapped code at its exit.
# Usage: core_dlclose_self.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
lib=$(realpath "$1")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
cat > "$work/dlo.c" << 'EOF'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
static void *h;
static pthread_barrier_t allocated, closed;
static void *thread(void *arg)
{
    void *(*lm)(size_t) = (void *(*)(size_t))dlsym(h, "lum_malloc");
    void (*lf)(void *) = (void (*)(void *))dlsym(h, "lum_free");
    lf(lm(100)); /* a heap of its own: torn down by the library's key destructor at exit */
    pthread_barrier_wait(&allocated);
    pthread_barrier_wait(&closed);
    return arg;
}
int main(int argc, char **argv)
{
    (void)argc;
    if (!(h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL))) return printf("dlopen: %s\n", dlerror()), 2;
    pthread_barrier_init(&allocated, NULL, 2);
    pthread_barrier_init(&closed, NULL, 2);
    pthread_t t;
    pthread_create(&t, NULL, thread, NULL);
    pthread_barrier_wait(&allocated);
    dlclose(h);
    printf("loaded after dlclose: %s\n", dlopen(argv[1], RTLD_NOW | RTLD_NOLOAD) ? "yes" : "no");
    pthread_barrier_wait(&closed);
    pthread_join(t, NULL);
    printf("thread exited\n");
    return 0;
}
EOF
cc -o "$work/dlo" "$work/dlo.c" -ldl -lpthread
out=$(timeout 20 "$work/dlo" "$lib" 2>&1) || fail "exit status $? after dlclose: $out"
grep -q "loaded after dlclose: yes" <<< "$out" || fail "$out"
grep -q "thread exited" <<< "$out" || fail "$out"
echo "ok: $out" | tr '\n' ' '; echo
