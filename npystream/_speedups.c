/*
 * npystream._speedups: C twins of the two hot loops of npystream/formats/pickle_ops.py.
 *
 *   setup(ScanError, ScanState, RewriteState[, text_int])     called once by pickle_walk._load_speedups()
 *   scan_ops(buf, pos, end, base, st) -> int                  the index/liveness scanner
 *   rewrite_ops(buf, pos, end, base, rw, out) -> int          the chunk rewriter
 *   _tables() -> (names, args, kinds, constants)              for the tests: the opcode table and limits
 *
 * Specification: the Python functions of the same names and their docstrings.
 * The results are identical -- returned pos, every state attribute (written
 * back on every exit, errors included, exactly where the Python code writes
 * it), ScanError kind/message/offset/index, bytes appended to ``out`` -- which
 * tests/test_speedups.py checks call by call on the corpus, on every
 * truncation of small files and on random mutations.  Comments of the form
 * "py: ..." quote the Python line a block mirrors.
 *
 * Safety: ``buf`` is taken through the buffer protocol (read-only, any
 * contiguous bytes-like object: bytes, bytearray, memoryview of an mmap).
 * No byte at or beyond ``end`` is ever read (the Python code's own bounds
 * checks are the spec), length fields are compared without overflow, and a
 * state no caller builds (e.g. an empty ``dep`` list where the stack is not
 * empty) raises IndexError/ValueError like the Python code instead of reading
 * out of bounds.
 *
 * Deliberate differences (arguments/states the Python callers never pass):
 *   - pos < 0, end > len(buf) or base outside [0, 2**62): ValueError up front;
 *   - list items of the state must be ints that fit in 64 bits (TypeError/OverflowError),
 *     ScanState.starts/memo_at bytearrays a multiple of 8 bytes long (TypeError);
 *   - rewrite_ops: a text PUT whose index does not fit in 64 bits raises
 *     OverflowError; a slot number outside [0, 2**32) raises OverflowError;
 *     values of rw.live are compared with the GET's offset as ints (a float
 *     equal to it does not count as the last read);
 *   - the scanner's global_check callback must not modify the ScanState
 *     (the C code keeps the state in C variables during a call).
 *
 * C99, Python.h only, CPython 3.10-3.13.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* constants: pickle_ops's, checked equal by tests/test_speedups.py        */

#define MAX_MARK_DEPTH 1000
#define MAX_STACK (1 << 20)
#define MAX_NESTING 1000 /* the default of pickle_ops.MAX_NESTING; a scan reads ScanState.max_nesting */
#define PENDING_PER_LEVEL 4 /* element-level slots pending per nesting level: see pickle_ops */
#define MEMO_DEPTH_NOTE 32
#define MAX_LINE (1 << 16)
#define INF ((int64_t)1 << 62) /* py: _INF */

/* argument layouts (py: A_*) */
#define A_NONE 0
#define A_LINE 100
#define A_LINE2 200
#define A_LEN1 (-1)
#define A_LEN4 (-4)
#define A_SLEN4 (-5)
#define A_LEN8 (-8)

/* stack effect kinds (py: K_*, same order) */
enum {
    K_PUSH, K_P1, K_P2, K_P3, K_POP1, K_POP2, K_POP, K_MARK, K_TOMARK1, K_TOMARK0,
    K_PUT, K_GET, K_DUP, K_FRAME, K_PROTO, K_STOP, K_REFUSE, K_BAD
};
enum { PH_PREFIX, PH_BODY, PH_SUFFIX, PH_DONE };
enum { ST_MORE, ST_BATCH, ST_DONE };
enum { RW_OK, RW_MISSING };

/* opcodes the loops look at by value */
#define OP_MEMOIZE 0x94
#define OP_BINPUT 0x71
#define OP_LONG_BINPUT 0x72
#define OP_BINGET 0x68
#define OP_LONG_BINGET 0x6A
#define OP_TUPLE 0x74
#define OP_BUILD 0x62
#define OP_APPEND 0x61
#define OP_APPENDS 0x65
#define OP_EMPTY_LIST 0x5D
#define OP_FRAME 0x95
#define OP_GLOBAL 0x63
#define OP_INST 0x69
#define OP_POP_MARK 0x31
#define OP_BINPERSID 0x51
#define OP_BINBYTES 0x42
#define OP_SHORT_BINBYTES 0x43
#define OP_BINBYTES8 0x8E

static const char *op_name[256];
static int op_arg[256];
static int op_kind[256];

static void
init_tables(void)
{
    for (int i = 0; i < 256; i++) {
        op_name[i] = "?";
        op_arg[i] = A_NONE;
        op_kind[i] = K_BAD;
    }
#define OP(c, nm, a, k) (op_name[(c)] = (nm), op_arg[(c)] = (a), op_kind[(c)] = (k))
    OP('(', "MARK", A_NONE, K_MARK);
    OP('.', "STOP", A_NONE, K_STOP);
    OP('0', "POP", A_NONE, K_POP);
    OP('1', "POP_MARK", A_NONE, K_TOMARK0);
    OP('2', "DUP", A_NONE, K_DUP);
    OP('F', "FLOAT", A_LINE, K_PUSH);
    OP('I', "INT", A_LINE, K_PUSH);
    OP('J', "BININT", 4, K_PUSH);
    OP('K', "BININT1", 1, K_PUSH);
    OP('L', "LONG", A_LINE, K_PUSH);
    OP('M', "BININT2", 2, K_PUSH);
    OP('N', "NONE", A_NONE, K_PUSH);
    OP('P', "PERSID", A_LINE, K_REFUSE);
    OP('Q', "BINPERSID", A_NONE, K_REFUSE);
    OP('R', "REDUCE", A_NONE, K_P2);
    OP('S', "STRING", A_LINE, K_PUSH);
    OP('T', "BINSTRING", A_SLEN4, K_PUSH);
    OP('U', "SHORT_BINSTRING", A_LEN1, K_PUSH);
    OP('V', "UNICODE", A_LINE, K_PUSH);
    OP('X', "BINUNICODE", A_LEN4, K_PUSH);
    OP('a', "APPEND", A_NONE, K_POP1);
    OP('b', "BUILD", A_NONE, K_POP1);
    OP('c', "GLOBAL", A_LINE2, K_PUSH);
    OP('d', "DICT", A_NONE, K_TOMARK1);
    OP('}', "EMPTY_DICT", A_NONE, K_PUSH);
    OP('e', "APPENDS", A_NONE, K_TOMARK0);
    OP('g', "GET", A_LINE, K_GET);
    OP('h', "BINGET", 1, K_GET);
    OP('i', "INST", A_LINE2, K_TOMARK1);
    OP('j', "LONG_BINGET", 4, K_GET);
    OP('l', "LIST", A_NONE, K_TOMARK1);
    OP(']', "EMPTY_LIST", A_NONE, K_PUSH);
    OP('o', "OBJ", A_NONE, K_TOMARK1);
    OP('p', "PUT", A_LINE, K_PUT);
    OP('q', "BINPUT", 1, K_PUT);
    OP('r', "LONG_BINPUT", 4, K_PUT);
    OP('s', "SETITEM", A_NONE, K_POP2);
    OP('t', "TUPLE", A_NONE, K_TOMARK1);
    OP(')', "EMPTY_TUPLE", A_NONE, K_PUSH);
    OP('u', "SETITEMS", A_NONE, K_TOMARK0);
    OP('G', "BINFLOAT", 8, K_PUSH);
    OP(0x80, "PROTO", 1, K_PROTO);
    OP(0x81, "NEWOBJ", A_NONE, K_P2);
    OP(0x82, "EXT1", 1, K_REFUSE);
    OP(0x83, "EXT2", 2, K_REFUSE);
    OP(0x84, "EXT4", 4, K_REFUSE);
    OP(0x85, "TUPLE1", A_NONE, K_P1);
    OP(0x86, "TUPLE2", A_NONE, K_P2);
    OP(0x87, "TUPLE3", A_NONE, K_P3);
    OP(0x88, "NEWTRUE", A_NONE, K_PUSH);
    OP(0x89, "NEWFALSE", A_NONE, K_PUSH);
    OP(0x8a, "LONG1", A_LEN1, K_PUSH);
    OP(0x8b, "LONG4", A_SLEN4, K_PUSH);
    OP('B', "BINBYTES", A_LEN4, K_PUSH);
    OP('C', "SHORT_BINBYTES", A_LEN1, K_PUSH);
    OP(0x8c, "SHORT_BINUNICODE", A_LEN1, K_PUSH);
    OP(0x8d, "BINUNICODE8", A_LEN8, K_PUSH);
    OP(0x8e, "BINBYTES8", A_LEN8, K_PUSH);
    OP(0x8f, "EMPTY_SET", A_NONE, K_PUSH);
    OP(0x90, "ADDITEMS", A_NONE, K_TOMARK0);
    OP(0x91, "FROZENSET", A_NONE, K_TOMARK1);
    OP(0x92, "NEWOBJ_EX", A_NONE, K_P3);
    OP(0x93, "STACK_GLOBAL", A_NONE, K_P2);
    OP(0x94, "MEMOIZE", A_NONE, K_PUT);
    OP(0x95, "FRAME", 8, K_FRAME);
    OP(0x96, "BYTEARRAY8", A_LEN8, K_PUSH);
    OP(0x97, "NEXT_BUFFER", A_NONE, K_REFUSE);
    OP(0x98, "READONLY_BUFFER", A_NONE, K_P1);
#undef OP
}

