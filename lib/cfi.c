/* The unwind rule of a code address from the DWARF call frame information in .eh_frame (x86-64).
 *
 * The sampler's walk (unwind.c) knows one kind of frame: CFA = rsp + k or rbp + k, the return
 * address at CFA - 8, rbp saved at CFA + off or unchanged, or outermost.  This reads the same
 * facts off the object's own tables, as an exception unwinder would: the object holding the pc
 * (_dl_find_object), its .eh_frame_hdr binary-search table, the FDE and its CIE, and the CFA
 * program run up to the pc.  Whatever does not fit that rule (signal trampolines, CFA or
 * registers given by expressions, rbp kept in another register) ends the walk there: a frame
 * the walk cannot follow makes a shorter stack, never a wrong read.
 *
 * No malloc, and not the loader's lock: the object holding the pc comes from the loader's
 * lock-free index (_dl_find_object, glibc >= 2.35), its program headers from its ELF header, and
 * a small cache of objects (which makes a miss cost one lookup, not a read of headers) has a
 * lock of its own.  Waiting for the loader's lock inside malloc hung fork children (glibc does
 * not reset it in the child, and any thread of the parent's may have held it) and deadlocked
 * against a dl_iterate_phdr callback taking a mutex an allocating thread held.  Where there is
 * no index, everything runs inside dl_iterate_phdr's callback as before, and a fork child
 * derives no rules.  Every read of the tables is checked against the bounds of the segment
 * that holds them.
 *
 * The tables are read from the object's file (pread) rather than through its mapping when the
 * file is known to be the one mapped (same build-id): a lookup reads a few scattered bytes, but
 * touching the mapping faults in a 64 KiB window of the file around each of them (the kernel's
 * fault-around) and they stay in the process's RSS for good.  For libc, whose .eh_frame_hdr and
 * .eh_frame no other code reads, a sampled thread's bottom frames (start_thread, clone3) cost
 * ~100 KiB of RSS that way (bench cachescratch: 2.0 -> 1.7 MiB peak); through the file, none.
 * Any failure (no build-id, a sandbox refusing open, a file replaced on disk) falls back to the
 * mapping. */
#define _GNU_SOURCE 1
#include <elf.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <stddef.h>
#include <sys/auxv.h>
#include <sys/stat.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include "internal.h" /* lum_now_ms */
#include "obs_internal.h"
#include "options.h"

#if defined(__x86_64__)

#define DW_EH_PE_omit 0xff
#define DW_EH_PE_indirect 0x80

enum { REG_RBP = 6, REG_RSP = 7, REG_RA = 16 };
/* how a register is recovered at the pc */
enum { RS_SAME, RS_UNDEF, RS_OFFSET, RS_OTHER };

struct reg_rule {
    uint8_t how;
    int64_t off; /* RS_OFFSET: saved at CFA + off */
};

struct cfa_state {
    uint64_t cfa_reg; /* as read: a register number past 255 must not alias rsp or rbp */
    bool cfa_expr; /* CFA given by an expression: not a rule we can take */
    int64_t cfa_off;
    struct reg_rule rbp, ra;
};

/* A run of readable bytes: every read of the tables goes through one.  When the bytes are a
 * copy (read from the file), p + delta is where they are in the object's address space. */
struct rd {
    const uint8_t *p, *end;
    bool bad;
    intptr_t delta;
};

static inline bool rd_has(struct rd *r, size_t n)
{
    /* p past end (a record placed outside its bounds) must not turn into a huge size_t */
    if (r->bad || r->p > r->end || (size_t)(r->end - r->p) < n) {
        r->bad = true;
        return false;
    }
    return true;
}

#define RD_FIXED(name, type)                              \
    static type name(struct rd *r)                        \
    {                                                     \
        type v = 0;                                       \
        if (rd_has(r, sizeof v)) {                        \
            memcpy(&v, r->p, sizeof v);                   \
            r->p += sizeof v;                             \
        }                                                 \
        return v;                                         \
    }
RD_FIXED(rd_u8, uint8_t)
RD_FIXED(rd_u16, uint16_t)
RD_FIXED(rd_u32, uint32_t)
RD_FIXED(rd_u64, uint64_t)

static uint64_t rd_uleb(struct rd *r)
{
    uint64_t v = 0;
    for (unsigned shift = 0; rd_has(r, 1); shift += 7) {
        uint8_t b = *r->p++;
        if (shift < 64)
            v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80))
            return v;
    }
    return 0;
}

static int64_t rd_sleb(struct rd *r)
{
    uint64_t v = 0;
    unsigned shift = 0;
    for (; rd_has(r, 1);) {
        uint8_t b = *r->p++;
        if (shift < 64)
            v |= (uint64_t)(b & 0x7f) << shift;
        shift += 7;
        if (!(b & 0x80)) {
            if (shift < 64 && (b & 0x40))
                v |= ~(uint64_t)0 << shift;
            return (int64_t)v;
        }
    }
    return 0;
}

/* Where the tables of one object are, and the bounds every read of them is checked against. */
struct obj {
    uintptr_t text_lo, text_hi;   /* its executable segments */
    const uint8_t *hdr;           /* .eh_frame_hdr */
    const uint8_t *hdr_end;       /* end of the segment holding it */
    const uint8_t *seg_lo, *seg_hi; /* the segment holding .eh_frame */
    /* Reading the tables from the file (see the top): its path (NULL: read the mapping),
     * address - file offset in the tables' segment, and the build-id note that must read the
     * same in the file (at note_off) as in memory (at note). */
    const char *path;
    uintptr_t file_delta;
    const uint8_t *note;
    uint64_t note_off;
    uint32_t note_len;
    /* The object as the loader's index (_dl_find_object) named it when the entry was made:
     * its mapping, link_map and .eh_frame_hdr (all 0 through dl_iterate_phdr). */
    uintptr_t map_lo, map_hi;
    const void *lm, *eh;
    /* its slot in slots[] (the probe cache's), or -1: none (found through dl_iterate_phdr) */
    int slot;
};

/* Where lookups read the tables: a file descriptor of the object's file, or -1 (the mapping),
 * and the build the file holds (a hash of its build-id note, which src_open checked against the
 * mapped object's). */
struct src {
    const struct obj *o;
    int fd;
    uint64_t build;
};

/* The same object, as two copies of its cache entry name it. */
static bool obj_same(const struct obj *a, const struct obj *b)
{
    return a->text_lo == b->text_lo && a->text_hi == b->text_hi && a->hdr == b->hdr && a->map_lo == b->map_lo &&
           a->lm == b->lm && a->eh == b->eh && a->path == b->path;
}

bool lum_cfi_read_files = true;
uint64_t lum_cfi_file_lookups, lum_cfi_file_opens, lum_cfi_file_reads;

/* Raw system calls: open and pread are cancellation points in libc (a cancelled thread must
 * not unwind out of malloc), and their wrappers would be more libc code to fault in. */
static long sys4(long n, long a, long b, long c, long d)
{
    long r;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall" : "=a"(r) : "0"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
    return r;
}

/* The n bytes at offset off of the file fd into dst: false on an error or past the file's end. */
static bool file_read(int fd, void *dst, size_t n, uint64_t off)
{
    __atomic_fetch_add(&lum_cfi_file_reads, 1, __ATOMIC_RELAXED);
    for (size_t done = 0; done < n;) {
        long r = sys4(SYS_pread64, fd, (long)((uint8_t *)dst + done), (long)(n - done), (long)(off + done));
        if (r == -EINTR)
            continue;
        if (r <= 0)
            return false;
        done += (size_t)r;
    }
    return true;
}

/* Copies the n bytes at a (checked by the caller to lie in the tables' segment) to dst: from the
 * file, or from the mapping when the file does not give them (a read error, or a file with the
 * same build-id cut short): the mapping holds them whatever became of the file since. */
static void src_read(const struct src *s, const uint8_t *a, void *dst, size_t n)
{
    if (s->fd < 0 || !file_read(s->fd, dst, n, (uint64_t)((uintptr_t)a - s->o->file_delta)))
        memcpy(dst, a, n);
}

