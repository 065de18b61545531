/* Fast paths for the byteplane codec.
 *
 * Each plane function here has a numpy twin in rbeformat/codecs/planes.py that
 * is the reference, and crc32 has zlib.crc32; tests check that both give
 * identical results.  The C versions exist only because the numpy ones need
 * several passes and a sort, which makes decode an order of magnitude slower.
 * The work loops release the GIL so that chunks can be decoded on several
 * threads at once.  set_bit_deposit and set_clmul only switch fast paths off
 * for tests.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *what)
{
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) != 0) {
        PyErr_Format(PyExc_TypeError, "%s must be a contiguous%s buffer", what,
                     writable ? " writable" : "");
        return -1;
    }
    return 0;
}

/* A buffer argument: the object, whether it must be writable, its name for errors. */
struct buffer_arg {
    PyObject *obj;
    int writable;
    const char *name;
};

static void release_buffers(Py_buffer *views, int count)
{
    for (int k = 0; k < count; k++)
        PyBuffer_Release(&views[k]);
}

/* Acquires count buffers; on failure releases the ones already held and returns -1. */
static int get_buffers(const struct buffer_arg *args, Py_buffer *views, int count)
{
    for (int k = 0; k < count; k++)
        if (get_buffer(args[k].obj, &views[k], args[k].writable, args[k].name) < 0) {
            release_buffers(views, k);
            return -1;
        }
    return 0;
}

/* Rotating a little-endian word left moves the sign bit and the high exponent
 * bits to the bottom, so that the top byte holds the exponent bits that vary
 * together with the mantissa bits that depend on them.  0 <= r < bits. */
static inline uint64_t rotl(uint64_t x, int bits, int r)
{
    uint64_t mask = bits == 64 ? ~(uint64_t)0 : (((uint64_t)1 << bits) - 1);
    return r == 0 ? x : ((x << r) | (x >> (bits - r))) & mask;
}

static inline uint32_t rotl32(uint32_t x, int r) { return r == 0 ? x : (x << r) | (x >> (32 - r)); }
static inline uint16_t rotl16(uint16_t x, int r) { return (uint16_t)(r == 0 ? x : (x << r) | (x >> (16 - r))); }

static int check_rotation(int width, int rotate)
{
    if (width != 1 && width != 2 && width != 4 && width != 8) {
        PyErr_SetString(PyExc_ValueError, "width must be 1, 2, 4 or 8");
        return -1;
    }
    if (rotate < 0 || rotate >= 8 * width) {
        PyErr_SetString(PyExc_ValueError, "rotate must be in [0, 8 * width)");
        return -1;
    }
    return 0;
}

static inline uint64_t load_word(const uint8_t *p, int width)
{
    uint64_t x = 0;
    for (int k = 0; k < width; k++)
        x |= (uint64_t)p[k] << (8 * k);
    return x;
}

/* split(src, width, rotate, dst): dst[k*n + i] = byte k of word i after rotating
 * it left by rotate bits. */