/* ------------------------------------------------------------------------ */
/* module state (single-phase init; set by setup())                         */

static PyObject *ScanError = NULL;   /* pickle_ops.ScanError */
static PyObject *TextInt = NULL;     /* pickle_ops._text_int(buf, start, stop) or NULL: built-in twin */

/* keep an exception across calls into the C API (PyErr_Fetch is deprecated from 3.12) */
typedef struct {
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc;
#else
    PyObject *type, *value, *tb;
#endif
} saved_error;

static void
error_save(saved_error *e)
{
#if PY_VERSION_HEX >= 0x030C0000
    e->exc = PyErr_GetRaisedException();
#else
    PyErr_Fetch(&e->type, &e->value, &e->tb);
#endif
}

static void
error_restore(saved_error *e)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(e->exc);
#else
    PyErr_Restore(e->type, e->value, e->tb);
#endif
}

/* ------------------------------------------------------------------------ */
/* reading the buffer: little-endian fields and text lines                  */

static inline uint32_t
rd_u4(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint64_t
rd_u8(const unsigned char *p)
{
    return (uint64_t)rd_u4(p) | ((uint64_t)rd_u4(p + 4) << 32);
}

/* py: _line_end(buf, start, lim, lines): just past the lines-th newline below lim; -1 absent, -2 too long */
static int64_t
line_end(const unsigned char *buf, int64_t start, int64_t lim, int lines)
{
    int64_t pos = start;
    for (int i = 0; i < lines; i++) {
        int64_t stop = lim < pos + MAX_LINE ? lim : pos + MAX_LINE;
        const unsigned char *hit = stop > pos ? memchr(buf + pos, '\n', (size_t)(stop - pos)) : NULL;
        if (hit == NULL)
            return stop - pos >= MAX_LINE ? -2 : -1;
        pos = (int64_t)(hit - buf) + 1;
    }
    return pos;
}

/* py: _text_int(buf, start, stop) -> int | None (new reference) */
static PyObject *
text_int(PyObject *bufobj, const unsigned char *buf, int64_t start, int64_t stop)
{
    if (TextInt != NULL)
        return PyObject_CallFunction(TextInt, "OLL", bufobj, (long long)start, (long long)stop);
    /* py: int(bytes(buf[start:stop]).strip()), None on ValueError */
    PyObject *raw = PyBytes_FromStringAndSize((const char *)buf + start, (Py_ssize_t)(stop - start));
    if (raw == NULL)
        return NULL;
    PyObject *stripped = PyObject_CallMethod(raw, "strip", NULL);
    Py_DECREF(raw);
    if (stripped == NULL)
        return NULL;
    PyObject *v = PyObject_CallOneArg((PyObject *)&PyLong_Type, stripped);
    Py_DECREF(stripped);
    if (v == NULL && PyErr_ExceptionMatches(PyExc_ValueError)) {
        PyErr_Clear();
        v = Py_NewRef(Py_None);
    }
    return v;
}

/* classify a text int: TI_INT (value in *v), TI_NONE, TI_BIG (an int beyond 64 bits) */
enum { TI_INT, TI_NONE, TI_BIG };

static int
text_int_kind(PyObject *obj, int64_t *v)
{
    if (obj == Py_None || !PyLong_Check(obj))
        return TI_NONE;
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow) {
        *v = overflow > 0 ? INT64_MAX : INT64_MIN;
        return TI_BIG;
    }
    *v = x;
    return TI_INT;
}

/* ------------------------------------------------------------------------ */
/* a Python list of ints mirrored by a C array during one call               */
/* (written back in place on every exit: only the part from `low` changed)   */

typedef struct {
    PyObject *list; /* borrowed from the state object for the duration of the call */
    int packed;     /* 0: a list of ints; 1: a bytearray of little-endian int64 (ScanState.starts/memo_at) */
    int64_t *v;
    Py_ssize_t n, cap;
    Py_ssize_t low; /* items [0, low) are unchanged since the load */
} ivec;

static int
ivec_reserve(ivec *a, Py_ssize_t need)
{
    if (need <= a->cap)
        return 0;
    Py_ssize_t cap = a->cap ? a->cap : 16;
    while (cap < need)
        cap *= 2;
    int64_t *nv = PyMem_Realloc(a->v, (size_t)cap * sizeof(int64_t));
    if (nv == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    a->v = nv;
    a->cap = cap;
    return 0;
}

static int
ivec_load(ivec *a, PyObject *list, const char *what)
{
    if (!PyList_Check(list)) {
        PyErr_Format(PyExc_TypeError, "state attribute %s must be a list, not %.100s", what, Py_TYPE(list)->tp_name);
        return -1;
    }
    a->list = list;
    Py_ssize_t n = PyList_GET_SIZE(list);
    if (ivec_reserve(a, n + 64) < 0)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        long long x = PyLong_AsLongLong(PyList_GET_ITEM(list, i));
        if (x == -1 && PyErr_Occurred())
            return -1;
        a->v[i] = x;
    }
    a->n = a->low = n;
    return 0;
}

/* the same for a bytearray of little-endian int64 (py: starts += _pack_q(x) ... del starts[-8:]) */
static int
ivec_load_packed(ivec *a, PyObject *arr, const char *what)
{
    if (!PyByteArray_Check(arr) || PyByteArray_GET_SIZE(arr) % 8) {
        PyErr_Format(PyExc_TypeError, "state attribute %s must be a bytearray of int64 (a multiple of 8 bytes)",
                     what);
        return -1;
    }
    a->list = arr;
    a->packed = 1;
    Py_ssize_t n = PyByteArray_GET_SIZE(arr) / 8;
    if (ivec_reserve(a, n + 64) < 0)
        return -1;
    const unsigned char *p = (const unsigned char *)PyByteArray_AS_STRING(arr);
#if PY_LITTLE_ENDIAN
    if (n)
        memcpy(a->v, p, (size_t)n * 8);
#else
    for (Py_ssize_t i = 0; i < n; i++)
        a->v[i] = (int64_t)rd_u8(p + 8 * i);
#endif
    a->n = a->low = n;
    return 0;
}

/* py: list.append(x)  (always inlined: called per element and per opcode by the scan;
 * index scan of 1M small arrays 0.176 -> 0.139 s CPU, 3M strings 0.063 -> 0.056 s) */
#if defined(__GNUC__) || defined(__clang__)
#define NPYS_UNLIKELY(x) __builtin_expect(!!(x), 0)
__attribute__((always_inline))
#else
#define NPYS_UNLIKELY(x) (x)
#endif
static inline int
ivec_push(ivec *a, int64_t x)
{
    if (NPYS_UNLIKELY(a->n == a->cap) && ivec_reserve(a, a->n + 1) < 0)
        return -1;
    a->v[a->n++] = x;
    return 0;
}

static inline void
ivec_cut(ivec *a, Py_ssize_t n)
{
    a->n = n;
    if (n < a->low)
        a->low = n;
}

/* py: x = list.pop() */
static int
ivec_pop(ivec *a, int64_t *x)
{
    if (a->n == 0) {
        PyErr_SetString(PyExc_IndexError, "pop from empty list");
        return -1;
    }
    *x = a->v[a->n - 1];
    ivec_cut(a, a->n - 1);
    return 0;
}

/* py: x = list[-1] */
static int
ivec_last(ivec *a, int64_t *x)
{
    if (a->n == 0) {
        PyErr_SetString(PyExc_IndexError, "list index out of range");
        return -1;
    }
    *x = a->v[a->n - 1];
    return 0;
}

/* py: if d > list[-1]: list[-1] = d */
static int
ivec_raise_last(ivec *a, int64_t d)
{
    int64_t last;
    if (ivec_last(a, &last) < 0)
        return -1;
    if (d > last) {
        a->v[a->n - 1] = d;
        if (a->n - 1 < a->low)
            a->low = a->n - 1;
    }
    return 0;
}

/* Python's normalisation of a slice start i for a list of length n */
static Py_ssize_t
slice_start(int64_t i, Py_ssize_t n)
{
    if (i < 0) {
        i += n;
        if (i < 0)
            i = 0;
    }
    return i > n ? n : (Py_ssize_t)i;
}

/* py: del list[i:] */
static void
ivec_del_from(ivec *a, int64_t i)
{
    ivec_cut(a, slice_start(i, a->n));
}

/* py: d = max(list[-k:]); del list[-k:]   (ValueError on an empty slice, like max()) */
static int
ivec_pop_max(ivec *a, int64_t k, int64_t *d)
{
    Py_ssize_t s = slice_start(-k, a->n);
    if (s >= a->n) {
        PyErr_SetString(PyExc_ValueError, "max() arg is an empty sequence");
        return -1;
    }
    int64_t mx = a->v[s];
    for (Py_ssize_t i = s + 1; i < a->n; i++)
        if (a->v[i] > mx)
            mx = a->v[i];
    *d = mx;
    ivec_cut(a, s);
    return 0;
}

