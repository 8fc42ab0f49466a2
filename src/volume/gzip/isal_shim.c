/* The part of ISA-L's igzip that med3d uses, reached through dlopen so the
 * binary starts (and inflates with zlib-rs) where libisal.so.2 is missing.
 * Compiled against Debian's libisal-dev header: the inflate state is
 * allocated here, at the size that header gives, and Rust sees only an
 * opaque pointer. */
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>

#include <isa-l/igzip_lib.h>

typedef void (*state_fn)(struct inflate_state *);
typedef int (*inflate_fn)(struct inflate_state *);

static state_fn p_init, p_reset;
static inflate_fn p_inflate;
static int has_avx;

/* ISA-L's AVX-512/AVX2 inflate can return with the upper halves of the
 * vector registers dirty; on Intel cores every later legacy-SSE instruction
 * of this thread (most of med3d's Rust code, built for baseline x86-64)
 * then pays a merge penalty until a VZEROUPPER. Measured: the f16
 * conversion and PNG writing after an ISA-L load took 7x longer. */
static void clean_upper(void) {
#if defined(__x86_64__)
    if (has_avx) __asm__ volatile("vzeroupper" ::: "memory");
#endif
}

/* 1 when libisal.so.2 and its three functions were found. Rust calls this
 * once, before any other function here (behind a OnceLock). */
int med3d_isal_load(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    has_avx = __builtin_cpu_supports("avx");
#endif
    void *h = dlopen("libisal.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!h) return 0;
    p_init = (state_fn)dlsym(h, "isal_inflate_init");
    p_reset = (state_fn)dlsym(h, "isal_inflate_reset");
    p_inflate = (inflate_fn)dlsym(h, "isal_inflate");
    return p_init && p_reset && p_inflate;
}

/* A state that parses a gzip member's header and checks its trailer (CRC32
 * and ISIZE); NULL when out of memory. */
void *med3d_isal_new(void) {
    struct inflate_state *s = malloc(sizeof *s);
    if (!s) return NULL;
    p_init(s);
    clean_upper();
    s->crc_flag = ISAL_GZIP;
    return s;
}

/* Ready for the next gzip member of a multi-member stream. */
void med3d_isal_next_member(void *state) {
    struct inflate_state *s = state;
    p_reset(s);
    clean_upper();
    s->crc_flag = ISAL_GZIP;
}

void med3d_isal_free(void *state) { free(state); }

/* Inflates from in[0..in_len) into out[0..out_len): the bytes taken and made,
 * and whether the member (trailer included) is complete. Returns ISA-L's
 * code: 0 or a negative error. Input ISA-L buffered but did not need is
 * handed back in `used` once the member ends. */
int med3d_isal_inflate(void *state, const uint8_t *in, uint32_t in_len, uint8_t *out, uint32_t out_len,
                       uint32_t *used, uint32_t *made, int *finished) {
    struct inflate_state *s = state;
    s->next_in = (uint8_t *)in;
    s->avail_in = in_len;
    s->next_out = out;
    s->avail_out = out_len;
    int r = p_inflate(s);
    clean_upper();
    *used = in_len - s->avail_in;
    *made = out_len - s->avail_out;
    *finished = s->block_state == ISAL_BLOCK_FINISH;
    return r;
}