/* memcmp(a, b, n) == 0, strnlen and strchr(s, c) != NULL for the few bytes a sample's first walk
 * through an object compares (a build-id note, an augmentation string, a path): libc's run in
 * its vector versions near the end of its text, whose 64 KiB windows a program may never touch
 * (-Os kept even memcmp's 4-byte compares calls).  Inline: dlfo_info runs at start-up, hot. */
static inline __attribute__((always_inline)) bool same_bytes(const void *a, const void *b, size_t n)
{
    const uint8_t *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i]) return false;
    return true;
}
static inline __attribute__((always_inline)) size_t bounded_len(const char *s, size_t max)
{
    size_t n = 0;
    while (n < max && s[n]) n++;
    return n;
}
static inline __attribute__((always_inline)) bool has_char(const char *s, char c)
{
    for (; *s; s++)
        if (*s == c) return true;
    return false;
}

/* The object's file, opened for this lookup if it still holds the mapped build (else -1). */
static int src_open(const struct obj *o, uint64_t *build)
{
    if (!o->path || !lum_cfi_read_files || !lum_opt.unwind_files)
        return -1;
    /* Not blocking, and a regular file only: the path is the loader's name for the object, and
     * a plugin loaded from /proc/self/fd/N names whatever N is now (a FIFO without a writer
     * blocked the sampling thread in open for good). */
    long fd = sys4(SYS_openat, AT_FDCWD, (long)o->path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY, 0);
    if (fd < 0)
        return -1;
    struct stat st;
    uint8_t note[96];
    if (sys4(SYS_fstat, fd, (long)&st, 0, 0) != 0 || !S_ISREG(st.st_mode) || o->note_len > sizeof note ||
        !file_read((int)fd, note, o->note_len, o->note_off) || !same_bytes(note, o->note, o->note_len)) {
        sys4(SYS_close, fd, 0, 0, 0);
        return -1;
    }
    uint64_t h = 0xcbf29ce484222325ULL;
    for (uint32_t i = 0; i < o->note_len; i++)
        h = (h ^ note[i]) * 0x100000001b3ULL;
    *build = h | 1;
    __atomic_fetch_add(&lum_cfi_file_opens, 1, __ATOMIC_RELAXED);
    return (int)fd;
}

/* Whether the 8 bytes at q lie in [lo, hi): q is any value a table holds, so q + 8 may wrap. */
static inline bool within8(const uint8_t *q, const uint8_t *lo, const uint8_t *hi)
{
    return lo && q >= lo && q < hi && (size_t)(hi - q) >= 8;
}

/* A pointer in encoding enc at r's position; datarel is relative to base (.eh_frame_hdr).
 * With deref, an indirect pointer is loaded (from the object's own data, within seg). */
static uintptr_t rd_enc(struct rd *r, uint8_t enc, uintptr_t base, const struct obj *o)
{
    if (enc == DW_EH_PE_omit)
        return 0;
    uintptr_t at = (uintptr_t)r->p + (uintptr_t)r->delta, v;
    switch (enc & 0x0f) {
    case 0x00: v = (uintptr_t)rd_u64(r); break;                   /* absptr */
    case 0x01: v = (uintptr_t)rd_uleb(r); break;                  /* uleb128 */
    case 0x02: v = rd_u16(r); break;                              /* udata2 */
    case 0x03: v = rd_u32(r); break;                              /* udata4 */
    case 0x04: v = (uintptr_t)rd_u64(r); break;                   /* udata8 */
    case 0x09: v = (uintptr_t)rd_sleb(r); break;                  /* sleb128 */
    case 0x0a: v = (uintptr_t)(intptr_t)(int16_t)rd_u16(r); break; /* sdata2 */
    case 0x0b: v = (uintptr_t)(intptr_t)(int32_t)rd_u32(r); break; /* sdata4 */
    case 0x0c: v = (uintptr_t)rd_u64(r); break;                   /* sdata8 */
    default: r->bad = true; return 0;
    }
    switch (enc & 0x70) {
    case 0x00: break;
    case 0x10: v += at; break;   /* pcrel */
    case 0x30: v += base; break; /* datarel */
    default: r->bad = true; return 0; /* textrel, funcrel, aligned: not used on x86-64 */
    }
    if (enc & DW_EH_PE_indirect) {
        /* the pointer is in the object's GOT: read only if it lies in a segment we know */
        const uint8_t *q = (const uint8_t *)v;
        bool in = within8(q, o->seg_lo, o->seg_hi) || within8(q, o->hdr, o->hdr_end);
        if (!in) {
            r->bad = true;
            return 0;
        }
        memcpy(&v, q, sizeof v);
    }
    return v;
}

/* One CIE's facts. */
struct cie {
    uint64_t code_align;
    int64_t data_align;
    uint64_t ra_reg;
    uint8_t fde_enc;
    bool aug_z, signal;
    struct rd insns; /* initial instructions */
};

/* Room for a CIE or FDE record read from the file; a longer one (rare: a function with a very
 * long CFA program) is read through the mapping. */
#define RECORD_BUF 512

/* A CIE or FDE record at p: its contents after the length field, within the segment, read
 * into buf (RECORD_BUF bytes) when s reads the file. */
static bool record_at(const struct src *s, const uint8_t *p, uint8_t *buf, struct rd *out)
{
    const struct obj *o = s->o;
    /* p comes from a table entry or a CIE offset: anything, including past the segment */
    if (p < o->seg_lo || p >= o->seg_hi)
        return false;
    size_t have = (size_t)(o->seg_hi - p) < RECORD_BUF ? (size_t)(o->seg_hi - p) : RECORD_BUF;
    const uint8_t *base = p;
    if (s->fd >= 0) {
        src_read(s, p, buf, have);
        base = buf;
    }
    struct rd r = {base, s->fd >= 0 ? buf + have : o->seg_hi, false, 0};
    uint64_t len = rd_u32(&r);
    if (len == 0xffffffffu)
        len = rd_u64(&r);
    const uint8_t *body = p + (r.p - base);
    if (r.bad || len == 0 || len > (uint64_t)(o->seg_hi - body))
        return false;
    if (s->fd >= 0 && len > (uint64_t)(r.end - r.p)) /* longer than the copy: the mapping */
        *out = (struct rd){body, body + len, false, 0};
    else
        *out = (struct rd){r.p, r.p + len, false, (intptr_t)(body - r.p)};
    return true;
}

static bool parse_cie(const struct src *s, const uint8_t *p, uint8_t *buf, struct cie *c)
{
    const struct obj *o = s->o;
    struct rd r;
    if (!record_at(s, p, buf, &r) || rd_u32(&r) != 0) /* a CIE's id is 0 in .eh_frame */
        return false;
    uint8_t version = rd_u8(&r);
    if (version != 1 && version != 3)
        return false;
    const char *aug = (const char *)r.p;
    size_t alen = bounded_len(aug, (size_t)(r.end - r.p));
    if (!rd_has(&r, alen + 1))
        return false;
    r.p += alen + 1;
    memset(c, 0, sizeof *c);
    c->fde_enc = 0; /* absptr when there is no 'R' */
    if (alen >= 2 && aug[0] == 'e' && aug[1] == 'h')
        return false; /* the old GNU "eh" augmentation: not emitted by any current toolchain */
    c->code_align = rd_uleb(&r);
    c->data_align = rd_sleb(&r);
    c->ra_reg = version == 1 ? rd_u8(&r) : rd_uleb(&r);
    if (alen && aug[0] == 'z') {
        c->aug_z = true;
        uint64_t dlen = rd_uleb(&r);
        if (!rd_has(&r, dlen))
            return false;
        struct rd d = {r.p, r.p + dlen, false, r.delta};
        r.p += dlen;
        for (size_t i = 1; i < alen; i++) {
            switch (aug[i]) {
            case 'R': c->fde_enc = rd_u8(&d); break;
            case 'L': (void)rd_u8(&d); break;
            case 'P': {
                uint8_t penc = rd_u8(&d);
                (void)rd_enc(&d, penc & 0x7f, 0, o); /* skipped, never loaded */
                break;
            }
            case 'S': c->signal = true; break;
            default: i = alen; break; /* the rest of the data is skipped by its length */
            }
        }
        if (d.bad)
            return false;
    } else if (alen) {
        return false; /* an augmentation we cannot skip */
    }
    c->insns = r;
    return !r.bad;
}