/* write the changed tail back into the Python list (in place, like the Python code's mutations) */
static int
ivec_store(ivec *a)
{
    if (a->list == NULL)
        return 0;
    if (a->packed) {
        Py_ssize_t cur = PyByteArray_GET_SIZE(a->list) / 8;
        if (a->low == cur && a->n == cur)
            return 0;
        Py_ssize_t low = a->low < cur ? a->low : cur;
        if (PyByteArray_Resize(a->list, a->n * 8) < 0)
            return -1;
        unsigned char *p = (unsigned char *)PyByteArray_AS_STRING(a->list);
#if PY_LITTLE_ENDIAN
        if (a->n > low)
            memcpy(p + 8 * low, a->v + low, (size_t)(a->n - low) * 8);
#else
        for (Py_ssize_t i = low; i < a->n; i++)
            for (int b = 0; b < 8; b++)
                p[8 * i + b] = (unsigned char)((uint64_t)a->v[i] >> (8 * b));
#endif
        a->low = a->n;
        return 0;
    }
    Py_ssize_t cur = PyList_GET_SIZE(a->list);
    if (a->low == cur && a->n == cur)
        return 0;
    Py_ssize_t low = a->low < cur ? a->low : cur;
    PyObject *tail = PyList_New(a->n - low);
    if (tail == NULL)
        return -1;
    for (Py_ssize_t i = low; i < a->n; i++) {
        PyObject *x = PyLong_FromLongLong(a->v[i]);
        if (x == NULL) {
            Py_DECREF(tail);
            return -1;
        }
        PyList_SET_ITEM(tail, i - low, x);
    }
    int r = PyList_SetSlice(a->list, low, cur, tail);
    Py_DECREF(tail);
    if (r == 0)
        a->low = a->n;
    return r;
}

static void
ivec_free(ivec *a)
{
    PyMem_Free(a->v);
    a->v = NULL;
}

/* ------------------------------------------------------------------------ */
/* attributes of the state objects                                           */

/* Attribute names as interned str objects, made once per C string literal: the scan returns to
 * Python once per 1000-element batch and reads/writes ~20 state attributes each time, and
 * PyObject_GetAttrString builds (decodes, hashes) a new str per call. */
#define NAME_CACHE 64
static const char *name_keys[NAME_CACHE];
static PyObject *name_vals[NAME_CACHE];
static int name_n = 0;

static PyObject *
attr_name(const char *name) /* borrowed (kept for the life of the module), NULL on error */
{
    for (int i = 0; i < name_n; i++)
        if (name_keys[i] == name)
            return name_vals[i];
    if (name_n == NAME_CACHE)
        return NULL;
    PyObject *s = PyUnicode_InternFromString(name);
    if (s == NULL)
        return NULL;
    name_keys[name_n] = name;
    name_vals[name_n++] = s;
    return s;
}

static PyObject *
get_attr(PyObject *o, const char *name)
{
    PyObject *k = attr_name(name);
    if (k == NULL)
        return PyErr_Occurred() ? NULL : PyObject_GetAttrString(o, name);
    return PyObject_GetAttr(o, k);
}

static int
set_attr(PyObject *o, const char *name, PyObject *v)
{
    PyObject *k = attr_name(name);
    if (k == NULL)
        return PyErr_Occurred() ? -1 : PyObject_SetAttrString(o, name, v);
    return PyObject_SetAttr(o, k, v);
}

static int
get_i64(PyObject *o, const char *name, int64_t *out)
{
    PyObject *v = get_attr(o, name);
    if (v == NULL)
        return -1;
    long long x = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred())
        return -1;
    *out = x;
    return 0;
}

static int
get_truth(PyObject *o, const char *name, int *out)
{
    PyObject *v = get_attr(o, name);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (r < 0)
        return -1;
    *out = r;
    return 0;
}

static int
set_i64(PyObject *o, const char *name, int64_t x)
{
    PyObject *v = PyLong_FromLongLong(x);
    if (v == NULL)
        return -1;
    int r = set_attr(o, name, v);
    Py_DECREF(v);
    return r;
}

static int
set_bool(PyObject *o, const char *name, int x)
{
    return set_attr(o, name, x ? Py_True : Py_False);
}

static int
dict_set_i64(PyObject *d, int64_t k, int64_t v)
{
    PyObject *key = PyLong_FromLongLong(k);
    PyObject *val = key ? PyLong_FromLongLong(v) : NULL;
    int r = val ? PyDict_SetItem(d, key, val) : -1;
    Py_XDECREF(key);
    Py_XDECREF(val);
    return r;
}