static PyObject *split(PyObject *self, PyObject *args)
{
    PyObject *src_obj, *dst_obj;
    int width, rotate;
    if (!PyArg_ParseTuple(args, "OiiO", &src_obj, &width, &rotate, &dst_obj))
        return NULL;
    if (check_rotation(width, rotate) < 0)
        return NULL;
    Py_buffer src, dst;
    if (get_buffer(src_obj, &src, 0, "src") < 0)
        return NULL;
    if (get_buffer(dst_obj, &dst, 1, "dst") < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if (src.len % width != 0 || dst.len != src.len) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "src and dst must have the same size, a multiple of width");
        return NULL;
    }
    const uint8_t *s = src.buf;
    uint8_t *d = dst.buf;
    Py_ssize_t n = src.len / width;
    int bits = 8 * width;
    Py_BEGIN_ALLOW_THREADS
    if (width == 4) {
        uint8_t *d0 = d, *d1 = d + n, *d2 = d + 2 * n, *d3 = d + 3 * n;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t x;
            memcpy(&x, s + 4 * i, 4);
            x = rotl32(x, rotate);
            d0[i] = (uint8_t)x;
            d1[i] = (uint8_t)(x >> 8);
            d2[i] = (uint8_t)(x >> 16);
            d3[i] = (uint8_t)(x >> 24);
        }
    } else if (width == 2) {
        uint8_t *d0 = d, *d1 = d + n;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint16_t x;
            memcpy(&x, s + 2 * i, 2);
            x = rotl16(x, rotate);
            d0[i] = (uint8_t)x;
            d1[i] = (uint8_t)(x >> 8);
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t x = rotl(load_word(s + (Py_ssize_t)width * i, width), bits, rotate);
            for (int k = 0; k < width; k++)
                d[k * n + i] = (uint8_t)(x >> (8 * k));
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

/* join(planes, width, rotate, dst): the inverse of split (the words are rotated
 * right by rotate bits); planes is a tuple of width buffers of n bytes each. */
static PyObject *join(PyObject *self, PyObject *args)
{
    PyObject *planes_obj, *dst_obj;
    int width, rotate;
    if (!PyArg_ParseTuple(args, "O!iiO", &PyTuple_Type, &planes_obj, &width, &rotate, &dst_obj))
        return NULL;
    if (check_rotation(width, rotate) < 0)
        return NULL;
    if (PyTuple_GET_SIZE(planes_obj) != width) {
        PyErr_SetString(PyExc_ValueError, "join needs one plane per byte of the word");
        return NULL;
    }
    int back = rotate == 0 ? 0 : 8 * width - rotate; /* rotating left by this undoes it */
    Py_buffer dst, pl[8];
    if (get_buffer(dst_obj, &dst, 1, "dst") < 0)
        return NULL;
    int got = 0;
    int ok = dst.len % width == 0;
    Py_ssize_t n = dst.len / width;
    for (; ok && got < width; got++) {
        if (get_buffer(PyTuple_GET_ITEM(planes_obj, got), &pl[got], 0, "plane") < 0) {
            ok = -1;
            break;
        }
        if (pl[got].len != n) {
            got++;
            ok = 0;
        }
    }
    if (ok == 1) {
        const uint8_t *s[8];
        for (int k = 0; k < width; k++)
            s[k] = pl[k].buf;
        uint8_t *d = dst.buf;
        int bits = 8 * width;
        Py_BEGIN_ALLOW_THREADS
        if (width == 4) {
            const uint8_t *s0 = s[0], *s1 = s[1], *s2 = s[2], *s3 = s[3];
            for (Py_ssize_t i = 0; i < n; i++) {
                uint32_t x = (uint32_t)s0[i] | ((uint32_t)s1[i] << 8) | ((uint32_t)s2[i] << 16) |
                             ((uint32_t)s3[i] << 24);
                x = rotl32(x, back);
                memcpy(d + 4 * i, &x, 4);
            }
        } else if (width == 2) {
            const uint8_t *s0 = s[0], *s1 = s[1];
            for (Py_ssize_t i = 0; i < n; i++) {
                uint16_t x = rotl16((uint16_t)(s0[i] | (s1[i] << 8)), back);
                memcpy(d + 2 * i, &x, 2);
            }
        } else {
            for (Py_ssize_t i = 0; i < n; i++) {
                uint64_t x = 0;
                for (int k = 0; k < width; k++)
                    x |= (uint64_t)s[k][i] << (8 * k);
                x = rotl(x, bits, back);
                for (int k = 0; k < width; k++)
                    d[(Py_ssize_t)width * i + k] = (uint8_t)(x >> (8 * k));
            }
        }
        Py_END_ALLOW_THREADS
    }
    for (int k = 0; k < got; k++)
        PyBuffer_Release(&pl[k]);
    PyBuffer_Release(&dst);
    if (ok == 1)
        Py_RETURN_NONE;
    if (ok == 0)
        PyErr_SetString(PyExc_ValueError, "every plane must hold dst's size / width bytes");
    return NULL;
}

/* group(values, context, dst): a stable counting sort of values by context byte.
 * dst receives the values of context 0 first, then context 1, and so on. */
static PyObject *group(PyObject *self, PyObject *args)
{
    PyObject *val_obj, *ctx_obj, *dst_obj;
    if (!PyArg_ParseTuple(args, "OOO", &val_obj, &ctx_obj, &dst_obj))
        return NULL;
    Py_buffer b[3];
    const struct buffer_arg want[3] = {{val_obj, 0, "values"}, {ctx_obj, 0, "context"}, {dst_obj, 1, "dst"}};
    if (get_buffers(want, b, 3) < 0)
        return NULL;
    if (b[0].len != b[1].len || b[2].len != b[0].len) {
        release_buffers(b, 3);
        PyErr_SetString(PyExc_ValueError, "values, context and dst must have the same size");
        return NULL;
    }
    const uint8_t *v = b[0].buf, *c = b[1].buf;
    uint8_t *d = b[2].buf;
    Py_ssize_t n = b[0].len;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t start[256] = {0}, count[256] = {0};
    for (Py_ssize_t i = 0; i < n; i++)
        count[c[i]]++;
    for (int k = 1; k < 256; k++)
        start[k] = start[k - 1] + count[k - 1];
    for (Py_ssize_t i = 0; i < n; i++)
        d[start[c[i]]++] = v[i];
    Py_END_ALLOW_THREADS
    release_buffers(b, 3);
    Py_RETURN_NONE;
}

/* Counts of each byte value in c[0..n), in four interleaved tables so that runs
 * of one value do not serialise on a single counter. */
static void count_bytes(const uint8_t *c, Py_ssize_t n, Py_ssize_t count[256])
{
    Py_ssize_t t[4][256];
    memset(t, 0, sizeof t);
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        t[0][c[i]]++;
        t[1][c[i + 1]]++;
        t[2][c[i + 2]]++;
        t[3][c[i + 3]]++;
    }
    for (; i < n; i++)
        t[0][c[i]]++;
    for (int k = 0; k < 256; k++)
        count[k] = t[0][k] + t[1][k] + t[2][k] + t[3][k];
}