/* The CFA program's factored operands, v times the CIE's factor: a product that does not fit is
 * a malformed table (r->bad), not undefined behaviour a file controls. */
static inline uint64_t code_factored(struct rd *r, uint64_t v, uint64_t align)
{
    uint64_t p;
    if (__builtin_mul_overflow(v, align, &p))
        r->bad = true;
    return p;
}

static inline int64_t data_factored(struct rd *r, int64_t v, int64_t align)
{
    int64_t p;
    if (__builtin_mul_overflow(v, align, &p))
        r->bad = true;
    return p;
}

/* Runs the CFA program in r while its location stays at or below pc; initial is the state
 * after the CIE's instructions (for DW_CFA_restore), NULL while running those.  false when
 * the program is malformed or needs more than the remember stack holds. */
static bool run_cfa(struct rd *r, const struct cie *c, uintptr_t loc, uintptr_t pc, struct cfa_state *s,
                    const struct cfa_state *initial, const struct obj *o)
{
    struct cfa_state stack[8];
    unsigned depth = 0;
    while (r->p < r->end && !r->bad) {
        uint8_t op = rd_u8(r);
        uint64_t reg = 0, adv = 0;
        int64_t off = 0;
        switch (op >> 6) {
        case 1: adv = code_factored(r, op & 0x3f, c->code_align); goto advance;
        case 2: reg = op & 0x3f; off = data_factored(r, (int64_t)rd_uleb(r), c->data_align); goto offset;
        case 3: reg = op & 0x3f; goto restore;
        default: break;
        }
        switch (op) {
        case 0x00: break; /* nop */
        case 0x01: {      /* set_loc */
            uintptr_t nl = rd_enc(r, c->fde_enc, 0, o);
            if (nl > pc)
                return !r->bad;
            loc = nl;
            break;
        }
        case 0x02: adv = code_factored(r, rd_u8(r), c->code_align); goto advance;
        case 0x03: adv = code_factored(r, rd_u16(r), c->code_align); goto advance;
        case 0x04: adv = code_factored(r, rd_u32(r), c->code_align); goto advance;
        case 0x05: reg = rd_uleb(r); off = data_factored(r, (int64_t)rd_uleb(r), c->data_align); goto offset;
        case 0x11: reg = rd_uleb(r); off = data_factored(r, rd_sleb(r), c->data_align); goto offset;
        case 0x2f: /* GNU_negative_offset_extended */
            reg = rd_uleb(r);
            off = data_factored(r, (int64_t)rd_uleb(r), c->data_align);
            if (off == INT64_MIN)
                r->bad = true;
            off = r->bad ? 0 : -off;
            goto offset;
        case 0x06: reg = rd_uleb(r); goto restore;
        case 0x07: /* undefined */
        case 0x08: /* same_value */
            reg = rd_uleb(r);
            if (reg == REG_RBP)
                s->rbp.how = op == 0x07 ? RS_UNDEF : RS_SAME;
            else if (reg == c->ra_reg)
                s->ra.how = op == 0x07 ? RS_UNDEF : RS_SAME;
            break;
        case 0x09: /* register: a value kept in another register */
            reg = rd_uleb(r);
            (void)rd_uleb(r);
            goto other;
        case 0x14: /* val_offset */
        case 0x15: /* val_offset_sf */
            reg = rd_uleb(r);
            if (op == 0x14)
                (void)rd_uleb(r);
            else
                (void)rd_sleb(r);
            goto other;
        case 0x10: /* expression */
        case 0x16: { /* val_expression */
            reg = rd_uleb(r);
            uint64_t n = rd_uleb(r);
            if (!rd_has(r, n))
                return false;
            r->p += n;
            goto other;
        }
        case 0x0a: /* remember_state */
            if (depth == sizeof stack / sizeof stack[0])
                return false;
            stack[depth++] = *s;
            break;
        case 0x0b: /* restore_state: the CFA rule too, as gcc's epilogues expect */
            if (!depth)
                return false;
            *s = stack[--depth];
            break;
        case 0x0c: /* def_cfa */
            s->cfa_reg = rd_uleb(r);
            s->cfa_off = (int64_t)rd_uleb(r);
            s->cfa_expr = false;
            break;
        case 0x12: /* def_cfa_sf */
            s->cfa_reg = rd_uleb(r);
            s->cfa_off = data_factored(r, rd_sleb(r), c->data_align);
            s->cfa_expr = false;
            break;
        case 0x0d: s->cfa_reg = rd_uleb(r); s->cfa_expr = false; break;
        case 0x0e: s->cfa_off = (int64_t)rd_uleb(r); break;
        case 0x13: s->cfa_off = data_factored(r, rd_sleb(r), c->data_align); break;
        case 0x0f: { /* def_cfa_expression */
            uint64_t n = rd_uleb(r);
            if (!rd_has(r, n))
                return false;
            r->p += n;
            s->cfa_expr = true;
            break;
        }
        case 0x2e: (void)rd_uleb(r); break; /* GNU_args_size: the CFA rule already says it */
        default: return false;               /* an opcode we do not know: cannot go on */
        }
        continue;
    advance:
        if (r->bad || adv > pc - loc) /* loc <= pc here: no sum to wrap */
            return !r->bad;
        loc += adv;
        continue;
    offset:
        if (reg == REG_RBP)
            s->rbp = (struct reg_rule){RS_OFFSET, off};
        else if (reg == c->ra_reg)
            s->ra = (struct reg_rule){RS_OFFSET, off};
        continue;
    restore:
        if (!initial)
            return false; /* restore inside a CIE has nothing to restore to */
        if (reg == REG_RBP)
            s->rbp = initial->rbp;
        else if (reg == c->ra_reg)
            s->ra = initial->ra;
        continue;
    other:
        if (reg == REG_RBP)
            s->rbp.how = RS_OTHER;
        else if (reg == c->ra_reg)
            s->ra.how = RS_OTHER;
        continue;
    }
    return !r->bad;
}

/* The top of each object's search through its .eh_frame_hdr table, read from its file: the
 * entries a binary search probes first are the same for every lookup in the object, and each
 * was a pread of its own (bench python, 9811 entries: 8 before the last 64 came in one read,
 * ~12 system calls a rule with the header, the FDE, the CIE and the file's open).  Kept for
 * PROBE_LEVELS levels (255 entries, 1 KiB an object slot), filled as lookups read them, under
 * lum_cfi_lock, and dropped with the slot's object or when a lookup's file is another build.
 * Only the index path (_dl_find_object) has slots for it. */
#define PROBE_LEVELS 8
#define PROBE_NODES (1u << PROBE_LEVELS) /* nodes 1 .. PROBE_NODES - 1: the root is 1 */
#define OBJS 32
struct probe_cache {
    /* The build they were read from (struct src): a slot's object can be another build at the
     * same address, with the same link_map and layout (a plugin rebuilt and reloaded), which
     * the object cache takes for the same object; its entries would send the search to the
     * wrong window, and its rules would be "none" for good (found in review). */
    uint64_t build;
    const uint8_t *tab; /* the table and its entry count, as the file's header gave them; NULL:
                         * the header not read yet */
    uint64_t n;
    uint64_t have[PROBE_NODES / 64];
    int32_t start[PROBE_NODES]; /* read only where have says: a reset leaves them be */
};
/* An object and its probes side by side: a program samples through a few objects, and the
 * slots they fill are one run of memory, 1.2 KiB a slot (the probes in an array of their own
 * had their first entries on a page of .bss apart from the objects': one page more in every
 * sampling program). */
