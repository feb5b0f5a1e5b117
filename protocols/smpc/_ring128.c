/* Z_2^128 kernels for ring128.py: elementwise sums and products, the matrix product and
 * sums along an axis, exact mod 2^128 with the compiler's unsigned __int128 (one 64x64->128
 * multiply and two 64-bit ones per product, where numpy needs about fifteen passes over
 * 32-bit halves and the matrix product 21 to 36 float64 limb products).
 *
 * Ring arrays are ring128's layout: n elements as a plane of n low words followed by a
 * plane of n high words (numpy shape (2, *S)). Every function takes C-contiguous buffers,
 * inputs first and the output last (ring128.py makes them so), checks their sizes before
 * touching them, writes into the output and releases the GIL while it runs. ring128.py keeps its numpy code for machines where this file was not
 * compiled (setup.py builds it as an optional extension) and as the reference the tests
 * hold these kernels to. The comparison's table lookup (gates.lt_eq_codes) and the bit
 * openings' check words (mac_bits.sigma) are here too: one pass each. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned __int128 u128;
typedef uint64_t u64;
typedef int64_t i64;

#define R128_ABI 3

static inline u128 ld(const u64 *p, i64 n, i64 i) { return ((u128)p[n + i] << 64) | p[i]; }

static inline void st(u64 *p, i64 n, i64 i, u128 v) {
    p[i] = (u64)v;
    p[n + i] = (u64)(v >> 64);
}

/* The C-contiguous buffers of objs[0..n-1]: inputs, then one writable output last.
 * 0, or -1 (an exception set) with none of them held. */
static int take(PyObject **objs, Py_buffer *bufs, int n) {
    for (int i = 0; i < n; i++) {
        int flags = PyBUF_C_CONTIGUOUS | (i == n - 1 ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(objs[i], &bufs[i], flags)) {
            while (i--) PyBuffer_Release(&bufs[i]);
            return -1;
        }
    }
    return 0;
}

/* Release what take() took; return res (Py_None, a new reference, when the kernel ran;
 * NULL after an error). */
static PyObject *give_back(Py_buffer *bufs, int n, PyObject *res) {
    for (int i = 0; i < n; i++) PyBuffer_Release(&bufs[i]);
    if (res == Py_None) Py_INCREF(res);
    return res;
}

static PyObject *size_error(void) {
    PyErr_SetString(PyExc_ValueError, "ring128 kernel: operands of the wrong size");
    return NULL;
}

enum { OP_ADD, OP_SUB, OP_MUL };

/* out = a op b, elementwise, for ring arrays of one size */
static PyObject *binary(PyObject *args, int op) {
    PyObject *o[3];
    Py_buffer b[3];
    if (!PyArg_ParseTuple(args, "OOO", &o[0], &o[1], &o[2]) || take(o, b, 3)) return NULL;
    if (b[0].len != b[1].len || b[0].len != b[2].len || b[0].len % 16)
        return give_back(b, 3, size_error());
    const u64 *x = b[0].buf, *y = b[1].buf;
    u64 *z = b[2].buf;
    const i64 n = b[0].len / 16;
    Py_BEGIN_ALLOW_THREADS
    if (op == OP_ADD) for (i64 i = 0; i < n; i++) st(z, n, i, ld(x, n, i) + ld(y, n, i));
    else if (op == OP_SUB) for (i64 i = 0; i < n; i++) st(z, n, i, ld(x, n, i) - ld(y, n, i));
    else for (i64 i = 0; i < n; i++) st(z, n, i, ld(x, n, i) * ld(y, n, i));
    Py_END_ALLOW_THREADS
    return give_back(b, 3, Py_None);
}

static PyObject *py_add(PyObject *self, PyObject *args) { return binary(args, OP_ADD); }
static PyObject *py_sub(PyObject *self, PyObject *args) { return binary(args, OP_SUB); }
static PyObject *py_mul(PyObject *self, PyObject *args) { return binary(args, OP_MUL); }