/* histogram(context, dst): dst (256 int64) receives the count of each byte value. */
static PyObject *histogram(PyObject *self, PyObject *args)
{
    PyObject *ctx_obj, *dst_obj;
    if (!PyArg_ParseTuple(args, "OO", &ctx_obj, &dst_obj))
        return NULL;
    Py_buffer ctx, dst;
    if (get_buffer(ctx_obj, &ctx, 0, "context") < 0)
        return NULL;
    if (get_buffer(dst_obj, &dst, 1, "dst") < 0) {
        PyBuffer_Release(&ctx);
        return NULL;
    }
    if (dst.len != 256 * (Py_ssize_t)sizeof(int64_t)) {
        PyBuffer_Release(&ctx);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "dst must hold 256 int64");
        return NULL;
    }
    Py_ssize_t count[256];
    Py_BEGIN_ALLOW_THREADS
    count_bytes(ctx.buf, ctx.len, count);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < 256; k++)
        ((int64_t *)dst.buf)[k] = (int64_t)count[k];
    PyBuffer_Release(&ctx);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

/* Loads up to 8 bytes little-endian; fewer near the end of a buffer. */
static inline uint64_t load_le(const uint8_t *p, Py_ssize_t avail)
{
    uint64_t x = 0;
    if (avail >= 8) {
        memcpy(&x, p, 8);
        return x; /* little-endian hosts only; see the check at module init */
    }
    for (Py_ssize_t k = 0; k < avail; k++)
        x |= (uint64_t)p[k] << (8 * k);
    return x;
}

/* Eight values of b bits fill exactly b bytes, so each group of eight elements
 * reads (8 - low) bytes of the high stream and low bytes of the low stream. */
