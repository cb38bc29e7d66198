/*
 * npystream._speedups (part 3): direct decoding of plain ndarray and scalar elements.
 *
 * C twin of npystream/formats/pickle_direct.py's direct_run (that module's docstring is the spec and
 * the design; the Python function is the fallback and the reference of the tests).  Linked into the
 * same extension module; _speedups_build.c's init hook calls npystream_direct_init(module).
 *
 *   direct_setup(reconstruct, ndarray)          numpy's real _reconstruct and ndarray (once)
 *   direct_run(buf, base, starts, ends, memos, i, k, roles, live_keys, hot, view_fn, out) -> (j, m)
 *
 * starts/ends/memos/hot/live_keys are int64 buffers (live_keys and hot sorted), roles a dict
 * memo index -> (role, object).  Same results as the Python twin: the same elements built (same
 * objects: numpy's _reconstruct + __setstate__ with a bytes payload, or view_fn(...) in zero-copy
 * mode), the same (j, m) returned.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { ROLE_NONE = 0, ROLE_RECONSTRUCT = 1, ROLE_NDARRAY = 2, ROLE_B = 3, ROLE_DTYPE = 4 };

static PyObject *d_reconstruct = NULL; /* numpy's _reconstruct */
static PyObject *d_ndarray = NULL;
static PyObject *d_zero_shape = NULL; /* (0,) */
static PyObject *d_bcode = NULL;      /* b'b' */
static PyObject *d_one = NULL;        /* 1 */
static PyObject *d_setstate = NULL;   /* "__setstate__" */
static PyObject *d_itemsize = NULL;   /* "itemsize" */

static PyObject *
direct_setup(PyObject *self, PyObject *args)
{
    PyObject *rec, *nd;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO", &rec, &nd))
        return NULL;
    Py_XSETREF(d_reconstruct, Py_NewRef(rec));
    Py_XSETREF(d_ndarray, Py_NewRef(nd));
    Py_RETURN_NONE;
}

static inline uint32_t
rd_u16(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8);
}

static inline uint32_t
rd_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint64_t
rd_u64(const unsigned char *p)
{
    return (uint64_t)rd_u32(p) | ((uint64_t)rd_u32(p + 4) << 32);
}

/* skip FRAMEs and memo writes (MEMOIZE, BINPUT, LONG_BINPUT) */
static inline Py_ssize_t
skip_sep(const unsigned char *b, Py_ssize_t p, Py_ssize_t q)
{
    while (p < q) {
        unsigned char op = b[p];
        if (op == 0x95 && p + 9 <= q)
            p += 9;
        else if (op == 0x94)
            p += 1;
        else if (op == 'q' && p + 2 <= q)
            p += 2;
        else if (op == 'r' && p + 5 <= q)
            p += 5;
        else
            break;
    }
    return p;
}

/* a memo read at p: its index in *m, returns the position after it, or -1 */
static inline Py_ssize_t
read_get(const unsigned char *b, Py_ssize_t p, Py_ssize_t q, long long *m)
{
    if (p + 2 <= q && b[p] == 'h') {
        *m = b[p + 1];
        return p + 2;
    }
    if (p + 5 <= q && b[p] == 'j') {
        *m = rd_u32(b + p + 1);
        return p + 5;
    }
    return -1;
}

/* a shape int (BININT1/BININT2/BININT) at p: value in *v (may be negative), new position or -1 */
static inline Py_ssize_t
read_int(const unsigned char *b, Py_ssize_t p, Py_ssize_t q, long long *v)
{
    if (p + 2 <= q && b[p] == 'K') {
        *v = b[p + 1];
        return p + 2;
    }
    if (p + 3 <= q && b[p] == 'M') {
        *v = rd_u16(b + p + 1);
        return p + 3;
    }
    if (p + 5 <= q && b[p] == 'J') {
        *v = (int32_t)rd_u32(b + p + 1);
        return p + 5;
    }
    return -1;
}

static inline int
expect(const unsigned char *b, Py_ssize_t *p, Py_ssize_t q, unsigned char op)
{
    if (*p < q && b[*p] == op) {
        *p = skip_sep(b, *p + 1, q);
        return 1;
    }
    return 0;
}

