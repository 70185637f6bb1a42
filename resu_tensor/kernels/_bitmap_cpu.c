/* CPU kernels for bitmap selections (Python module resu_tensor.kernels._bitmap_cpu).
 *
 * A selection is the set bits of a packed bitmap (bit j of byte i is element 8i + j), or its
 * clear bits with invert. The loops walk the bitmap itself, 16 elements at a time: 16 bits of it
 * are the lane mask of one vector of 16 floats. Where the CPU has AVX-512, a gather is one masked
 * load and one compressing store per 16 elements, and an update reads its compact operand with one
 * expanding load, so a selection costs about what a dense pass over the weight costs and needs no
 * decoded positions. Elsewhere a scalar loop visits the set bits of each 16-bit piece.
 *
 * Arithmetic is float32, one rounding per operation as torch's CPU ops round, with no contraction
 * into fused multiply-adds (built with -ffp-contract=off; the vector forms use separate multiply
 * and add instructions): results equal torch's bit for bit. Every entry point takes tensor
 * addresses as integers and releases the GIL while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX512_BUILD 1
#include <immintrin.h>
#endif

enum { OP_MUL_SCALAR = 0, OP_MUL = 1, OP_ADD = 2, OP_COPY = 3 };

static int use_simd = 0; /* set at import where the CPU has AVX-512 */

/* The selection bits of elements 16c .. 16c + 15 (bits past numel clear; no byte past the
 * bitmap's ceil(numel / 8) is read). */
static inline uint16_t chunk_bits(const uint8_t *bitmap, int64_t numel, int64_t c, uint16_t flip) {
    const int64_t left = numel - 16 * c;
    uint16_t bits;
    if (left >= 16) {
        memcpy(&bits, bitmap + 2 * c, 2);
        return bits ^ flip;
    }
    bits = bitmap[2 * c];
    if (left > 8)
        bits |= (uint16_t)(bitmap[2 * c + 1] << 8);
    return (uint16_t)((bits ^ flip) & ((1u << left) - 1));
}

static int64_t count_words(const uint8_t *bitmap, int64_t words, uint64_t flip) {
    int64_t count = 0;
    for (int64_t w = 0; w < words; w++) {
        uint64_t bits;
        memcpy(&bits, bitmap + 8 * w, 8);
        count += __builtin_popcountll(bits ^ flip);
    }
    return count;
}

#ifdef HAVE_AVX512_BUILD
__attribute__((target("popcnt"))) static int64_t count_words_popcnt(const uint8_t *bitmap, int64_t words,
                                                                    uint64_t flip) {
    return count_words(bitmap, words, flip); /* inlined here, where popcount is one instruction */
}
#endif

static int64_t count_selected(const uint8_t *bitmap, int64_t numel, int invert) {
    const int64_t words = numel / 64;
    const uint64_t flip = invert ? ~(uint64_t)0 : 0;
#ifdef HAVE_AVX512_BUILD
    int64_t count = use_simd ? count_words_popcnt(bitmap, words, flip) : count_words(bitmap, words, flip);
#else
    int64_t count = count_words(bitmap, words, flip);
#endif
    for (int64_t c = 4 * words; 16 * c < numel; c++)
        count += __builtin_popcount(chunk_bits(bitmap, numel, c, (uint16_t)flip));
    return count;
}

/* The scalar loops visit the set bits of 64-bit words (the tail in 16-bit pieces), one loop per op
 * so that no branch on the op runs per element. BODY sees the element's index in the tensor as e
 * and in the selection as k. */
#define FOR_EACH_SELECTED(BODY)                                                            \
    do {                                                                                   \
        int64_t k = 0, w = 0;                                                              \
        for (; 64 * w + 64 <= numel; w++) {                                                \
            uint64_t bits;                                                                 \
            memcpy(&bits, bitmap + 8 * w, 8);                                              \
            for (bits ^= flip64; bits; bits &= bits - 1, k++) {                            \
                const int64_t e = 64 * w + __builtin_ctzll(bits);                          \
                BODY;                                                                      \
            }                                                                              \
        }                                                                                  \
        for (int64_t c = 4 * w; 16 * c < numel; c++)                                       \
            for (unsigned bits = chunk_bits(bitmap, numel, c, flip); bits; bits &= bits - 1, k++) { \
                const int64_t e = 16 * c + __builtin_ctz(bits);                            \
                BODY;                                                                      \
            }                                                                              \
    } while (0)

static void gather_scalar(const uint8_t *bitmap, int64_t numel, uint16_t flip, const float *values, float *out) {
    const uint64_t flip64 = flip ? ~(uint64_t)0 : 0;
    FOR_EACH_SELECTED(out[k] = values[e]);
}

static void update_scalar(const uint8_t *bitmap, int64_t numel, uint16_t flip, float *values, int op,
                          const float *t1, float scalar) {
    const uint64_t flip64 = flip ? ~(uint64_t)0 : 0;
    switch (op) {
    case OP_MUL_SCALAR: FOR_EACH_SELECTED(values[e] *= scalar); break;
    case OP_MUL: FOR_EACH_SELECTED(values[e] *= t1[k]); break;
    case OP_ADD: FOR_EACH_SELECTED(values[e] += t1[k]); break;
    default: FOR_EACH_SELECTED(values[e] = t1[k]); /* OP_COPY */
    }
}

#ifdef HAVE_AVX512_BUILD
/* Masked loads and stores touch only the selected lanes, so the last chunk of a tensor reads and
 * writes nothing past its end. */
