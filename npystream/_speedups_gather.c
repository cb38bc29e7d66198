/*
 * npystream._speedups (part 5): the batch loader's gathers (C twins of npystream.loader's
 * _gather_pad_py / _gather_runs_py; same contract, checked by tests/test_loader.py).
 *
 *   gather_pad(src, dst, starts, counts, row_items, itemsize, pad)
 *       row j of dst (row_items items of itemsize bytes, at byte j * row_items * itemsize) gets
 *       counts[j] items copied from src at item starts[j], then pad (one item's bytes) repeated
 *       to the end of the row.
 *   gather_runs(src, dst, starts, counts, dst_starts, itemsize)
 *       run j: counts[j] items from src at item starts[j] to dst at item dst_starts[j].
 *
 * src is any buffer (a read-only memory map is fine), dst a writable C-contiguous buffer,
 * starts/counts/dst_starts C-contiguous int64 buffers of one length.  Every run is checked
 * against both buffers before any byte is copied (ValueError, nothing written); the copies run
 * without the GIL, so a prefetch thread overlaps them with the training step.  Linked into
 * npystream._speedups; _speedups_build.c's init hook calls npystream_gather_init(module).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static int
get_i64(PyObject *obj, Py_buffer *view, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (view->itemsize != 8 || view->format == NULL || (strcmp(view->format, "q") != 0 && strcmp(view->format, "l") != 0
                                                        && strcmp(view->format, "<q") != 0 && strcmp(view->format, "<l") != 0
                                                        && strcmp(view->format, "=q") != 0 && strcmp(view->format, "=l") != 0)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int64 array", what);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *
gather_pad(PyObject *self, PyObject *args)
{
    PyObject *src_o, *dst_o, *starts_o, *counts_o;
    Py_ssize_t row_items, itemsize;
    Py_buffer src, dst, starts, counts, pad;
    if (!PyArg_ParseTuple(args, "OOOOnny*", &src_o, &dst_o, &starts_o, &counts_o, &row_items, &itemsize, &pad))
        return NULL;
    PyObject *result = NULL;
    int have_src = 0, have_dst = 0, have_starts = 0, have_counts = 0;
    if (PyObject_GetBuffer(src_o, &src, PyBUF_SIMPLE) < 0)
        goto done;
    have_src = 1;
    if (PyObject_GetBuffer(dst_o, &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        goto done;
    have_dst = 1;
    if (get_i64(starts_o, &starts, "starts") < 0)
        goto done;
    have_starts = 1;
    if (get_i64(counts_o, &counts, "counts") < 0)
        goto done;
    have_counts = 1;
    Py_ssize_t n = starts.len / 8;
    if (counts.len / 8 != n || itemsize < 1 || row_items < 0 || pad.len != itemsize) {
        PyErr_SetString(PyExc_ValueError, "gather_pad: starts/counts lengths, itemsize or pad size disagree");
        goto done;
    }
    const int64_t *st = (const int64_t *)starts.buf, *ct = (const int64_t *)counts.buf;
    int64_t src_items = src.len / itemsize;
    if ((int64_t)n * row_items * itemsize > dst.len) {
        PyErr_SetString(PyExc_ValueError, "gather_pad: dst is too small for the rows");
        goto done;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        if (ct[j] < 0 || ct[j] > row_items || st[j] < 0 || st[j] > src_items - ct[j]) {
            PyErr_Format(PyExc_ValueError, "gather_pad: run %zd (start %lld, count %lld) is outside the source "
                         "(%lld items) or longer than a row (%zd items)", j, (long long)st[j], (long long)ct[j],
                         (long long)src_items, row_items);
            goto done;
        }
    }
    {
        const char *s = (const char *)src.buf;
        char *d = (char *)dst.buf;
        const char *p = (const char *)pad.buf;
        int zero = 1;
        for (Py_ssize_t k = 0; k < itemsize; k++)
            zero &= p[k] == 0;
        size_t row_bytes = (size_t)row_items * (size_t)itemsize;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t j = 0; j < n; j++) {
            char *row = d + (size_t)j * row_bytes;
            size_t used = (size_t)ct[j] * (size_t)itemsize;
            memcpy(row, s + (size_t)st[j] * (size_t)itemsize, used);
            if (zero) {
                memset(row + used, 0, row_bytes - used);
            } else {
                for (size_t b = used; b < row_bytes; b += (size_t)itemsize)
                    memcpy(row + b, p, (size_t)itemsize);
            }
        }
        Py_END_ALLOW_THREADS
    }
    result = Py_NewRef(Py_None);
done:
    if (have_counts)
        PyBuffer_Release(&counts);
    if (have_starts)
        PyBuffer_Release(&starts);
    if (have_dst)
        PyBuffer_Release(&dst);
    if (have_src)
        PyBuffer_Release(&src);
    PyBuffer_Release(&pad);
    return result;
}

static PyObject *
gather_runs(PyObject *self, PyObject *args)
{
    PyObject *src_o, *dst_o, *starts_o, *counts_o, *dpos_o;
    Py_ssize_t itemsize;
    Py_buffer src, dst, starts, counts, dpos;
    if (!PyArg_ParseTuple(args, "OOOOOn", &src_o, &dst_o, &starts_o, &counts_o, &dpos_o, &itemsize))
        return NULL;
    PyObject *result = NULL;
    int have_src = 0, have_dst = 0, have_starts = 0, have_counts = 0, have_dpos = 0;
    if (PyObject_GetBuffer(src_o, &src, PyBUF_SIMPLE) < 0)
        goto done;
    have_src = 1;
    if (PyObject_GetBuffer(dst_o, &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        goto done;
    have_dst = 1;
    if (get_i64(starts_o, &starts, "starts") < 0)
        goto done;
    have_starts = 1;
    if (get_i64(counts_o, &counts, "counts") < 0)
        goto done;
    have_counts = 1;
    if (get_i64(dpos_o, &dpos, "dst_starts") < 0)
        goto done;
    have_dpos = 1;
    Py_ssize_t n = starts.len / 8;
    if (counts.len / 8 != n || dpos.len / 8 != n || itemsize < 1) {
        PyErr_SetString(PyExc_ValueError, "gather_runs: starts/counts/dst_starts lengths or itemsize disagree");
        goto done;
    }
    const int64_t *st = (const int64_t *)starts.buf, *ct = (const int64_t *)counts.buf,
                  *dp = (const int64_t *)dpos.buf;
    int64_t src_items = src.len / itemsize, dst_items = dst.len / itemsize;
    for (Py_ssize_t j = 0; j < n; j++) {
        if (ct[j] < 0 || st[j] < 0 || st[j] > src_items - ct[j] || dp[j] < 0 || dp[j] > dst_items - ct[j]) {
            PyErr_Format(PyExc_ValueError, "gather_runs: run %zd (start %lld, count %lld, to %lld) is outside "
                         "the source (%lld items) or the destination (%lld items)", j, (long long)st[j],
                         (long long)ct[j], (long long)dp[j], (long long)src_items, (long long)dst_items);
            goto done;
        }
    }
    {
        const char *s = (const char *)src.buf;
        char *d = (char *)dst.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t j = 0; j < n; j++)
            memcpy(d + (size_t)dp[j] * (size_t)itemsize, s + (size_t)st[j] * (size_t)itemsize,
                   (size_t)ct[j] * (size_t)itemsize);
        Py_END_ALLOW_THREADS
    }
    result = Py_NewRef(Py_None);
done:
    if (have_dpos)
        PyBuffer_Release(&dpos);
    if (have_counts)
        PyBuffer_Release(&counts);
    if (have_starts)
        PyBuffer_Release(&starts);
    if (have_dst)
        PyBuffer_Release(&dst);
    if (have_src)
        PyBuffer_Release(&src);
    return result;
}

static PyMethodDef gather_methods[] = {
    {"gather_pad", gather_pad, METH_VARARGS,
     "gather_pad(src, dst, starts, counts, row_items, itemsize, pad)\n\nC twin of npystream.loader._gather_pad_py."},
    {"gather_runs", gather_runs, METH_VARARGS,
     "gather_runs(src, dst, starts, counts, dst_starts, itemsize)\n\nC twin of npystream.loader._gather_runs_py."},
    {NULL, NULL, 0, NULL},
};

int
npystream_gather_init(PyObject *module)
{
    return PyModule_AddFunctions(module, gather_methods);
}
