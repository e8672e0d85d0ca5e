/* fork() while other threads take pages from their segments and give them back, with threads
 * exiting and their abandoned pages emptied by others.  A fork child takes the pages of the
 * threads that did not survive from the segments' slice maps, by their owner, and keeps the
 * abandoned lists; a page had neither for a moment outside the allocator's locks: one just
 * taken from its segment (until heap_next_page stored its owner), or an abandoned one on its
 * way back (emptied by a free and filed again, or stale at a thread exit).  A child made then
 * kept the page in its slice maps, used and nobody's, for its life.  Each child here checks
 * that every page in the slice maps is accounted for: its own heap's, on an abandoned list, or
 * a sampled page on the sampled lists; then runs the heap check.  A second case forks while the
 * only other thread exits (its stale pages, given back at its exit, once stayed in the child).
 * test_hardened_fork_orphan_pages.c builds this file against the hardened library. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include "internal.h"
#include "lumalloc.h"
#include "test_support.h"

void lum_sampled_for_each(void (*fn)(struct lum_page *, void *), void *arg);

/* Before the fix, 3-14 children in 1000 kept such a page (70 in 10 runs, 37 in 5 more; the
 * hardened library 5-7 in 1000); about 4 s on 2 cores */
#define FORKS 1000

static atomic_int stop;

static void nap_us(long us)
{
    struct timespec t = {0, us * 1000};
    nanosleep(&t, NULL);
}

/* Sizes of classes one page of a slice or a few holds a handful to hundreds of: taken in turn
 * on the same slices, each class's page gets another's span trimmed, which makes the window
 * between a page's allocation and its owner wider (a madvise). */
static const size_t sizes[] = {32, 96, 256, 640, 1536, 3072, 5120, 12288, 20480, 40000};
#define NSIZES (sizeof sizes / sizeof sizes[0])

/* Pages of one class carved through and given back, class after class. */
static void *fill_and_empty(void *arg)
{
    uint64_t s = 0x9e3779b97f4a7c15ULL ^ (uintptr_t)arg;
    static __thread void *v[512];
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        size_t size = sizes[xorshift(&s) % NSIZES];
        int n = (int)((4 * 65536) / size);
        if (n > 512) n = 512;
        for (int i = 0; i < n; i++) memset(v[i] = malloc(size), 1, 8);
        for (int i = 0; i < n; i++) free(v[i]);
    }
    return NULL;
}

/* Blocks short-lived threads leave behind, freed by another thread into their abandoned pages
 * (which empty, and are filed again as empty or go back over the bound). */
#define HANDOFF 4096
static void *_Atomic handoff[HANDOFF];

static void *short_lived(void *arg)
{
    uint64_t s = (uintptr_t)arg * 0x2545f4914f6cdd1dULL + 1;
    /* a few classes a thread, so that others' pages go stale (abandoned_release_stale) */
    for (int k = 0; k < 3; k++) {
        size_t size = sizes[xorshift(&s) % NSIZES];
        int n = (int)(65536 / size) + 1;
        for (int i = 0; i < n; i++) {
            void *p = malloc(size);
            memset(p, 2, 8);
            if (i & 1) {
                free(p);
                continue;
            }
            p = atomic_exchange(&handoff[xorshift(&s) % HANDOFF], p);
            free(p);
        }
    }
    return NULL;
}

static void *spawner(void *arg)
{
    (void)arg;
    for (uintptr_t i = 1; !atomic_load_explicit(&stop, memory_order_relaxed); i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, short_lived, (void *)i) == 0) pthread_join(t, NULL);
    }
    return NULL;
}

/* Frees what the short-lived threads left, mostly on pages whose threads have gone. */
static void *reaper(void *arg)
{
    uint64_t s = 77 + (uintptr_t)arg;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        free(atomic_exchange(&handoff[xorshift(&s) % HANDOFF], NULL));
        if ((xorshift(&s) & 255) == 0) sched_yield();
    }
    return NULL;
}

/* ---- the child's check ---- */

#define SAMPLED_MAX 1024
static struct lum_page *sampled[SAMPLED_MAX];
static unsigned nsampled;

static void note_sampled(struct lum_page *page, void *arg)
{
    (void)arg;
    if (nsampled < SAMPLED_MAX) sampled[nsampled++] = page;
}

struct tally { unsigned pages, orphans, orphan_slices, strays; };

/* Every page in the slice map: the surviving thread's, abandoned (no owner, on a list), or a
 * sampled page on the sampled lists.  No allocation here: the segment lock is held. */
