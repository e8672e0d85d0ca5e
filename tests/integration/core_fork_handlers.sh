#!/usr/bin/env bash
# A library whose constructor registers fork handlers before lumalloc's (glibc's first
# registrations take no memory), handlers that allocate and free small and large blocks (as
# gRPC's do): glibc runs its prepare handler after lumalloc's has taken every lock and its
# parent/child handlers before lumalloc's let go of them.  Both hung (a malloc on the heap-list
# lock in prepare, a large free on the large-cache lock in parent), under LD_PRELOAD and linked.
# Usage: core_fork_handlers.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
lib=$(realpath "$1")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
cat > "$work/handlers.c" << 'EOF'
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
static void *kept[2];
static void churn(void)
{
    char *s = malloc(100), *l = malloc(1 << 20);
    memset(s, 1, 100), memset(l, 2, 4096);
    s = realloc(s, 200000);
    free(l), free(s);
}
static void prep(void) { churn(); kept[0] = malloc(64); kept[1] = malloc(3 << 20); }
static void parent(void) { churn(); free(kept[0]); free(kept[1]); }
static void child(void) { churn(); free(kept[0]); free(kept[1]); }
__attribute__((constructor)) static void handlers_init(void) { pthread_atfork(prep, parent, child); }
int handlers_linked(void) { return 0; }
EOF
cat > "$work/main.c" << 'EOF'
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/wait.h>
int handlers_linked(void);
static volatile int stop;
static void *worker(void *arg)
{
    void *ring[16] = {0};
    for (unsigned i = 0; !stop; i++) {
        free(ring[i & 15]);
        ring[i & 15] = malloc((i & 31) ? 40 + (i & 511) : 300000);
    }
    for (int i = 0; i < 16; i++) free(ring[i]);
    return arg;
}
int main(void)
{
    handlers_linked();
    void *big = malloc(2 << 20); /* a large block before the first fork: the cache in use */
    free(big);
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    for (int k = 0; k < 20; k++) {
        pid_t p = fork();
        if (p == 0) {
            free(malloc(1 << 20));
            _exit(0);
        }
        int st;
        if (waitpid(p, &st, 0) != p || st != 0) return printf("child %d: status 0x%x\n", k, st), 1;
    }
    stop = 1;
    pthread_join(t, NULL);
    printf("forks ok\n");
    return 0;
}
EOF
cc -shared -fPIC -O1 -o "$work/libhandlers.so" "$work/handlers.c" -lpthread
cc -O1 -o "$work/preloaded" "$work/main.c" -L"$work" -Wl,-rpath,"$work" -lhandlers -lpthread
# linked: lumalloc needed first, so the handlers' library (needed after it) is initialised first
cc -O1 -o "$work/linked" "$work/main.c" -Wl,--no-as-needed "$lib" -Wl,-rpath,"$(dirname "$lib")" \
  -L"$work" -Wl,-rpath,"$work" -lhandlers -lpthread
inits=$(LD_DEBUG=libs timeout 30 "$work/linked" 2>&1 | sed -n 's/.*calling init: //p' || true)
grep -A1 liblumalloc <<< "$inits" | grep -q libhandlers &&
  fail "linked: lumalloc initialised before the handlers' library: $inits"
grep -q liblumalloc <<< "$inits" || fail "linked program does not load lumalloc: $inits"
for interval in 512k 1k; do
  out=$(LUMALLOC_SAMPLE_INTERVAL=$interval LD_PRELOAD="$lib" timeout 30 "$work/preloaded" 2>&1) ||
    fail "LD_PRELOAD, sample interval $interval: exit $? ($out; 124: a fork deadlocked)"
  grep -q "forks ok" <<< "$out" || fail "LD_PRELOAD: $out"
  out=$(LUMALLOC_SAMPLE_INTERVAL=$interval timeout 30 "$work/linked" 2>&1) ||
    fail "linked, sample interval $interval: exit $? ($out; 124: a fork deadlocked)"
  grep -q "forks ok" <<< "$out" || fail "linked: $out"
done
echo "ok: handlers registered before lumalloc's allocate in prepare, parent and child"
