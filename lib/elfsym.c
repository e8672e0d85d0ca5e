/* Function names from an object's own ELF symbol tables, for reports: dladdr knows only the
 * exported symbols (.dynsym), and a program's static functions, or any function of an executable
 * linked without -rdynamic, are only in .symtab.  The object's file is mapped read-only and its
 * SHT_SYMTAB and SHT_DYNSYM sections searched for the closest function at or below the address,
 * as libunwind's get_proc_name does (this replaces it: no library to load for a report).
 *
 * The file at the object's path may no longer be the one that was loaded (a package upgrade
 * renames a new file over it, a library is rebuilt while the program runs): its names would be
 * another build's.  So a file is only read when its program headers and notes (the build ID) are
 * the loaded image's, compared under the loader's lock (dl_iterate_phdr), which also keeps the
 * object from being unloaded while its headers are read.
 *
 * A few mapped files are kept, so that a report naming hundreds of frames maps each object
 * once.  The cache is only tried (trylock): a report that finds it busy, or a fork child whose
 * parent forked in the middle of a report, maps and unmaps the file for each lookup instead. */
#define _GNU_SOURCE 1
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "obs_internal.h"

struct elf_file {
    const uint8_t *data;
    size_t size;
    uintptr_t base; /* load bias of the object it was mapped for */
    char path[240];
};

#define FILES 4
static struct elf_file files[FILES];
static unsigned next_file;
static pthread_mutex_t files_lock = PTHREAD_MUTEX_INITIALIZER;

static bool map_file(const char *path, struct elf_file *f)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY); /* see src_open in cfi.c */
    if (fd < 0)
        return false;
    struct stat st;
    void *p = MAP_FAILED;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size >= (off_t)sizeof(ElfW(Ehdr)))
        p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED)
        return false;
    f->data = p;
    f->size = (size_t)st.st_size;
    return true;
}

/* The section header i, or NULL when the file does not hold it. */
static const ElfW(Shdr) *section(const struct elf_file *f, const ElfW(Ehdr) *eh, unsigned i)
{
    if (i >= eh->e_shnum)
        return NULL;
    return (const ElfW(Shdr) *)(f->data + eh->e_shoff + (size_t)i * sizeof(ElfW(Shdr)));
}

static bool in_file(const struct elf_file *f, uint64_t off, uint64_t len)
{
    return off <= f->size && len <= f->size - off;
}

struct same_image {
    const struct elf_file *f;
    uintptr_t base;
    const char *name; /* the link map's: "" for the executable */
    bool same;
};

/* Whether the file's program headers, and the bytes of its PT_NOTE segments, are the loaded
 * object's. */
static bool image_matches(const struct elf_file *f, const struct dl_phdr_info *info)
{
    const ElfW(Ehdr) *eh = (const ElfW(Ehdr) *)f->data;
    size_t phsz = (size_t)info->dlpi_phnum * sizeof(ElfW(Phdr));
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
        eh->e_phentsize != sizeof(ElfW(Phdr)) || eh->e_phnum != info->dlpi_phnum || !in_file(f, eh->e_phoff, phsz) ||
        memcmp(f->data + eh->e_phoff, info->dlpi_phdr, phsz))
        return false;
    for (unsigned i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *n = &info->dlpi_phdr[i];
        if (n->p_type != PT_NOTE)
            continue;
        if (!in_file(f, n->p_offset, n->p_filesz))
            return false;
        /* compared only where a loaded segment holds the note's bytes */
        for (unsigned j = 0; j < info->dlpi_phnum; j++) {
            const ElfW(Phdr) *l = &info->dlpi_phdr[j];
            if (l->p_type == PT_LOAD && n->p_vaddr >= l->p_vaddr && n->p_vaddr - l->p_vaddr <= l->p_filesz &&
                n->p_filesz <= l->p_filesz - (n->p_vaddr - l->p_vaddr)) {
                if (memcmp(f->data + n->p_offset, (const void *)(info->dlpi_addr + n->p_vaddr), n->p_filesz))
                    return false;
                break;
            }
        }
    }
    return true;
}

static int same_image_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)size;
    struct same_image *s = arg;
    if (info->dlpi_addr != s->base || strcmp(info->dlpi_name ? info->dlpi_name : "", s->name))
        return 0;
    s->same = image_matches(s->f, info);
    return 1;
}