static inline __attribute__((always_inline)) void join_fields_body(const uint8_t *hi, Py_ssize_t hi_len,
                                                                   const uint8_t *lo, Py_ssize_t lo_len, int low,
                                                                   uint8_t *d, Py_ssize_t n, Py_ssize_t g)
{
    const int high = 8 - low;
    const uint64_t hmask = ((uint64_t)1 << high) - 1, lmask = ((uint64_t)1 << low) - 1;
    /* Whole groups with 8 readable bytes in both streams: fixed shifts, no branches. */
    for (; 8 * g + 8 <= n && g * high + 8 <= hi_len && g * low + 8 <= lo_len; g++) {
        uint64_t h, l, w = 0;
        memcpy(&h, hi + g * high, 8);
        memcpy(&l, lo + g * low, 8);
        for (int e = 0; e < 8; e++)
            w |= (((h >> (e * high)) & hmask) << low | ((l >> (e * low)) & lmask)) << (8 * e);
        memcpy(d + 8 * g, &w, 8);
    }
    for (; 8 * g < n; g++) {
        Py_ssize_t ho = g * high, lo_off = g * low;
        uint64_t h = load_le(hi + ho, hi_len - ho), l = load_le(lo + lo_off, lo_len - lo_off);
        Py_ssize_t count = n - 8 * g < 8 ? n - 8 * g : 8;
        for (int e = 0; e < count; e++)
            d[8 * g + e] = (uint8_t)((((h >> (e * high)) & hmask) << low) | ((l >> (e * low)) & lmask));
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#include <cpuid.h>
#define HAVE_PDEP_PATH 1
/* With BMI2, one deposit per stream scatters eight packed fields into the
 * high or low bits of eight bytes. */
__attribute__((target("bmi2"))) static Py_ssize_t join_fields_pdep(const uint8_t *hi, Py_ssize_t hi_len,
                                                                   const uint8_t *lo, Py_ssize_t lo_len, int low,
                                                                   uint8_t *d, Py_ssize_t n)
{
    const int high = 8 - low;
    const uint64_t lbyte = ((uint64_t)1 << low) - 1;
    const uint64_t lmask = lbyte * 0x0101010101010101ULL, hmask = ~lmask;
    Py_ssize_t g = 0;
    for (; 8 * g + 8 <= n && g * high + 8 <= hi_len && g * low + 8 <= lo_len; g++) {
        uint64_t h, l;
        memcpy(&h, hi + g * high, 8);
        memcpy(&l, lo + g * low, 8);
        uint64_t w = _pdep_u64(h, hmask) | _pdep_u64(l, lmask);
        memcpy(d + 8 * g, &w, 8);
    }
    return g; /* groups done; the caller finishes the rest */
}

/* AMD processors before Zen 3 (family 0x19) run pdep in microcode, much slower
 * than the plain loop. */
static int pdep_is_fast(void)
{
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("bmi2"))
        return 0;
    if (!__builtin_cpu_is("amd"))
        return 1;
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    unsigned int family = (a >> 8) & 0xf;
    if (family == 0xf)
        family += (a >> 20) & 0xff;
    return family >= 0x19;
}
#endif

static int use_pdep = 0;

/* join_fields(high, low_stream, low, dst): dst[i] = (high value i << low) | low value i,
 * where the high values are packed at 8 - low bits and the low values at low
 * bits (the bit packing of the lossy codecs: value i at bits [i*b, (i+1)*b)). */
static PyObject *join_fields(PyObject *self, PyObject *args)
{
    PyObject *hi_obj, *lo_obj, *dst_obj;
    int low;
    if (!PyArg_ParseTuple(args, "OOiO", &hi_obj, &lo_obj, &low, &dst_obj))
        return NULL;
    if (low < 1 || low > 7) {
        PyErr_SetString(PyExc_ValueError, "low must be in [1, 7]");
        return NULL;
    }
    Py_buffer b[3];
    const struct buffer_arg want[3] = {{hi_obj, 0, "high"}, {lo_obj, 0, "low_stream"}, {dst_obj, 1, "dst"}};
    if (get_buffers(want, b, 3) < 0)
        return NULL;
    Py_buffer hi = b[0], lo = b[1], dst = b[2];
    Py_ssize_t n = dst.len;
    int ok = hi.len == (n * (8 - low) + 7) / 8 && lo.len == (n * low + 7) / 8;
    if (ok) {
        const uint8_t *h = hi.buf, *l = lo.buf;
        uint8_t *d = dst.buf;
        Py_BEGIN_ALLOW_THREADS
        Py_ssize_t g = 0;
#ifdef HAVE_PDEP_PATH
        if (use_pdep)
            g = join_fields_pdep(h, hi.len, l, lo.len, low, d, n);
#endif
        switch (low) { /* constant field widths let the compiler unroll the group loop */
        case 1: join_fields_body(h, hi.len, l, lo.len, 1, d, n, g); break;
        case 2: join_fields_body(h, hi.len, l, lo.len, 2, d, n, g); break;
        case 3: join_fields_body(h, hi.len, l, lo.len, 3, d, n, g); break;
        case 4: join_fields_body(h, hi.len, l, lo.len, 4, d, n, g); break;
        case 5: join_fields_body(h, hi.len, l, lo.len, 5, d, n, g); break;
        case 6: join_fields_body(h, hi.len, l, lo.len, 6, d, n, g); break;
        default: join_fields_body(h, hi.len, l, lo.len, 7, d, n, g); break;
        }
        Py_END_ALLOW_THREADS
    }
    release_buffers(b, 3);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "high and low_stream must hold exactly the packed sizes of dst's values");
        return NULL;
    }
    Py_RETURN_NONE;
}

#define SEGMENTS 4
#define MAX_SPLIT_PLANES 7

/* segment_histograms(context, dst): dst (SEGMENTS x 256 int64) receives the byte
 * counts of each of SEGMENTS contiguous segments of context, segment s covering
 * [s * L, min((s + 1) * L, n)) with L = ceil(n / SEGMENTS). */
static PyObject *segment_histograms(PyObject *self, PyObject *args)
{
    PyObject *ctx_obj, *dst_obj;
    if (!PyArg_ParseTuple(args, "OO", &ctx_obj, &dst_obj))
        return NULL;
    Py_buffer ctx, dst;
    if (get_buffer(ctx_obj, &ctx, 0, "context") < 0)
        return NULL;
    if (get_buffer(dst_obj, &dst, 1, "dst") < 0) {
        PyBuffer_Release(&ctx);
        return NULL;
    }
    if (dst.len != SEGMENTS * 256 * (Py_ssize_t)sizeof(int64_t)) {
        PyBuffer_Release(&ctx);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "dst must hold 4 x 256 int64");
        return NULL;
    }
    Py_ssize_t n = ctx.len, len = (n + SEGMENTS - 1) / SEGMENTS;
    Py_ssize_t count[SEGMENTS][256];
    const uint8_t *c = ctx.buf;
    Py_BEGIN_ALLOW_THREADS
    for (int sgm = 0; sgm < SEGMENTS; sgm++) {
        Py_ssize_t start = sgm * len < n ? sgm * len : n, end = (sgm + 1) * len < n ? (sgm + 1) * len : n;
        count_bytes(c + start, end - start, count[sgm]);
    }
    Py_END_ALLOW_THREADS
    for (int sgm = 0; sgm < SEGMENTS; sgm++)
        for (int k = 0; k < 256; k++)
            ((int64_t *)dst.buf)[sgm * 256 + k] = (int64_t)count[sgm][k];
    PyBuffer_Release(&ctx);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