static void check_segment(struct lum_segment *seg, void *arg)
{
    struct tally *t = arg;
    struct lum_heap *me = lum_tls_heap;
    for (unsigned i = 1; i < LUM_SLICES; i++) {
        struct lum_page *page = seg->slice_page[i];
        if (page != &seg->pages[i] || !page->slices) continue;
        t->pages++;
        struct lum_heap *owner = atomic_load(&page->owner);
        bool ok;
        if (page->kind == LUM_PAGE_SAMPLED) {
            ok = false;
            for (unsigned k = 0; k < nsampled && !ok; k++) ok = sampled[k] == page;
        } else {
            ok = page->kind == LUM_PAGE_SMALL && (owner ? owner == me : page->abandoned != 0);
        }
        if (ok) continue;
        if (!owner && page->kind == LUM_PAGE_SMALL) {
            t->orphans++;
            char m[160];
            int k = snprintf(m, sizeof m, "#  no owner, no list: class %u, %u slices, %u carved, %u used, free list %p\n",
                             page->cls, page->slices, page->carved, page->used, (void *)page->free);
            if (write(1, m, (size_t)k) < 0) {}
            t->orphan_slices += page->slices;
        } else {
            t->strays++;
        }
    }
}

/* 0; 3 when a page has no owner and is on no list, 4 for any other page unaccounted for, 5
 * when the heap check finds anything else. */
static int child(void)
{
    lum_sampled_for_each(note_sampled, NULL);
    struct tally t = {0, 0, 0, 0};
    lum_segments_for_each(check_segment, &t);
    if (t.orphans || t.strays) {
        char msg[160];
        int n = snprintf(msg, sizeof msg, "# child: %u pages, %u without owner or list (%u slices), %u other\n",
                         t.pages, t.orphans, t.orphan_slices, t.strays);
        if (write(1, msg, (size_t)n) < 0) {}
    }
    if (t.orphans) return 3;
    if (t.strays) return 4;
    return lum_heap_check(1) != 0 ? 5 : 0;
}

/* How the children checked out. */
struct children { int forks, killed, orphaned, other; };

static void fork_one(struct children *c)
{
    int status = fork_and_wait(child);
    c->forks++;
    if (WIFSIGNALED(status)) c->killed++;
    else if (WEXITSTATUS(status) == 3) c->orphaned++;
    else if (WEXITSTATUS(status) != 0) c->other++;
}

static void all_children_clean(const struct children *c)
{
    printf("# %d forks: %d children killed by a signal, %d with pages nobody has, %d failed otherwise\n",
           c->forks, c->killed, c->orphaned, c->other);
    assert_int_equal(c->killed, 0);
    assert_int_equal(c->other, 0);
    assert_int_equal(c->orphaned, 0);
}

static void fork_while_pages_change_hands(void **state)
{
    (void)state;
    pthread_t t[4];
    assert_int_equal(pthread_create(&t[0], NULL, fill_and_empty, (void *)1), 0);
    assert_int_equal(pthread_create(&t[1], NULL, fill_and_empty, (void *)2), 0);
    assert_int_equal(pthread_create(&t[2], NULL, spawner, NULL), 0);
    assert_int_equal(pthread_create(&t[3], NULL, reaper, NULL), 0);
    nap_us(20000);
    struct children c = {0, 0, 0, 0};
    while (c.forks < FORKS) {
        fork_one(&c);
        nap_us(200 + (c.forks % 7) * 100);
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < HANDOFF; i++) free(atomic_exchange(&handoff[i], NULL));
    all_children_clean(&c);
}

/* The one other thread exiting while the main thread forks: its heap is pooled before it gives
 * back its stale pages (stale_owner's until then, outside the locks), so the child has no dead
 * thread to look for; it walked the slice maps only when it had one, and those pages stayed in
 * its maps for good. */
#define LAST_EXITS 1500

static void fork_as_the_last_other_thread_exits(void **state)
{
    (void)state;
    struct children c = {0, 0, 0, 0};
    for (uintptr_t i = 1; i <= LAST_EXITS; i++) {
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, short_lived, (void *)i), 0);
        do
            fork_one(&c);
        while (pthread_tryjoin_np(t, NULL) != 0);
        /* the next thread's blocks go on to pages the reaper would have freed */
        for (int k = 0; k < HANDOFF; k += 7) free(atomic_exchange(&handoff[k], NULL));
    }
    for (int i = 0; i < HANDOFF; i++) free(atomic_exchange(&handoff[i], NULL));
    all_children_clean(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(fork_while_pages_change_hands),
        cmocka_unit_test(fork_as_the_last_other_thread_exits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
