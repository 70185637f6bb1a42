/* CPU kernels for bitmap selections (Python module resu_tensor.kernels._bitmap_cpu).
 *
 * A selection is the set bits of a packed bitmap (bit j of byte i is element 8i + j), or its
 * clear bits with invert. A training step decodes it into int64 positions once (count, then one
 * branch-free pass: every element's index is written and the output index advances by its bit,
 * so a random mask costs no mispredicted branches), then gathers and updates float32 values at
 * those positions with plain loops, which do the work of index_select and scatter_ without their
 * generic indexing machinery.
 *
 * Arithmetic is float32, one rounding per operation as torch's CPU ops round, with no contraction
 * into fused multiply-adds (built with -ffp-contract=off): results equal torch's bit for bit.
 * Every entry point takes tensor addresses as integers and releases the GIL while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { OP_MUL_SCALAR = 0, OP_MUL = 1, OP_ADD = 2, OP_COPY = 3 };

static int selected(const uint8_t *bitmap, uint8_t flip, int64_t e) {
    return ((bitmap[e >> 3] ^ flip) >> (e & 7)) & 1;
}

static int64_t count_selected(const uint8_t *bitmap, int64_t numel, int invert) {
    const uint64_t flip = invert ? ~(uint64_t)0 : 0;
    int64_t count = 0, words = numel / 64;
    for (int64_t w = 0; w < words; w++) {
        uint64_t bits;
        memcpy(&bits, bitmap + 8 * w, 8);
        count += __builtin_popcountll(bits ^ flip);
    }
    for (int64_t e = words * 64; e < numel; e++)
        count += selected(bitmap, (uint8_t)flip, e);
    return count;
}

/* positions[k] = the k-th selected element; returns how many are selected (writes at most count). */
static int64_t decode(const uint8_t *bitmap, int64_t numel, int invert, int64_t *positions, int64_t count) {
    const uint8_t flip = invert ? 0xFF : 0;
    int64_t k = 0, i = 0, full = numel / 8;
    for (; i < full && k + 8 <= count; i++) {
        const unsigned bits = bitmap[i] ^ flip;
        for (int j = 0; j < 8; j++) {
            positions[k] = 8 * i + j;
            k += (bits >> j) & 1;
        }
    }
    for (int64_t e = 8 * i; e < numel; e++) {
        if (selected(bitmap, flip, e)) {
            if (k < count)
                positions[k] = e;
            k++;
        }
    }
    return k;
}

static void gather_at(const float *values, const int64_t *positions, int64_t count, float *out) {
    for (int64_t k = 0; k < count; k++)
        out[k] = values[positions[k]];
}

static void update_at(float *values, const int64_t *positions, int64_t count, int op, const float *t1,
                      float scalar) {
    switch (op) {
    case OP_MUL_SCALAR:
        for (int64_t k = 0; k < count; k++) values[positions[k]] *= scalar;
        break;
    case OP_MUL:
        for (int64_t k = 0; k < count; k++) values[positions[k]] *= t1[k];
        break;
    case OP_ADD:
        for (int64_t k = 0; k < count; k++) values[positions[k]] += t1[k];
        break;
    default: /* OP_COPY */
        for (int64_t k = 0; k < count; k++) values[positions[k]] = t1[k];
    }
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

static PyObject *py_decode(PyObject *self, PyObject *args) {
    unsigned long long bitmap, positions;
    long long numel, count;
    int invert;
    if (!PyArg_ParseTuple(args, "KLpKL", &bitmap, &numel, &invert, &positions, &count))
        return NULL;
    int64_t found;
    Py_BEGIN_ALLOW_THREADS
    found = decode((const uint8_t *)(uintptr_t)bitmap, numel, invert, (int64_t *)(uintptr_t)positions, count);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(found);
}

static PyObject *py_gather_at(PyObject *self, PyObject *args) {
    unsigned long long values, positions, out;
    long long count;
    if (!PyArg_ParseTuple(args, "KKLK", &values, &positions, &count, &out))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    gather_at((const float *)(uintptr_t)values, (const int64_t *)(uintptr_t)positions, count, (float *)(uintptr_t)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_update_at(PyObject *self, PyObject *args) {
    unsigned long long values, positions, t1;
    long long count;
    int op;
    double scalar;
    if (!PyArg_ParseTuple(args, "KKLiKd", &values, &positions, &count, &op, &t1, &scalar))
        return NULL;
    if (op < OP_MUL_SCALAR || op > OP_COPY) {
        PyErr_Format(PyExc_ValueError, "_bitmap_cpu.update_at: unknown op %d", op);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    update_at((float *)(uintptr_t)values, (const int64_t *)(uintptr_t)positions, count, op,
              (const float *)(uintptr_t)t1, (float)scalar);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"count_selected", py_count_selected, METH_VARARGS,
     "count_selected(bitmap_ptr, numel, invert) -> elements selected"},
    {"decode", py_decode, METH_VARARGS,
     "decode(bitmap_ptr, numel, invert, positions_ptr, count) -> elements selected (writes at most count int64)"},
    {"gather_at", py_gather_at, METH_VARARGS, "gather_at(values_ptr, positions_ptr, count, out_ptr)"},
    {"update_at", py_update_at, METH_VARARGS,
     "update_at(values_ptr, positions_ptr, count, op, t1_ptr, scalar): in-place op at the positions"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bitmap_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__bitmap_cpu(void) { return PyModule_Create(&module); }