/* out = a op (c1 2^64 + c0), for op add or mul */
static PyObject *scalar(PyObject *args, int op) {
    PyObject *o[2];
    Py_buffer b[2];
    unsigned long long c0, c1;
    if (!PyArg_ParseTuple(args, "OKKO", &o[0], &c0, &c1, &o[1]) || take(o, b, 2)) return NULL;
    if (b[0].len != b[1].len || b[0].len % 16) return give_back(b, 2, size_error());
    const u64 *x = b[0].buf;
    u64 *z = b[1].buf;
    const i64 n = b[0].len / 16;
    const u128 c = ((u128)c1 << 64) | c0;
    Py_BEGIN_ALLOW_THREADS
    if (op == OP_ADD) for (i64 i = 0; i < n; i++) st(z, n, i, ld(x, n, i) + c);
    else for (i64 i = 0; i < n; i++) st(z, n, i, ld(x, n, i) * c);
    Py_END_ALLOW_THREADS
    return give_back(b, 2, Py_None);
}

static PyObject *py_add_scalar(PyObject *self, PyObject *args) { return scalar(args, OP_ADD); }
static PyObject *py_mul_scalar(PyObject *self, PyObject *args) { return scalar(args, OP_MUL); }

/* out = a times per-element 64-bit values c (one plane of n words) */
static PyObject *py_mul_u64(PyObject *self, PyObject *args) {
    PyObject *o[3];
    Py_buffer b[3];
    if (!PyArg_ParseTuple(args, "OOO", &o[0], &o[1], &o[2]) || take(o, b, 3)) return NULL;
    if (b[0].len != b[2].len || b[0].len % 16 || b[1].len * 2 != b[0].len)
        return give_back(b, 3, size_error());
    const u64 *x = b[0].buf, *y = b[1].buf;
    u64 *z = b[2].buf;
    const i64 n = b[0].len / 16;
    Py_BEGIN_ALLOW_THREADS
    for (i64 i = 0; i < n; i++) st(z, n, i, ld(x, n, i) * (u128)y[i]);
    Py_END_ALLOW_THREADS
    return give_back(b, 3, Py_None);
}

/* out (m x n) = a (m x k) b (k x n). Row i accumulates in 128-bit words; b is read row by
 * row, so every load is sequential. */
static PyObject *py_matmul(PyObject *self, PyObject *args) {
    PyObject *o[3];
    Py_buffer b[3];
    long long m, k, n;
    if (!PyArg_ParseTuple(args, "OOOLLL", &o[0], &o[1], &o[2], &m, &k, &n)) return NULL;
    if (m < 0 || k < 0 || n < 0) return size_error();
    if (take(o, b, 3)) return NULL;
    if (b[0].len != 16 * m * k || b[1].len != 16 * k * n || b[2].len != 16 * m * n)
        return give_back(b, 3, size_error());
    u128 *acc = malloc(sizeof(u128) * (size_t)(n > 0 ? n : 1));
    if (acc == NULL) return give_back(b, 3, PyErr_NoMemory());
    const u64 *x = b[0].buf, *y = b[1].buf;
    u64 *z = b[2].buf;
    const i64 na = m * k, nb = k * n, no = m * n;
    Py_BEGIN_ALLOW_THREADS
    for (i64 i = 0; i < m; i++) {
        memset(acc, 0, sizeof(u128) * (size_t)n);
        for (i64 t = 0; t < k; t++) {
            const u128 v = ld(x, na, i * k + t);
            const u64 *blo = y + t * n, *bhi = y + nb + t * n;
            for (i64 j = 0; j < n; j++) acc[j] += v * (((u128)bhi[j] << 64) | blo[j]);
        }
        for (i64 j = 0; j < n; j++) st(z, no, i * n + j, acc[j]);
    }
    Py_END_ALLOW_THREADS
    free(acc);
    return give_back(b, 3, Py_None);
}

/* out (outer x inner) = the sum over the middle axis of a (outer x k x inner) */
static PyObject *py_sum_axis(PyObject *self, PyObject *args) {
    PyObject *o[2];
    Py_buffer b[2];
    long long outer, k, inner;
    if (!PyArg_ParseTuple(args, "OOLLL", &o[0], &o[1], &outer, &k, &inner)) return NULL;
    if (outer < 0 || k < 0 || inner < 0) return size_error();
    if (take(o, b, 2)) return NULL;
    if (b[0].len != 16 * outer * k * inner || b[1].len != 16 * outer * inner)
        return give_back(b, 2, size_error());
    const u64 *x = b[0].buf;
    u64 *z = b[1].buf;
    const i64 na = outer * k * inner, no = outer * inner;
    Py_BEGIN_ALLOW_THREADS
    for (i64 q = 0; q < outer; q++) {
        for (i64 j = 0; j < inner; j++) {
            u128 s = 0;
            for (i64 t = 0; t < k; t++) s += ld(x, na, (q * k + t) * inner + j);
            st(z, no, q * inner + j, s);
        }
    }
    Py_END_ALLOW_THREADS
    return give_back(b, 2, Py_None);
}

