/*
 * npystream._speedups: safe-mode array building in C.
 *
 * Linked into the same extension module as _speedups.c (setup.py compiles every
 * npystream/_speedups*.c); _speedups.c's PyInit calls npystream_build_init(module).
 *
 *   Reconstructor(proto_type, token, ndarray, fallback, ctx)   the checked numpy _reconstruct
 *   build_arrays(items, out, proto_type, done, checked_dtype, reconstruct, ndarray, fallback)
 *
 * Both are twins of Python code in npystream/formats/pickle_safety.py (which stays the spec and
 * the fallback): Reconstructor.__call__ == _ReconstructChecked.__call__, build_arrays == the
 * bytes fast path of _build_array (anything else goes to the Python fallback).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *str_setstate = NULL;

/* 1 if o is an exact int equal to v (never raises) */
static int
long_is(PyObject *o, long v)
{
    if (!PyLong_CheckExact(o))
        return 0;
    int overflow = 0;
    long x = PyLong_AsLongAndOverflow(o, &overflow);
    if (x == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return !overflow && x == v;
}

typedef struct {
    PyObject_HEAD
    PyObject *proto_type;
    PyObject *token;
    PyObject *ndarray;
    PyObject *fallback; /* callable(subtype, shape, typecode) */
    PyObject *ctx;
    int flagged;
} Reconstructor;

static int
Reconstructor_init(Reconstructor *self, PyObject *args, PyObject *kw)
{
    PyObject *pt, *tok, *nd, *fb, *ctx;
    (void)kw;
    if (!PyArg_ParseTuple(args, "OOOOO", &pt, &tok, &nd, &fb, &ctx))
        return -1;
    Py_XSETREF(self->proto_type, Py_NewRef(pt));
    Py_XSETREF(self->token, Py_NewRef(tok));
    Py_XSETREF(self->ndarray, Py_NewRef(nd));
    Py_XSETREF(self->fallback, Py_NewRef(fb));
    Py_XSETREF(self->ctx, Py_NewRef(ctx));
    self->flagged = 0;
    return 0;
}

static int
Reconstructor_clear(Reconstructor *self)
{
    Py_CLEAR(self->proto_type);
    Py_CLEAR(self->token);
    Py_CLEAR(self->ndarray);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->ctx);
    return 0;
}

static void
Reconstructor_dealloc(Reconstructor *self)
{
    PyObject_GC_UnTrack(self);
    Reconstructor_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
Reconstructor_traverse(Reconstructor *self, visitproc visit, void *arg)
{
    Py_VISIT(self->proto_type);
    Py_VISIT(self->token);
    Py_VISIT(self->ndarray);
    Py_VISIT(self->fallback);
    Py_VISIT(self->ctx);
    return 0;
}

static PyObject *
Reconstructor_call(Reconstructor *self, PyObject *args, PyObject *kw)
{
    if (self->proto_type == NULL) {
        PyErr_SetString(PyExc_TypeError, "Reconstructor not initialised");
        return NULL;
    }
    if (kw == NULL && PyTuple_GET_SIZE(args) == 3) {
        PyObject *sub = PyTuple_GET_ITEM(args, 0), *shape = PyTuple_GET_ITEM(args, 1),
                 *code = PyTuple_GET_ITEM(args, 2);
        int ok = (sub == self->token || sub == self->ndarray) && PyTuple_CheckExact(shape) &&
                 PyTuple_GET_SIZE(shape) == 1 && long_is(PyTuple_GET_ITEM(shape, 0), 0) &&
                 ((PyBytes_CheckExact(code) && PyBytes_GET_SIZE(code) == 1 && PyBytes_AS_STRING(code)[0] == 'b') ||
                  (PyUnicode_CheckExact(code) && PyUnicode_CompareWithASCIIString(code, "b") == 0));
        if (ok) {
            if (!self->flagged) {
                PyObject *one = PyLong_FromLong(1);
                if (one == NULL || PyObject_SetAttrString(self->ctx, "protos", one) < 0) {
                    Py_XDECREF(one);
                    return NULL;
                }
                Py_DECREF(one);
                self->flagged = 1;
            }
            return PyObject_CallNoArgs(self->proto_type);
        }
    }
    return PyObject_Call(self->fallback, args, kw);
}

static PyTypeObject ReconstructorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "npystream._speedups.Reconstructor",
    .tp_basicsize = sizeof(Reconstructor),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Reconstructor_init,
    .tp_dealloc = (destructor)Reconstructor_dealloc,
    .tp_traverse = (traverseproc)Reconstructor_traverse,
    .tp_clear = (inquiry)Reconstructor_clear,
    .tp_call = (ternaryfunc)Reconstructor_call,
    .tp_doc = "Checked numpy _reconstruct: placeholders for plain ndarrays, the Python fallback otherwise.",
};

