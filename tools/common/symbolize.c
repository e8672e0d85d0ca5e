/* Symbolisation with elfutils libdwfl from snapshots of the target's mappings.
 *
 * Why not dwfl_linux_proc_report: it reads /proc/PID/maps at the time of the call, and the
 * tools must keep resolving after the target exits.  Instead each snapshot reports the
 * process's ELF files with dwfl_report_elf at their load bias, opening the files while the
 * process is alive (through /proc/PID/map_files, or a path checked to be the same file).  Separate debug info is
 * found by build id under /usr/lib/debug/.build-id (dwfl_standard_find_debuginfo). */
#define _GNU_SOURCE
#include <elfutils/libdwfl.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tc.h"

/* A module as reported to dwfl.  A file unloaded (dlclose) and loaded again at another
 * address, or replaced on disk and loaded again (a new inode), is a module of its own; where
 * such modules' ranges overlap, an address is the one mapped last (dwfl would answer with the
 * first reported, and name a reloaded plugin's frames after the old file's symbols). */
struct loaded {
    char *path;
    uint64_t base;  /* an executable mapping's start less its file offset */
    uint64_t inode;
    uint64_t low, high;
    uint64_t seen;  /* the last snapshot that found it mapped */
    Dwfl_Module *mod;
};

struct pidsym {
    pid_t pid;
    Dwfl *dwfl;
    struct loaded *loaded;
    size_t nloaded;
    uint64_t snapshots;
    char *alloc_module;
    double last_snapshot;
    bool released;         /* files closed (tc_sym_retire): only cached answers are left */
    struct tc_map64 cache; /* addr -> index+1 into frames */
};

struct tc_symbolizer {
    struct pidsym *p;
    size_t np;
    struct tc_frame *frames;
    size_t nframes, capframes;
    /* Module paths the frames point to, owned here: dwfl_module_info's string belongs to the
     * process's Dwfl, which tc_sym_retire ends while its cached frames are still read. */
    char **modnames;
    size_t nmodnames;
    struct tc_map64 modname_idx; /* hash of a path -> index+1 into modnames */
    uint32_t retired; /* processes retired (tc_sym_retire): their keys are -1, -2, ... */
};

static char *debuginfo_path;
static const Dwfl_Callbacks callbacks = {
    .find_elf = dwfl_build_id_find_elf,
    .find_debuginfo = dwfl_standard_find_debuginfo,
    .section_address = dwfl_offline_section_address,
    .debuginfo_path = &debuginfo_path,
};

struct tc_symbolizer *tc_sym_new(void) { return calloc(1, sizeof(struct tc_symbolizer)); }

void tc_sym_free(struct tc_symbolizer *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->np; i++) {
        if (s->p[i].dwfl)
            dwfl_end(s->p[i].dwfl);
        for (size_t k = 0; k < s->p[i].nloaded; k++)
            free(s->p[i].loaded[k].path);
        free(s->p[i].loaded);
        free(s->p[i].alloc_module);
        tc_map64_free(&s->p[i].cache);
    }
    for (size_t i = 0; i < s->nframes; i++)
        free((char *)s->frames[i].name);
    free(s->frames);
    for (size_t i = 0; i < s->nmodnames; i++)
        free(s->modnames[i]);
    free(s->modnames);
    tc_map64_free(&s->modname_idx);
    free(s->p);
    free(s);
}

/* Our own copy of a module path, one per distinct path; NULL if out of memory. */
static const char *intern_module(struct tc_symbolizer *s, const char *name)
{
    uint64_t h = 0x6d6f64;
    for (const unsigned char *c = (const unsigned char *)name; *c; c++)
        h = tc_hash64(h, *c);
    /* another path with the same hash: the next key along */
    for (;; h = tc_hash64(h, 1)) {
        bool created;
        uint64_t *slot = tc_map64_put(&s->modname_idx, h | 1, &created);
        if (!slot)
            return NULL;
        if (!created) {
            if (!strcmp(s->modnames[*slot - 1], name))
                return s->modnames[*slot - 1];
            continue;
        }
        char **nm = realloc(s->modnames, (s->nmodnames + 1) * sizeof(*nm));
        char *copy = strdup(name);
        if (nm)
            s->modnames = nm;
        if (!nm || !copy) {
            free(copy);
            tc_map64_del(&s->modname_idx, h | 1, NULL);
            return NULL;
        }
        s->modnames[s->nmodnames++] = copy;
        *slot = s->nmodnames;
        return copy;
    }
}