static struct cfi_slot {
    struct obj obj;
    struct probe_cache probes;
} slots[OBJS];

static unsigned slot_of(const struct obj *e)
{
    _Static_assert(offsetof(struct cfi_slot, obj) == 0, "an entry's address is its slot's");
    return (unsigned)((const struct cfi_slot *)(const void *)e - slots);
}

/* Empty, for the build given.  The starts stay as they were (probe_known tells which hold one):
 * a slot's 1 KiB of them is written as lookups learn them, and no sooner (cleared whole, the
 * third slot of a program sampled through three objects wrote a page of .bss more). */
static void probe_reset(struct probe_cache *c, uint64_t build)
{
    c->build = build;
    c->tab = NULL;
    c->n = 0;
    memset(c->have, 0, sizeof c->have);
}

static inline bool probe_known(const struct probe_cache *c, unsigned node)
{
    return node < PROBE_NODES && (c->have[node / 64] >> (node % 64) & 1);
}

/* .eh_frame_hdr's search table of o through s: false when it has none we can search. */
static bool hdr_table(const struct src *s, const uint8_t **tab, uint64_t *n)
{
    const struct obj *o = s->o;
    /* the header: 4 bytes, then two pointers of at most 8 bytes each */
    uint8_t head[20];
    size_t hn = (size_t)(o->hdr_end - o->hdr) < sizeof head ? (size_t)(o->hdr_end - o->hdr) : sizeof head;
    src_read(s, o->hdr, head, hn);
    struct rd r = {head, head + hn, false, (intptr_t)(o->hdr - head)};
    uint8_t version = rd_u8(&r), ptr_enc = rd_u8(&r), cnt_enc = rd_u8(&r), tab_enc = rd_u8(&r);
    if (r.bad || version != 1)
        return false;
    (void)rd_enc(&r, ptr_enc, (uintptr_t)o->hdr, o);
    *n = rd_enc(&r, cnt_enc, (uintptr_t)o->hdr, o);
    *tab = o->hdr + (r.p - head);
    /* the table is sorted pairs of datarel sdata4 (every linker writes that); anything else
     * would need a linear search through .eh_frame, which a sample cannot afford */
    return !r.bad && tab_enc == 0x3b && *n && *n <= (uint64_t)(o->hdr_end - *tab) / 8;
}

/* The FDE covering pc by the .eh_frame_hdr table: its record, or NULL. */
static const uint8_t *find_fde(const struct src *s, uintptr_t pc)
{
    const struct obj *o = s->o;
    uintptr_t hdr = (uintptr_t)o->hdr;
    const uint8_t *tab = NULL;
    uint64_t n = 0;
    size_t lo = 0, hi = 0;
    unsigned node = 1; /* the search's place in the tree of probes */
    /* only lookups that read the file (and the mapping where the file fell short: the same
     * bytes, for a file of the mapped build) use the probe cache: without it, the mapping is
     * read as it is at each lookup (tests damage it in memory) */
    bool cache = s->fd >= 0 && o->slot >= 0;
    if (cache) {
        lum_lock(&lum_cfi_lock);
        const struct probe_cache *c = &slots[o->slot].probes;
        if (obj_same(&slots[o->slot].obj, o) && c->tab && c->build == s->build) {
            tab = c->tab, n = c->n, hi = (size_t)n;
            while (hi - lo > 64 && probe_known(c, node)) {
                size_t mid = lo + (hi - lo) / 2;
                bool right = hdr + (uintptr_t)(intptr_t)c->start[node] <= pc;
                right ? (lo = mid) : (hi = mid);
                node = 2 * node + right;
            }
        }
        lum_unlock(&lum_cfi_lock);
    }
    bool new_tab = !tab;
    if (!tab) {
        if (!hdr_table(s, &tab, &n))
            return NULL;
        hi = (size_t)n;
    }
    struct { unsigned node; int32_t start; } learnt[PROBE_LEVELS];
    unsigned nl = 0;
    /* From the file, the last 64 entries come in one read: half the system calls. */
    int32_t chunk[2 * 64];
    size_t chunk_lo = SIZE_MAX;
    while (hi - lo > 1) { /* the last entry whose start is <= pc */
        size_t mid = lo + (hi - lo) / 2;
        int32_t start;
        if (s->fd >= 0 && chunk_lo == SIZE_MAX && hi - lo <= 64) {
            src_read(s, tab + lo * 8, chunk, (hi - lo) * 8);
            chunk_lo = lo;
        }
        if (chunk_lo != SIZE_MAX) {
            start = chunk[2 * (mid - chunk_lo)];
        } else {
            src_read(s, tab + mid * 8, &start, 4);
            if (node < PROBE_NODES && nl < PROBE_LEVELS)
                learnt[nl].node = node, learnt[nl++].start = start;
        }
        bool right = hdr + (uintptr_t)(intptr_t)start <= pc;
        right ? (lo = mid) : (hi = mid);
        node = 2 * node + right;
    }
    if (cache && (new_tab || nl)) {
        lum_lock(&lum_cfi_lock);
        struct probe_cache *c = &slots[o->slot].probes;
        if (obj_same(&slots[o->slot].obj, o)) {
            if (c->build != s->build)
                probe_reset(c, s->build);
            if (!c->tab)
                c->tab = tab, c->n = n;
            for (unsigned i = 0; i < nl && c->tab == tab && c->n == n; i++) {
                c->start[learnt[i].node] = learnt[i].start;
                c->have[learnt[i].node / 64] |= (uint64_t)1 << (learnt[i].node % 64);
            }
        }
        lum_unlock(&lum_cfi_lock);
    }
    int32_t e[2];
    if (chunk_lo != SIZE_MAX)
        e[0] = chunk[2 * (lo - chunk_lo)], e[1] = chunk[2 * (lo - chunk_lo) + 1];
    else
        src_read(s, tab + lo * 8, e, 8);
    if (hdr + (uintptr_t)(intptr_t)e[0] > pc)
        return NULL;
    return (const uint8_t *)(hdr + (uintptr_t)(intptr_t)e[1]);
}

/* The rule for the return address ra in object o, read through s. */
static int rule_from(const struct src *sr, uintptr_t ra, struct lum_cfi_rule *out)
{
    const struct obj *o = sr->o;
    /* a return address may follow a call that ends its function (noreturn callees): the call
     * itself, at ra - 1, is in the function that made it */
    uintptr_t pc = ra - 1;
    const uint8_t *fp = find_fde(sr, pc);
    uint8_t fde_buf[RECORD_BUF], cie_buf[RECORD_BUF];
    struct rd r;
    if (!fp || !record_at(sr, fp, fde_buf, &r))
        return LUM_CFI_NONE;
    const uint8_t *idp = r.p + r.delta;
    uint32_t id = rd_u32(&r);
    struct cie c;
    if (!id || r.bad || !parse_cie(sr, idp - id, cie_buf, &c))
        return LUM_CFI_NONE;
    uintptr_t begin = rd_enc(&r, c.fde_enc, 0, o);
    uintptr_t range = rd_enc(&r, c.fde_enc & 0x0f, 0, o);
    if (r.bad || pc < begin || pc - begin >= range)
        return LUM_CFI_NONE;
    if (c.aug_z) {
        uint64_t n = rd_uleb(&r);
        if (!rd_has(&r, n))
            return LUM_CFI_NONE;
        r.p += n;
    }
    if (c.signal)
        return LUM_CFI_NONE; /* a signal trampoline: the caller's registers are in a ucontext */
    struct cfa_state s = {.cfa_reg = REG_RSP, .cfa_off = 8, .rbp = {RS_SAME, 0}, .ra = {RS_SAME, 0}};
    struct rd ci = c.insns;
    if (!run_cfa(&ci, &c, 0, UINTPTR_MAX, &s, NULL, o))
        return LUM_CFI_NONE;
    struct cfa_state initial = s;
    if (!run_cfa(&r, &c, begin, pc, &s, &initial, o))
        return LUM_CFI_NONE;

    if (c.ra_reg != REG_RA)
        return LUM_CFI_NONE;
    if (s.ra.how == RS_UNDEF)
        return LUM_CFI_LAST; /* _start, a thread's clone: the outermost frame */
    if (s.cfa_expr || s.ra.how != RS_OFFSET || s.ra.off != -8 ||
        (s.cfa_reg != REG_RSP && s.cfa_reg != REG_RBP) || s.cfa_off < 8 || s.cfa_off > INT32_MAX)
        return LUM_CFI_NONE;
    *out = (struct lum_cfi_rule){.cfa_off = (int32_t)s.cfa_off, .cfa_rbp = s.cfa_reg == REG_RBP};
    if (s.rbp.how == RS_OFFSET) {
        /* a save slot inside the frame, below the return address: with an rsp-based CFA, at
         * or above the frame's rsp (the walk checks the same for rbp-based ones) */
        if (s.rbp.off > -8 || s.rbp.off < INT16_MIN || (!out->cfa_rbp && s.rbp.off < -s.cfa_off))
            return LUM_CFI_NONE;
        out->rbp_off = (int16_t)s.rbp.off;
    } else if (s.rbp.how == RS_OTHER) {
        return LUM_CFI_NONE;
    }
    return LUM_CFI_OK;
}