/* Pass 1 of ungroup_planes: at_run[i] = how many earlier elements share
 * context[i]'s value.  The SEGMENTS segments are walked side by side (their
 * counters are independent, so the processor overlaps them), starting from
 * the counts of the segments before them.  Returns 1 if the counts do not
 * match the context. */
static int find_run_positions(const uint8_t *restrict c, Py_ssize_t n, Py_ssize_t len, const int64_t *restrict sc,
                              uint32_t *restrict at_run)
{
    uint32_t pos[SEGMENTS][256], limit[SEGMENTS][256];
    for (int k = 0; k < 256; k++) {
        int64_t start = 0;
        for (int sgm = 0; sgm < SEGMENTS; sgm++) {
            pos[sgm][k] = (uint32_t)start;
            start += sc[sgm * 256 + k];
            limit[sgm][k] = (uint32_t)start;
        }
    }
    int mismatch = 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        for (int sgm = 0; sgm < SEGMENTS; sgm++) {
            Py_ssize_t at = sgm * len + i;
            if (at >= n)
                break;
            uint8_t v = c[at];
            uint32_t k = pos[sgm][v]++;
            mismatch |= k >= limit[sgm][v];
            at_run[at] = k;
        }
    }
    return mismatch;
}

/* Pass 2 of ungroup_planes, once per plane: a plain gather. */
static void gather_plane(const uint8_t *restrict c, const uint32_t *restrict at_run,
                         const uint8_t *const *restrict src, uint8_t *restrict out, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = src[c[i]][at_run[i]];
}

/* ungroup_planes(runs, context, segment_counts, dsts): ungroup for several
 * planes split by the same context at once.  runs holds one tuple per plane,
 * each with one buffer per context value that occurs (ascending), dsts one
 * output buffer per plane; segment_counts is segment_histograms(context).
 * The runs of a value have the same length in every plane, so one read
 * position serves all planes, and the SEGMENTS segments of the context are
 * walked side by side: their positions are independent, which lets the
 * processor overlap them.  Every read is bounds checked against its
 * segment's share of the run. */