static void pidsym_close(struct pidsym *p)
{
    if (p->dwfl)
        dwfl_end(p->dwfl); /* closes the files reported to it */
    p->dwfl = NULL;
    for (size_t k = 0; k < p->nloaded; k++)
        free(p->loaded[k].path);
    free(p->loaded);
    p->loaded = NULL;
    p->nloaded = 0;
}

pid_t tc_sym_retire(struct tc_symbolizer *s, pid_t pid)
{
    for (size_t i = 0; i < s->np; i++)
        if (s->p[i].pid == pid) {
            pidsym_close(&s->p[i]);
            s->p[i].released = true;
            s->p[i].pid = -(pid_t)++s->retired;
            return s->p[i].pid;
        }
    return -(pid_t)++s->retired; /* nothing of it cached: a key that answers "[unknown]" */
}

void tc_sym_forget(struct tc_symbolizer *s, pid_t pid)
{
    for (size_t i = 0; i < s->np; i++)
        if (s->p[i].pid == pid) {
            pidsym_close(&s->p[i]);
            free(s->p[i].alloc_module);
            tc_map64_free(&s->p[i].cache);
            s->p[i] = s->p[--s->np];
            return;
        }
}

static struct pidsym *get_pid(struct tc_symbolizer *s, pid_t pid, bool create)
{
    for (size_t i = 0; i < s->np; i++)
        if (s->p[i].pid == pid)
            return &s->p[i];
    if (!create || pid <= 0) /* a retired key never gets a process back */
        return NULL;
    struct pidsym *np = realloc(s->p, (s->np + 1) * sizeof(*np));
    if (!np)
        return NULL;
    s->p = np;
    struct pidsym *p = &s->p[s->np++];
    memset(p, 0, sizeof(*p));
    p->pid = pid;
    p->dwfl = dwfl_begin(&callbacks);
    return p;
}

static struct loaded *reported(struct pidsym *p, const struct tc_map *map)
{
    for (size_t i = 0; i < p->nloaded; i++) {
        struct loaded *l = &p->loaded[i];
        if (l->base == map->start - map->offset && l->inode == map->inode && strcmp(l->path, map->path) == 0)
            return l;
    }
    return NULL;
}

static struct loaded *module_at(struct pidsym *p, uint64_t pc)
{
    struct loaded *best = NULL;
    for (size_t i = 0; i < p->nloaded; i++) {
        struct loaded *l = &p->loaded[i];
        if (pc >= l->low && pc < l->high && (!best || l->seen > best->seen))
            best = l;
    }
    return best;
}