void lum_cfi_files_close(struct lum_cfi_files *f)
{
    if (f->fd >= 0)
        sys4(SYS_close, f->fd, 0, 0, 0);
    if (f->locked)
        pthread_rwlock_unlock(&lum_unwind_fork_lock);
    *f = (struct lum_cfi_files)LUM_CFI_FILES_INIT;
}

/* The rule for ra in o, read through the file f holds for o, opened now if f holds another
 * object's (f NULL: opened and closed for this lookup). */
static inline __attribute__((always_inline)) int rule_in(const struct obj *o, uintptr_t ra, struct lum_cfi_rule *out,
                                                         struct lum_cfi_files *f)
{
    struct lum_cfi_files own = LUM_CFI_FILES_INIT;
    if (!f)
        f = &own;
    if (f->text_lo != o->text_lo || f->hdr != o->hdr || f->lm != o->lm || f->map_lo != o->map_lo) {
        if (f->fd >= 0)
            sys4(SYS_close, f->fd, 0, 0, 0);
        f->fd = src_open(o, &f->build);
        f->text_lo = o->text_lo, f->hdr = o->hdr, f->lm = o->lm, f->map_lo = o->map_lo;
    }
    struct src s = {o, f->fd, f->build};
    int k = rule_from(&s, ra, out);
    if (s.fd >= 0)
        __atomic_fetch_add(&lum_cfi_file_lookups, 1, __ATOMIC_RELAXED);
    if (f == &own)
        lum_cfi_files_close(f);
    return k;
}

/* The object's build-id note in memory (its first PT_LOAD, which the loader has read), for
 * src_open to compare with the file's: NULL when it has none. */
static void find_note(struct dl_phdr_info *info, struct obj *o)
{
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_NOTE)
            continue;
        /* the notes must lie in a loaded segment, and at the same offset in the file */
        bool loaded = false;
        for (int j = 0; j < info->dlpi_phnum; j++) {
            const ElfW(Phdr) *l = &info->dlpi_phdr[j];
            if (l->p_type == PT_LOAD && ph->p_vaddr >= l->p_vaddr &&
                ph->p_vaddr + ph->p_filesz <= l->p_vaddr + l->p_filesz &&
                ph->p_vaddr - l->p_vaddr == ph->p_offset - l->p_offset)
                loaded = true;
        }
        if (!loaded)
            continue;
        const uint8_t *p = (const uint8_t *)(info->dlpi_addr + ph->p_vaddr), *end = p + ph->p_filesz;
        while ((size_t)(end - p) >= sizeof(ElfW(Nhdr))) {
            ElfW(Nhdr) nh;
            memcpy(&nh, p, sizeof nh);
            size_t len = sizeof nh + ((nh.n_namesz + 3u) & ~3u) + ((nh.n_descsz + 3u) & ~3u);
            if (nh.n_namesz > 64 || nh.n_descsz > 64 || len > (size_t)(end - p))
                break;
            if (nh.n_type == NT_GNU_BUILD_ID && nh.n_namesz == 4 && nh.n_descsz >= 8 &&
                same_bytes(p + sizeof nh, "GNU", 4)) {
                o->note = p;
                o->note_len = (uint32_t)len;
                o->note_off = ph->p_offset + (uint64_t)(p - (const uint8_t *)(info->dlpi_addr + ph->p_vaddr));
                return;
            }
            p += len;
        }
    }
}

/* Relocations written into read-only segments (DT_TEXTREL) may have changed the tables in
 * memory: then the file is not what the mapping holds. */
static bool has_textrel(struct dl_phdr_info *info)
{
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_DYNAMIC)
            continue;
        const ElfW(Dyn) *d = (const ElfW(Dyn) *)(info->dlpi_addr + ph->p_vaddr);
        for (size_t k = 0; k < ph->p_memsz / sizeof *d && d[k].d_tag != DT_NULL; k++)
            if (d[k].d_tag == DT_TEXTREL || (d[k].d_tag == DT_FLAGS && (d[k].d_un.d_val & DF_TEXTREL)))
                return true;
    }
    return false;
}

/* Objects seen by earlier lookups.  Found through the loader's index (see lum_cfi_rule), an
 * entry names the object as the index did (map_lo, lm, eh), which each lookup compares, and the
 * cache has a lock of its own, lum_cfi_lock, never held across anything that waits.  Found
 * through dl_iterate_phdr (a glibc without the index), the entries are valid while the loader's
 * add and remove counts are those of gen_adds and gen_subs, and only touched inside its
 * callback. */
static unsigned nobjs, next_obj;
static unsigned long long gen_adds, gen_subs;
uint64_t lum_cfi_object_scans; /* lookups that read an object's headers (tests) */
/* Taken by fork's prepare handler (observe.c): a child finds the cache and the seen set whole. */
lum_lock_t lum_cfi_lock = LUM_LOCK_INIT;
/* Set in a fork child: see lum_cfi_rule. */
bool lum_cfi_forked;
#define forked lum_cfi_forked

struct find {
    uintptr_t ra;
    struct lum_cfi_rule *out;
    struct lum_cfi_files *files;
    int result;
    bool first;
};

static const struct obj *cached_obj(uintptr_t pc)
{
    for (unsigned i = 0; i < nobjs; i++)
        if (pc >= slots[i].obj.text_lo && pc < slots[i].obj.text_hi)
            return &slots[i].obj;
    return NULL;
}

/* The tables of the object info describes, into *out, when pc lies in one of its executable
 * segments. */