/* build_arrays(items, out, proto_type, done, checked_dtype, reconstruct, ndarray, fallback)
 * For each item: a placeholder [state] whose state is a 1-d numeric array exactly as numpy writes
 * it, with bytes raw data, is built here (dtype via checked_dtype(d) -> private checked copy,
 * then numpy's own _reconstruct + __setstate__, then the placeholder becomes [done, array]); any
 * other item goes through fallback(item).  Results are appended to out, so after an error the
 * caller knows how many were built. */
static PyObject *
build_arrays(PyObject *self, PyObject *args)
{
    PyObject *items, *out, *proto_type, *done, *checked_dtype, *reconstruct, *ndarray, *fallback;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO!OOOOOO", &items, &PyList_Type, &out, &proto_type, &done, &checked_dtype,
                          &reconstruct, &ndarray, &fallback))
        return NULL;
    PyObject *seq = PySequence_Fast(items, "items must be a sequence");
    if (seq == NULL)
        return NULL;
    PyObject *last_d = NULL, *last_canon = NULL; /* both owned */
    Py_ssize_t last_itemsize = 0;
    int last_hasobject = 1;
    PyObject *result = NULL;
    PyObject *zero_shape = Py_BuildValue("(i)", 0);
    PyObject *b_code = PyBytes_FromStringAndSize("b", 1);
    if (zero_shape == NULL || b_code == NULL)
        goto finish;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **it = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = it[i], *built = NULL;
        if ((PyObject *)Py_TYPE(item) == proto_type && PyList_GET_SIZE(item) == 1) {
            PyObject *state = PyList_GET_ITEM(item, 0);
            if (PyTuple_CheckExact(state) && PyTuple_GET_SIZE(state) == 5) {
                PyObject *ver = PyTuple_GET_ITEM(state, 0), *shape = PyTuple_GET_ITEM(state, 1),
                         *d = PyTuple_GET_ITEM(state, 2), *fortran = PyTuple_GET_ITEM(state, 3),
                         *raw = PyTuple_GET_ITEM(state, 4);
                if (long_is(ver, 1) && PyTuple_CheckExact(shape) && PyTuple_GET_SIZE(shape) == 1 &&
                    PyLong_CheckExact(PyTuple_GET_ITEM(shape, 0)) && (fortran == Py_True || fortran == Py_False) &&
                    PyBytes_CheckExact(raw)) {
                    long long count = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, 0));
                    if (count == -1 && PyErr_Occurred()) {
                        PyErr_Clear();
                        count = -1;
                    }
                    if (count >= 0 && d != last_d) {
                        PyObject *canon = PyObject_CallOneArg(checked_dtype, d);
                        if (canon == NULL)
                            goto finish;
                        PyObject *hs = PyObject_GetAttrString(canon, "hasobject");
                        PyObject *isz = PyObject_GetAttrString(canon, "itemsize");
                        if (hs == NULL || isz == NULL) {
                            Py_XDECREF(hs);
                            Py_XDECREF(isz);
                            Py_DECREF(canon);
                            goto finish;
                        }
                        last_hasobject = PyObject_IsTrue(hs);
                        last_itemsize = PyLong_AsSsize_t(isz);
                        Py_DECREF(hs);
                        Py_DECREF(isz);
                        Py_XSETREF(last_canon, canon);
                        Py_XSETREF(last_d, Py_NewRef(d));
                        if (last_hasobject < 0 || (last_itemsize == -1 && PyErr_Occurred()))
                            goto finish;
                    }
                    if (count >= 0 && !last_hasobject && last_itemsize > 0 &&
                        count <= PY_SSIZE_T_MAX / last_itemsize &&
                        PyBytes_GET_SIZE(raw) == (Py_ssize_t)count * last_itemsize) {
                        PyObject *arr = PyObject_CallFunctionObjArgs(reconstruct, ndarray, zero_shape, b_code, NULL);
                        if (arr == NULL)
                            goto finish;
                        PyObject *st2 = PyTuple_Pack(5, ver, shape, last_canon, fortran, raw);
                        PyObject *r = st2 ? PyObject_CallMethodOneArg(arr, str_setstate, st2) : NULL;
                        Py_XDECREF(st2);
                        if (r == NULL) {
                            Py_DECREF(arr);
                            goto finish;
                        }
                        Py_DECREF(r);
                        PyObject *pair = PyList_New(2);
                        if (pair == NULL) {
                            Py_DECREF(arr);
                            goto finish;
                        }
                        PyList_SET_ITEM(pair, 0, Py_NewRef(done));
                        PyList_SET_ITEM(pair, 1, Py_NewRef(arr));
                        int e = PyList_SetSlice(item, 0, PyList_GET_SIZE(item), pair);
                        Py_DECREF(pair);
                        if (e < 0) {
                            Py_DECREF(arr);
                            goto finish;
                        }
                        built = arr;
                    }
                }
            }
        }
        if (built == NULL) {
            built = PyObject_CallOneArg(fallback, item);
            if (built == NULL)
                goto finish;
        }
        int e = PyList_Append(out, built);
        Py_DECREF(built);
        if (e < 0)
            goto finish;
    }
    result = Py_NewRef(out);
