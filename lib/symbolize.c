/* Symbolisation for reports and warnings.  dladdr covers exported symbols and is cheap; code in
 * executables (static symbols, no -rdynamic) needs the ELF .symtab, which elfsym.c reads from
 * the object's file, at a cost that only report writers (LUM_SYM_DEEP) pay.  Inside malloc
 * (LUM_SYM_INSIDE: the large-allocation warning, the failure report) not dladdr, which waits
 * for the loader's lock: a dlopen holds that across the new object's constructors, and one
 * waiting for a mutex the allocating thread held deadlocked.  There the object comes from the
 * loader's lock-free index and the exported symbols from its .dynsym, as dladdr reads them. */
#define _GNU_SOURCE 1
#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <stdio.h>
#include <string.h>
#include "obs_internal.h"

static const char *base_name(const char *path)
{
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

#ifdef DLFO_EH_SEGMENT_TYPE
#pragma weak _dl_find_object

/* A pointer from the dynamic section into [lo, hi): the loader has relocated most objects'
 * (l_addr added), not those whose dynamic section is read-only (the vDSO's). */
static const uint8_t *dyn_ptr(uintptr_t v, uintptr_t l_addr, uintptr_t lo, uintptr_t hi)
{
    if (v >= lo && v < hi)
        return (const uint8_t *)v;
    if (v + l_addr >= lo && v + l_addr < hi)
        return (const uint8_t *)(v + l_addr);
    return NULL;
}

/* How many entries .dynsym has, by its hash table, as dladdr counts them. */
static size_t dynsym_count(const uint32_t *hash, const uint32_t *gnu, uintptr_t hi)
{
    if (hash)
        return (uintptr_t)(hash + 2) <= hi ? hash[1] : 0;
    if (!gnu || (uintptr_t)(gnu + 4) > hi)
        return 0;
    uint32_t nbuckets = gnu[0], symoff = gnu[1], bloom = gnu[2];
    const uint32_t *buckets = gnu + 4 + (size_t)bloom * (sizeof(ElfW(Addr)) / 4);
    const uint32_t *chains = buckets + nbuckets;
    if ((uintptr_t)chains > hi || (uintptr_t)chains < (uintptr_t)buckets)
        return 0;
    uint32_t last = 0;
    for (uint32_t i = 0; i < nbuckets; i++)
        if (buckets[i] > last)
            last = buckets[i];
    if (last < symoff)
        return last;
    for (;; last++) {
        const uint32_t *c = chains + (last - symoff);
        if ((uintptr_t)(c + 1) > hi)
            return 0;
        if (*c & 1)
            return (size_t)last + 1;
    }
}

/* The exported symbol of lm's object (mapped at [lo, hi)) whose code holds addr. */
static bool dynsym_name(const struct link_map *lm, uintptr_t lo, uintptr_t hi, uintptr_t addr,
                        const char **name, uintptr_t *start)
{
    const ElfW(Dyn) *d = lm->l_ld;
    if ((uintptr_t)d < lo || (uintptr_t)d >= hi)
        return false;
    const ElfW(Sym) *syms = NULL;
    const char *str = NULL;
    const uint32_t *hash = NULL, *gnu = NULL;
    size_t strsz = 0;
    for (size_t i = 0; i < 1024 && (uintptr_t)(d + i + 1) <= hi && d[i].d_tag != DT_NULL; i++) {
        uintptr_t v = d[i].d_un.d_ptr;
        switch (d[i].d_tag) {
        case DT_SYMTAB: syms = (const ElfW(Sym) *)dyn_ptr(v, lm->l_addr, lo, hi); break;
        case DT_STRTAB: str = (const char *)dyn_ptr(v, lm->l_addr, lo, hi); break;
        case DT_STRSZ: strsz = d[i].d_un.d_val; break;
        case DT_HASH: hash = (const uint32_t *)dyn_ptr(v, lm->l_addr, lo, hi); break;
        case DT_GNU_HASH: gnu = (const uint32_t *)dyn_ptr(v, lm->l_addr, lo, hi); break;
        default: break;
        }
    }
    if (!syms || !str || !strsz || (uintptr_t)str + strsz > hi)
        return false;
    size_t n = dynsym_count(hash, gnu, hi);
    if (n > (hi - (uintptr_t)syms) / sizeof *syms)
        return false;
    const ElfW(Sym) *best = NULL;
    uintptr_t best_at = 0;
    for (size_t i = 0; i < n; i++) {
        const ElfW(Sym) *s = &syms[i];
        unsigned type = ELF64_ST_TYPE(s->st_info);
        if (s->st_shndx == SHN_UNDEF || !s->st_value || s->st_name >= strsz ||
            (type != STT_FUNC && type != STT_GNU_IFUNC && type != STT_NOTYPE))
            continue;
        uintptr_t at = lm->l_addr + s->st_value;
        /* past a sized symbol's end is not that symbol's (see lum_symbolize) */
        if (at > addr || (s->st_size && addr - at >= s->st_size))
            continue;
        if (!best || at > best_at)
            best = s, best_at = at;
    }
    if (!best || !best->st_size)
        return false;
    *name = str + best->st_name;
    *start = best_at;
    return true;
}
#endif

/* lum_symbolize without the loader's lock: false when glibc has no index to ask (then only the
 * address is given). */
static bool symbolize_inside(uintptr_t addr, char *buf, size_t len, unsigned flags)
{
#ifdef DLFO_EH_SEGMENT_TYPE
    struct dl_find_object fo;
    if (!lum_cfi_index_usable() || _dl_find_object((void *)addr, &fo) != 0 || !fo.dlfo_link_map)
        return false;
    const struct link_map *lm = fo.dlfo_link_map;
    uintptr_t lo = (uintptr_t)fo.dlfo_map_start, hi = (uintptr_t)fo.dlfo_map_end;
    /* dladdr names the main program by argv[0] */
    const char *mod = base_name(lm->l_name && lm->l_name[0] ? lm->l_name : program_invocation_name);
    const char *name;
    uintptr_t start;
    char modsuf[160] = "";
    if ((flags & LUM_SYM_MODULE) && mod[0])
        snprintf(modsuf, sizeof modsuf, " (%s)", mod);
    if (dynsym_name(lm, lo, hi, addr, &name, &start)) {
        if ((flags & LUM_SYM_OFFSET) && addr != start)
            snprintf(buf, len, "%.*s+0x%lx%s", 256, name, (unsigned long)(addr - start), modsuf);
        else
            snprintf(buf, len, "%.*s%s", 256, name, modsuf);
    } else {
        snprintf(buf, len, "%s+0x%lx", mod, (unsigned long)(addr - lo));
    }
    return true;
#else
    (void)addr, (void)buf, (void)len, (void)flags;
    return false;
#endif
}

void lum_symbolize(uintptr_t addr, char *buf, size_t len, unsigned flags)
{
    if (flags & LUM_SYM_INSIDE) {
        if (!symbolize_inside(addr, buf, len, flags))
            snprintf(buf, len, "0x%lx", (unsigned long)addr);
        return;
    }
    Dl_info di;
    const ElfW(Sym) *sym = NULL;
    memset(&di, 0, sizeof di);
    bool found = dladdr1((void *)addr, &di, (void **)&sym, RTLD_DL_SYMENT) != 0;
    const char *mod = found && di.dli_fname && di.dli_fname[0] ? base_name(di.dli_fname) : NULL;
    char modsuf[160] = "";
    if ((flags & LUM_SYM_MODULE) && mod)
        snprintf(modsuf, sizeof modsuf, " (%s)", mod);
    /* dladdr answers with the nearest exported symbol below addr, however far: code of a local
     * one (start_thread in a stripped libc) came out as pthread_condattr_setpshared+0x514.  An
     * address past the symbol's size is not its. */
    if (found && di.dli_sname && sym && sym->st_size && addr - (uintptr_t)di.dli_saddr >= sym->st_size)
        di.dli_sname = NULL;
    if (found && di.dli_sname) {
        uintptr_t off = addr - (uintptr_t)di.dli_saddr;
        if ((flags & LUM_SYM_OFFSET) && off)
            snprintf(buf, len, "%s+0x%lx%s", di.dli_sname, (unsigned long)off, modsuf);
        else
            snprintf(buf, len, "%s%s", di.dli_sname, modsuf);
        return;
    }
    if (flags & LUM_SYM_DEEP) {
        char name[256];
        uint64_t off = 0;
        if (lum_elf_proc_name(addr, name, sizeof name, &off)) {
            if ((flags & LUM_SYM_OFFSET) && off)
                snprintf(buf, len, "%s+0x%lx%s", name, (unsigned long)off, modsuf);
            else
                snprintf(buf, len, "%s%s", name, modsuf);
            return;
        }
    }
    if (mod)
        snprintf(buf, len, "%s+0x%lx", mod, (unsigned long)(addr - (uintptr_t)di.dli_fbase));
    else
        snprintf(buf, len, "0x%lx", (unsigned long)addr);
}