void tc_sym_snapshot(struct tc_symbolizer *s, pid_t pid, const char *alloc_module)
{
    struct pidsym *p = get_pid(s, pid, true);
    if (!p || !p->dwfl)
        return;
    if (alloc_module && !p->alloc_module) {
        /* Probes in the executable itself (static link): the module says nothing about which
         * frames are the allocator's, only symbol names do. */
        char exe[64], target[PATH_MAX];
        pid_t task = tc_proc_task(pid);
        snprintf(exe, sizeof(exe), "/proc/%d/exe", (int)(task ? task : pid));
        ssize_t n = readlink(exe, target, sizeof(target) - 1);
        if (n > 0) {
            target[n] = 0;
            tc_strip_deleted(target);
        }
        if (n > 0 && strcmp(target, alloc_module))
            p->alloc_module = strdup(alloc_module);
    }
    p->last_snapshot = tc_now();
    struct tc_map *maps;
    size_t n;
    if (tc_read_maps(pid, &maps, &n))
        return;
    uint64_t seen = ++p->snapshots;
    dwfl_report_begin_add(p->dwfl);
    for (size_t i = 0; i < n; i++) {
        const char *path = maps[i].path;
        if (path[0] != '/' || maps[i].perms[2] != 'x')
            continue;
        struct loaded *known = reported(p, &maps[i]);
        if (known) {
            known->seen = seen;
            continue;
        }
        /* The mapped file itself, not whatever its path names now (an upgrade, a container's
         * path that is another file on the host). */
        int fd = tc_map_open(pid, &maps[i], NULL, 0);
        if (fd < 0)
            continue;
        uint64_t bias = 0;
        char fdpath[64];
        snprintf(fdpath, sizeof(fdpath), "/proc/self/fd/%d", fd);
        if (tc_elf_load_bias(fdpath, &maps[i], maps, n, &bias)) {
            /* Fall back: executable mapping's start minus its file offset. */
            bias = maps[i].start - maps[i].offset;
        }
        bool exec_type = !tc_elf_is_dyn(fdpath);
        /* dwfl owns fd from here on. */
        Dwfl_Module *m = dwfl_report_elf(p->dwfl, path, path, fd, exec_type ? 0 : bias, false);
        if (!m) {
            if (tc_verbose)
                tc_warn("dwfl_report_elf %s: %s", path, dwfl_errmsg(-1));
            continue;
        }
        struct loaded l = {strdup(path), maps[i].start - maps[i].offset, maps[i].inode, 0, 0, seen, m};
        Dwarf_Addr low, high;
        dwfl_module_info(m, NULL, &low, &high, NULL, NULL, NULL, NULL);
        l.low = low, l.high = high;
        struct loaded *nl = realloc(p->loaded, (p->nloaded + 1) * sizeof(*nl));
        if (nl)
            p->loaded = nl;
        if (nl && l.path)
            p->loaded[p->nloaded++] = l;
        else
            free(l.path);
    }
    dwfl_report_end(p->dwfl, NULL, NULL);
    free(maps);
}

static bool is_alloc_symbol(const char *n)
{
    static const char *const names[] = {"malloc", "free", "calloc", "realloc", "reallocarray", "posix_memalign",
                                        "aligned_alloc", "memalign", "valloc", "pvalloc", "_Znwm", "_Znam",
                                        "_ZnwmRKSt9nothrow_t", "_ZnamRKSt9nothrow_t", "_ZnwmSt11align_val_t",
                                        "_ZnamSt11align_val_t", "operator new", "operator new[]"};
    if (!strncmp(n, "lum_", 4) || !strncmp(n, "__lum", 5) || !strncmp(n, "lumalloc_", 9) ||
        !strncmp(n, "operator new", 12))
        return true;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (!strcmp(n, names[i]))
            return true;
    return false;
}