static bool obj_of(struct dl_phdr_info *info, uintptr_t pc, struct obj *out)
{
    struct obj o = {.text_lo = UINTPTR_MAX, .slot = -1};
    bool mine = false;
    const ElfW(Phdr) *eh = NULL;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type == PT_GNU_EH_FRAME)
            eh = ph;
        if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_X))
            continue;
        uintptr_t a = info->dlpi_addr + ph->p_vaddr, b = a + ph->p_memsz;
        if (pc >= a && pc < b)
            mine = true;
        if (a < o.text_lo)
            o.text_lo = a;
        if (b > o.text_hi)
            o.text_hi = b;
    }
    if (!mine)
        return false;
    if (eh) {
        uintptr_t hdr = info->dlpi_addr + eh->p_vaddr;
        const ElfW(Phdr) *hseg = NULL;
        /* the segments holding .eh_frame_hdr and .eh_frame bound every read */
        for (int i = 0; i < info->dlpi_phnum; i++) {
            const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
            uintptr_t a = info->dlpi_addr + ph->p_vaddr, b = a + ph->p_filesz;
            if (ph->p_type == PT_LOAD && (ph->p_flags & PF_R) && hdr >= a && hdr < b) {
                o.hdr = (const uint8_t *)hdr;
                o.hdr_end = (const uint8_t *)b;
                hseg = ph;
            }
        }
        /* From the file only where the tables' segment holds the file's bytes at a fixed
         * offset (and both tables lie in it: checked below).  The main program's entry has no
         * name. */
        const char *path = info->dlpi_name && info->dlpi_name[0] ? info->dlpi_name : "/proc/self/exe";
        if (o.hdr && !(hseg->p_flags & PF_W) && has_char(path, '/') && !has_textrel(info)) {
            find_note(info, &o);
            if (o.note) {
                o.path = path;
                o.file_delta = info->dlpi_addr + hseg->p_vaddr - hseg->p_offset;
            }
        }
        if (o.hdr) {
            uint8_t head[12];
            size_t hn = (size_t)(o.hdr_end - o.hdr) < sizeof head ? (size_t)(o.hdr_end - o.hdr) : sizeof head;
            struct src s = {&o, -1, 0};
            s.fd = src_open(&o, &s.build);
            src_read(&s, o.hdr, head, hn);
            if (s.fd >= 0)
                sys4(SYS_close, s.fd, 0, 0, 0);
            struct rd r = {head, head + hn, false, (intptr_t)(o.hdr - head)};
            uint8_t version = rd_u8(&r), ptr_enc = rd_u8(&r);
            rd_u16(&r);
            uintptr_t ehf = rd_enc(&r, ptr_enc, hdr, &o);
            o.hdr = NULL;
            for (int i = 0; !r.bad && version == 1 && i < info->dlpi_phnum; i++) {
                const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
                uintptr_t a = info->dlpi_addr + ph->p_vaddr, b = a + ph->p_filesz;
                if (ph->p_type == PT_LOAD && (ph->p_flags & PF_R) && ehf >= a && ehf < b) {
                    o.hdr = (const uint8_t *)hdr;
                    o.seg_lo = (const uint8_t *)a;
                    o.seg_hi = (const uint8_t *)b;
                    if (ph != hseg)
                        o.path = NULL;
                }
            }
        }
    }
    *out = o;
    return true;
}

/* Into slot e (an object's there before is gone): the slot's probes are no longer its. */
static struct obj *obj_put(struct obj *e, const struct obj *o)
{
    *e = *o;
    probe_reset(&slots[slot_of(e)].probes, 0);
    return e;
}

/* Remembered even without tables: the next lookup in it is as cheap. */
static struct obj *obj_remember(const struct obj *o)
{
    unsigned slot = nobjs < OBJS ? nobjs++ : (next_obj++ % OBJS);
    return obj_put(&slots[slot].obj, o);
}

static int find_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
    struct find *f = arg;
    uintptr_t pc = f->ra - 1;
    if (f->first) {
        f->first = false;
        if (size < offsetof(struct dl_phdr_info, dlpi_subs) + sizeof info->dlpi_subs ||
            info->dlpi_adds != gen_adds || info->dlpi_subs != gen_subs) {
            /* dlopen or dlclose since: addresses may mean other objects now */
            nobjs = next_obj = 0;
            gen_adds = size >= offsetof(struct dl_phdr_info, dlpi_subs) + sizeof info->dlpi_subs ? info->dlpi_adds : 0;
            gen_subs = size >= offsetof(struct dl_phdr_info, dlpi_subs) + sizeof info->dlpi_subs ? info->dlpi_subs : 0;
        }
        const struct obj *o = cached_obj(pc);
        if (o) {
            f->result = o->hdr ? rule_in(o, f->ra, f->out, f->files) : LUM_CFI_NONE;
            return 1;
        }
        __atomic_fetch_add(&lum_cfi_object_scans, 1, __ATOMIC_RELAXED);
    }
    struct obj o;
    if (!obj_of(info, pc, &o))
        return 0;
    const struct obj *c = obj_remember(&o);
    f->result = c->hdr ? rule_in(c, f->ra, f->out, f->files) : LUM_CFI_NONE;
    return 1;
}

#if defined(__SANITIZE_THREAD__)
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
static char loader_lock_order;

/* The object cache above is shared on the strength of the loader's lock, which glibc's
 * dl_iterate_phdr holds across its callbacks; ThreadSanitizer sees dl_iterate_phdr but not that
 * internal lock, and would report every lookup of one thread against another's.  Each callback
 * acquires at entry and releases at exit what the lock orders (nothing is emitted outside TSan
 * builds). */
static int find_cb_ordered(struct dl_phdr_info *info, size_t size, void *arg)
{
    __tsan_acquire(&loader_lock_order);
    int r = find_cb(info, size, arg);
    __tsan_release(&loader_lock_order);
    return r;
}
#define FIND_CB find_cb_ordered
#else
#define FIND_CB find_cb
#endif

#ifdef DLFO_EH_SEGMENT_TYPE
/* The loader's lock-free index of objects (glibc >= 2.35, the one libgcc's unwinder finds FDEs
 * with).  dl_iterate_phdr takes the loader's lock, which must not be waited for inside malloc:
 * glibc does not reset it in a fork child, so a child forked while another thread was in
 * dlopen, dlclose or dl_iterate_phdr hung at its first sample; and a program whose
 * dl_iterate_phdr callback takes a mutex that an allocating thread holds deadlocked.  Weak, so
 * that a static link without it still works (dl_iterate_phdr then, as before). */
#pragma weak _dl_find_object

/* Whether the main program asks for a dynamic loader (PT_INTERP): started as an argument of
 * ld.so it has one, though AT_BASE is 0 then; a static executable (static-pie too) has none. */
static bool main_has_interp(void)
{
    const ElfW(Phdr) *ph = (const ElfW(Phdr) *)getauxval(AT_PHDR);
    unsigned long n = getauxval(AT_PHNUM);
    for (unsigned long i = 0; ph && i < n; i++)
        if (ph[i].p_type == PT_INTERP)
            return true;
    return false;
}

/* Whether the index can be asked: it is there, and the program has a dynamic loader (in a
 * static executable, glibc's _dl_find_object faulted on a sample taken while libc started, and
 * names no ELF header later: such programs read the program headers by dl_iterate_phdr, as
 * before).  A program started as an argument of ld.so has no AT_BASE, but its PT_INTERP
 * tells. */
bool lum_cfi_index_usable(void)
{
    static int state; /* 0: not yet known, 1: usable, -1: not */
    int s = __atomic_load_n(&state, __ATOMIC_RELAXED);
    if (!s) {
        s = _dl_find_object && (getauxval(AT_BASE) || main_has_interp()) ? 1 : -1;
        __atomic_store_n(&state, s, __ATOMIC_RELAXED);
    }
    return s > 0;
}

/* The object holding pc by the index: what the index says of it in *fo, and its program
 * headers as dl_iterate_phdr would give them, read from its ELF header at the start of its
 * mapping.  The object is not locked in place: pc is a return address on this thread's stack,
 * in code it runs, which a dlclose does not unmap from under it (as for libgcc's unwinder).
 * false when the index has no object at pc or the header there does not describe it. */