/* raise ScanError(kind, message, offset, index); index < 0 means None; steals msg */
static void
raise_scan_error(const char *kind, PyObject *msg, int64_t offset, int64_t index)
{
    if (msg == NULL)
        return;
    PyObject *idx = index < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(index);
    if (idx != NULL) {
        PyObject *exc = PyObject_CallFunction(ScanError, "sOLO", kind, msg, (long long)offset, idx);
        if (exc != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        Py_DECREF(idx);
    }
    Py_DECREF(msg);
}

/* the exact count of bytes an opcode needs, for messages: hdr + length (length may be near 2**64) */
static PyObject *
need_obj(int hdr, uint64_t length)
{
    if (length <= UINT64_MAX - (uint64_t)hdr)
        return PyLong_FromUnsignedLongLong(length + (uint64_t)hdr);
    PyObject *a = PyLong_FromUnsignedLongLong(length), *b = PyLong_FromLong(hdr);
    PyObject *r = a && b ? PyNumber_Add(a, b) : NULL;
    Py_XDECREF(a);
    Py_XDECREF(b);
    return r;
}

static int
check_args(Py_buffer *view, long long pos, long long end, long long base)
{
    if (pos < 0 || end > view->len || base < 0 || base >= INF) {
        PyErr_Format(PyExc_ValueError, "need 0 <= pos, end <= len(buf) (%zd) and 0 <= base < 2**62; got pos=%lld end=%lld base=%lld",
                     view->len, pos, end, base);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* scan_ops                                                                  */

/* py: fail()'s element index inside an APPENDS batch */
static inline int64_t
err_index_in_batch(int64_t done, int64_t slots, int push, int64_t count)
{
    int64_t cur = push ? slots : (slots > 1 ? slots - 1 : 0);
    int64_t cap = count - 1 > done ? count - 1 : done;
    return done + cur < cap ? done + cur : cap;
}

#define READS_CACHE 64 /* recent GETs: reads[idx] = offset is written to the dict on eviction / exit */

static PyObject *
scan_ops(PyObject *self, PyObject *args)
{
    PyObject *bufobj, *st;
    long long pos_ll, end_ll, base_ll;
    if (!PyArg_ParseTuple(args, "OLLLO:scan_ops", &bufobj, &pos_ll, &end_ll, &base_ll, &st))
        return NULL;
    if (ScanError == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "npystream._speedups.setup() was not called");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(bufobj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (check_args(&view, pos_ll, end_ll, base_ll) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)view.buf;
    const int64_t end = end_ll, base = base_ll;
    int64_t pos = pos_ll;

    PyObject *result = NULL, *reads = NULL, *memo_depth = NULL, *global_check = NULL, *count_obj = NULL;
    PyObject *l_marks = NULL, *l_starts = NULL, *l_memo_at = NULL, *l_dep = NULL;
    ivec marks = {0}, starts = {0}, memo_at = {0}, dep = {0};
    int64_t cache_idx[READS_CACHE], cache_off[READS_CACHE];
    for (int i = 0; i < READS_CACHE; i++)
        cache_idx[i] = INT64_MIN; /* empty */

    /* py: the locals loaded from st (the lists are mirrored by ivecs) */
    int64_t phase = 0, depth = 0, n = 0, memo = 0, memo_base = 0, done = 0, count = 0, frame_end = 0,
            data_end = -1, proto = 0, max_nesting = 0, max_slots = 0;
    int in_batch = 0, memo_seen = 0, status = ST_MORE, loaded = 0;
    int64_t fe = INF, td = -1, tbase = 0;

    if (get_i64(st, "phase", &phase) || get_i64(st, "depth", &depth) || get_i64(st, "n", &n) ||
        get_i64(st, "memo", &memo) || get_i64(st, "memo_base", &memo_base) || get_i64(st, "done", &done) ||
        get_i64(st, "data_end", &data_end) || get_i64(st, "proto", &proto) || get_i64(st, "max_nesting", &max_nesting) ||
        get_truth(st, "in_batch", &in_batch) || get_truth(st, "memo_seen", &memo_seen))
        goto finish;
    if ((count_obj = get_attr(st, "count")) == NULL)
        goto finish;
    {
        int overflow = 0;
        count = PyLong_AsLongLongAndOverflow(count_obj, &overflow);
        if (count == -1 && PyErr_Occurred())
            goto finish;
        if (overflow) /* compares like the huge Python int it is */
            count = overflow > 0 ? INT64_MAX / 2 : INT64_MIN / 2;
    }
    /* py: _max_slots(st) */
    if (max_nesting < 0 || max_nesting > (INT64_MAX / 4) / PENDING_PER_LEVEL)
        max_nesting = max_nesting < 0 ? 0 : (INT64_MAX / 4) / PENDING_PER_LEVEL;
    max_slots = count + 8 + PENDING_PER_LEVEL * max_nesting;
    {
        PyObject *fo = get_attr(st, "frame_end");
        if (fo == NULL)
            goto finish;
        int overflow = 0;
        frame_end = PyLong_AsLongLongAndOverflow(fo, &overflow);
        Py_DECREF(fo);
        if (frame_end == -1 && PyErr_Occurred())
            goto finish;
        if (overflow)
            frame_end = overflow > 0 ? INF : -INF;
    }
    if (!(reads = get_attr(st, "reads")) || !(memo_depth = get_attr(st, "memo_depth")) ||
        !(global_check = get_attr(st, "global_check")) ||
        !(l_marks = get_attr(st, "marks")) || !(l_starts = get_attr(st, "starts")) ||
        !(l_memo_at = get_attr(st, "memo_at")) || !(l_dep = get_attr(st, "dep")))
        goto finish;
    if (!PyDict_Check(reads) || !PyDict_Check(memo_depth)) {
        PyErr_SetString(PyExc_TypeError, "ScanState.reads and ScanState.memo_depth must be dicts");
        goto finish;
    }
    if (ivec_load(&marks, l_marks, "marks") || ivec_load_packed(&starts, l_starts, "starts") ||
        ivec_load_packed(&memo_at, l_memo_at, "memo_at") || ivec_load(&dep, l_dep, "dep"))
        goto finish;
    loaded = 1;

    /* py: fe = st.frame_end - base if st.frame_end < _INF else _INF */
    fe = frame_end < INF ? frame_end - base : INF;
    /* py: td, tbase = (2, 0) if in_batch else (1, 5) in the body; else -1, 0.  td: the MARK depth of
       element-level slots; tbase: stack items below the first element slot at that depth */
    if (phase == PH_BODY) {
        td = in_batch ? 2 : 1;
        tbase = in_batch ? 0 : 5;
    }

    /* py: fail(kind, msg, at, push, batch) -> the index of the element the error belongs to */
    /* outside an APPENDS batch (td == 1) every slot belongs to the one element `e APPEND` adds; in a
     * batch a slot is an element or a pending part of the last one: never past the header's count */
#define ERR_INDEX(push, batch)                                                                            \
    ((batch) ? done                                                                                       \
             : phase == PH_BODY ? (td == 1 ? done : err_index_in_batch(done, starts.n, depth == td && (push), count)) \
                                : -1)
#define FAIL(kind, push, batch, ...)                                                                       \
    do {                                                                                                   \
        raise_scan_error((kind), PyUnicode_FromFormat(__VA_ARGS__), base + pos, ERR_INDEX((push), (batch))); \
        goto finish;                                                                                       \
    } while (0)
#define FAIL_OBJ(kind, push, batch, msg)                                                \
    do {                                                                                \
        raise_scan_error((kind), (msg), base + pos, ERR_INDEX((push), (batch)));        \
        goto finish;                                                                    \
    } while (0)
#define TRY(expr)           \
    do {                    \
        if ((expr) < 0)     \
            goto finish;    \
    } while (0)

    for (;;) {
        /* py: lim = end if fe > end else fe; at a frame's end the frame is over */
        int64_t lim = fe > end ? end : fe;
        if (pos >= lim) {
            if (pos == fe) {
                fe = INF;
                continue;
            }
            break;
        }
        const unsigned char op = buf[pos];
        if (op == 0x8c && phase == PH_BODY && depth == td) {
            /* Fast path, same effect as the generic branches below: a run of elements that are
             * SHORT_BINUNICODE + MEMOIZE (a list of short strings, protocol 4): each a new
             * element-level slot (starts, memo_at, dep 0) whose memo write is the next index.
             * 3,000,000 strings: index scan 0.052 -> 0.033 s CPU (min of 9, with and without it). */
            int64_t p2 = pos;
            while (p2 + 2 <= lim && buf[p2] == 0x8c) {
                const int64_t q2 = p2 + 2 + buf[p2 + 1];
                if (q2 >= lim || buf[q2] != OP_MEMOIZE || n >= MAX_STACK - 1 || done + starts.n > max_slots)
                    break;
                TRY(ivec_push(&starts, base + p2));
                TRY(ivec_push(&memo_at, memo));
                TRY(ivec_push(&dep, 0));
                n += 1;
                memo += 1;
                memo_seen = 1;
                p2 = q2 + 1;
            }
            if (p2 != pos) {
                pos = p2;
                continue;
            }
        }
        const int a = op_arg[op];
        const int kind = op_kind[op];
        const char *name = op_name[op];
        int64_t npos;

        /* ---- where the opcode ends (nothing at or past lim is read) ---------------------------- */
        if (a == A_NONE) {
            npos = pos + 1;
        }
        else if (a > 0 && a < A_LINE) { /* fixed-size argument: its bytes are read below, once npos <= lim */
            npos = pos + 1 + a;
        }
        else if (a < 0) { /* length-prefixed payload */
            const int la = a == A_LEN1 ? 1 : (a == A_LEN8 ? 8 : 4);
            if (pos + 1 + la > lim) {
                if (fe <= end)
                    FAIL("format", 0, 0, "%s opcode straddles the end of its FRAME", name);
                break;
            }
            uint64_t length;
            if (a == A_LEN1)
                length = buf[pos + 1];
            else if (a == A_LEN4)
                length = rd_u4(buf + pos + 1);
            else if (a == A_SLEN4) {
                int64_t sl = (int32_t)rd_u4(buf + pos + 1);
                if (sl < 0)
                    FAIL("format", 1, 0, "%s has a negative length %lld", name, (long long)sl);
                length = (uint64_t)sl;
            }
            else
                length = rd_u8(buf + pos + 1);
            /* py: npos = pos + 1 + la + length, then "if npos > lim" -- compared without overflow */
            const uint64_t room = (uint64_t)(lim - pos - 1 - la);
            if (length > room) {
                if (fe <= end)
                    FAIL("format", 0, 0, "%s opcode straddles the end of its FRAME", name);
                if (data_end >= 0) {
                    int64_t rem = data_end - base - pos; /* py: st.data_end - base - pos */
                    if (rem < 1 + la || length > (uint64_t)(rem - 1 - la)) {
                        PyObject *need = need_obj(1 + la, length);
                        if (need == NULL)
                            goto finish;
                        PyObject *msg = PyUnicode_FromFormat("%s needs %S bytes, only %lld remain", name, need,
                                                             (long long)rem);
                        Py_DECREF(need);
                        FAIL_OBJ("truncated", 1, 0, msg);
                    }
                }
                break;
            }
            npos = pos + 1 + la + (int64_t)length;
        }
        else { /* text argument: one line (two for GLOBAL/INST) */
            npos = line_end(buf, pos + 1, lim, a == A_LINE2 ? 2 : 1);
            if (npos < 0) {
                if (npos == -2)
                    FAIL("format", 0, 0, "%s text argument longer than %d bytes", name, MAX_LINE);
                if (fe <= end)
                    FAIL("format", 0, 0, "%s opcode straddles the end of its FRAME", name);
                break;
            }
        }
        if (npos > lim) { /* only fixed-size arguments get here with a cut opcode */
            if (fe <= end)
                FAIL("format", 0, 0, "%s opcode straddles the end of its FRAME", name);
            if (data_end >= 0 && npos + base > data_end)
                FAIL("truncated", 1, 0, "%s needs %lld bytes, only %lld remain", name, (long long)(npos - pos),
                     (long long)(data_end - base - pos));
            break;
        }

        /* ---- stack effect: one branch per kind (py: the if/elif chain) ---------------------------- */
        int64_t d = 0;
        switch (kind) {
        case K_PUT: { /* MEMOIZE, PUT, BINPUT, LONG_BINPUT: memo indices strictly sequential */
            if (n == 0)
                FAIL("format", 0, 0, "%s with an empty stack", name);
            if (op != OP_MEMOIZE) {
                int64_t idx = 0;
                int ti = TI_INT;
                PyObject *idx_obj = NULL;
                if (op == OP_BINPUT)
                    idx = buf[pos + 1];
                else if (op == OP_LONG_BINPUT)
                    idx = rd_u4(buf + pos + 1);
                else {
                    if ((idx_obj = text_int(bufobj, buf, pos + 1, npos - 1)) == NULL)
                        goto finish;
                    ti = text_int_kind(idx_obj, &idx);
                }
                if (ti != TI_INT || idx != memo) {
                    if (!memo_seen && memo == 0 && ti == TI_INT && idx == 1) {
                        memo = 1; /* Python 2's cPickle numbers its memo from 1 */
                        memo_base = 1;
                    }
                    else {
                        PyObject *msg = idx_obj
                            ? PyUnicode_FromFormat("memo index %S written where %lld was expected (memo indices "
                                                   "must be sequential: a forged index makes unpicklers allocate "
                                                   "without bound)", idx_obj, (long long)memo)
                            : PyUnicode_FromFormat("memo index %lld written where %lld was expected (memo indices "
                                                   "must be sequential: a forged index makes unpicklers allocate "
                                                   "without bound)", (long long)idx, (long long)memo);
                        Py_XDECREF(idx_obj);
                        FAIL_OBJ("format", 0, 0, msg);
                    }
                }
                Py_XDECREF(idx_obj);
            }
            memo_seen = 1;
            /* py: if dep[-1] > MEMO_DEPTH_NOTE: st.memo_depth[memo] = dep[-1] */
            int64_t top;
            TRY(ivec_last(&dep, &top));
            if (top > MEMO_DEPTH_NOTE)
                TRY(dict_set_i64(memo_depth, memo, top));
            memo += 1;
            break;
        }
        case K_PUSH:
        case K_GET:
        case K_DUP: {
            if (phase == PH_SUFFIX)
                FAIL("format", 0, 0, "%s after the element list; numpy writes TUPLE BUILD STOP", name);
            if (kind == K_GET) {
                int64_t idx = 0;
                int ti = TI_INT;
                PyObject *idx_obj = NULL;
                if (op == OP_BINGET)
                    idx = buf[pos + 1];
                else if (op == OP_LONG_BINGET)
                    idx = rd_u4(buf + pos + 1);
                else {
                    if ((idx_obj = text_int(bufobj, buf, pos + 1, npos - 1)) == NULL)
                        goto finish;
                    ti = text_int_kind(idx_obj, &idx);
                }
                /* py: if idx is None or idx >= memo or idx < st.memo_base */
                if (ti == TI_NONE || idx >= memo || idx < memo_base) {
                    PyObject *msg = idx_obj
                        ? PyUnicode_FromFormat("memo entry %S is read before it was written", idx_obj)
                        : PyUnicode_FromFormat("memo entry %lld is read before it was written", (long long)idx);
                    Py_XDECREF(idx_obj);
                    FAIL_OBJ("format", 1, 0, msg);
                }
                Py_XDECREF(idx_obj);
                /* py: reads[idx] = base + pos (through a small cache: numpy reads a few entries often) */
                int c = (int)(idx & (READS_CACHE - 1));
                if (cache_idx[c] != idx) {
                    if (cache_idx[c] != INT64_MIN)
                        TRY(dict_set_i64(reads, cache_idx[c], cache_off[c]));
                    cache_idx[c] = idx;
                }
                cache_off[c] = base + pos;
                /* py: d = st.memo_depth.get(idx, 0) if st.memo_depth else 0 */
                if (PyDict_GET_SIZE(memo_depth)) {
                    PyObject *key = PyLong_FromLongLong(idx);
                    if (key == NULL)
                        goto finish;
                    PyObject *dv = PyDict_GetItemWithError(memo_depth, key);
                    Py_DECREF(key);
                    if (dv == NULL && PyErr_Occurred())
                        goto finish;
                    if (dv != NULL) {
                        d = PyLong_AsLongLong(dv);
                        if (d == -1 && PyErr_Occurred())
                            goto finish;
                    }
                }
            }
            else if (kind == K_DUP) {
                if (n == 0)
                    FAIL("format", 1, 0, "DUP with an empty stack");
                TRY(ivec_last(&dep, &d));
            }
            if (op == OP_EMPTY_LIST && phase == PH_PREFIX && depth == 1 && n == 4) {
                /* the element list: (1, shape, dtype, is_fortran, [ ... */
                phase = PH_BODY;
                td = 1;
                tbase = 5;
                n = 5;
                TRY(ivec_push(&dep, 0));
                TRY(set_i64(st, "body_start", base + npos));
                TRY(set_i64(st, "body_memo", memo));
                pos = npos;
                continue;
            }
            if (op == OP_GLOBAL && global_check != Py_None) { /* py: st.global_check(bytes(buf[pos+1:npos])) */
                PyObject *raw = PyBytes_FromStringAndSize((const char *)buf + pos + 1, (Py_ssize_t)(npos - pos - 1));
                if (raw == NULL)
                    goto finish;
                PyObject *msg = PyObject_CallOneArg(global_check, raw);
                Py_DECREF(raw);
                if (msg == NULL)
                    goto finish;
                int truthy = PyObject_IsTrue(msg);
                if (truthy != 0) {
                    if (truthy < 0) {
                        Py_DECREF(msg);
                        goto finish;
                    }
                    FAIL_OBJ("unsafe", 1, 0, msg);
                }
                Py_DECREF(msg);
            }
            if (n >= MAX_STACK)
                FAIL("format", 1, 0, "more than %d items on one stack level", MAX_STACK);
            if (depth == td) { /* a new element-level slot */
                if (done + starts.n > max_slots)
                    FAIL("format", 0, 1,
                         "the pickle holds more elements than the header's %S, or an element nests deeper than "
                         "MAX_NESTING=%lld levels (%lld objects pending on the element list)",
                         count_obj, (long long)max_nesting, (long long)(max_slots - count));
                TRY(ivec_push(&starts, base + pos));
                TRY(ivec_push(&memo_at, memo));
            }
            n += 1;
            TRY(ivec_push(&dep, d));
            break;
        }
        case K_P1:
        case K_P2:
        case K_P3:
        case K_POP1:
        case K_POP2: {
            /* py: pops = _POPS[kind]; pushes = 1 if kind <= K_P3 else 0 */
            const int pops = (kind == K_P1 || kind == K_POP1) ? 1 : (kind == K_P3 ? 3 : 2);
            const int pushes = kind <= K_P3;
            const int need = pops + 1 - pushes; /* APPEND/BUILD/SETITEM also need their container */
            if (n < need)
                FAIL("format", 0, 0, "%s needs %d stack items, %lld available", name, need, (long long)n);
            if (depth == td) {
                if (op == OP_APPEND && !in_batch && n == 6) {
                    /* a batch of one element: "e APPEND" */
                    n = 5;
                    TRY(ivec_pop(&dep, &d));
                    d += 1;
                    TRY(ivec_raise_last(&dep, d));
                    TRY(set_i64(st, "batch_end", base + pos));
                    done += starts.n;
                    if (done > count)
                        FAIL("format", 0, 0, "the pickle holds more elements than the header's %S", count_obj);
                    status = ST_BATCH;
                    pos = npos;
                    goto stop;
                }
                if (n - tbase < pops + 1 - pushes)
                    FAIL("format", 0, 0, "%s reaches into the element list", name);
                /* the slots consumed become part of the slot below (their starts are dropped) */
                const int64_t k = starts.n;
                if (pushes) {
                    if (pops > 1) {
                        ivec_del_from(&starts, k - pops + 1);
                        ivec_del_from(&memo_at, k - pops + 1);
                    }
                }
                else {
                    ivec_del_from(&starts, k - pops);
                    ivec_del_from(&memo_at, k - pops);
                }
            }
            else if (phase == PH_SUFFIX) {
                if (op != OP_BUILD || n != 2 || depth != 0)
                    FAIL("format", 0, 0, "%s after the element list; numpy writes TUPLE BUILD STOP", name);
            }
            n = n - pops + pushes;
            TRY(ivec_pop_max(&dep, pops, &d));
            d += 1;
            if (pushes)
                TRY(ivec_push(&dep, d));
            else
                TRY(ivec_raise_last(&dep, d));
            if (d > max_nesting)
                FAIL("format", 0, 0,
                     "objects nested more than %lld deep (npystream.formats.pickle_ops.MAX_NESTING; raise it, "
                     "and sys.setrecursionlimit, for deeper data)",
                     (long long)max_nesting);
            break;
        }
        case K_MARK: {
            if (phase == PH_SUFFIX)
                FAIL("format", 0, 0, "MARK after the element list; numpy writes TUPLE BUILD STOP");
            if (depth >= MAX_MARK_DEPTH)
                FAIL("format", 1, 0, "MARKs nested deeper than %d", MAX_MARK_DEPTH);
            if (depth == 1 && n == 5 && phase == PH_BODY) { /* the MARK of an APPENDS batch */
                in_batch = 1;
                td = 2;
                tbase = 0;
            }
            TRY(ivec_push(&marks, n));
            TRY(ivec_push(&marks, base + pos));
            TRY(ivec_push(&marks, memo));
            depth += 1;
            n = 0;
            break;
        }
        case K_TOMARK1:
        case K_TOMARK0: {
            if (depth == 0)
                FAIL("format", 0, 0, "%s without an open MARK", name);
            if (op == OP_INST && global_check != Py_None) {
                PyObject *raw = PyBytes_FromStringAndSize((const char *)buf + pos + 1, (Py_ssize_t)(npos - pos - 1));
                if (raw == NULL)
                    goto finish;
                PyObject *msg = PyObject_CallOneArg(global_check, raw);
                Py_DECREF(raw);
                if (msg == NULL)
                    goto finish;
                int truthy = PyObject_IsTrue(msg);
                if (truthy != 0) {
                    if (truthy < 0) {
                        Py_DECREF(msg);
                        goto finish;
                    }
                    FAIL_OBJ("unsafe", 0, 0, msg);
                }
                Py_DECREF(msg);
            }
            const int64_t inner = n;
            if (inner) {
                TRY(ivec_pop_max(&dep, inner, &d));
                d += 1;
            }
            else
                d = 1;
            if (d > max_nesting)
                FAIL("format", 0, 0,
                     "objects nested more than %lld deep (npystream.formats.pickle_ops.MAX_NESTING; raise it, "
                     "and sys.setrecursionlimit, for deeper data)",
                     (long long)max_nesting);
            int64_t mark_memo, mark_off;
            TRY(ivec_pop(&marks, &mark_memo));
            TRY(ivec_pop(&marks, &mark_off));
            TRY(ivec_pop(&marks, &n));
            depth -= 1;
            if (phase == PH_BODY && depth == 1 && in_batch && kind == K_TOMARK1) {
                /* The MARK taken for an APPENDS batch was the first opcode of a single element that
                 * numpy appends alone (`e APPEND`: a 0-d or one-element array, or a batch of one
                 * after 1000s) and that starts with a MARK (a frozenset, a tuple of 4+ items): its
                 * slots were that element's insides; it is one element-level slot now. */
                in_batch = 0;
                td = 1;
                tbase = 5;
                ivec_cut(&starts, 0);
                ivec_cut(&memo_at, 0);
            }
            if (phase == PH_BODY && (depth == 0 || (depth == 1 && in_batch))) {
                if (depth == 1) { /* closing an APPENDS batch */
                    if (op != OP_APPENDS)
                        FAIL("format", 0, 0, "%s closes the element batch; numpy writes APPENDS", name);
                    in_batch = 0;
                    td = 1;
                    tbase = 5;
                    TRY(ivec_raise_last(&dep, d));
                    TRY(set_i64(st, "batch_end", base + pos));
                    done += starts.n;
                    if (done > count)
                        FAIL("format", 0, 0, "the pickle holds more elements than the header's %S", count_obj);
                    status = ST_BATCH;
                    pos = npos;
                    goto stop;
                }
                /* depth 0: the TUPLE closing the array state ends the element list */
                if (op != OP_TUPLE || inner != 5 || n != 1)
                    FAIL("format", 0, 0,
                         "%s with %lld items ends the array state; numpy writes TUPLE after (1, shape, dtype, "
                         "is_fortran, list)",
                         name, (long long)inner);
                phase = PH_SUFFIX;
                td = -1;
                n = 2;
                TRY(ivec_push(&dep, d));
            }
            else if (kind == K_TOMARK1) {
                if (phase == PH_SUFFIX)
                    FAIL("format", 0, 0, "%s after the element list", name);
                if (depth == td) {
                    TRY(ivec_push(&starts, mark_off));
                    TRY(ivec_push(&memo_at, mark_memo));
                }
                n += 1;
                TRY(ivec_push(&dep, d));
            }
            else if (op != OP_POP_MARK) { /* APPENDS/SETITEMS/ADDITEMS modify the item below the MARK */
                if (n == 0 || (depth == td && n <= tbase))
                    FAIL("format", 0, 0, "%s has no container below its MARK", name);
                TRY(ivec_raise_last(&dep, d));
            }
            break;
        }
        case K_POP: {
            if (phase == PH_SUFFIX)
                FAIL("format", 0, 0, "POP after the element list");
            if (n == 0) {
                if (depth == 0)
                    FAIL("format", 0, 0, "POP with an empty stack");
                int64_t ignored;
                TRY(ivec_pop(&marks, &ignored));
                TRY(ivec_pop(&marks, &ignored));
                TRY(ivec_pop(&marks, &n));
                depth -= 1;
                if (phase == PH_BODY && depth <= 1)
                    FAIL("format", 0, 0, "POP removes a MARK of the array state");
            }
            else {
                if (depth == td) {
                    if (n <= tbase)
                        FAIL("format", 0, 0, "POP reaches into the element list");
                    ivec_del_from(&starts, -1); /* py: del starts[-8:]; del memo_at[-8:] */
                    ivec_del_from(&memo_at, -1);
                }
                n -= 1;
                TRY(ivec_pop(&dep, &d));
            }
            break;
        }
        case K_FRAME: {
            if (fe < INF && pos < fe)
                FAIL("format", 0, 0, "FRAME inside another FRAME");
            const uint64_t flen = rd_u8(buf + pos + 1);
            if (data_end >= 0) { /* py: npos + base + flen > st.data_end */
                const int64_t rem = data_end - base - npos;
                if (rem < 0 || flen > (uint64_t)rem)
                    FAIL("truncated", 0, 0, "FRAME of %llu bytes but only %lld bytes remain in the file",
                         (unsigned long long)flen, (long long)rem);
            }
            if (flen > ((uint64_t)1 << 48))
                FAIL("format", 0, 0, "FRAME length %llu is absurd", (unsigned long long)flen);
            fe = npos + (int64_t)flen;
            pos = npos;
            continue;
        }
        case K_PROTO: {
            if (phase != PH_PREFIX || n || depth || proto || memo_seen)
                FAIL("format", 0, 0, "PROTO opcode in the middle of the pickle");
            const int p = buf[pos + 1];
            if (p > 5)
                FAIL("format", 0, 0, "pickle protocol %d is newer than 5", p);
            proto = p;
            TRY(set_i64(st, "proto", p));
            break;
        }
        case K_STOP: {
            if (phase != PH_SUFFIX || depth != 0 || n != 1) {
                if (phase == PH_BODY)
                    FAIL("format", 0, 0, "STOP inside the element list (open MARKs: %lld)", (long long)depth);
                if (phase == PH_PREFIX)
                    FAIL("format", 0, 0, "STOP before any element list: not an object array as np.save writes it");
                FAIL("format", 0, 0, "STOP with %lld stack items and %lld open MARKs; expected 1 and 0", (long long)n,
                     (long long)depth);
            }
            phase = PH_DONE;
            status = ST_DONE;
            pos = npos;
            goto stop;
        }
        case K_REFUSE:
            FAIL("unsafe", op != OP_BINPERSID, 0,
                 "%s opcode refused: persistent ids, extension codes and out-of-band buffers are never written by "
                 "np.save",
                 name);
        default: {
            char text[48];
            snprintf(text, sizeof text, "unknown pickle opcode 0x%02x", (unsigned)op);
            FAIL("format", 1, 0, "%s", text);
        }
        }
        pos = npos;
    }
stop:
    result = PyLong_FromLongLong(pos);

finish:
    /* py: finally: write the state back -- on every exit, errors included */
    if (loaded) {
        saved_error err = {0};
        int had_error = result == NULL;
        if (had_error)
            error_save(&err);
        int bad = 0;
        for (int i = 0; i < READS_CACHE; i++)
            if (cache_idx[i] != INT64_MIN && dict_set_i64(reads, cache_idx[i], cache_off[i]) < 0)
                bad = 1;
        if (ivec_store(&marks) || ivec_store(&starts) || ivec_store(&memo_at) || ivec_store(&dep))
            bad = 1;
        if (set_i64(st, "phase", phase) || set_i64(st, "depth", depth) || set_i64(st, "n", n) ||
            set_i64(st, "memo", memo) || set_bool(st, "in_batch", in_batch) || set_i64(st, "done", done) ||
            set_i64(st, "frame_end", fe < INF ? fe + base : INF) || set_i64(st, "status", status))
            bad = 1;
        /* written by the Python code as they change (here: once) */
        if (memo_base && set_i64(st, "memo_base", memo_base))
            bad = 1;
        if (memo_seen && set_bool(st, "memo_seen", 1))
            bad = 1;
        if (had_error) {
            if (bad)
                PyErr_Clear();
            error_restore(&err);
        }
        else if (bad)
            Py_CLEAR(result);
    }
    ivec_free(&marks);
    ivec_free(&starts);
    ivec_free(&memo_at);
    ivec_free(&dep);
    Py_XDECREF(reads);
    Py_XDECREF(memo_depth);
    Py_XDECREF(global_check);
    Py_XDECREF(count_obj);
    Py_XDECREF(l_marks);
    Py_XDECREF(l_starts);
    Py_XDECREF(l_memo_at);
    Py_XDECREF(l_dep);
    PyBuffer_Release(&view);
    return result;
#undef ERR_INDEX
#undef FAIL
#undef FAIL_OBJ
#undef TRY
}

/* ------------------------------------------------------------------------ */
/* rewrite_ops                                                               */

/* append k bytes to the bytearray out (PyByteArray_Resize over-allocates: amortised growth) */
static int
out_put(PyObject *out, const void *p, Py_ssize_t k)
{
    if (k <= 0)
        return 0;
    Py_ssize_t old = PyByteArray_GET_SIZE(out);
    if (PyByteArray_Resize(out, old + k) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(out) + old, p, (size_t)k);
    return 0;
}

/* py: _PUT_CODES[s] if s < 256 else b"r" + _pack_I(s)   (and the same for GET: h / j) */
static int
out_slot(PyObject *out, unsigned char short_op, unsigned char long_op, int64_t s)
{
    unsigned char tmp[5];
    if (s < 0 || s > (int64_t)UINT32_MAX) {
        PyErr_Format(PyExc_OverflowError, "memo slot %lld out of range", (long long)s);
        return -1;
    }
    if (s < 256) {
        tmp[0] = short_op;
        tmp[1] = (unsigned char)s;
        return out_put(out, tmp, 2);
    }
    tmp[0] = long_op;
    for (int i = 0; i < 4; i++)
        tmp[1 + i] = (unsigned char)((uint64_t)s >> (8 * i));
    return out_put(out, tmp, 5);
}

/* py: m in rw.live.  Small live tables (numpy files read back a handful of entries) are copied into a
   sorted C array once per call; larger ones are looked up in the dict. */
#define LIVE_SMALL 64
typedef struct {
    PyObject *dict; /* NULL: live is None (every write is live) */
    int small;      /* keys copied into `keys` */
    Py_ssize_t nkeys;
    int64_t keys[LIVE_SMALL];
} live_set;

static int
live_init(live_set *ls, PyObject *live)
{
    ls->dict = live == Py_None ? NULL : live;
    ls->small = 0;
    ls->nkeys = 0;
    if (ls->dict == NULL || PyDict_GET_SIZE(live) > LIVE_SMALL)
        return 0;
    PyObject *k, *v;
    Py_ssize_t it = 0;
    while (PyDict_Next(live, &it, &k, &v)) {
        if (!PyLong_CheckExact(k))
            return 0; /* exotic keys: use the dict */
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(k, &overflow);
        if (overflow)
            return 0;
        if (x == -1 && PyErr_Occurred())
            return -1;
        Py_ssize_t i = ls->nkeys++; /* insertion sort: at most LIVE_SMALL keys */
        while (i > 0 && ls->keys[i - 1] > x) {
            ls->keys[i] = ls->keys[i - 1];
            i--;
        }
        ls->keys[i] = x;
    }
    ls->small = 1;
    return 0;
}

/* 1 live, 0 not, -1 error */
static int
live_has(live_set *ls, int64_t m)
{
    if (ls->dict == NULL)
        return 1;
    if (ls->small) {
        Py_ssize_t lo = 0, hi = ls->nkeys;
        while (lo < hi) {
            Py_ssize_t mid = (lo + hi) / 2;
            if (ls->keys[mid] < m)
                lo = mid + 1;
            else
                hi = mid;
        }
        return lo < ls->nkeys && ls->keys[lo] == m;
    }
    PyObject *key = PyLong_FromLongLong(m);
    if (key == NULL)
        return -1;
    int r = PyDict_Contains(ls->dict, key);
    Py_DECREF(key);
    return r;
}

/* py: _zero_copy_target(buf, q, end, memo, live): after a BINBYTES payload ending at q, is it an ndarray
   state's raw data (FRAME/memo writes, TUPLE, FRAME/memo writes, BUILD) whose own memo entry is not live?
   1 yes, 0 no, -1 error.  A memo write whose argument runs past end answers 0, as the Python loop would. */
static int
zero_copy_target(const unsigned char *buf, int64_t q, int64_t end, int64_t memo, live_set *live)
{
    int seen_tuple = 0, own_memo = 1;
    while (q < end) {
        const unsigned char op = buf[q];
        if (op == OP_FRAME) {
            q += 9;
        }
        else if (op == OP_MEMOIZE || op == OP_BINPUT || op == OP_LONG_BINPUT) {
            int64_t m;
            if (op == OP_MEMOIZE) {
                m = memo;
                q += 1;
            }
            else if (op == OP_BINPUT) {
                if (q + 2 > end)
                    return 0;
                m = buf[q + 1];
                q += 2;
            }
            else {
                if (q + 5 > end)
                    return 0;
                m = rd_u4(buf + q + 1);
                q += 5;
            }
            if (own_memo && !seen_tuple) {
                int l = live_has(live, m);
                if (l != 0)
                    return l < 0 ? -1 : 0; /* the bytes object itself is read again elsewhere */
            }
            memo = m + 1;
            own_memo = 0;
        }
        else if (op == OP_TUPLE && !seen_tuple) {
            seen_tuple = 1;
            own_memo = 0;
            q += 1;
        }
        else if (op == OP_BUILD && seen_tuple) {
            return 1;
        }
        else
            return 0;
    }
    return 0;
}

#define GET_CACHE 64 /* slot_of / live lookups of recent GETs (invalidated when a PUT rebinds the index) */

static PyObject *
rewrite_ops(PyObject *self, PyObject *args)
{
    PyObject *bufobj, *rw, *out;
    long long pos_ll, end_ll, base_ll;
    if (!PyArg_ParseTuple(args, "OLLLOO:rewrite_ops", &bufobj, &pos_ll, &end_ll, &base_ll, &rw, &out))
        return NULL;
    if (ScanError == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "npystream._speedups.setup() was not called");
        return NULL;
    }
    if (!PyByteArray_Check(out)) {
        PyErr_Format(PyExc_TypeError, "out must be a bytearray, not %.100s", Py_TYPE(out)->tp_name);
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(bufobj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (check_args(&view, pos_ll, end_ll, base_ll) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)view.buf;
    const int64_t end = end_ll, base = base_ll;
    int64_t pos = pos_ll;

    PyObject *result = NULL, *slot_of = NULL, *live = NULL, *free_list = NULL, *fresh = NULL, *freed = NULL;
    int64_t memo = 0, nslots = 0, nslots0 = 0;
    int zero_copy = 0, free_on_read = 0, status = RW_OK, loaded = 0;
    live_set ls;
    int64_t gc_m[GET_CACHE], gc_s[GET_CACHE], gc_last[GET_CACHE];
    for (int i = 0; i < GET_CACHE; i++)
        gc_m[i] = -1;

    /* py: memo = rw.memo; slot_of = rw.slot_of; live = rw.live; ... */
    if (get_i64(rw, "memo", &memo) || get_i64(rw, "nslots", &nslots) || get_truth(rw, "zero_copy", &zero_copy) ||
        get_truth(rw, "free_on_read", &free_on_read))
        goto finish;
    nslots0 = nslots;
    if (!(slot_of = get_attr(rw, "slot_of")) || !(live = get_attr(rw, "live")) ||
        !(free_list = get_attr(rw, "free")) || !(fresh = get_attr(rw, "fresh")) ||
        !(freed = get_attr(rw, "freed")))
        goto finish;
    if (!PyDict_Check(slot_of) || !PyList_Check(free_list) || !PyList_Check(fresh) || !PyList_Check(freed) ||
        (live != Py_None && !PyDict_Check(live))) {
        PyErr_SetString(PyExc_TypeError,
                        "RewriteState: slot_of must be a dict, live a dict or None, free/fresh/freed lists");
        goto finish;
    }
    if (live_init(&ls, live) < 0)
        goto finish;
    free_on_read = free_on_read && live != Py_None; /* py: rw.free_on_read and live is not None */
    loaded = 1;

    int64_t run = pos; /* start of the bytes not yet copied to out */
#define FLUSH()                                                                               \
    do {                                                                                      \
        if (run < pos && out_put(out, buf + run, (Py_ssize_t)(pos - run)) < 0)                \
            goto finish;                                                                      \
    } while (0)
#define TRY(expr)           \
    do {                    \
        if ((expr) < 0)     \
            goto finish;    \
    } while (0)

    while (pos < end) {
        const unsigned char op = buf[pos];
        const int a = op_arg[op];
        int64_t npos = end + 1; /* "runs past the end" unless computed below */
        /* ---- where the opcode ends; its length field must itself lie before end ---------------- */
        if (a == A_NONE)
            npos = pos + 1;
        else if (a > 0 && a < A_LINE)
            npos = pos + 1 + a;
        else if (a == A_LEN1) {
            if (pos + 2 <= end)
                npos = pos + 2 + buf[pos + 1];
        }
        else if (a == A_LEN4 || a == A_SLEN4) { /* py reads both as unsigned here (scan_ops checked the sign) */
            if (pos + 5 <= end)
                npos = pos + 5 + (int64_t)rd_u4(buf + pos + 1);
        }
        else if (a == A_LEN8) {
            if (pos + 9 <= end) {
                uint64_t length = rd_u8(buf + pos + 1);
                if (length <= (uint64_t)(end - pos - 9))
                    npos = pos + 9 + (int64_t)length;
            }
        }
        else {
            npos = line_end(buf, pos + 1, end, a == A_LINE2 ? 2 : 1);
            if (npos < 0)
                npos = end + 1;
        }
        if (npos > end) {
            raise_scan_error("format",
                             PyUnicode_FromFormat("%s at the end of an element runs past it: the offset index "
                                                  "does not match this file (rebuild it)",
                                                  op_name[op]),
                             base + pos, -1);
            goto finish;
        }

        switch (op_kind[op]) {
        case K_PUT: { /* a memo write: kept (in a slot) only if somebody reads it */
            if (op != OP_MEMOIZE) {
                if (op == OP_BINPUT)
                    memo = buf[pos + 1];
                else if (op == OP_LONG_BINPUT)
                    memo = rd_u4(buf + pos + 1);
                else { /* py: _text_int(...) or 0 */
                    PyObject *v = text_int(bufobj, buf, pos + 1, npos - 1);
                    if (v == NULL)
                        goto finish;
                    int64_t x = 0;
                    int ti = text_int_kind(v, &x);
                    Py_DECREF(v);
                    if (ti == TI_BIG) {
                        PyErr_SetString(PyExc_OverflowError, "PUT memo index beyond 64 bits");
                        goto finish;
                    }
                    memo = ti == TI_NONE ? 0 : x;
                }
            }
            const int64_t m = memo;
            memo += 1;
            FLUSH();
            int l = live_has(&ls, m);
            TRY(l);
            if (l) {
                int64_t s;
                Py_ssize_t nf = PyList_GET_SIZE(free_list);
                if (nf) { /* py: s = free.pop() */
                    s = PyLong_AsLongLong(PyList_GET_ITEM(free_list, nf - 1));
                    if (s == -1 && PyErr_Occurred())
                        goto finish;
                    TRY(PyList_SetSlice(free_list, nf - 1, nf, NULL));
                }
                else
                    s = nslots++; /* py: s = rw.nslots; rw.nslots = s + 1 */
                TRY(dict_set_i64(slot_of, m, s));
                PyObject *mo = PyLong_FromLongLong(m);
                if (mo == NULL)
                    goto finish;
                int r = PyList_Append(fresh, mo);
                Py_DECREF(mo);
                TRY(r);
                TRY(out_slot(out, 'q', 'r', s));
                const int c = (int)(m & (GET_CACHE - 1));
                if (gc_m[c] == m)
                    gc_m[c] = -1; /* slot_of[m] changed */
            }
            run = npos;
            break;
        }
        case K_GET: { /* a memo read: the slot of m, or stop at RW_MISSING */
            PyObject *key = NULL; /* set for text GETs: m may not fit in 64 bits */
            int64_t m = 0, s = 0, last = -1;
            int cached = 0;
            if (op == OP_BINGET)
                m = buf[pos + 1];
            else if (op == OP_LONG_BINGET)
                m = rd_u4(buf + pos + 1);
            else { /* py: _text_int(...) or 0 */
                PyObject *v = text_int(bufobj, buf, pos + 1, npos - 1);
                if (v == NULL)
                    goto finish;
                int ti = text_int_kind(v, &m);
                if (ti == TI_NONE) {
                    Py_DECREF(v);
                    m = 0;
                }
                else if (ti == TI_BIG)
                    key = v;
                else
                    Py_DECREF(v);
            }
            const int c = (int)(m & (GET_CACHE - 1));
            if (key == NULL && m >= 0 && gc_m[c] == m) {
                s = gc_s[c];
                last = gc_last[c];
                cached = 1;
            }
            else {
                if (key == NULL && (key = PyLong_FromLongLong(m)) == NULL)
                    goto finish;
                PyObject *sv = PyDict_GetItemWithError(slot_of, key); /* py: s = slot_of.get(m) */
                if (sv == NULL || sv == Py_None) {
                    if (PyErr_Occurred()) {
                        Py_DECREF(key);
                        goto finish;
                    }
                    FLUSH(); /* (key is released below) */
                    run = pos;
                    int r = set_attr(rw, "missing", key); /* py: rw.missing = m */
                    Py_DECREF(key);
                    TRY(r);
                    status = RW_MISSING;
                    goto stop;
                }
                s = PyLong_AsLongLong(sv);
                if (s == -1 && PyErr_Occurred()) {
                    Py_DECREF(key);
                    goto finish;
                }
                if (free_on_read) { /* py: live.get(m) == base + pos, as an int compare */
                    PyObject *lv = PyDict_GetItemWithError(live, key);
                    if (lv == NULL && PyErr_Occurred()) {
                        Py_DECREF(key);
                        goto finish;
                    }
                    if (lv != NULL && PyLong_Check(lv)) {
                        int overflow = 0;
                        last = PyLong_AsLongLongAndOverflow(lv, &overflow);
                        if (overflow || last < 0)
                            last = -1; /* never equal to a (non-negative) offset */
                    }
                    else
                        last = -1;
                    if (last == -1 && PyErr_Occurred()) {
                        Py_DECREF(key);
                        goto finish;
                    }
                }
                Py_DECREF(key);
            }
            if (!cached && m >= 0) {
                gc_m[c] = m;
                gc_s[c] = s;
                gc_last[c] = last;
            }
            FLUSH();
            TRY(out_slot(out, 'h', 'j', s));
            if (free_on_read && last == base + pos) { /* m's last read: the caller releases its slot */
                PyObject *mo = PyLong_FromLongLong(m), *so = PyLong_FromLongLong(s);
                int r = (mo && so && PyList_Append(freed, mo) == 0 && PyList_Append(freed, so) == 0) ? 0 : -1;
                Py_XDECREF(mo);
                Py_XDECREF(so);
                TRY(r);
            }
            run = npos;
            break;
        }
        case K_FRAME: /* dropped: the program is not framed */
            FLUSH();
            run = npos;
            break;
        default:
            if (zero_copy && (op == OP_BINBYTES || op == OP_SHORT_BINBYTES || op == OP_BINBYTES8)) {
                int t = zero_copy_target(buf, npos, end, memo, &ls);
                TRY(t);
                if (t) { /* py: LONG1 offset LONG1 length TUPLE2 BINPERSID */
                    FLUSH();
                    const int64_t hdr = op == OP_SHORT_BINBYTES ? 2 : (op == OP_BINBYTES ? 5 : 9);
                    const int64_t off = base + pos + hdr, len = npos - pos - hdr;
                    unsigned char tmp[22];
                    tmp[0] = 0x8a;
                    tmp[1] = 8;
                    for (int i = 0; i < 8; i++)
                        tmp[2 + i] = (unsigned char)((uint64_t)off >> (8 * i));
                    tmp[10] = 0x8a;
                    tmp[11] = 8;
                    for (int i = 0; i < 8; i++)
                        tmp[12 + i] = (unsigned char)((uint64_t)len >> (8 * i));
                    tmp[20] = 0x86;
                    tmp[21] = 'Q';
                    TRY(out_put(out, tmp, 22));
                    run = npos;
                }
            }
            break;
        }
        pos = npos;
    }
    FLUSH(); /* py: if status == RW_OK and run < pos: out += buf[run:pos] */
stop:
    /* py: rw.memo = memo; rw.status = status  (only on a normal return, like the Python code) */
    if (set_i64(rw, "memo", memo) == 0 && set_i64(rw, "status", status) == 0)
        result = PyLong_FromLongLong(pos);
#undef FLUSH
#undef TRY

finish:
    /* py writes rw.nslots as it allocates: on every exit */
    if (loaded && nslots != nslots0) {
        saved_error err = {0};
        int had_error = result == NULL;
        if (had_error)
            error_save(&err);
        if (set_i64(rw, "nslots", nslots) < 0) {
            if (had_error)
                PyErr_Clear();
            else
                Py_CLEAR(result);
        }
        if (had_error)
            error_restore(&err);
    }
    Py_XDECREF(slot_of);
    Py_XDECREF(live);
    Py_XDECREF(free_list);
    Py_XDECREF(fresh);
    Py_XDECREF(freed);
    PyBuffer_Release(&view);
    return result;
}

/* ------------------------------------------------------------------------ */
/* module                                                                    */

static PyObject *
setup(PyObject *self, PyObject *args)
{
    PyObject *err, *st_cls, *rw_cls, *ti = NULL;
    if (!PyArg_ParseTuple(args, "OOO|O:setup", &err, &st_cls, &rw_cls, &ti))
        return NULL;
    if (!PyExceptionClass_Check(err) || !PyType_Check(st_cls) || !PyType_Check(rw_cls)) {
        PyErr_SetString(PyExc_TypeError, "setup(ScanError, ScanState, RewriteState[, text_int]): wrong types");
        return NULL;
    }
    if (ti == Py_None)
        ti = NULL;
    if (ti != NULL && !PyCallable_Check(ti)) {
        PyErr_SetString(PyExc_TypeError, "setup(): text_int must be callable");
        return NULL;
    }
    PyObject *old = ScanError;
    ScanError = Py_NewRef(err);
    Py_XDECREF(old);
    old = TextInt;
    TextInt = ti ? Py_NewRef(ti) : NULL;
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyObject *
tables(PyObject *self, PyObject *noargs)
{
    PyObject *names = PyList_New(256), *argl = PyList_New(256), *kinds = PyList_New(256);
    PyObject *consts = NULL, *r = NULL;
    if (!names || !argl || !kinds)
        goto done;
    for (int i = 0; i < 256; i++) {
        PyObject *a = PyUnicode_FromString(op_name[i]), *b = PyLong_FromLong(op_arg[i]), *c = PyLong_FromLong(op_kind[i]);
        if (a)
            PyList_SET_ITEM(names, i, a);
        if (b)
            PyList_SET_ITEM(argl, i, b);
        if (c)
            PyList_SET_ITEM(kinds, i, c);
        if (!a || !b || !c)
            goto done;
    }
    consts = Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:L,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "MAX_MARK_DEPTH",
                           MAX_MARK_DEPTH, "MAX_STACK", MAX_STACK, "MAX_NESTING", MAX_NESTING, "PENDING_PER_LEVEL", PENDING_PER_LEVEL, "MEMO_DEPTH_NOTE",
                           MEMO_DEPTH_NOTE, "MAX_LINE", MAX_LINE, "_INF", (long long)INF, "PH_PREFIX", PH_PREFIX,
                           "PH_BODY", PH_BODY, "PH_SUFFIX", PH_SUFFIX, "PH_DONE", PH_DONE, "ST_MORE", ST_MORE,
                           "ST_BATCH", ST_BATCH, "ST_DONE", ST_DONE, "RW_OK", RW_OK, "RW_MISSING", RW_MISSING);
    if (consts)
        r = PyTuple_Pack(4, names, argl, kinds, consts);
done:
    Py_XDECREF(names);
    Py_XDECREF(argl);
    Py_XDECREF(kinds);
    Py_XDECREF(consts);
    return r;
}

static PyMethodDef methods[] = {
    {"scan_ops", scan_ops, METH_VARARGS,
     "scan_ops(buf, pos, end, base, st) -> int\n\nC twin of npystream.formats.pickle_ops.scan_ops (same contract)."},
    {"rewrite_ops", rewrite_ops, METH_VARARGS,
     "rewrite_ops(buf, pos, end, base, rw, out) -> int\n\nC twin of npystream.formats.pickle_ops.rewrite_ops."},
    {"setup", setup, METH_VARARGS,
     "setup(ScanError, ScanState, RewriteState[, text_int])\n\nRegister pickle_walk's exception class (and text-int "
     "parser)."},
    {"_tables", tables, METH_NOARGS, "The opcode table and limits compiled in (for the tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "npystream._speedups",
    "C twins of the pickle walker's two hot loops (npystream.formats.pickle_ops.scan_ops / rewrite_ops).", -1,
    methods, NULL, NULL, NULL, NULL,
};

/* Safe-mode array building (engineer "stream") may live in npystream/_speedups_build.c, which setup.py's
   _speedups*.c glob compiles into this module; it adds its names to the module through this hook.  A weak
   reference, so that the module builds and works without that file. */
#if defined(__GNUC__) || defined(__clang__)
extern int npystream_build_init(PyObject *module) __attribute__((weak));
#define HAVE_BUILD_HOOK 1
#endif

PyMODINIT_FUNC
PyInit__speedups(void)
{
    init_tables();
    PyObject *m = PyModule_Create(&moduledef);
#ifdef HAVE_BUILD_HOOK
    if (m != NULL && npystream_build_init != NULL && npystream_build_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#endif
    return m;
}
