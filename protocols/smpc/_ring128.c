/* Z_2^128 kernels for ring128.py: elementwise add, sub, products and the matrix product,
 * exact mod 2^128 with the compiler's unsigned __int128 (one 64x64->128 multiply and two
 * 64-bit ones per product, where numpy needs about fifteen passes over 32-bit halves and
 * the matrix product 21 to 36 float64 limb products).
 *
 * Arrays are ring128's layout, C-contiguous: n elements as a plane of n low words followed
 * by a plane of n high words (numpy shape (2, *S)). ring128.py calls these through ctypes,
 * which releases the GIL, and checks r128_abi() before using them; it keeps its numpy code
 * for machines where this file was not compiled (setup.py builds it as an optional
 * extension) and as the reference the tests compare against.
 *
 * The module init below exists so that setuptools builds and installs this file as an
 * ordinary extension module; Python never calls into it except through ctypes. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned __int128 u128;
typedef uint64_t u64;
typedef int64_t i64;

#define R128_ABI 1

int r128_abi(void) { return R128_ABI; }

static inline u128 ld(const u64 *p, i64 n, i64 i) { return ((u128)p[n + i] << 64) | p[i]; }

static inline void st(u64 *p, i64 n, i64 i, u128 v) {
    p[i] = (u64)v;
    p[n + i] = (u64)(v >> 64);
}

void r128_add(const u64 *a, const u64 *b, u64 *out, i64 n) {
    for (i64 i = 0; i < n; i++) st(out, n, i, ld(a, n, i) + ld(b, n, i));
}

void r128_sub(const u64 *a, const u64 *b, u64 *out, i64 n) {
    for (i64 i = 0; i < n; i++) st(out, n, i, ld(a, n, i) - ld(b, n, i));
}

void r128_mul(const u64 *a, const u64 *b, u64 *out, i64 n) {
    for (i64 i = 0; i < n; i++) st(out, n, i, ld(a, n, i) * ld(b, n, i));
}

/* a times the constant c1 2^64 + c0 */
void r128_mul_scalar(const u64 *a, u64 c0, u64 c1, u64 *out, i64 n) {
    u128 c = ((u128)c1 << 64) | c0;
    for (i64 i = 0; i < n; i++) st(out, n, i, ld(a, n, i) * c);
}

/* a plus the constant c1 2^64 + c0 */
void r128_add_scalar(const u64 *a, u64 c0, u64 c1, u64 *out, i64 n) {
    u128 c = ((u128)c1 << 64) | c0;
    for (i64 i = 0; i < n; i++) st(out, n, i, ld(a, n, i) + c);
}

/* a times per-element 64-bit values c (one plane of n words) */
void r128_mul_u64(const u64 *a, const u64 *c, u64 *out, i64 n) {
    for (i64 i = 0; i < n; i++) st(out, n, i, ld(a, n, i) * (u128)c[i]);
}

/* out (m x n) = a (m x k) b (k x n). Returns 0, or -1 when out of memory (the caller
 * falls back to numpy). Row i accumulates in 128-bit words; b is read row by row, so every
 * load is sequential. */
int r128_matmul(const u64 *a, const u64 *b, u64 *out, i64 m, i64 k, i64 n) {
    u128 *acc = malloc(sizeof(u128) * (size_t)(n > 0 ? n : 1));
    if (acc == NULL) return -1;
    const i64 na = m * k, nb = k * n, no = m * n;
    for (i64 i = 0; i < m; i++) {
        memset(acc, 0, sizeof(u128) * (size_t)n);
        for (i64 t = 0; t < k; t++) {
            const u128 x = ld(a, na, i * k + t);
            const u64 *blo = b + t * n, *bhi = b + nb + t * n;
            for (i64 j = 0; j < n; j++) acc[j] += x * (((u128)bhi[j] << 64) | blo[j]);
        }
        for (i64 j = 0; j < n; j++) st(out, no, i * n + j, acc[j]);
    }
    free(acc);
    return 0;
}

static struct PyModuleDef r128_module = {
    PyModuleDef_HEAD_INIT, "_ring128",
    "Z_2^128 kernels for p2pgrid.protocols.smpc.ring128 (called through ctypes).", -1, NULL,
};

PyMODINIT_FUNC PyInit__ring128(void) { return PyModule_Create(&r128_module); }
