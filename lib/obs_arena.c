/* Internal memory for the observability side: a bump arena over mmap (records and stacks live
 * for the process) and page buffers for reports.  Never calls malloc, so it is usable from the
 * sample path inside the allocator and from reports while the allocator is being profiled. */
#define _GNU_SOURCE 1
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "obs_internal.h"

#define ARENA_CHUNK (1u << 20)

pthread_mutex_t lum_obs_arena_lock = PTHREAD_MUTEX_INITIALIZER;
#define arena_lock lum_obs_arena_lock
static char *arena_cur, *arena_end;

void *lum_obs_pages(size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

void lum_obs_free_pages(void *p, size_t size)
{
    if (p)
        munmap(p, size);
}

void *lum_obs_alloc(size_t size)
{
    return lum_obs_alloc_aligned(size, 16);
}

void *lum_obs_alloc_aligned(size_t size, size_t align)
{
    size = (size + 15) & ~(size_t)15;
    if (size > ARENA_CHUNK / 4)
        return lum_obs_pages(size); /* big tables get their own mapping: no arena waste */
    lum_mutex_lock(&arena_lock);
    /* in integers: arena_cur is NULL before the first chunk, and the padding may pass the
     * chunk's end (chunks are page-aligned, so a fresh one needs none) */
    size_t pad = (size_t)-(uintptr_t)arena_cur & (align - 1);
    if ((uintptr_t)arena_end - (uintptr_t)arena_cur < pad + size) {
        char *c = lum_obs_pages(ARENA_CHUNK);
        if (!c) {
            lum_mutex_unlock(&arena_lock);
            return NULL;
        }
        arena_cur = c;
        arena_end = c + ARENA_CHUNK;
    } else {
        arena_cur += pad;
    }
    void *p = arena_cur;
    arena_cur += size;
    lum_mutex_unlock(&arena_lock);
    return p; /* fresh anonymous pages are zero */
}

void *lum_obs_table(size_t size)
{
    return size < 4096 ? lum_obs_alloc(size) : lum_obs_pages(size);
}

void lum_obs_free_table(void *p, size_t size)
{
    if (size >= 4096)
        lum_obs_free_pages(p, size);
}

static bool buf_reserve(struct lum_buf *b, size_t extra)
{
    if (b->failed)
        return false;
    if (b->len + extra <= b->cap)
        return true;
    size_t ncap = b->cap ? b->cap : 64 * 1024;
    while (ncap < b->len + extra)
        ncap *= 2;
    char *n;
    if (b->data) {
        n = mremap(b->data, b->cap, ncap, MREMAP_MAYMOVE);
        if (n == MAP_FAILED)
            n = NULL;
    } else {
        n = lum_obs_pages(ncap);
    }
    if (!n) {
        b->failed = true;
        return false;
    }
    b->data = n;
    b->cap = ncap;
    return true;
}

LUM_COLD_TEXT void lum_buf_put(struct lum_buf *b, const void *p, size_t n)
{
    if (!buf_reserve(b, n))
        return;
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

void lum_buf_puts(struct lum_buf *b, const char *s)
{
    lum_buf_put(b, s, strlen(s));
}

/* vsnprintf into the buffer: glibc's vsnprintf on a plain %d/%s/%lu/%f format does not
 * allocate, so this is safe in diagnostics; reports avoid %ls and positional arguments. */
LUM_COLD_TEXT void lum_buf_printf(struct lum_buf *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof tmp)
        n = sizeof tmp - 1;
    lum_buf_put(b, tmp, (size_t)n);
}

void lum_buf_free(struct lum_buf *b)
{
    lum_obs_free_pages(b->data, b->cap);
    memset(b, 0, sizeof *b);
}

int lum_write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        c += w;
        n -= (size_t)w;
    }
    return 0;
}