__attribute__((target("avx512f,popcnt"))) static void gather_avx512(const uint8_t *bitmap, int64_t numel,
                                                                    uint16_t flip, const float *values, float *out) {
    int64_t k = 0;
    for (int64_t c = 0; 16 * c < numel; c++) {
        const __mmask16 m = chunk_bits(bitmap, numel, c, flip);
        _mm512_mask_compressstoreu_ps(out + k, m, _mm512_maskz_loadu_ps(m, values + 16 * c));
        k += _mm_popcnt_u32(m);
    }
}

__attribute__((target("avx512f,popcnt"))) static void update_avx512(const uint8_t *bitmap, int64_t numel,
                                                                    uint16_t flip, float *values, int op,
                                                                    const float *t1, float scalar) {
    const __m512 s = _mm512_set1_ps(scalar);
    int64_t k = 0;
    for (int64_t c = 0; 16 * c < numel; c++) {
        const __mmask16 m = chunk_bits(bitmap, numel, c, flip);
        float *v = values + 16 * c;
        const __m512 x = _mm512_maskz_loadu_ps(m, v);
        __m512 r;
        if (op == OP_MUL_SCALAR) {
            r = _mm512_mul_ps(x, s);
        } else {
            const __m512 t = _mm512_maskz_expandloadu_ps(m, t1 + k);
            k += _mm_popcnt_u32(m);
            r = op == OP_MUL ? _mm512_mul_ps(x, t) : op == OP_ADD ? _mm512_add_ps(x, t) : t;
        }
        _mm512_mask_storeu_ps(v, m, r);
    }
}
#endif

static void gather(const uint8_t *bitmap, int64_t numel, int invert, const float *values, float *out) {
    const uint16_t flip = invert ? 0xFFFF : 0;
#ifdef HAVE_AVX512_BUILD
    if (use_simd) {
        gather_avx512(bitmap, numel, flip, values, out);
        return;
    }
#endif
    gather_scalar(bitmap, numel, flip, values, out);
}

static void update(const uint8_t *bitmap, int64_t numel, int invert, float *values, int op, const float *t1,
                   float scalar) {
    const uint16_t flip = invert ? 0xFFFF : 0;
#ifdef HAVE_AVX512_BUILD
    if (use_simd) {
        update_avx512(bitmap, numel, flip, values, op, t1, scalar);
        return;
    }
#endif
    update_scalar(bitmap, numel, flip, values, op, t1, scalar);
}

static PyObject *py_count_selected(PyObject *self, PyObject *args) {
    unsigned long long bitmap;
    long long numel;
    int invert;
    if (!PyArg_ParseTuple(args, "KLp", &bitmap, &numel, &invert))
        return NULL;
    int64_t count;
    Py_BEGIN_ALLOW_THREADS
    count = count_selected((const uint8_t *)(uintptr_t)bitmap, numel, invert);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(count);
}

static PyObject *py_gather(PyObject *self, PyObject *args) {
    unsigned long long bitmap, values, out;
    long long numel;
    int invert;
    if (!PyArg_ParseTuple(args, "KLpKK", &bitmap, &numel, &invert, &values, &out))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    gather((const uint8_t *)(uintptr_t)bitmap, numel, invert, (const float *)(uintptr_t)values,
           (float *)(uintptr_t)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_update(PyObject *self, PyObject *args) {
    unsigned long long bitmap, values, t1;
    long long numel;
    int invert, op;
    double scalar;
    if (!PyArg_ParseTuple(args, "KLpKiKd", &bitmap, &numel, &invert, &values, &op, &t1, &scalar))
        return NULL;
    if (op < OP_MUL_SCALAR || op > OP_COPY) {
        PyErr_Format(PyExc_ValueError, "_bitmap_cpu.update: unknown op %d", op);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    update((const uint8_t *)(uintptr_t)bitmap, numel, invert, (float *)(uintptr_t)values, op,
           (const float *)(uintptr_t)t1, (float)scalar);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_set_simd(PyObject *self, PyObject *args) {
    int enabled;
    if (!PyArg_ParseTuple(args, "p", &enabled))
        return NULL;
#ifdef HAVE_AVX512_BUILD
    if (enabled && !__builtin_cpu_supports("avx512f")) {
        PyErr_SetString(PyExc_ValueError, "_bitmap_cpu.set_simd(True): this CPU has no AVX-512");
        return NULL;
    }
#else
    if (enabled) {
        PyErr_SetString(PyExc_ValueError, "_bitmap_cpu.set_simd(True): built without the AVX-512 loops");
        return NULL;
    }
#endif
    const int previous = use_simd;
    use_simd = enabled;
    return PyBool_FromLong(previous);
}

static PyMethodDef methods[] = {
    {"count_selected", py_count_selected, METH_VARARGS,
     "count_selected(bitmap_ptr, numel, invert) -> elements selected"},
    {"gather", py_gather, METH_VARARGS,
     "gather(bitmap_ptr, numel, invert, values_ptr, out_ptr): out = the selected values, in order"},
    {"update", py_update, METH_VARARGS,
     "update(bitmap_ptr, numel, invert, values_ptr, op, t1_ptr, scalar): in-place op on the selected values"},
    {"set_simd", py_set_simd, METH_VARARGS,
     "set_simd(enabled) -> previous: whether the AVX-512 loops run (True at import where the CPU has them)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bitmap_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__bitmap_cpu(void) {
#ifdef HAVE_AVX512_BUILD
    __builtin_cpu_init();
    use_simd = __builtin_cpu_supports("avx512f");
#endif
    return PyModule_Create(&module);
}