static PyObject *ungroup_planes(PyObject *self, PyObject *args)
{
    PyObject *runs_obj, *ctx_obj, *seg_obj, *dsts_obj;
    if (!PyArg_ParseTuple(args, "O!OOO!", &PyTuple_Type, &runs_obj, &ctx_obj, &seg_obj, &PyTuple_Type, &dsts_obj))
        return NULL;
    Py_ssize_t planes = PyTuple_GET_SIZE(runs_obj);
    if (planes < 1 || planes > MAX_SPLIT_PLANES || PyTuple_GET_SIZE(dsts_obj) != planes) {
        PyErr_SetString(PyExc_ValueError, "runs and dsts must hold one entry per plane, 1 to 7 planes");
        return NULL;
    }
    Py_buffer ctx, seg, dst[MAX_SPLIT_PLANES];
    Py_buffer (*run)[256] = PyMem_Calloc(MAX_SPLIT_PLANES, sizeof *run); /* too big for a thread's stack */
    int ndst = 0, nrun[MAX_SPLIT_PLANES] = {0};
    const char *error = NULL;
    if (run == NULL)
        return PyErr_NoMemory();
    if (get_buffer(ctx_obj, &ctx, 0, "context") < 0) {
        PyMem_Free(run);
        return NULL;
    }
    if (get_buffer(seg_obj, &seg, 0, "segment_counts") < 0) {
        PyBuffer_Release(&ctx);
        PyMem_Free(run);
        return NULL;
    }
    Py_ssize_t n = ctx.len, len = (n + SEGMENTS - 1) / SEGMENTS;
    const int64_t *sc = seg.buf;
    int64_t total[256] = {0};
    if (seg.len != SEGMENTS * 256 * (Py_ssize_t)sizeof(int64_t))
        error = "segment_counts must hold 4 x 256 int64";
    for (int k = 0; !error && k < 256; k++)
        for (int sgm = 0; sgm < SEGMENTS; sgm++) {
            if (sc[sgm * 256 + k] < 0 || sc[sgm * 256 + k] > n) {
                error = "segment counts out of range";
                break;
            }
            total[k] += sc[sgm * 256 + k];
        }
    const uint8_t *src[MAX_SPLIT_PLANES][256];
    uint8_t *out[MAX_SPLIT_PLANES];
    for (; !error && ndst < planes; ndst++) {
        if (get_buffer(PyTuple_GET_ITEM(dsts_obj, ndst), &dst[ndst], 1, "dst") < 0) {
            error = "";
            break;
        }
        out[ndst] = dst[ndst].buf;
        if (dst[ndst].len != n) {
            ndst++;
            error = "every dst must have the context's size";
        }
    }
    for (Py_ssize_t p = 0; !error && p < planes; p++) {
        PyObject *plane_runs = PyTuple_GET_ITEM(runs_obj, p);
        if (!PyTuple_Check(plane_runs)) {
            error = "runs must hold a tuple per plane";
            break;
        }
        Py_ssize_t m = PyTuple_GET_SIZE(plane_runs);
        int value = 0;
        for (Py_ssize_t j = 0; j < m; j++) {
            while (value < 256 && total[value] == 0)
                value++;
            if (value == 256) {
                error = "more runs than context values";
                break;
            }
            if (get_buffer(PyTuple_GET_ITEM(plane_runs, j), &run[p][nrun[p]], 0, "run") < 0) {
                error = "";
                break;
            }
            nrun[p]++;
            if (run[p][nrun[p] - 1].len != total[value]) {
                error = "a run's length differs from its context value's count";
                break;
            }
            src[p][value] = run[p][nrun[p] - 1].buf;
            value++;
        }
        while (!error && value < 256 && total[value] == 0)
            value++;
        if (!error && value != 256)
            error = "fewer runs than context values";
    }
    uint32_t *at_run = NULL; /* element i's position within the runs of its context value */
    if (!error && n > 0 && (at_run = PyMem_Malloc(n * sizeof *at_run)) == NULL) {
        PyErr_NoMemory();
        error = "";
    }
    if (!error) {
        int mismatch;
        Py_BEGIN_ALLOW_THREADS
        mismatch = find_run_positions(ctx.buf, n, len, sc, at_run);
        if (!mismatch)
            for (Py_ssize_t p = 0; p < planes; p++)
                gather_plane(ctx.buf, at_run, src[p], out[p], n);
        Py_END_ALLOW_THREADS
        if (mismatch)
            error = "segment counts do not match the context";
    }
    PyMem_Free(at_run);
    for (Py_ssize_t p = 0; p < planes; p++)
        for (int j = 0; j < nrun[p]; j++)
            PyBuffer_Release(&run[p][j]);
    PyMem_Free(run);
    for (int k = 0; k < ndst; k++)
        PyBuffer_Release(&dst[k]);
    PyBuffer_Release(&ctx);
    PyBuffer_Release(&seg);
    if (error) {
        if (*error)
            PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* split_fields(plane, low, high_dst, low_dst): the inverse of join_fields.  Packs
 * plane[i] >> low at 8 - low bits into high_dst and plane[i] & (2^low - 1) at
 * low bits into low_dst (exact packed sizes, padding bits zero). */
static PyObject *split_fields(PyObject *self, PyObject *args)
{
    PyObject *src_obj, *hi_obj, *lo_obj;
    int low;
    if (!PyArg_ParseTuple(args, "OiOO", &src_obj, &low, &hi_obj, &lo_obj))
        return NULL;
    if (low < 1 || low > 7) {
        PyErr_SetString(PyExc_ValueError, "low must be in [1, 7]");
        return NULL;
    }
    Py_buffer b[3];
    const struct buffer_arg want[3] = {{src_obj, 0, "plane"}, {hi_obj, 1, "high_dst"}, {lo_obj, 1, "low_dst"}};
    if (get_buffers(want, b, 3) < 0)
        return NULL;
    Py_buffer src = b[0], hi = b[1], lo = b[2];
    Py_ssize_t n = src.len;
    int high = 8 - low;
    int ok = hi.len == (n * high + 7) / 8 && lo.len == (n * low + 7) / 8;
    if (ok) {
        const uint8_t *v = src.buf;
        uint8_t *h = hi.buf, *l = lo.buf;
        Py_BEGIN_ALLOW_THREADS
        /* Eight values of b bits fill b bytes: build each group as a 64-bit word. */
        for (Py_ssize_t g = 0; 8 * g < n; g++) {
            uint64_t hw = 0, lw = 0;
            Py_ssize_t count = n - 8 * g < 8 ? n - 8 * g : 8;
            for (int e = 0; e < count; e++) {
                uint8_t x = v[8 * g + e];
                hw |= (uint64_t)(x >> low) << (e * high);
                lw |= (uint64_t)(x & ((1u << low) - 1)) << (e * low);
            }
            Py_ssize_t hb = (count * high + 7) / 8, lb = (count * low + 7) / 8;
            for (Py_ssize_t k = 0; k < hb; k++)
                h[g * high + k] = (uint8_t)(hw >> (8 * k));
            for (Py_ssize_t k = 0; k < lb; k++)
                l[g * low + k] = (uint8_t)(lw >> (8 * k));
        }
        Py_END_ALLOW_THREADS
    }
    release_buffers(b, 3);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "high_dst and low_dst must hold exactly the packed sizes");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* joint_histogram(context, values, dst): dst (65536 int64) receives, at
 * context * 256 + value, how often each pair occurs. */
static PyObject *joint_histogram(PyObject *self, PyObject *args)
{
    PyObject *ctx_obj, *val_obj, *dst_obj;
    if (!PyArg_ParseTuple(args, "OOO", &ctx_obj, &val_obj, &dst_obj))
        return NULL;
    Py_buffer b[3];
    const struct buffer_arg want[3] = {{ctx_obj, 0, "context"}, {val_obj, 0, "values"}, {dst_obj, 1, "dst"}};
    if (get_buffers(want, b, 3) < 0)
        return NULL;
    Py_buffer ctx = b[0], val = b[1], dst = b[2];
    int ok = ctx.len == val.len && dst.len == 65536 * (Py_ssize_t)sizeof(int64_t);
    if (ok) {
        const uint8_t *c = ctx.buf, *v = val.buf;
        int64_t *d = dst.buf;
        Py_BEGIN_ALLOW_THREADS
        memset(d, 0, 65536 * sizeof(int64_t));
        for (Py_ssize_t i = 0; i < ctx.len; i++)
            d[(c[i] << 8) | v[i]]++;
        Py_END_ALLOW_THREADS
    }
    release_buffers(b, 3);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "context and values must have the same size, dst 65536 int64");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* CRC-32 (the zlib / ISO-HDLC polynomial, reflected 0xEDB88320), as zlib.crc32
 * computes it.  With PCLMULQDQ, 64-byte blocks are folded into four 128-bit
 * accumulators by carry-less multiplication with x^n mod P, the four are
 * folded into one, and the last 128 bits and the tail go through the
 * byte-wise table: folding keeps the message's residue mod P, so the table
 * CRC of the folded 16 bytes (from a zero register) equals the register the
 * byte-wise loop would have reached.  The constants are reflect33(x^n mod P)
 * for n = 544, 480 (4-way folding) and 160, 96 (one block at a time). */
static uint32_t crc_table[256];

static void init_crc_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (c & 1 ? 0xEDB88320u : 0);
        crc_table[i] = c;
    }
}