/* The closest function symbol at or below the file address rel. */
static bool lookup(const struct elf_file *f, uintptr_t rel, char *name, size_t len, uint64_t *off)
{
    const ElfW(Ehdr) *eh = (const ElfW(Ehdr) *)f->data;
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
        eh->e_shentsize != sizeof(ElfW(Shdr)) || !in_file(f, eh->e_shoff, (uint64_t)eh->e_shnum * sizeof(ElfW(Shdr))))
        return false;
    uint64_t best = UINT64_MAX, best_size = 0;
    const char *best_name = NULL;
    size_t best_max = 0;
    for (unsigned i = 0; i < eh->e_shnum; i++) {
        const ElfW(Shdr) *sh = section(f, eh, i);
        if ((sh->sh_type != SHT_SYMTAB && sh->sh_type != SHT_DYNSYM) || sh->sh_entsize != sizeof(ElfW(Sym)) ||
            !in_file(f, sh->sh_offset, sh->sh_size))
            continue;
        const ElfW(Shdr) *str = section(f, eh, sh->sh_link);
        if (!str || !in_file(f, str->sh_offset, str->sh_size))
            continue;
        const ElfW(Sym) *sym = (const ElfW(Sym) *)(f->data + sh->sh_offset);
        size_t n = sh->sh_size / sizeof *sym;
        const char *strtab = (const char *)f->data + str->sh_offset;
        for (size_t k = 0; k < n; k++) {
            unsigned type = ELF64_ST_TYPE(sym[k].st_info);
            if ((type != STT_FUNC && type != STT_GNU_IFUNC) || sym[k].st_shndx == SHN_UNDEF ||
                sym[k].st_value > rel || rel - sym[k].st_value >= best || sym[k].st_name >= str->sh_size)
                continue;
            best = rel - sym[k].st_value;
            best_size = sym[k].st_size;
            best_name = strtab + sym[k].st_name;
            best_max = str->sh_size - sym[k].st_name;
        }
    }
    /* past the closest function's end: code no symbol names (a stripped object's local
     * function), not that function's */
    if (!best_name || !best_max || !best_name[0] || (best_size && best >= best_size))
        return false;
    size_t l = strnlen(best_name, best_max);
    if (l >= len)
        l = len - 1;
    memcpy(name, best_name, l);
    name[l] = 0;
    *off = best;
    return true;
}

/* The lookup in f, when f is the file of the object loaded at base under the name lname (*same,
 * if not NULL: whether it is). */
static bool lookup_loaded(const struct elf_file *f, uintptr_t base, const char *lname, uintptr_t rel, char *name,
                          size_t len, uint64_t *off, bool *same)
{
    struct same_image s = {f, base, lname, false};
    /* like the unwinder's: a fork then never finds the loader's lock held by this thread */
    lum_lock_order_check(&lum_unwind_fork_lock);
    pthread_rwlock_rdlock(&lum_unwind_fork_lock);
    dl_iterate_phdr(same_image_cb, &s);
    pthread_rwlock_unlock(&lum_unwind_fork_lock);
    if (same)
        *same = s.same;
    return s.same && lookup(f, rel, name, len, off);
}

/* The object whose loaded segments hold addr: its load bias and its loader's name, copied
 * while the loader's lock holds it (dladdr1's link_map, read after dladdr1 returned, could be
 * freed by a dlclose meanwhile). */
struct object_at {
    uintptr_t addr, base;
    char name[sizeof files[0].path];
    bool found, name_too_long;
};

static int object_at_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)size;
    struct object_at *o = arg;
    for (unsigned j = 0; j < info->dlpi_phnum; j++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[j];
        uintptr_t lo = info->dlpi_addr + ph->p_vaddr;
        if (ph->p_type != PT_LOAD || o->addr < lo || o->addr - lo >= ph->p_memsz)
            continue;
        const char *n = info->dlpi_name ? info->dlpi_name : "";
        size_t l = strlen(n);
        o->name_too_long = l >= sizeof o->name;
        if (!o->name_too_long)
            memcpy(o->name, n, l + 1);
        o->base = info->dlpi_addr;
        o->found = true;
        return 1;
    }
    return 0;
}

bool lum_elf_proc_name(uintptr_t addr, char *name, size_t len, uint64_t *off)
{
    if (!len)
        return false;
    struct object_at o = {.addr = addr};
    lum_lock_order_check(&lum_unwind_fork_lock);
    pthread_rwlock_rdlock(&lum_unwind_fork_lock);
    dl_iterate_phdr(object_at_cb, &o);
    pthread_rwlock_unlock(&lum_unwind_fork_lock);
    if (!o.found || o.name_too_long)
        return false;
    const char *lname = o.name;
    /* the executable's own entry has no name: its file is /proc/self/exe */
    const char *path = o.name[0] ? o.name : "/proc/self/exe";
    uintptr_t rel = addr - o.base;
    if (pthread_mutex_trylock(&files_lock)) {
        struct elf_file f;
        if (!map_file(path, &f))
            return false;
        bool ok = lookup_loaded(&f, o.base, lname, rel, name, len, off, NULL);
        munmap((void *)f.data, f.size);
        return ok;
    }
    struct elf_file *f = NULL;
    for (unsigned i = 0; i < FILES; i++)
        if (files[i].data && files[i].base == o.base && !strcmp(files[i].path, path))
            f = &files[i];
    if (f) {
        bool same;
        bool ok = lookup_loaded(f, o.base, lname, rel, name, len, off, &same);
        if (same) {
            pthread_mutex_unlock(&files_lock);
            return ok;
        }
        /* Another build than the one mapped when the entry was made (the library was replaced
         * and loaded again at the same address): the file is mapped again. */
        munmap((void *)f->data, f->size);
        f->data = NULL;
        if (map_file(path, f))
            f->base = o.base;
        else
            f = NULL;
    } else {
        f = &files[next_file++ % FILES];
        if (f->data)
            munmap((void *)f->data, f->size);
        f->data = NULL;
        if (map_file(path, f)) {
            f->base = o.base;
            strcpy(f->path, path);
        } else {
            f = NULL;
        }
    }
    bool ok = f && lookup_loaded(f, o.base, lname, rel, name, len, off, NULL);
    pthread_mutex_unlock(&files_lock);
    return ok;
}