static bool dlfo_info(uintptr_t pc, struct dl_find_object *fo, struct dl_phdr_info *info)
{
    if (_dl_find_object((void *)pc, fo) != 0 || !fo->dlfo_link_map)
        return false;
    uintptr_t lo = (uintptr_t)fo->dlfo_map_start, hi = (uintptr_t)fo->dlfo_map_end;
    if (hi <= lo || hi - lo < sizeof(ElfW(Ehdr)))
        return false;
    const ElfW(Ehdr) *eh = (const ElfW(Ehdr) *)lo;
    if (!same_bytes(eh->e_ident, ELFMAG, SELFMAG) || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
        eh->e_phentsize != sizeof(ElfW(Phdr)) || !eh->e_phnum || eh->e_phnum == PN_XNUM ||
        eh->e_phoff > hi - lo || eh->e_phnum > (hi - lo - eh->e_phoff) / sizeof(ElfW(Phdr)))
        return false;
    const ElfW(Phdr) *ph = (const ElfW(Phdr) *)(lo + eh->e_phoff);
    const struct link_map *lm = fo->dlfo_link_map;
    for (int i = 0; i < eh->e_phnum; i++) {
        if (ph[i].p_type != PT_LOAD)
            continue;
        /* the first load segment maps the file's start, headers included, at lo */
        if (ph[i].p_offset > eh->e_phoff ||
            eh->e_phoff + eh->e_phnum * sizeof *ph > ph[i].p_offset + ph[i].p_filesz ||
            ((lm->l_addr + ph[i].p_vaddr - ph[i].p_offset) & ~(uintptr_t)4095) != lo)
            return false;
        *info = (struct dl_phdr_info){.dlpi_addr = lm->l_addr, .dlpi_name = lm->l_name, .dlpi_phdr = ph,
                                      .dlpi_phnum = eh->e_phnum};
        return true;
    }
    return false;
}

/* Objects rules have been derived from since the generation last moved, as the index named
 * them: lum_cfi_unloads asks the index again, and an object that is no longer the same moves
 * the count, so that no rule learnt from one object is used in another mapped where it was.
 * Under lum_cfi_lock.  Full, the count moves and the set starts again: a program sampled
 * through more objects than this re-derives its rules once per fill. */
#define SEEN 64
static struct seen {
    uintptr_t map_lo, map_hi;
    const void *lm, *eh;
    uint64_t print;
    uint32_t note_rel, note_len;
} seen[SEEN];

/* What tells one load of an object from another at the same address, whose link_map may well
 * be the freed one's memory again and whose layout may be the same (a plugin rebuilt and
 * reloaded): its build-id, when its note lies in the header's page (mapped whatever the
 * object); else the start of its .eh_frame_hdr, 16 bytes: version, encodings, the .eh_frame
 * pointer and the FDE count, all in the page.  Both, as before, cost the look the kernel's
 * pinning of a second page an object, for nothing a build-id does not tell (a look over 9
 * objects, in batches: 7.0 us with both, 3.5 us with one).  The bytes a look
 * hashes of object e: where they are, and how many (a build-id note is 36 bytes, SHA-1; more
 * than 64 are hashed as their first 64); 0 when none. */
static size_t print_part(const struct seen *e, const void **at)
{
    if (e->note_len && e->note_rel + e->note_len <= 4096) {
        *at = (const uint8_t *)e->map_lo + e->note_rel;
        return e->note_len < 64 ? e->note_len : 64;
    }
    *at = e->eh;
    return e->eh && 4096 - ((uintptr_t)e->eh & 4095) >= 16 ? 16 : 0;
}

/* Reads the hashed bytes of up to PRINT_BATCH objects in one system call: they may be unmapped
 * at any moment (the look runs with no loader lock, and another thread's dlclose can unmap an
 * object between the index's answer and the read: SIGSEGV inside malloc, found in review), and
 * the kernel's copy fails instead of faulting.  A call (and a getpid) for each of an object's
 * two reads made a look over 9 objects ~16 us, as much as a walk deriving a few rules, before
 * every such walk.  false when any could not be read (one of them gone); where the call is
 * refused (a seccomp filter), plain reads, as before. */
#define PRINT_BATCH 8
struct print_bytes {
    uint64_t w[8];
};

static bool read_prints(const struct seen *e, unsigned m, struct print_bytes *out)
{
    struct iovec local[PRINT_BATCH], remote[PRINT_BATCH];
    unsigned k = 0;
    size_t total = 0;
    for (unsigned i = 0; i < m; i++) {
        const void *at;
        size_t n = print_part(&e[i], &at);
        if (n)
            local[k] = (struct iovec){out[i].w, n}, remote[k++] = (struct iovec){(void *)at, n};
        total += n;
    }
    if (!k)
        return true;
    int saved = errno;
    long r = syscall(SYS_process_vm_readv, (long)getpid(), local, (long)k, remote, (long)k, 0L);
    if (r < 0 && (errno == ENOSYS || errno == EPERM)) {
        for (unsigned j = 0; j < k; j++)
            memcpy(local[j].iov_base, remote[j].iov_base, local[j].iov_len);
        r = (long)total;
    }
    errno = saved;
    return r == (long)total;
}

/* A hash of the bytes read_prints read of e (b), a word at a time (a look hashes every object
 * rules came from: byte by byte it was 10 times the cost of the old look); never 0 (the | 1),
 * which marks an object that could not be read. */
static uint64_t print_hash(const struct seen *e, const struct print_bytes *b)
{
    const void *at;
    size_t n = print_part(e, &at), i = 0;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; i + 8 <= n; i += 8)
        h = (h ^ b->w[i / 8]) * 0x100000001b3ULL;
    if (i < n) { /* a note's length is a multiple of 4 */
        uint32_t t;
        memcpy(&t, (const uint8_t *)b->w + i, 4);
        h = (h ^ t) * 0x100000001b3ULL;
    }
    return h | 1;
}

static unsigned nseen;
static uint64_t seen_changes;

static void seen_note(const struct dl_find_object *fo, const struct obj *o)
{
    uintptr_t lo = (uintptr_t)fo->dlfo_map_start;
    for (unsigned i = 0; i < nseen; i++)
        if (seen[i].map_lo == lo && seen[i].lm == fo->dlfo_link_map && seen[i].eh == fo->dlfo_eh_frame)
            return;
    if (nseen == SEEN) {
        nseen = 0;
        __atomic_store_n(&seen_changes, seen_changes + 1, __ATOMIC_RELEASE);
    }
    struct seen *e = &seen[nseen++];
    *e = (struct seen){lo, (uintptr_t)fo->dlfo_map_end, fo->dlfo_link_map, fo->dlfo_eh_frame, 0, 0, 0};
    if (o->note && (uintptr_t)o->note >= lo && (uintptr_t)o->note - lo + o->note_len <= 4096) {
        e->note_rel = (uint32_t)((uintptr_t)o->note - lo);
        e->note_len = o->note_len;
    }
    struct print_bytes b;
    e->print = read_prints(e, 1, &b) ? print_hash(e, &b) : 0;
}

static bool same_object(const struct obj *o, const struct dl_find_object *fo)
{
    return o->map_lo == (uintptr_t)fo->dlfo_map_start && o->map_hi == (uintptr_t)fo->dlfo_map_end &&
           o->lm == fo->dlfo_link_map && o->eh == fo->dlfo_eh_frame;
}

/* lum_cfi_rule through the index: false when there is none to use. */
static bool rule_by_index(uintptr_t ra, struct lum_cfi_rule *out, int *res, struct lum_cfi_files *files)
{
    if (!lum_cfi_index_usable())
        return false;
    uintptr_t pc = ra - 1;
    struct dl_find_object fo;
    struct dl_phdr_info info;
    *res = LUM_CFI_NONE;
    if (!dlfo_info(pc, &fo, &info)) {
        /* No object there (code made at run time, a wrong return address), or no index yet:
         * an allocation while the loader starts, before it builds one, when no other thread
         * can be in the loader; the index then does not know this library either. */
        struct dl_find_object me;
        return _dl_find_object((void *)(uintptr_t)&rule_by_index, &me) == 0 || forked;
    }
    struct obj o;
    bool have = false;
    lum_lock(&lum_cfi_lock);
    const struct obj *c = cached_obj(pc);
    if (c && same_object(c, &fo))
        o = *c, have = true;
    lum_unlock(&lum_cfi_lock);
    if (!have) {
        __atomic_fetch_add(&lum_cfi_object_scans, 1, __ATOMIC_RELAXED);
        if (!obj_of(&info, pc, &o))
            return true; /* in its mapping, not in its code */
        o.map_lo = (uintptr_t)fo.dlfo_map_start;
        o.map_hi = (uintptr_t)fo.dlfo_map_end;
        o.lm = fo.dlfo_link_map;
        o.eh = fo.dlfo_eh_frame;
    }
    lum_lock(&lum_cfi_lock);
    if (!have) {
        /* an entry for the code of an object since unloaded is replaced */
        struct obj *old = (struct obj *)cached_obj(pc);
        struct obj *e = old ? obj_put(old, &o) : obj_remember(&o);
        e->slot = o.slot = (int)slot_of(e); /* the probe cache is this path's only */
    }
    seen_note(&fo, &o);
    lum_unlock(&lum_cfi_lock);
    /* read from the copy: the cache entry may be replaced meanwhile */
    *res = o.hdr ? rule_in(&o, ra, out, files) : LUM_CFI_NONE;
    return true;
}