static uint32_t crc_bytes(uint32_t reg, const uint8_t *p, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        reg = crc_table[(reg ^ p[i]) & 0xFF] ^ (reg >> 8);
    return reg;
}

static int use_clmul = 0;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_CLMUL_PATH 1
__attribute__((target("pclmul,sse2"))) static inline __m128i fold128(__m128i acc, __m128i k)
{
    return _mm_xor_si128(_mm_clmulepi64_si128(acc, k, 0x00), _mm_clmulepi64_si128(acc, k, 0x11));
}

/* The register after p[0..n), n >= 64, from register reg. */
__attribute__((target("pclmul,sse2"))) static uint32_t crc_clmul(uint32_t reg, const uint8_t *p, Py_ssize_t n)
{
    const __m128i k4 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL); /* x^480, x^544 */
    const __m128i k1 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL); /* x^96, x^160 */
    __m128i a0 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128((int)reg));
    __m128i a1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i a2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i a3 = _mm_loadu_si128((const __m128i *)(p + 48));
    Py_ssize_t off = 64;
    for (; off + 64 <= n; off += 64) {
        a0 = _mm_xor_si128(fold128(a0, k4), _mm_loadu_si128((const __m128i *)(p + off)));
        a1 = _mm_xor_si128(fold128(a1, k4), _mm_loadu_si128((const __m128i *)(p + off + 16)));
        a2 = _mm_xor_si128(fold128(a2, k4), _mm_loadu_si128((const __m128i *)(p + off + 32)));
        a3 = _mm_xor_si128(fold128(a3, k4), _mm_loadu_si128((const __m128i *)(p + off + 48)));
    }
    __m128i acc = _mm_xor_si128(fold128(a0, k1), a1);
    acc = _mm_xor_si128(fold128(acc, k1), a2);
    acc = _mm_xor_si128(fold128(acc, k1), a3);
    for (; off + 16 <= n; off += 16)
        acc = _mm_xor_si128(fold128(acc, k1), _mm_loadu_si128((const __m128i *)(p + off)));
    uint8_t folded[16];
    _mm_storeu_si128((__m128i *)folded, acc);
    return crc_bytes(crc_bytes(0, folded, 16), p + off, n - off);
}
#endif