typedef struct {
    long long m;
    int role;
    PyObject *obj; /* borrowed from the roles dict */
    Py_ssize_t itemsize;
} RoleHit;

#define ROLE_CACHE 8

/* role of memo entry m: 1 found (*out filled), 0 unknown, -1 error */
static int
lookup_role(PyObject *roles, long long m, RoleHit *cache, int *ncache, RoleHit *out)
{
    for (int c = 0; c < *ncache; c++) {
        if (cache[c].m == m) {
            *out = cache[c];
            return 1;
        }
    }
    PyObject *key = PyLong_FromLongLong(m);
    if (key == NULL)
        return -1;
    PyObject *hit = PyDict_GetItemWithError(roles, key);
    Py_DECREF(key);
    if (hit == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_Check(hit) || PyTuple_GET_SIZE(hit) != 2) {
        PyErr_SetString(PyExc_TypeError, "roles values must be (role, object) tuples");
        return -1;
    }
    RoleHit r;
    r.m = m;
    r.role = (int)PyLong_AsLong(PyTuple_GET_ITEM(hit, 0));
    if (r.role == -1 && PyErr_Occurred())
        return -1;
    r.obj = PyTuple_GET_ITEM(hit, 1);
    r.itemsize = 0;
    if (r.role == ROLE_DTYPE) {
        PyObject *isz = PyObject_GetAttr(r.obj, d_itemsize);
        if (isz == NULL)
            return -1;
        r.itemsize = PyLong_AsSsize_t(isz);
        Py_DECREF(isz);
        if (r.itemsize == -1 && PyErr_Occurred())
            return -1;
        if (r.itemsize <= 0)
            r.role = ROLE_NONE;
    }
    if (*ncache < ROLE_CACHE)
        cache[(*ncache)++] = r;
    else
        cache[m % ROLE_CACHE] = r;
    *out = r;
    return 1;
}

