/* Fast paths for the byteplane codec.
 *
 * Each function here has a numpy twin in rbeformat/codecs/planes.py that is the
 * reference; tests check that both give identical bytes.  The C versions exist
 * only because the numpy ones need several passes and a sort, which makes decode
 * an order of magnitude slower.  All functions release the GIL so that chunks can
 * be decoded on several threads at once.
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

/* Rotating a little-endian word left by one bit moves the sign bit to bit 0 and
 * lines the exponent up with the top byte. */
static inline uint64_t rotl1(uint64_t x, int bits)
{
    uint64_t mask = bits == 64 ? ~(uint64_t)0 : (((uint64_t)1 << bits) - 1);
    return ((x << 1) | (x >> (bits - 1))) & mask;
}

static inline uint64_t rotr1(uint64_t x, int bits)
{
    uint64_t mask = bits == 64 ? ~(uint64_t)0 : (((uint64_t)1 << bits) - 1);
    return ((x >> 1) | ((x & 1) << (bits - 1))) & mask;
}

static inline uint64_t load_word(const uint8_t *p, int width)
{
    uint64_t x = 0;
    for (int k = 0; k < width; k++)
        x |= (uint64_t)p[k] << (8 * k);
    return x;
}

/* split(src, width, rotate, dst): dst[k*n + i] = byte k of word i. */
static PyObject *split(PyObject *self, PyObject *args)
{
    PyObject *src_obj, *dst_obj;
    int width, rotate;
    if (!PyArg_ParseTuple(args, "OipO", &src_obj, &width, &rotate, &dst_obj))
        return NULL;
    if (width != 1 && width != 2 && width != 4 && width != 8) {
        PyErr_SetString(PyExc_ValueError, "width must be 1, 2, 4 or 8");
        return NULL;
    }
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
    if (width == 4 && rotate) {
        uint8_t *d0 = d, *d1 = d + n, *d2 = d + 2 * n, *d3 = d + 3 * n;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t x;
            memcpy(&x, s + 4 * i, 4);
            x = (x << 1) | (x >> 31);
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
            if (rotate)
                x = (uint16_t)((x << 1) | (x >> 15));
            d0[i] = (uint8_t)x;
            d1[i] = (uint8_t)(x >> 8);
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t x = load_word(s + (Py_ssize_t)width * i, width);
            if (rotate)
                x = rotl1(x, bits);
            for (int k = 0; k < width; k++)
                d[k * n + i] = (uint8_t)(x >> (8 * k));
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

/* join(planes, width, rotate, dst): the inverse of split. */
static PyObject *join(PyObject *self, PyObject *args)
{
    PyObject *src_obj, *dst_obj;
    int width, rotate;
    if (!PyArg_ParseTuple(args, "OipO", &src_obj, &width, &rotate, &dst_obj))
        return NULL;
    if (width != 1 && width != 2 && width != 4 && width != 8) {
        PyErr_SetString(PyExc_ValueError, "width must be 1, 2, 4 or 8");
        return NULL;
    }
    Py_buffer src, dst;
    if (get_buffer(src_obj, &src, 0, "planes") < 0)
        return NULL;
    if (get_buffer(dst_obj, &dst, 1, "dst") < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if (src.len % width != 0 || dst.len != src.len) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "planes and dst must have the same size, a multiple of width");
        return NULL;
    }
    const uint8_t *s = src.buf;
    uint8_t *d = dst.buf;
    Py_ssize_t n = src.len / width;
    int bits = 8 * width;
    Py_BEGIN_ALLOW_THREADS
    if (width == 4 && rotate) {
        const uint8_t *s0 = s, *s1 = s + n, *s2 = s + 2 * n, *s3 = s + 3 * n;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t x = (uint32_t)s0[i] | ((uint32_t)s1[i] << 8) | ((uint32_t)s2[i] << 16) |
                         ((uint32_t)s3[i] << 24);
            x = (x >> 1) | (x << 31);
            memcpy(d + 4 * i, &x, 4);
        }
    } else if (width == 2) {
        const uint8_t *s0 = s, *s1 = s + n;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint16_t x = (uint16_t)(s0[i] | (s1[i] << 8));
            if (rotate)
                x = (uint16_t)((x >> 1) | (x << 15));
            memcpy(d + 2 * i, &x, 2);
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t x = 0;
            for (int k = 0; k < width; k++)
                x |= (uint64_t)s[k * n + i] << (8 * k);
            if (rotate)
                x = rotr1(x, bits);
            for (int k = 0; k < width; k++)
                d[(Py_ssize_t)width * i + k] = (uint8_t)(x >> (8 * k));
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

/* group(values, context, dst): a stable counting sort of values by context byte.
 * dst receives the values of context 0 first, then context 1, and so on. */
static PyObject *group(PyObject *self, PyObject *args)
{
    PyObject *val_obj, *ctx_obj, *dst_obj;
    if (!PyArg_ParseTuple(args, "OOO", &val_obj, &ctx_obj, &dst_obj))
        return NULL;
    Py_buffer val, ctx, dst;
    if (get_buffer(val_obj, &val, 0, "values") < 0)
        return NULL;
    if (get_buffer(ctx_obj, &ctx, 0, "context") < 0) {
        PyBuffer_Release(&val);
        return NULL;
    }
    if (get_buffer(dst_obj, &dst, 1, "dst") < 0) {
        PyBuffer_Release(&val);
        PyBuffer_Release(&ctx);
        return NULL;
    }
    if (val.len != ctx.len || dst.len != val.len) {
        PyBuffer_Release(&val);
        PyBuffer_Release(&ctx);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "values, context and dst must have the same size");
        return NULL;
    }
    const uint8_t *v = val.buf, *c = ctx.buf;
    uint8_t *d = dst.buf;
    Py_ssize_t n = val.len;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t start[256] = {0}, count[256] = {0};
    for (Py_ssize_t i = 0; i < n; i++)
        count[c[i]]++;
    for (int k = 1; k < 256; k++)
        start[k] = start[k - 1] + count[k - 1];
    for (Py_ssize_t i = 0; i < n; i++)
        d[start[c[i]]++] = v[i];
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&val);
    PyBuffer_Release(&ctx);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

/* ungroup(grouped, context, dst): the inverse of group. */
static PyObject *ungroup(PyObject *self, PyObject *args)
{
    PyObject *val_obj, *ctx_obj, *dst_obj;
    if (!PyArg_ParseTuple(args, "OOO", &val_obj, &ctx_obj, &dst_obj))
        return NULL;
    Py_buffer val, ctx, dst;
    if (get_buffer(val_obj, &val, 0, "grouped") < 0)
        return NULL;
    if (get_buffer(ctx_obj, &ctx, 0, "context") < 0) {
        PyBuffer_Release(&val);
        return NULL;
    }
    if (get_buffer(dst_obj, &dst, 1, "dst") < 0) {
        PyBuffer_Release(&val);
        PyBuffer_Release(&ctx);
        return NULL;
    }
    if (val.len != ctx.len || dst.len != val.len) {
        PyBuffer_Release(&val);
        PyBuffer_Release(&ctx);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "grouped, context and dst must have the same size");
        return NULL;
    }
    const uint8_t *v = val.buf, *c = ctx.buf;
    uint8_t *d = dst.buf;
    Py_ssize_t n = val.len;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t start[256] = {0}, count[256] = {0};
    for (Py_ssize_t i = 0; i < n; i++)
        count[c[i]]++;
    for (int k = 1; k < 256; k++)
        start[k] = start[k - 1] + count[k - 1];
    for (Py_ssize_t i = 0; i < n; i++)
        d[i] = v[start[c[i]]++];
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&val);
    PyBuffer_Release(&ctx);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"split", split, METH_VARARGS, "split(src, width, rotate, dst): words to byte planes."},
    {"join", join, METH_VARARGS, "join(planes, width, rotate, dst): byte planes to words."},
    {"group", group, METH_VARARGS, "group(values, context, dst): stable counting sort by context."},
    {"ungroup", ungroup, METH_VARARGS, "ungroup(grouped, context, dst): inverse of group."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_planes", NULL, -1, methods};

PyMODINIT_FUNC PyInit__planes(void) { return PyModule_Create(&module); }
