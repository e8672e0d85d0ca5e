#include <stdlib.h>
#include <string.h>

#include "tc.h"

uint64_t tc_hash64(uint64_t h, uint64_t v)
{
    h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    h ^= h >> 31;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 29;
    return h;
}

static size_t slot_of(uint64_t key, size_t cap) { return (size_t)(tc_hash64(0, key) & (cap - 1)); }

uint64_t *tc_map64_get(struct tc_map64 *m, uint64_t key)
{
    if (!m->cap)
        return NULL;
    for (size_t i = slot_of(key, m->cap);; i = (i + 1) & (m->cap - 1)) {
        if (m->keys[i] == key)
            return &m->vals[i];
        if (m->keys[i] == 0)
            return NULL;
    }
}

static int grow(struct tc_map64 *m)
{
    size_t nc = m->cap ? m->cap * 2 : 1024;
    uint64_t *nk = calloc(nc, sizeof(*nk)), *nv = calloc(nc, sizeof(*nv));
    if (!nk || !nv) {
        free(nk);
        free(nv);
        return -1;
    }
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->keys[i])
            continue;
        size_t j = slot_of(m->keys[i], nc);
        while (nk[j])
            j = (j + 1) & (nc - 1);
        nk[j] = m->keys[i];
        nv[j] = m->vals[i];
    }
    free(m->keys);
    free(m->vals);
    m->keys = nk, m->vals = nv, m->cap = nc;
    return 0;
}

uint64_t *tc_map64_put(struct tc_map64 *m, uint64_t key, bool *created)
{
    if ((m->len + 1) * 2 > m->cap && grow(m))
        return NULL;
    size_t i = slot_of(key, m->cap);
    while (m->keys[i] && m->keys[i] != key)
        i = (i + 1) & (m->cap - 1);
    if (created)
        *created = !m->keys[i];
    if (!m->keys[i]) {
        m->keys[i] = key;
        m->vals[i] = 0;
        m->len++;
    }
    return &m->vals[i];
}

bool tc_map64_del(struct tc_map64 *m, uint64_t key, uint64_t *val)
{
    if (!m->cap)
        return false;
    size_t i = slot_of(key, m->cap);
    while (m->keys[i] && m->keys[i] != key)
        i = (i + 1) & (m->cap - 1);
    if (!m->keys[i])
        return false;
    if (val)
        *val = m->vals[i];
    /* Backward-shift deletion keeps probe chains intact without tombstones. */
    size_t j = i;
    for (;;) {
        j = (j + 1) & (m->cap - 1);
        if (!m->keys[j])
            break;
        size_t k = slot_of(m->keys[j], m->cap);
        if ((j > i && (k <= i || k > j)) || (j < i && (k <= i && k > j))) {
            m->keys[i] = m->keys[j];
            m->vals[i] = m->vals[j];
            i = j;
        }
    }
    m->keys[i] = 0;
    m->vals[i] = 0;
    m->len--;
    return true;
}

void tc_map64_free(struct tc_map64 *m)
{
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof(*m));
}