finish:
    Py_XDECREF(last_canon);
    Py_XDECREF(last_d);
    Py_XDECREF(zero_shape);
    Py_XDECREF(b_code);
    Py_DECREF(seq);
    return result;
}

/* has_special(obj, types) -> bool: whether obj, or anything inside its exact lists, tuples and dicts
 * (keys too), is of one of the exact types in the tuple `types` -- the finaliser's placeholders and
 * wrappers (pickle_safety.finalize walks an element in Python only when this says so).  Sets and
 * frozensets, nesting deeper than 100 and more than 100,000 visited objects answer True: the Python
 * walk (which handles shared and cyclic references) decides then. */
static int
hs_visit(PyObject *o, PyObject *const *types, Py_ssize_t nt, Py_ssize_t *budget, int depth)
{
    PyTypeObject *t = Py_TYPE(o);
    for (Py_ssize_t i = 0; i < nt; i++)
        if ((PyObject *)t == types[i])
            return 1;
    if (t == &PyUnicode_Type || t == &PyLong_Type || t == &PyFloat_Type || t == &PyBytes_Type || o == Py_None ||
        t == &PyBool_Type)
        return 0;
    if (--*budget < 0 || depth > 100)
        return 1;
    if (t == &PyList_Type) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(o); i++)
            if (hs_visit(PyList_GET_ITEM(o, i), types, nt, budget, depth + 1))
                return 1;
    }
    else if (t == &PyTuple_Type) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(o); i++)
            if (hs_visit(PyTuple_GET_ITEM(o, i), types, nt, budget, depth + 1))
                return 1;
    }
    else if (t == &PyDict_Type) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(o, &pos, &k, &v))
            if (hs_visit(k, types, nt, budget, depth + 1) || hs_visit(v, types, nt, budget, depth + 1))
                return 1;
    }
    else if (t == &PySet_Type || t == &PyFrozenSet_Type) {
        return PySet_GET_SIZE(o) > 0;
    }
    return 0;
}

static PyObject *
has_special(PyObject *self, PyObject *args)
{
    PyObject *obj, *types;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO!", &obj, &PyTuple_Type, &types))
        return NULL;
    Py_ssize_t budget = 100000;
    return PyBool_FromLong(hs_visit(obj, &PyTuple_GET_ITEM(types, 0), PyTuple_GET_SIZE(types), &budget, 0));
}

static PyMethodDef build_methods[] = {
    {"build_arrays", build_arrays, METH_VARARGS, "Safe-mode array building fast path (see pickle_safety)."},
    {"has_special", has_special, METH_VARARGS, "Whether a placeholder or wrapper may be inside obj (see pickle_safety)."},
    {NULL, NULL, 0, NULL},
};

int npystream_direct_init(PyObject *module); /* _speedups_direct.c */
int npystream_io_init(PyObject *module);     /* _speedups_io.c */

int
npystream_build_init(PyObject *module)
{
    if (npystream_io_init(module) < 0)
        return -1;
    if (npystream_direct_init(module) < 0)
        return -1;
    if (str_setstate == NULL) {
        str_setstate = PyUnicode_InternFromString("__setstate__");
        if (str_setstate == NULL)
            return -1;
    }
    if (PyType_Ready(&ReconstructorType) < 0)
        return -1;
    if (PyModule_AddObjectRef(module, "Reconstructor", (PyObject *)&ReconstructorType) < 0)
        return -1;
    return PyModule_AddFunctions(module, build_methods);
}