/* first index in the sorted int64 array a[0:n] whose value >= x */
static inline Py_ssize_t
lower_bound(const int64_t *a, Py_ssize_t n, long long x)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (a[mid] < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

#define STOP(jj, mm)          \
    do {                      \
        ret_j = (jj);         \
        ret_m = (mm);         \
        goto done;            \
    } while (0)

static PyObject *
direct_run(PyObject *self, PyObject *args)
{
    PyObject *bufobj, *o_starts, *o_ends, *o_memos, *roles, *o_live, *o_hot, *view_fn, *out;
    long long base;
    Py_ssize_t i, k;
    (void)self;
    if (!PyArg_ParseTuple(args, "OLOOOnnO!OOOO!", &bufobj, &base, &o_starts, &o_ends, &o_memos, &i, &k,
                          &PyDict_Type, &roles, &o_live, &o_hot, &view_fn, &PyList_Type, &out))
        return NULL;
    if (d_reconstruct == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "direct_setup() was not called");
        return NULL;
    }
    Py_buffer bv, vv[5];
    PyObject *objs[5] = {o_starts, o_ends, o_memos, o_live, o_hot};
    int got = 0;
    if (PyObject_GetBuffer(bufobj, &bv, PyBUF_SIMPLE) < 0)
        return NULL;
    for (; got < 5; got++) {
        if (PyObject_GetBuffer(objs[got], &vv[got], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
            break;
        if (vv[got].itemsize != 8 || vv[got].format == NULL || strchr("qlQL", vv[got].format[0]) == NULL) {
            PyErr_SetString(PyExc_TypeError, "direct_run: starts, ends, memos, live_keys, hot must be int64 arrays");
            PyBuffer_Release(&vv[got]);
            break;
        }
    }
    if (got < 5) {
        while (got-- > 0)
            PyBuffer_Release(&vv[got]);
        PyBuffer_Release(&bv);
        return NULL;
    }
    const int64_t *starts = (const int64_t *)vv[0].buf, *ends = (const int64_t *)vv[1].buf,
                  *memos = (const int64_t *)vv[2].buf, *live = (const int64_t *)vv[3].buf,
                  *hot = (const int64_t *)vv[4].buf;
    Py_ssize_t nlive = vv[3].len / 8, nhot = vv[4].len / 8;
    const unsigned char *b = (const unsigned char *)bv.buf;
    Py_ssize_t blen = bv.len;
    if (k > vv[0].len / 8 || k > vv[1].len / 8 || k > vv[2].len / 8 || i < 0 || i > k) {
        PyErr_SetString(PyExc_IndexError, "direct_run: i, k out of range");
        for (got = 0; got < 5; got++)
            PyBuffer_Release(&vv[got]);
        PyBuffer_Release(&bv);
        return NULL;
    }
    int use_view = view_fn != Py_None;
    RoleHit cache[ROLE_CACHE];
    int ncache = 0;
    Py_ssize_t ret_j = k;
    long long ret_m = -1;
    int failed = 0;

    /* the first hot offset at or after starts[i] */
    Py_ssize_t h = (nhot && i < k) ? lower_bound(hot, nhot, starts[i]) : 0;
    long long hot_at = h < nhot ? hot[h] : -1;

    for (Py_ssize_t j = i; j < k; j++) {
        long long s = starts[j], e = ends[j], mlo = memos[j];
        if (h < nhot && hot_at < e)
            STOP(j, -1);
        if (nlive) {
            Py_ssize_t li = lower_bound(live, nlive, mlo);
            if (li < nlive) {
                if (j + 1 >= k || live[li] < memos[j + 1])
                    STOP(j, -1);
            }
        }
        Py_ssize_t p = (Py_ssize_t)(s - base), q = (Py_ssize_t)(e - base);
        if (p < 0 || q > blen || p >= q)
            STOP(j, -1);
        unsigned char op = b[p];
        while (op == 0x95 && p + 9 < q) {
            p += 9;
            op = b[p];
        }
        PyObject *item = NULL;
        if (op == 'h' || op == 'j') {
            /* GET GET K0 TUPLE1 GET TUPLE3 REDUCE MARK K1 <shape> GET flag payload TUPLE BUILD */
            long long gm[4];
            long long dims[64];
            int ndim = 0;
            Py_ssize_t r = skip_sep(b, p, q);
            if ((r = read_get(b, r, q, &gm[0])) < 0)
                STOP(j, -1);
            r = skip_sep(b, r, q);
            if ((r = read_get(b, r, q, &gm[1])) < 0)
                STOP(j, -1);
            r = skip_sep(b, r, q);
            if (!(r + 2 <= q && b[r] == 'K' && b[r + 1] == 0))
                STOP(j, -1);
            r = skip_sep(b, r + 2, q);
            if (!expect(b, &r, q, 0x85))
                STOP(j, -1);
            if ((r = read_get(b, r, q, &gm[2])) < 0)
                STOP(j, -1);
            r = skip_sep(b, r, q);
            if (!expect(b, &r, q, 0x87) || !expect(b, &r, q, 'R') || !expect(b, &r, q, '('))
                STOP(j, -1);
            if (!(r + 2 <= q && b[r] == 'K' && b[r + 1] == 1))
                STOP(j, -1);
            r = skip_sep(b, r + 2, q);
            if (r < q && b[r] == ')') {
                r = skip_sep(b, r + 1, q);
            }
            else if (r < q && b[r] == '(') {
                r = skip_sep(b, r + 1, q);
                for (;;) {
                    Py_ssize_t r2 = read_int(b, r, q, &dims[ndim < 64 ? ndim : 63]);
                    if (r2 < 0)
                        break;
                    if (ndim >= 64)
                        STOP(j, -1); /* numpy allows at most 64 dimensions */
                    ndim++;
                    r = skip_sep(b, r2, q);
                }
                if (!expect(b, &r, q, 't'))
                    STOP(j, -1);
            }
            else {
                for (;;) {
                    Py_ssize_t r2 = ndim < 3 ? read_int(b, r, q, &dims[ndim]) : -1;
                    if (r2 < 0)
                        break;
                    ndim++;
                    r = skip_sep(b, r2, q);
                }
                if (ndim == 0 || !(r < q && b[r] == 0x84 + ndim))
                    STOP(j, -1);
                r = skip_sep(b, r + 1, q);
            }
            if ((r = read_get(b, r, q, &gm[3])) < 0)
                STOP(j, -1);
            r = skip_sep(b, r, q);
            if (!(r < q && (b[r] == 0x88 || b[r] == 0x89)))
                STOP(j, -1);
            int fortran = b[r] == 0x88;
            r = skip_sep(b, r + 1, q);
            unsigned long long n;
            Py_ssize_t a;
            if (r + 2 <= q && b[r] == 'C') {
                n = b[r + 1];
                a = r + 2;
            }
            else if (r + 5 <= q && b[r] == 'B') {
                n = rd_u32(b + r + 1);
                a = r + 5;
            }
            else if (r + 9 <= q && b[r] == 0x8e) {
                n = rd_u64(b + r + 1);
                a = r + 9;
            }
            else
                STOP(j, -1);
            RoleHit rh[4];
            for (int g = 0; g < 4; g++) {
                int got = lookup_role(roles, gm[g], cache, &ncache, &rh[g]);
                if (got < 0) {
                    failed = 1;
                    goto done;
                }
                if (got == 0)
                    STOP(j, gm[g]);
            }
            if (rh[0].role != ROLE_RECONSTRUCT || rh[1].role != ROLE_NDARRAY || rh[2].role != ROLE_B ||
                rh[3].role != ROLE_DTYPE)
                STOP(j, -1);
            for (int d = 0; d < ndim; d++)
                if (dims[d] < 0)
                    STOP(j, -1);
            if (n > (unsigned long long)(q - a))
                STOP(j, -1);
            Py_ssize_t bend = a + (Py_ssize_t)n;
            /* count * itemsize == n, without overflow */
            unsigned long long count = 1, limit = n / (unsigned long long)rh[3].itemsize;
            int over = 0;
            for (int d = 0; d < ndim; d++) {
                unsigned long long v = (unsigned long long)dims[d];
                if (v != 0 && count > limit / v) {
                    over = 1;
                    count = 0;
                }
                else
                    count *= v;
            }
            if (over) {
                /* a zero dimension later still makes the count 0 */
                int zero = 0;
                for (int d = 0; d < ndim; d++)
                    zero |= dims[d] == 0;
                if (!zero)
                    STOP(j, -1);
                count = 0;
            }
            if (count * (unsigned long long)rh[3].itemsize != n)
                STOP(j, -1);
            r = skip_sep(b, bend, q);
            if (!expect(b, &r, q, 't') || !(r < q && b[r] == 'b'))
                STOP(j, -1);
            r = skip_sep(b, r + 1, q);
            if (r != q)
                STOP(j, -1);
            /* build it */
            PyObject *shape = PyTuple_New(ndim);
            if (shape == NULL) {
                failed = 1;
                goto done;
            }
            for (int d = 0; d < ndim; d++) {
                PyObject *v = PyLong_FromLongLong(dims[d]);
                if (v == NULL) {
                    Py_DECREF(shape);
                    failed = 1;
                    goto done;
                }
                PyTuple_SET_ITEM(shape, d, v);
            }
            PyObject *fl = fortran ? Py_True : Py_False;
            if (use_view) {
                item = PyObject_CallFunction(view_fn, "nnOOO", a, bend, shape, rh[3].obj, fl);
                Py_DECREF(shape);
                if (item == NULL) {
                    failed = 1;
                    goto done;
                }
            }
            else {
                PyObject *raw = PyBytes_FromStringAndSize((const char *)b + a, (Py_ssize_t)n);
                PyObject *arr = raw ? PyObject_CallFunctionObjArgs(d_reconstruct, d_ndarray, d_zero_shape, d_bcode, NULL)
                                    : NULL;
                PyObject *st = arr ? PyTuple_Pack(5, d_one, shape, rh[3].obj, fl, raw) : NULL;
                PyObject *res = st ? PyObject_CallMethodOneArg(arr, d_setstate, st) : NULL;
                Py_XDECREF(st);
                Py_XDECREF(raw);
                Py_DECREF(shape);
                if (res == NULL) {
                    Py_XDECREF(arr);
                    failed = 1;
                    goto done;
                }
                Py_DECREF(res);
                item = arr;
            }
        }
        else {
            Py_ssize_t r;
            switch (op) {
            case 0x8c: case 'X': case 0x8d: case 'C': case 'B': case 0x8e: {
                unsigned long long n;
                Py_ssize_t a;
                if ((op == 0x8c || op == 'C') && p + 2 <= q) {
                    n = b[p + 1];
                    a = p + 2;
                }
                else if ((op == 'X' || op == 'B') && p + 5 <= q) {
                    n = rd_u32(b + p + 1);
                    a = p + 5;
                }
                else if ((op == 0x8d || op == 0x8e) && p + 9 <= q) {
                    n = rd_u64(b + p + 1);
                    a = p + 9;
                }
                else
                    STOP(j, -1);
                if (n > (unsigned long long)(q - a))
                    STOP(j, -1);
                r = a + (Py_ssize_t)n;
                if (skip_sep(b, r, q) != q)
                    STOP(j, -1);
                if (op == 'C' || op == 'B' || op == 0x8e)
                    item = PyBytes_FromStringAndSize((const char *)b + a, (Py_ssize_t)n);
                else
                    item = PyUnicode_DecodeUTF8((const char *)b + a, (Py_ssize_t)n, "surrogatepass");
                break;
            }
            case 'K':
            case 'M':
            case 'J': {
                long long v;
                r = read_int(b, p, q, &v);
                if (r < 0 || skip_sep(b, r, q) != q)
                    STOP(j, -1);
                item = PyLong_FromLongLong(v);
                break;
            }
            case 'G': {
                if (p + 9 > q || skip_sep(b, p + 9, q) != q)
                    STOP(j, -1);
                uint64_t bits = 0;
                for (int t = 0; t < 8; t++)
                    bits = (bits << 8) | b[p + 1 + t];
                double dv;
                memcpy(&dv, &bits, sizeof dv);
                item = PyFloat_FromDouble(dv);
                break;
            }
            case 'N':
            case 0x88:
            case 0x89:
                if (skip_sep(b, p + 1, q) != q)
                    STOP(j, -1);
                item = Py_NewRef(op == 'N' ? Py_None : (op == 0x88 ? Py_True : Py_False));
                break;
            default:
                STOP(j, -1);
            }
            if (item == NULL) {
                if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
                    PyErr_Clear(); /* the unpickler reports it with the element's offset */
                else
                    failed = 1;
                if (failed)
                    goto done;
                STOP(j, -1);
            }
        }
        int e2 = PyList_Append(out, item);
        Py_DECREF(item);
        if (e2 < 0) {
            failed = 1;
            goto done;
        }
    }
done:
    for (got = 0; got < 5; got++)
        PyBuffer_Release(&vv[got]);
    PyBuffer_Release(&bv);
    if (failed)
        return NULL;
    return Py_BuildValue("nL", ret_j, ret_m);
}

static PyMethodDef direct_methods[] = {
    {"direct_setup", direct_setup, METH_VARARGS, "direct_setup(reconstruct, ndarray): numpy's builders."},
    {"direct_run", direct_run, METH_VARARGS,
     "direct_run(buf, base, starts, ends, memos, i, k, roles, live_keys, hot, view_fn, out) -> (j, m)\n\n"
     "C twin of npystream.formats.pickle_direct.direct_run."},
    {NULL, NULL, 0, NULL},
};

int
npystream_direct_init(PyObject *module)
{
    if (d_setstate == NULL) {
        d_setstate = PyUnicode_InternFromString("__setstate__");
        d_itemsize = PyUnicode_InternFromString("itemsize");
        d_zero_shape = Py_BuildValue("(i)", 0);
        d_bcode = PyBytes_FromStringAndSize("b", 1);
        d_one = PyLong_FromLong(1);
        if (d_setstate == NULL || d_itemsize == NULL || d_zero_shape == NULL || d_bcode == NULL || d_one == NULL)
            return -1;
    }
    return PyModule_AddFunctions(module, direct_methods);
}