static uint32_t crc32_update(uint32_t crc, const uint8_t *p, Py_ssize_t n)
{
    uint32_t reg = ~crc;
#ifdef HAVE_CLMUL_PATH
    if (use_clmul && n >= 64)
        return ~crc_clmul(reg, p, n);
#endif
    return ~crc_bytes(reg, p, n);
}

/* crc32(data, crc=0) -> int: zlib.crc32's result, faster where the processor
 * has carry-less multiplication. */
static PyObject *crc32(PyObject *self, PyObject *args)
{
    PyObject *obj;
    unsigned int crc = 0;
    if (!PyArg_ParseTuple(args, "O|I", &obj, &crc))
        return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(obj, &buf, PyBUF_SIMPLE) != 0)
        return NULL;
    uint32_t result;
    if (buf.len >= 65536) {
        Py_BEGIN_ALLOW_THREADS
        result = crc32_update(crc, buf.buf, buf.len);
        Py_END_ALLOW_THREADS
    } else {
        result = crc32_update(crc, buf.buf, buf.len);
    }
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLong(result);
}

/* set_clmul(flag) -> previous: turns the carry-less multiplication path of
 * crc32 on or off (it stays off where the processor lacks it). */
static PyObject *set_clmul(PyObject *self, PyObject *args)
{
    int flag;
    if (!PyArg_ParseTuple(args, "p", &flag))
        return NULL;
    int previous = use_clmul;
#ifdef HAVE_CLMUL_PATH
    use_clmul = flag && __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse2");
#endif
    return PyBool_FromLong(previous);
}

/* set_bit_deposit(flag) -> previous: turns the BMI2 path of join_fields on or off
 * (it stays off where the processor lacks it), so tests can check both paths. */
static PyObject *set_bit_deposit(PyObject *self, PyObject *args)
{
    int flag;
    if (!PyArg_ParseTuple(args, "p", &flag))
        return NULL;
    int previous = use_pdep;
#ifdef HAVE_PDEP_PATH
    use_pdep = flag && __builtin_cpu_supports("bmi2");
#endif
    return PyBool_FromLong(previous);
}

static PyMethodDef methods[] = {
    {"set_bit_deposit", set_bit_deposit, METH_VARARGS, "set_bit_deposit(flag) -> previous: BMI2 path on or off."},
    {"split", split, METH_VARARGS, "split(src, width, rotate, dst): words to byte planes."},
    {"join", join, METH_VARARGS, "join(planes, width, rotate, dst): byte planes to words."},
    {"group", group, METH_VARARGS, "group(values, context, dst): stable counting sort by context."},
    {"histogram", histogram, METH_VARARGS, "histogram(context, dst): counts of each byte value."},
    {"crc32", crc32, METH_VARARGS, "crc32(data, crc=0) -> int: the CRC-32 of zlib.crc32."},
    {"set_clmul", set_clmul, METH_VARARGS, "set_clmul(flag) -> previous: the PCLMUL path of crc32 on or off."},
    {"split_fields", split_fields, METH_VARARGS, "split_fields(plane, low, high_dst, low_dst): pack two bit fields."},
    {"joint_histogram", joint_histogram, METH_VARARGS, "joint_histogram(context, values, dst): pair counts."},
    {"join_fields", join_fields, METH_VARARGS, "join_fields(high, low_stream, low, dst): bytes from two bit fields."},
    {"segment_histograms", segment_histograms, METH_VARARGS,
     "segment_histograms(context, dst): byte counts of 4 contiguous segments."},
    {"ungroup_planes", ungroup_planes, METH_VARARGS,
     "ungroup_planes(runs, context, segment_counts, dsts): ungroup several planes at once."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_planes", NULL, -1, methods};

PyMODINIT_FUNC PyInit__planes(void)
{
    const uint16_t probe = 1;
    if (*(const uint8_t *)&probe != 1) { /* the fast loads assume little-endian words */
        PyErr_SetString(PyExc_ImportError, "rbeformat._planes supports little-endian hosts only");
        return NULL;
    }
#ifdef HAVE_PDEP_PATH
    use_pdep = pdep_is_fast();
#endif
    init_crc_table();
#ifdef HAVE_CLMUL_PATH
    __builtin_cpu_init();
    use_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse2");
#endif
    return PyModule_Create(&module);
}