/* out[p, i] = table[fields[p, i] >> u[i]] for uint16 fields (planes x n), uint8 u (n),
 * a 65536-entry uint8 table: gates.lt_eq_codes over every MAC plane in one pass */
static PyObject *py_lt_eq(PyObject *self, PyObject *args) {
    PyObject *o[4];
    Py_buffer b[4];             /* fields, u, table, out */
    if (!PyArg_ParseTuple(args, "OOOO", &o[0], &o[1], &o[2], &o[3]) || take(o, b, 4))
        return NULL;
    const i64 n = b[1].len, nf = b[0].len;
    if (!(b[2].len == 65536 && nf % 2 == 0 && b[3].len * 2 == nf
          && (n > 0 ? (nf / 2) % n == 0 : nf == 0)))
        return give_back(b, 4, size_error());
    const uint16_t *x = b[0].buf;
    const uint8_t *sh = b[1].buf, *tab = b[2].buf;
    uint8_t *z = b[3].buf;
    const i64 planes = n > 0 ? nf / 2 / n : 0;
    Py_BEGIN_ALLOW_THREADS
    for (i64 p = 0; p < planes; p++) {
        const uint16_t *row = x + p * n;
        uint8_t *dst = z + p * n;
        for (i64 i = 0; i < n; i++) dst[i] = tab[(unsigned)row[i] >> (sh[i] & 15)];
    }
    Py_END_ALLOW_THREADS
    return give_back(b, 4, Py_None);
}

/* out[r] bit p = parity of XOR_w (chi[r, w] AND z[p, w]): the bit openings' check words
 * (mac_bits.sigma), a product over GF(2) of chi (rows x w) and z (planes x w), planes <= 64 */
static PyObject *py_gf2_check(PyObject *self, PyObject *args) {
    PyObject *o[3];
    Py_buffer b[3];
    long long rows, planes, w;
    if (!PyArg_ParseTuple(args, "OOOLLL", &o[0], &o[1], &o[2], &rows, &planes, &w)) return NULL;
    if (rows < 0 || planes < 0 || planes > 64 || w < 0) return size_error();
    if (take(o, b, 3)) return NULL;
    if (b[0].len != 8 * rows * w || b[1].len != 8 * planes * w || b[2].len != 8 * rows)
        return give_back(b, 3, size_error());
    const u64 *chi = b[0].buf, *zz = b[1].buf;
    u64 *out = b[2].buf;
    Py_BEGIN_ALLOW_THREADS
    for (i64 r = 0; r < rows; r++) {
        u64 word = 0;
        for (i64 p = 0; p < planes; p++) {
            u64 acc = 0;
            const u64 *x = chi + r * w, *y = zz + p * w;
            for (i64 i = 0; i < w; i++) acc ^= x[i] & y[i];
            word |= (u64)__builtin_parityll(acc) << p;
        }
        out[r] = word;
    }
    Py_END_ALLOW_THREADS
    return give_back(b, 3, Py_None);
}

static PyMethodDef methods[] = {
    {"add", py_add, METH_VARARGS, "add(a, b, out): out = a + b mod 2^128"},
    {"sub", py_sub, METH_VARARGS, "sub(a, b, out): out = a - b mod 2^128"},
    {"mul", py_mul, METH_VARARGS, "mul(a, b, out): out = a b mod 2^128"},
    {"add_scalar", py_add_scalar, METH_VARARGS, "add_scalar(a, c0, c1, out)"},
    {"mul_scalar", py_mul_scalar, METH_VARARGS, "mul_scalar(a, c0, c1, out)"},
    {"mul_u64", py_mul_u64, METH_VARARGS, "mul_u64(a, c, out): a times uint64 values"},
    {"matmul", py_matmul, METH_VARARGS, "matmul(a, b, out, m, k, n)"},
    {"sum_axis", py_sum_axis, METH_VARARGS, "sum_axis(a, out, outer, k, inner)"},
    {"lt_eq", py_lt_eq, METH_VARARGS, "lt_eq(fields, u, table, out)"},
    {"gf2_check", py_gf2_check, METH_VARARGS, "gf2_check(chi, z, out, rows, planes, w)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ring128",
    "Z_2^128 kernels for p2pgrid.protocols.smpc.ring128 (ring arrays: shape (2, *S)).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__ring128(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "ABI", R128_ABI) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