/* A look reads the objects' prints (a process_vm_readv and a getpid, ~2.9 us of system time
 * here, which callgrind does not count) at most once in this many ms, or when told to (before a
 * walk that derives rules).  One look in 64 walks a thread read them: on the obs ring that was
 * a third of default sampling's cost (+16 ms on 128k samples where +10.5 without), for the one
 * case the index cannot tell, a rebuilt object reloaded with the same layout where its old
 * link_map was, whose stale rules read wrong frames (within the checked stack run) until the
 * next look with prints.  A program sampled at a rate where walks are more than 10 ms apart
 * reads them at every look, as before. */
#define PRINTS_EVERY_MS 10
static uint64_t prints_ms; /* when a look last read them; under lum_cfi_lock */
/* a thorough look found the lock taken (by a look that may not read them): the next one does */
static int prints_due;

/* One look: whether every object in the seen set is still the one the index named (and, with
 * prints, still holds the bytes it held). */
static bool unloads_by_index(uint64_t *count, bool thorough)
{
    if (!lum_cfi_index_usable())
        return false;
    /* busy: another thread is looking or learning, and the count it leaves will do */
    if (lum_trylock(&lum_cfi_lock)) {
        bool changed = false;
        uint64_t now = lum_now_ms();
        bool prints = thorough || __atomic_load_n(&prints_due, __ATOMIC_RELAXED) || now - prints_ms >= PRINTS_EVERY_MS;
        if (prints) {
            prints_ms = now;
            __atomic_store_n(&prints_due, 0, __ATOMIC_RELAXED);
        }
        for (unsigned i = 0; i < nseen && !changed; i += PRINT_BATCH) {
            unsigned m = nseen - i < PRINT_BATCH ? nseen - i : PRINT_BATCH;
            const struct seen *e = &seen[i];
            for (unsigned j = 0; j < m && !changed; j++) {
                struct dl_find_object fo;
                changed = _dl_find_object((void *)e[j].map_lo, &fo) != 0 ||
                          (uintptr_t)fo.dlfo_map_start != e[j].map_lo || (uintptr_t)fo.dlfo_map_end != e[j].map_hi ||
                          fo.dlfo_link_map != e[j].lm || fo.dlfo_eh_frame != e[j].eh;
            }
            if (!prints)
                continue;
            struct print_bytes b[PRINT_BATCH];
            /* one unreadable: each on its own, an unreadable one's print 0 (as seen_note
             * records one it could not read) */
            bool whole = changed || read_prints(e, m, b);
            for (unsigned j = 0; j < m && !changed; j++)
                changed = (whole || read_prints(&e[j], 1, &b[j]) ? print_hash(&e[j], &b[j]) : 0) != e[j].print;
        }
        if (changed) {
            nseen = 0;
            __atomic_store_n(&seen_changes, seen_changes + 1, __ATOMIC_RELEASE);
        }
        lum_unlock(&lum_cfi_lock);
    } else if (thorough) {
        __atomic_store_n(&prints_due, 1, __ATOMIC_RELAXED);
    }
    *count = __atomic_load_n(&seen_changes, __ATOMIC_ACQUIRE);
    return true;
}
#endif

bool lum_cfi_object_info(uintptr_t pc, struct dl_phdr_info *info)
{
#ifdef DLFO_EH_SEGMENT_TYPE
    struct dl_find_object fo;
    return lum_cfi_index_usable() && dlfo_info(pc, &fo, info);
#else
    (void)pc, (void)info;
    return false;
#endif
}

#ifndef DLFO_EH_SEGMENT_TYPE
bool lum_cfi_index_usable(void)
{
    return false;
}

static bool rule_by_index(uintptr_t ra, struct lum_cfi_rule *out, int *res, struct lum_cfi_files *files)
{
    (void)ra, (void)out, (void)res, (void)files;
    return false;
}

static bool unloads_by_index(uint64_t *count, bool thorough)
{
    (void)count, (void)thorough;
    return false;
}
#endif

int lum_cfi_rule(uintptr_t ra, struct lum_cfi_rule *out)
{
    return lum_cfi_rule_with(NULL, ra, out);
}

int lum_cfi_rule_with(struct lum_cfi_files *files, uintptr_t ra, struct lum_cfi_rule *out)
{
    struct find f = {.ra = ra, .out = out, .files = files, .result = LUM_CFI_NONE, .first = true};
    *out = (struct lum_cfi_rule){0};
    if (ra < 2)
        return LUM_CFI_NONE;
    /* A walk's lookups hold the lock from the first to lum_cfi_files_close: the file they
     * keep open between them must not be a fork child's too (see lum_unwind_fork_lock). */
    if (!files || !files->locked) {
        lum_lock_order_check(&lum_unwind_fork_lock);
        pthread_rwlock_rdlock(&lum_unwind_fork_lock);
        if (files)
            files->locked = true;
    }
    /* Without the index, a fork child derives no rules: the loader's lock may be held for
     * good by a thread of the parent's (the cached rules still walk). */
    if (!rule_by_index(ra, out, &f.result, files) && !forked)
        dl_iterate_phdr(FIND_CB, &f);
    if (!files)
        pthread_rwlock_unlock(&lum_unwind_fork_lock);
    return f.result;
}

static int subs_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
    if (size >= offsetof(struct dl_phdr_info, dlpi_subs) + sizeof info->dlpi_subs)
        *(uint64_t *)arg = info->dlpi_subs;
    return 1;
}

uint64_t lum_cfi_unloads(bool thorough)
{
    static uint64_t last;
    uint64_t subs = 0;
    if (unloads_by_index(&subs, thorough))
        return subs;
    if (forked)
        return __atomic_load_n(&last, __ATOMIC_RELAXED);
    lum_lock_order_check(&lum_unwind_fork_lock);
    pthread_rwlock_rdlock(&lum_unwind_fork_lock);
    dl_iterate_phdr(subs_cb, &subs);
    pthread_rwlock_unlock(&lum_unwind_fork_lock);
    __atomic_store_n(&last, subs, __ATOMIC_RELAXED);
    return subs;
}

void lum_cfi_after_fork_child(void)
{
    lum_lock_reset(&lum_cfi_lock);
    forked = true;
}

#else

int lum_cfi_rule(uintptr_t ra, struct lum_cfi_rule *out)
{
    (void)ra, (void)out;
    return LUM_CFI_NONE;
}

int lum_cfi_rule_with(struct lum_cfi_files *files, uintptr_t ra, struct lum_cfi_rule *out)
{
    (void)files, (void)ra, (void)out;
    return LUM_CFI_NONE;
}

void lum_cfi_files_close(struct lum_cfi_files *files)
{
    (void)files;
}

uint64_t lum_cfi_unloads(bool thorough)
{
    (void)thorough;
    return 0;
}

bool lum_cfi_object_info(uintptr_t pc, struct dl_phdr_info *info)
{
    (void)pc, (void)info;
    return false;
}

bool lum_cfi_index_usable(void)
{
    return false;
}

lum_lock_t lum_cfi_lock = LUM_LOCK_INIT;
bool lum_cfi_forked;

void lum_cfi_after_fork_child(void)
{
    lum_lock_reset(&lum_cfi_lock); /* fork's prepare took it here too */
    lum_cfi_forked = true;
}

#endif