const struct tc_frame *tc_sym_resolve(struct tc_symbolizer *s, pid_t pid, uint64_t addr)
{
    static struct tc_frame unknown = {"[unknown]", NULL, 0, false};
    struct pidsym *p = get_pid(s, pid, true);
    if (!p)
        return &unknown;
    uint64_t *ci = tc_map64_get(&p->cache, addr ? addr : 1);
    if (ci)
        return &s->frames[*ci - 1];
    if (!p->dwfl)
        return &unknown;
    Dwarf_Addr pc = addr ? addr - 1 : 0;
    struct loaded *l = module_at(p, pc);
    bool alive = false;
    /* Nothing there (a library loaded since, or code outside any file: throttled), or only a
     * file the last snapshot no longer found mapped (another may have been loaded over it:
     * not throttled, as a name given here stays with the address). */
    if ((!l || l->seen != p->snapshots) && (alive = tc_pid_alive(pid)) &&
        (l || tc_now() - p->last_snapshot > 0.01)) {
        tc_sym_snapshot(s, pid, NULL);
        l = module_at(p, pc);
    }
    if (!l && alive) {
        /* Not cached: a later snapshot may still find the module. */
        static struct tc_frame unknown_now = {"[unknown]", NULL, 0, false};
        return &unknown_now;
    }
    Dwfl_Module *m = l ? l->mod : NULL;
    struct tc_frame f = {NULL, NULL, 0, false};
    if (m) {
        Dwarf_Addr low;
        const char *mname = dwfl_module_info(m, NULL, &low, NULL, NULL, NULL, NULL, NULL);
        f.module = mname ? intern_module(s, mname) : NULL;
        f.offset = addr - low;
        GElf_Off off;
        GElf_Sym sym;
        const char *name = dwfl_module_addrinfo(m, pc, &off, &sym, NULL, NULL, NULL);
        if (name) {
            char *dm = tc_demangle(name);
            f.alloc_frame = is_alloc_symbol(name) || (dm && is_alloc_symbol(dm));
            f.name = dm ? dm : strdup(name);
            /* Drop ELF symbol versions (foo@@GLIBC_2.34): noise in stacks and flame graphs. */
            char *at = dm ? NULL : strchr(f.name, '@');
            if (at && at != f.name)
                *at = 0;
        }
        if (mname && p->alloc_module && !strcmp(mname, p->alloc_module))
            f.alloc_frame = true;
    }
    if (!f.name)
        f.name = strdup("[unknown]");
    if (s->nframes == s->capframes) {
        size_t nc = s->capframes ? s->capframes * 2 : 256;
        struct tc_frame *nf = realloc(s->frames, nc * sizeof(*nf));
        if (!nf) {
            free((char *)f.name);
            return &unknown;
        }
        s->frames = nf;
        s->capframes = nc;
    }
    s->frames[s->nframes++] = f;
    uint64_t *slot = tc_map64_put(&p->cache, addr ? addr : 1, NULL);
    if (slot)
        *slot = s->nframes;
    return &s->frames[s->nframes - 1];
}

const char *tc_frame_str(const struct tc_frame *f, char *buf, size_t n)
{
    if (strcmp(f->name, "[unknown]") || !f->module)
        return f->name;
    const char *base = strrchr(f->module, '/');
    snprintf(buf, n, "[unknown] (%s+0x%llx)", base ? base + 1 : f->module, (unsigned long long)f->offset);
    return buf;
}

unsigned tc_first_user_frame(struct tc_symbolizer *s, pid_t pid, const uint64_t *frames, unsigned depth)
{
    /* The innermost frames belong to the allocator (possibly below an unwinder's frames); the
     * site is the frame after the last one of that leading run. */
    int last = -1;
    for (unsigned i = 0; i < depth && i < 16; i++) {
        const struct tc_frame *f = tc_sym_resolve(s, pid, frames[i]);
        if (f->alloc_frame)
            last = (int)i;
        else if (last >= 0)
            break;
    }
    if (last < 0 || depth == 0)
        return 0;
    return (unsigned)last + 1 < depth ? (unsigned)last + 1 : depth - 1;
}

void tc_site_names(struct tc_symbolizer *s, pid_t pid, const uint64_t *frames, unsigned depth, char *name,
                   size_t name_len, char *caller, size_t caller_len)
{
    char tmp[PATH_MAX + 64];
    snprintf(name, name_len, "[no stack]");
    caller[0] = 0;
    if (!depth)
        return;
    unsigned f = tc_first_user_frame(s, pid, frames, depth);
    snprintf(name, name_len, "%s", tc_frame_str(tc_sym_resolve(s, pid, frames[f]), tmp, sizeof(tmp)));
    if (f + 1 < depth)
        snprintf(caller, caller_len, "%s", tc_frame_str(tc_sym_resolve(s, pid, frames[f + 1]), tmp, sizeof(tmp)));
}
