/*
 * npystream._speedups: C twins of the two hot loops of npystream/formats/pickle_walk.py.
 *
 *   scan_ops(buf, pos, end, base, st)          -> new pos   (index/liveness scanner)
 *   rewrite_ops(buf, pos, end, base, rw, out)  -> new pos   (chunk rewriter)
 *   setup(ScanError, ScanState, RewriteState, text_int)     (called once by pickle_walk)
 *
 * The contracts are the docstrings of the Python functions of the same name;
 * the results (state written back, errors with kind/offset/index) are
 * identical, which tests/test_objects_walk.py checks case by case.  The
 * package works without this module (NPYSTREAM_PURE_PYTHON=1 or no compiler).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* argument layouts (pickle_walk.A_*) */
#define A_NONE 0
#define A_LINE 100
#define A_LINE2 200
/* stack effect kinds (pickle_walk.K_*) */
enum { K_PUSH, K_P1, K_P2, K_P3, K_POP1, K_POP2, K_POP, K_MARK, K_TOMARK1, K_TOMARK0, K_PUT, K_GET,
       K_DUP, K_FRAME, K_PROTO, K_STOP, K_REFUSE, K_BAD };
enum { PH_PREFIX, PH_BODY, PH_SUFFIX, PH_DONE };
enum { ST_MORE, ST_BATCH, ST_DONE };
enum { RW_OK, RW_MISSING };

#define INF_OFF ((int64_t)1 << 62)
#define MAX_MARK_DEPTH 1000
#define MAX_STACK (1 << 20)
#define MAX_NESTING 1000
#define MEMO_DEPTH_NOTE 32
#define MAX_LINE (1 << 16)

static int op_arg[256];
static int op_kind[256];
static const char *op_name[256];

static PyObject *ScanError = NULL;
static PyObject *text_int = NULL; /* pickle_walk._text_int(buf, start, stop) -> int | None */

static void
init_tables(void)
{
    for (int i = 0; i < 256; i++) {
        op_arg[i] = A_NONE;
        op_kind[i] = K_BAD;
        op_name[i] = "?";
    }
#define OP(c, nm, a, k) do { op_arg[(unsigned char)(c)] = (a); op_kind[(unsigned char)(c)] = (k); op_name[(unsigned char)(c)] = (nm); } while (0)
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
    OP('T', "BINSTRING", -5, K_PUSH);
    OP('U', "SHORT_BINSTRING", -1, K_PUSH);
    OP('V', "UNICODE", A_LINE, K_PUSH);
    OP('X', "BINUNICODE", -4, K_PUSH);
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
    OP(0x8a, "LONG1", -1, K_PUSH);
    OP(0x8b, "LONG4", -5, K_PUSH);
    OP('B', "BINBYTES", -4, K_PUSH);
    OP('C', "SHORT_BINBYTES", -1, K_PUSH);
    OP(0x8c, "SHORT_BINUNICODE", -1, K_PUSH);
    OP(0x8d, "BINUNICODE8", -8, K_PUSH);
    OP(0x8e, "BINBYTES8", -8, K_PUSH);
    OP(0x8f, "EMPTY_SET", A_NONE, K_PUSH);
    OP(0x90, "ADDITEMS", A_NONE, K_TOMARK0);
    OP(0x91, "FROZENSET", A_NONE, K_TOMARK1);
    OP(0x92, "NEWOBJ_EX", A_NONE, K_P3);
    OP(0x93, "STACK_GLOBAL", A_NONE, K_P2);
    OP(0x94, "MEMOIZE", A_NONE, K_PUT);
    OP(0x95, "FRAME", 8, K_FRAME);
    OP(0x96, "BYTEARRAY8", -8, K_PUSH);
    OP(0x97, "NEXT_BUFFER", A_NONE, K_REFUSE);
    OP(0x98, "READONLY_BUFFER", A_NONE, K_P1);
#undef OP
}

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

/* offset just past the lines-th newline from start below lim; -1 absent, -2 too long */
static int64_t
line_end(const unsigned char *buf, int64_t start, int64_t lim, int lines)
{
    int64_t pos = start;
    for (int i = 0; i < lines; i++) {
        int64_t stop = lim < pos + MAX_LINE ? lim : pos + MAX_LINE;
        const unsigned char *hit = stop > pos ? memchr(buf + pos, '\n', (size_t)(stop - pos)) : NULL;
        if (hit == NULL)
            return (stop - pos >= MAX_LINE) ? -2 : -1;
        pos = (int64_t)(hit - buf) + 1;
    }
    return pos;
}

/* idx from a text line via the Python helper (identical semantics); -1 when not an int */
static int
call_text_int(PyObject *bufobj, int64_t start, int64_t stop, int64_t *out)
{
    PyObject *r = PyObject_CallFunction(text_int, "OLL", bufobj, (long long)start, (long long)stop);
    if (r == NULL)
        return -1;
    if (r == Py_None) {
        *out = -1;
    }
    else {
        long long v = PyLong_AsLongLong(r);
        if (v == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            v = -1;
        }
        *out = v;
    }
    Py_DECREF(r);
    return 0;
}

/* ---- attribute helpers ---------------------------------------------------- */

static int
get_i64(PyObject *o, const char *name, int64_t *out)
{
    PyObject *v = PyObject_GetAttrString(o, name);
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
set_i64(PyObject *o, const char *name, int64_t x)
{
    PyObject *v = PyLong_FromLongLong(x);
    if (v == NULL)
        return -1;
    int r = PyObject_SetAttrString(o, name, v);
    Py_DECREF(v);
    return r;
}

static int
get_bool(PyObject *o, const char *name, int *out)
{
    PyObject *v = PyObject_GetAttrString(o, name);
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
set_bool(PyObject *o, const char *name, int x)
{
    return PyObject_SetAttrString(o, name, x ? Py_True : Py_False);
}

/* growable int64 array */
typedef struct {
    int64_t *v;
    Py_ssize_t n, cap;
} vec64;

static int
vec_push(vec64 *a, int64_t x)
{
    if (a->n == a->cap) {
        Py_ssize_t cap = a->cap ? a->cap * 2 : 64;
        int64_t *nv = PyMem_Realloc(a->v, (size_t)cap * sizeof(int64_t));
        if (nv == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        a->v = nv;
        a->cap = cap;
    }
    a->v[a->n++] = x;
    return 0;
}

static int
vec_from_list(vec64 *a, PyObject *list)
{
    if (!PyList_Check(list)) {
        PyErr_SetString(PyExc_TypeError, "expected a list");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(list);
    for (Py_ssize_t i = 0; i < n; i++) {
        long long x = PyLong_AsLongLong(PyList_GET_ITEM(list, i));
        if (x == -1 && PyErr_Occurred())
            return -1;
        if (vec_push(a, x) < 0)
            return -1;
    }
    return 0;
}

static PyObject *
vec_to_list(vec64 *a)
{
    PyObject *list = PyList_New(a->n);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < a->n; i++) {
        PyObject *x = PyLong_FromLongLong(a->v[i]);
        if (x == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, x);
    }
    return list;
}

static int
list_append_i64(PyObject *list, int64_t x)
{
    PyObject *v = PyLong_FromLongLong(x);
    if (v == NULL)
        return -1;
    int r = PyList_Append(list, v);
    Py_DECREF(v);
    return r;
}

/* bytearray of little-endian int64 values: append one / keep the first n */
static int
ba_append_i64(PyObject *ba, int64_t x)
{
    Py_ssize_t old = PyByteArray_GET_SIZE(ba);
    if (PyByteArray_Resize(ba, old + 8) < 0)
        return -1;
    unsigned char *p = (unsigned char *)PyByteArray_AS_STRING(ba) + old;
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)((uint64_t)x >> (8 * i));
    return 0;
}

static int
ba_truncate(PyObject *ba, Py_ssize_t n)
{
    return PyByteArray_Resize(ba, n * 8);
}

static int
list_truncate(PyObject *list, Py_ssize_t n)
{
    return PyList_SetSlice(list, n, PyList_GET_SIZE(list), NULL);
}

static int
dict_set_i64(PyObject *d, int64_t k, int64_t v)
{
    PyObject *key = PyLong_FromLongLong(k), *val = PyLong_FromLongLong(v);
    int r = -1;
    if (key && val)
        r = PyDict_SetItem(d, key, val);
    Py_XDECREF(key);
    Py_XDECREF(val);
    return r;
}

/* ---- scan_ops ------------------------------------------------------------------ */

#define READS_CACHE 64

static PyObject *
scan_ops(PyObject *self, PyObject *args)
{
    PyObject *bufobj, *st;
    long long pos_ll, end_ll, base_ll;
    if (!PyArg_ParseTuple(args, "OLLLO", &bufobj, &pos_ll, &end_ll, &base_ll, &st))
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(bufobj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *buf = (const unsigned char *)view.buf;
    int64_t pos = pos_ll, end = end_ll, base = base_ll;
    if (end > view.len)
        end = view.len;

    PyObject *starts = NULL, *memo_at = NULL, *reads = NULL, *memo_depth = NULL, *global_check = NULL;
    PyObject *marks_list = NULL, *dep_list = NULL, *result = NULL;
    vec64 marks = {0}, dep = {0};
    int64_t phase, depth, n, memo, memo_base, done, count, frame_end, data_end, proto;
    int in_batch, memo_seen, status = ST_MORE;
    int64_t cache_idx[READS_CACHE], cache_pos[READS_CACHE];
    for (int i = 0; i < READS_CACHE; i++)
        cache_idx[i] = -1;
    /* error state */
    const char *err_kind = NULL;
    PyObject *err_msg = NULL;
    int64_t err_at = 0;
    int err_push = 0, err_batch = 0;

    if (get_i64(st, "phase", &phase) || get_i64(st, "depth", &depth) || get_i64(st, "n", &n) ||
        get_i64(st, "memo", &memo) || get_i64(st, "memo_base", &memo_base) || get_i64(st, "done", &done) ||
        get_i64(st, "count", &count) || get_i64(st, "frame_end", &frame_end) ||
        get_i64(st, "data_end", &data_end) || get_i64(st, "proto", &proto) || get_bool(st, "in_batch", &in_batch) ||
        get_bool(st, "memo_seen", &memo_seen))
        goto fatal;
    starts = PyObject_GetAttrString(st, "starts");
    memo_at = PyObject_GetAttrString(st, "memo_at");
    reads = PyObject_GetAttrString(st, "reads");
    memo_depth = PyObject_GetAttrString(st, "memo_depth");
    global_check = PyObject_GetAttrString(st, "global_check");
    marks_list = PyObject_GetAttrString(st, "marks");
    dep_list = PyObject_GetAttrString(st, "dep");
    if (!starts || !memo_at || !reads || !memo_depth || !global_check || !marks_list || !dep_list)
        goto fatal;
    if (!PyByteArray_Check(starts) || !PyByteArray_Check(memo_at) || !PyDict_Check(reads) || !PyDict_Check(memo_depth)) {
        PyErr_SetString(PyExc_TypeError, "ScanState has wrong attribute types");
        goto fatal;
    }
    if (vec_from_list(&marks, marks_list) < 0 || vec_from_list(&dep, dep_list) < 0)
        goto fatal;

    int64_t fe = frame_end < INF_OFF ? frame_end - base : INF_OFF;
    int64_t td, tbase;
    if (phase == PH_BODY) {
        td = in_batch ? 2 : 1;
        tbase = in_batch ? 0 : 5;
    }
    else {
        td = -1;
        tbase = 0;
    }

#define FAIL(kind, push, batch, ...) do { err_kind = (kind); err_at = pos; err_push = (push); err_batch = (batch); \
        err_msg = PyUnicode_FromFormat(__VA_ARGS__); goto failed; } while (0)
#define NSTARTS (PyByteArray_GET_SIZE(starts) / 8)

    for (;;) {
        int64_t lim = fe > end ? end : fe;
        if (pos >= lim) {
            if (pos == fe) {
                fe = INF_OFF;
                continue;
            }
            break;
        }
        unsigned char op = buf[pos];
        int a = op_arg[op];
        int kind = op_kind[op];
        int64_t npos;
        if (a == 0) {
            npos = pos + 1;
        }
        else if (a > 0 && a < 100) {
            npos = pos + 1 + a;
        }
        else if (a < 0) {
            int la = a == -1 ? 1 : (a == -8 ? 8 : 4);
            if (pos + 1 + la > lim) {
                if (fe <= end)
                    FAIL("format", 0, 0, "%s opcode straddles the end of its FRAME", op_name[op]);
                break;
            }
            uint64_t length;
            if (a == -1)
                length = buf[pos + 1];
            else if (a == -4)
                length = rd_u4(buf + pos + 1);
            else if (a == -5) {
                int32_t sl = (int32_t)rd_u4(buf + pos + 1);
                if (sl < 0)
                    FAIL("format", 1, 0, "%s has a negative length %d", op_name[op], (int)sl);
                length = (uint64_t)sl;
            }
            else
                length = rd_u8(buf + pos + 1);
            if (length > (uint64_t)INF_OFF)
                length = (uint64_t)INF_OFF;  /* beyond any real file; compares as "past the end" */
            npos = pos + 1 + la + (int64_t)length;
        }
        else {
            npos = line_end(buf, pos + 1, lim, a == A_LINE2 ? 2 : 1);
            if (npos < 0) {
                if (npos == -2)
                    FAIL("format", 0, 0, "%s text argument longer than %d bytes", op_name[op], MAX_LINE);
                if (fe <= end)
                    FAIL("format", 0, 0, "%s opcode straddles the end of its FRAME", op_name[op]);
                break;
            }
        }
        if (npos > lim) {
            if (fe <= end)
                FAIL("format", 0, 0, "%s opcode straddles the end of its FRAME", op_name[op]);
            if (data_end >= 0 && npos + base > data_end)
                FAIL("truncated", 1, 0, "%s needs %lld bytes, only %lld remain", op_name[op],
                     (long long)(npos - pos), (long long)(data_end - base - pos));
            break;
        }
        int64_t d = 0;
        if (kind == K_PUT) {
            if (n == 0)
                FAIL("format", 0, 0, "%s with an empty stack", op_name[op]);
            if (op != 0x94) {
                int64_t idx;
                if (op == 'q')
                    idx = buf[pos + 1];
                else if (op == 'r')
                    idx = rd_u4(buf + pos + 1);
                else if (call_text_int(bufobj, pos + 1, npos - 1, &idx) < 0)
                    goto fatal;
                if (idx != memo) {
                    if (!memo_seen && memo == 0 && idx == 1) {
                        memo = 1;
                        memo_base = 1;
                    }
                    else
                        FAIL("format", 0, 0,
                             "memo index %lld written where %lld was expected (memo indices must be sequential: a "
                             "forged index makes unpicklers allocate without bound)",
                             (long long)idx, (long long)memo);
                }
            }
            memo_seen = 1;
            if (dep.v[dep.n - 1] > MEMO_DEPTH_NOTE && dict_set_i64(memo_depth, memo, dep.v[dep.n - 1]) < 0)
                goto fatal;
            memo += 1;
        }
        else if (kind == K_PUSH || kind == K_GET || kind == K_DUP) {
            if (phase == PH_SUFFIX)
                FAIL("format", 0, 0, "%s after the element list; numpy writes TUPLE BUILD STOP", op_name[op]);
            if (kind == K_GET) {
                int64_t idx;
                if (op == 'h')
                    idx = buf[pos + 1];
                else if (op == 'j')
                    idx = rd_u4(buf + pos + 1);
                else if (call_text_int(bufobj, pos + 1, npos - 1, &idx) < 0)
                    goto fatal;
                if (idx < 0 || idx >= memo || idx < memo_base)
                    FAIL("format", 1, 0, "memo entry %lld is read before it was written", (long long)idx);
                int slot = (int)(idx & (READS_CACHE - 1));
                if (cache_idx[slot] != idx) {
                    if (cache_idx[slot] >= 0 && dict_set_i64(reads, cache_idx[slot], cache_pos[slot]) < 0)
                        goto fatal;
                    cache_idx[slot] = idx;
                }
                cache_pos[slot] = base + pos;
                if (PyDict_GET_SIZE(memo_depth)) {
                    PyObject *key = PyLong_FromLongLong(idx);
                    if (key == NULL)
                        goto fatal;
                    PyObject *dv = PyDict_GetItemWithError(memo_depth, key);
                    Py_DECREF(key);
                    if (dv == NULL && PyErr_Occurred())
                        goto fatal;
                    d = dv ? PyLong_AsLongLong(dv) : 0;
                }
            }
            else if (kind == K_DUP) {
                if (n == 0)
                    FAIL("format", 1, 0, "DUP with an empty stack");
                d = dep.v[dep.n - 1];
            }
            if (op == ']' && phase == PH_PREFIX && depth == 1 && n == 4) {
                phase = PH_BODY;
                td = 1;
                tbase = 5;
                n = 5;
                if (vec_push(&dep, 0) < 0)
                    goto fatal;
                if (set_i64(st, "body_start", base + npos) < 0 || set_i64(st, "body_memo", memo) < 0)
                    goto fatal;
                pos = npos;
                continue;
            }
            else if (op == 'c' && global_check != Py_None) {
                PyObject *raw = PyBytes_FromStringAndSize((const char *)buf + pos + 1, (Py_ssize_t)(npos - pos - 1));
                if (raw == NULL)
                    goto fatal;
                PyObject *msg = PyObject_CallOneArg(global_check, raw);
                Py_DECREF(raw);
                if (msg == NULL)
                    goto fatal;
                int truthy = PyObject_IsTrue(msg);
                if (truthy > 0) {
                    err_kind = "unsafe";
                    err_at = pos;
                    err_push = 1;
                    err_batch = 0;
                    err_msg = msg;
                    goto failed;
                }
                Py_DECREF(msg);
                if (truthy < 0)
                    goto fatal;
            }
            if (n >= MAX_STACK)
                FAIL("format", 1, 0, "more than %d items on one stack level", MAX_STACK);
            if (depth == td) {
                if (done + NSTARTS > count + 8)
                    FAIL("format", 0, 1, "the pickle holds more elements than the header's %lld", (long long)count);
                if (ba_append_i64(starts, base + pos) < 0 || ba_append_i64(memo_at, memo) < 0)
                    goto fatal;
            }
            n += 1;
            if (vec_push(&dep, d) < 0)
                goto fatal;
        }
        else if (kind <= K_POP2) {
            int pops = kind == K_P1 ? 1 : kind == K_P2 ? 2 : kind == K_P3 ? 3 : kind == K_POP1 ? 1 : 2;
            int pushes = kind <= K_P3 ? 1 : 0;
            if (n < pops)
                FAIL("format", 0, 0, "%s needs %d stack items, %lld available", op_name[op], pops, (long long)n);
            if (depth == td) {
                if (op == 'a' && !in_batch && n == 6) {
                    n = 5;
                    d = dep.v[--dep.n] + 1;
                    if (d > dep.v[dep.n - 1])
                        dep.v[dep.n - 1] = d;
                    if (set_i64(st, "batch_end", base + pos) < 0)
                        goto fatal;
                    done += NSTARTS;
                    if (done > count)
                        FAIL("format", 0, 0, "the pickle holds more elements than the header's %lld", (long long)count);
                    status = ST_BATCH;
                    pos = npos;
                    break;
                }
                int64_t avail = n - tbase;
                if (avail < pops + 1 - pushes)
                    FAIL("format", 0, 0, "%s reaches into the element list", op_name[op]);
                Py_ssize_t k = NSTARTS;
                Py_ssize_t keep = pushes ? (pops > 1 ? k - pops + 1 : k) : k - pops;
                if (keep < 0)
                    keep = 0;
                if (keep < k && (ba_truncate(starts, keep) < 0 || ba_truncate(memo_at, keep) < 0))
                    goto fatal;
            }
            else if (phase == PH_SUFFIX) {
                if (op != 'b' || n != 2 || depth != 0)
                    FAIL("format", 0, 0, "%s after the element list; numpy writes TUPLE BUILD STOP", op_name[op]);
            }
            n = n - pops + pushes;
            int64_t mx = 0;
            for (int i = 0; i < pops; i++)
                if (dep.v[dep.n - 1 - i] > mx)
                    mx = dep.v[dep.n - 1 - i];
            d = mx + 1;
            dep.n -= pops;
            if (pushes) {
                if (vec_push(&dep, d) < 0)
                    goto fatal;
            }
            else if (d > dep.v[dep.n - 1])
                dep.v[dep.n - 1] = d;
            if (d > MAX_NESTING)
                FAIL("format", 0, 0, "objects nested more than %d deep", MAX_NESTING);
        }
        else if (kind == K_MARK) {
            if (phase == PH_SUFFIX)
                FAIL("format", 0, 0, "MARK after the element list; numpy writes TUPLE BUILD STOP");
            if (depth >= MAX_MARK_DEPTH)
                FAIL("format", 1, 0, "MARKs nested deeper than %d", MAX_MARK_DEPTH);
            if (depth == 1 && n == 5 && phase == PH_BODY) {
                in_batch = 1;
                td = 2;
                tbase = 0;
            }
            if (vec_push(&marks, n) < 0 || vec_push(&marks, base + pos) < 0 || vec_push(&marks, memo) < 0)
                goto fatal;
            depth += 1;
            n = 0;
        }
        else if (kind == K_TOMARK1 || kind == K_TOMARK0) {
            if (depth == 0)
                FAIL("format", 0, 0, "%s without an open MARK", op_name[op]);
            if (op == 'i' && global_check != Py_None) {
                PyObject *raw = PyBytes_FromStringAndSize((const char *)buf + pos + 1, (Py_ssize_t)(npos - pos - 1));
                if (raw == NULL)
                    goto fatal;
                PyObject *msg = PyObject_CallOneArg(global_check, raw);
                Py_DECREF(raw);
                if (msg == NULL)
                    goto fatal;
                int truthy = PyObject_IsTrue(msg);
                if (truthy > 0) {
                    err_kind = "unsafe";
                    err_at = pos;
                    err_push = 0;
                    err_batch = 0;
                    err_msg = msg;
                    goto failed;
                }
                Py_DECREF(msg);
                if (truthy < 0)
                    goto fatal;
            }
            int64_t inner = n;
            if (inner) {
                int64_t mx = 0;
                for (int64_t i = 0; i < inner; i++)
                    if (dep.v[dep.n - 1 - i] > mx)
                        mx = dep.v[dep.n - 1 - i];
                d = mx + 1;
                dep.n -= inner;
            }
            else
                d = 1;
            if (d > MAX_NESTING)
                FAIL("format", 0, 0, "objects nested more than %d deep", MAX_NESTING);
            int64_t mark_memo = marks.v[marks.n - 1];
            int64_t mark_off = marks.v[marks.n - 2];
            n = marks.v[marks.n - 3];
            marks.n -= 3;
            depth -= 1;
            if (phase == PH_BODY && (depth == 0 || (depth == 1 && in_batch))) {
                if (depth == 1) {
                    if (op != 'e')
                        FAIL("format", 0, 0, "%s closes the element batch; numpy writes APPENDS", op_name[op]);
                    in_batch = 0;
                    td = 1;
                    tbase = 5;
                    if (d > dep.v[dep.n - 1])
                        dep.v[dep.n - 1] = d;
                    if (set_i64(st, "batch_end", base + pos) < 0)
                        goto fatal;
                    done += NSTARTS;
                    if (done > count)
                        FAIL("format", 0, 0, "the pickle holds more elements than the header's %lld", (long long)count);
                    status = ST_BATCH;
                    pos = npos;
                    break;
                }
                if (op != 't' || inner != 5 || n != 1)
                    FAIL("format", 0, 0,
                         "%s with %lld items ends the array state; numpy writes TUPLE after (1, shape, dtype, "
                         "is_fortran, list)",
                         op_name[op], (long long)inner);
                phase = PH_SUFFIX;
                td = -1;
                n = 2;
                if (vec_push(&dep, d) < 0)
                    goto fatal;
            }
            else if (kind == K_TOMARK1) {
                if (phase == PH_SUFFIX)
                    FAIL("format", 0, 0, "%s after the element list", op_name[op]);
                if (depth == td) {
                    if (ba_append_i64(starts, mark_off) < 0 || ba_append_i64(memo_at, mark_memo) < 0)
                        goto fatal;
                }
                n += 1;
                if (vec_push(&dep, d) < 0)
                    goto fatal;
            }
            else if (op != '1') {
                if (n == 0 || (depth == td && n <= tbase))
                    FAIL("format", 0, 0, "%s has no container below its MARK", op_name[op]);
                if (d > dep.v[dep.n - 1])
                    dep.v[dep.n - 1] = d;
            }
        }
        else if (kind == K_POP) {
            if (phase == PH_SUFFIX)
                FAIL("format", 0, 0, "POP after the element list");
            if (n == 0) {
                if (depth == 0)
                    FAIL("format", 0, 0, "POP with an empty stack");
                n = marks.v[marks.n - 3];
                marks.n -= 3;
                depth -= 1;
                if (phase == PH_BODY && depth <= 1)
                    FAIL("format", 0, 0, "POP removes a MARK of the array state");
            }
            else {
                if (depth == td) {
                    if (n <= tbase)
                        FAIL("format", 0, 0, "POP reaches into the element list");
                    Py_ssize_t k = NSTARTS;
                    if (ba_truncate(starts, k - 1) < 0 || ba_truncate(memo_at, k - 1) < 0)
                        goto fatal;
                }
                n -= 1;
                dep.n -= 1;
            }
        }
        else if (kind == K_FRAME) {
            if (fe < INF_OFF && pos < fe)
                FAIL("format", 0, 0, "FRAME inside another FRAME");
            uint64_t flen = rd_u8(buf + pos + 1);
            if (data_end >= 0 && (flen > (uint64_t)INF_OFF || npos + base + (int64_t)flen > data_end))
                FAIL("truncated", 0, 0, "FRAME of %llu bytes but only %lld bytes remain in the file",
                     (unsigned long long)flen, (long long)(data_end - base - npos));
            if (flen > ((uint64_t)1 << 48))
                FAIL("format", 0, 0, "FRAME length %llu is absurd", (unsigned long long)flen);
            fe = npos + (int64_t)flen;
            pos = npos;
            continue;
        }
        else if (kind == K_PROTO) {
            if (phase != PH_PREFIX || n || depth || proto || memo_seen)
                FAIL("format", 0, 0, "PROTO opcode in the middle of the pickle");
            int p = buf[pos + 1];
            if (p > 5)
                FAIL("format", 0, 0, "pickle protocol %d is newer than 5", p);
            proto = p;
            if (set_i64(st, "proto", p) < 0)
                goto fatal;
        }
        else if (kind == K_STOP) {
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
            break;
        }
        else if (kind == K_REFUSE) {
            FAIL("unsafe", op != 'Q', 0,
                 "%s opcode refused: persistent ids, extension codes and out-of-band buffers are never written by np.save",
                 op_name[op]);
        }
        else {
            FAIL("format", 1, 0, "unknown pickle opcode 0x%02x", (unsigned int)op);
        }
        pos = npos;
    }
    goto writeback;

failed:
    if (err_msg == NULL)
        goto fatal;
    {
        PyObject *index;
        if (err_batch)
            index = PyLong_FromLongLong(done);
        else if (phase == PH_BODY) {
            Py_ssize_t k = NSTARTS;
            Py_ssize_t cur = (depth == td && err_push) ? k : (k - 1 > 0 ? k - 1 : 0);
            index = PyLong_FromLongLong(done + cur);
        }
        else {
            index = Py_NewRef(Py_None);
        }
        if (index == NULL) {
            Py_DECREF(err_msg);
            goto fatal;
        }
        PyObject *exc = PyObject_CallFunction(ScanError, "sOLO", err_kind, err_msg, (long long)(base + err_at), index);
        Py_DECREF(index);
        Py_DECREF(err_msg);
        if (exc != NULL) {
            PyErr_SetObject(ScanError, exc);
            Py_DECREF(exc);
        }
    }
    /* fall through: write the state back, then return NULL with the error set */
writeback:
    {
        PyObject *et = NULL, *ev = NULL, *tb = NULL;
        int had_error = PyErr_Occurred() != NULL;
        if (had_error)
            PyErr_Fetch(&et, &ev, &tb);
        int bad = 0;
        for (int i = 0; i < READS_CACHE; i++)
            if (cache_idx[i] >= 0 && dict_set_i64(reads, cache_idx[i], cache_pos[i]) < 0)
                bad = 1;
        PyObject *ml = vec_to_list(&marks), *dl = vec_to_list(&dep);
        if (ml == NULL || dl == NULL || PyObject_SetAttrString(st, "marks", ml) < 0 ||
            PyObject_SetAttrString(st, "dep", dl) < 0)
            bad = 1;
        Py_XDECREF(ml);
        Py_XDECREF(dl);
        if (set_i64(st, "phase", phase) || set_i64(st, "depth", depth) || set_i64(st, "n", n) ||
            set_i64(st, "memo", memo) || set_i64(st, "memo_base", memo_base) || set_i64(st, "done", done) ||
            set_bool(st, "in_batch", in_batch) || set_bool(st, "memo_seen", memo_seen) ||
            set_i64(st, "frame_end", fe < INF_OFF ? fe + base : INF_OFF) || set_i64(st, "status", status))
            bad = 1;
        if (had_error) {
            if (bad)
                PyErr_Clear();
            PyErr_Restore(et, ev, tb);
        }
        else if (!bad)
            result = PyLong_FromLongLong(pos);
    }
    goto cleanup;

fatal:
    result = NULL;
cleanup:
    PyMem_Free(marks.v);
    PyMem_Free(dep.v);
    Py_XDECREF(starts);
    Py_XDECREF(memo_at);
    Py_XDECREF(reads);
    Py_XDECREF(memo_depth);
    Py_XDECREF(global_check);
    Py_XDECREF(marks_list);
    Py_XDECREF(dep_list);
    PyBuffer_Release(&view);
    return result;
#undef FAIL
#undef NSTARTS
}

/* ---- rewrite_ops ------------------------------------------------------------------ */

typedef struct {
    PyObject *out;
} outbuf;

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

static int
out_slot(PyObject *out, unsigned char small_op, unsigned char long_op, int64_t s)
{
    unsigned char tmp[5];
    if (s < 256) {
        tmp[0] = small_op;
        tmp[1] = (unsigned char)s;
        return out_put(out, tmp, 2);
    }
    tmp[0] = long_op;
    for (int i = 0; i < 4; i++)
        tmp[1 + i] = (unsigned char)((uint64_t)s >> (8 * i));
    return out_put(out, tmp, 5);
}

/* memo index written by the memo-write opcode at pos (memo = the MEMOIZE index); its end in *npos */
static int
memo_op_index(PyObject *bufobj, const unsigned char *buf, int64_t pos, int64_t lim, int64_t memo, int64_t *m,
              int64_t *npos)
{
    unsigned char op = buf[pos];
    if (op == 0x94) {
        *m = memo;
        *npos = pos + 1;
    }
    else if (op == 'q') {
        *m = buf[pos + 1];
        *npos = pos + 2;
    }
    else if (op == 'r') {
        *m = rd_u4(buf + pos + 1);
        *npos = pos + 5;
    }
    else {
        int64_t e = line_end(buf, pos + 1, lim, 1);
        if (e < 0) {
            *m = 0;
            *npos = lim + 1;
            return 0;
        }
        int64_t v;
        if (call_text_int(bufobj, pos + 1, e - 1, &v) < 0)
            return -1;
        *m = v < 0 ? 0 : v;
        *npos = e;
    }
    return 0;
}

/* 1 if m is live (rw.live is None counts as live), 0 if not, -1 on error */
static int
is_live(PyObject *live, int64_t live_min, int64_t live_max, int64_t m)
{
    if (live == Py_None)
        return 1;
    if (m < live_min || m > live_max)
        return 0;
    PyObject *key = PyLong_FromLongLong(m);
    if (key == NULL)
        return -1;
    int r = PyDict_Contains(live, key);
    Py_DECREF(key);
    return r;
}

/* is the payload ending at q an ndarray state's raw data? (see _zero_copy_target) */
static int
zero_copy_target(PyObject *bufobj, const unsigned char *buf, int64_t q, int64_t end, int64_t memo, PyObject *live,
                 int64_t live_min, int64_t live_max)
{
    int seen_tuple = 0, own_memo = 1;
    while (q < end) {
        unsigned char op = buf[q];
        if (op == 0x95) {
            q += 9;
        }
        else if (op == 0x94 || op == 'q' || op == 'r') {
            int64_t m, nq;
            if (memo_op_index(bufobj, buf, q, end, memo, &m, &nq) < 0)
                return -1;
            if (own_memo && !seen_tuple) {
                int l = is_live(live, live_min, live_max, m);
                if (l != 0)
                    return l < 0 ? -1 : 0;
            }
            memo = m + 1;
            own_memo = 0;
            q = nq;
        }
        else if (op == 't' && !seen_tuple) {
            seen_tuple = 1;
            own_memo = 0;
            q += 1;
        }
        else if (op == 'b' && seen_tuple) {
            return 1;
        }
        else
            return 0;
    }
    return 0;
}

#define GET_CACHE 64

static PyObject *
rewrite_ops(PyObject *self, PyObject *args)
{
    PyObject *bufobj, *rw, *out;
    long long pos_ll, end_ll, base_ll;
    if (!PyArg_ParseTuple(args, "OLLLOO", &bufobj, &pos_ll, &end_ll, &base_ll, &rw, &out))
        return NULL;
    if (!PyByteArray_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "out must be a bytearray");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(bufobj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *buf = (const unsigned char *)view.buf;
    int64_t pos = pos_ll, end = end_ll, base = base_ll;
    PyObject *slot_of = NULL, *live = NULL, *free_list = NULL, *fresh = NULL, *freed = NULL, *result = NULL;
    int64_t memo, nslots, live_min = 0, live_max = -1;
    int zero_copy, free_on_read, status = RW_OK;
    int64_t missing = -1;
    int64_t gc_m[GET_CACHE], gc_s[GET_CACHE], gc_last[GET_CACHE];
    for (int i = 0; i < GET_CACHE; i++)
        gc_m[i] = -1;

    if (end > view.len) {
        PyErr_SetString(PyExc_ValueError, "rewrite_ops: end beyond the buffer");
        goto fatal;
    }
    if (get_i64(rw, "memo", &memo) || get_i64(rw, "nslots", &nslots) || get_bool(rw, "zero_copy", &zero_copy) ||
        get_bool(rw, "free_on_read", &free_on_read))
        goto fatal;
    slot_of = PyObject_GetAttrString(rw, "slot_of");
    live = PyObject_GetAttrString(rw, "live");
    free_list = PyObject_GetAttrString(rw, "free");
    fresh = PyObject_GetAttrString(rw, "fresh");
    freed = PyObject_GetAttrString(rw, "freed");
    if (!slot_of || !live || !free_list || !fresh || !freed)
        goto fatal;
    if (!PyDict_Check(slot_of) || !PyList_Check(free_list) || !PyList_Check(fresh) || !PyList_Check(freed) ||
        (live != Py_None && !PyDict_Check(live))) {
        PyErr_SetString(PyExc_TypeError, "RewriteState has wrong attribute types");
        goto fatal;
    }
    if (live != Py_None) {
        /* bounds of the live keys: most memo writes fall outside and need no lookup */
        PyObject *k, *v;
        Py_ssize_t it = 0;
        int first = 1;
        while (PyDict_Next(live, &it, &k, &v)) {
            long long x = PyLong_AsLongLong(k);
            if (x == -1 && PyErr_Occurred())
                goto fatal;
            if (first || x < live_min)
                live_min = x;
            if (first || x > live_max)
                live_max = x;
            first = 0;
        }
    }
    if (live == Py_None)
        free_on_read = 0;

    int64_t run = pos;
#define FLUSH() do { if (run < pos && out_put(out, buf + run, (Py_ssize_t)(pos - run)) < 0) goto fatal; } while (0)
    while (pos < end) {
        unsigned char op = buf[pos];
        int a = op_arg[op];
        int64_t npos;
        if (a == 0)
            npos = pos + 1;
        else if (a > 0 && a < 100)
            npos = pos + 1 + a;
        else if (a == -1)
            npos = pos + 1 < end ? pos + 2 + buf[pos + 1] : end + 1;
        else if (a == -4 || a == -5)
            npos = pos + 5 <= end ? pos + 5 + (int64_t)rd_u4(buf + pos + 1) : end + 1;
        else if (a == -8) {
            if (pos + 9 <= end) {
                uint64_t l = rd_u8(buf + pos + 1);
                npos = l > (uint64_t)INF_OFF ? INF_OFF : pos + 9 + (int64_t)l;
            }
            else
                npos = end + 1;
        }
        else {
            npos = line_end(buf, pos + 1, end, a == A_LINE2 ? 2 : 1);
            if (npos < 0)
                npos = end + 1;
        }
        if (npos > end) {
            PyObject *msg = PyUnicode_FromFormat(
                "%s at the end of an element runs past it: the offset index does not match this file (rebuild it)",
                op_name[op]);
            if (msg != NULL) {
                PyObject *exc = PyObject_CallFunction(ScanError, "sOLO", "format", msg, (long long)(base + pos), Py_None);
                Py_DECREF(msg);
                if (exc != NULL) {
                    PyErr_SetObject(ScanError, exc);
                    Py_DECREF(exc);
                }
            }
            goto fatal;
        }
        int kind = op_kind[op];
        if (kind == K_PUT) {
            if (op != 0x94) {
                int64_t m, nq;
                if (memo_op_index(bufobj, buf, pos, end, memo, &m, &nq) < 0)
                    goto fatal;
                memo = m;
            }
            int64_t m = memo;
            memo += 1;
            FLUSH();
            int l = is_live(live, live_min, live_max, m);
            if (l < 0)
                goto fatal;
            if (l) {
                int64_t s;
                Py_ssize_t nf = PyList_GET_SIZE(free_list);
                if (nf) {
                    s = PyLong_AsLongLong(PyList_GET_ITEM(free_list, nf - 1));
                    if (s == -1 && PyErr_Occurred())
                        goto fatal;
                    if (list_truncate(free_list, nf - 1) < 0)
                        goto fatal;
                }
                else {
                    s = nslots++;
                }
                if (dict_set_i64(slot_of, m, s) < 0 || list_append_i64(fresh, m) < 0)
                    goto fatal;
                if (out_slot(out, 'q', 'r', s) < 0)
                    goto fatal;
            }
            run = npos;
        }
        else if (kind == K_GET) {
            int64_t m;
            if (op == 'h')
                m = buf[pos + 1];
            else if (op == 'j')
                m = rd_u4(buf + pos + 1);
            else {
                if (call_text_int(bufobj, pos + 1, npos - 1, &m) < 0)
                    goto fatal;
                if (m < 0)
                    m = 0;
            }
            int c = (int)(m & (GET_CACHE - 1));
            int64_t s, last;
            if (gc_m[c] == m) {
                s = gc_s[c];
                last = gc_last[c];
            }
            else {
                PyObject *key = PyLong_FromLongLong(m);
                if (key == NULL)
                    goto fatal;
                PyObject *sv = PyDict_GetItemWithError(slot_of, key);
                if (sv == NULL) {
                    Py_DECREF(key);
                    if (PyErr_Occurred())
                        goto fatal;
                    FLUSH();
                    run = pos;
                    missing = m;
                    status = RW_MISSING;
                    break;
                }
                s = PyLong_AsLongLong(sv);
                last = -1;
                if (free_on_read) {
                    PyObject *lv = PyDict_GetItemWithError(live, key);
                    if (lv == NULL && PyErr_Occurred()) {
                        Py_DECREF(key);
                        goto fatal;
                    }
                    if (lv != NULL)
                        last = PyLong_AsLongLong(lv);
                }
                Py_DECREF(key);
                gc_m[c] = m;
                gc_s[c] = s;
                gc_last[c] = last;
            }
            FLUSH();
            if (out_slot(out, 'h', 'j', s) < 0)
                goto fatal;
            if (free_on_read && last == base + pos) {
                if (list_append_i64(freed, m) < 0 || list_append_i64(freed, s) < 0)
                    goto fatal;
            }
            run = npos;
        }
        else if (kind == K_FRAME) {
            FLUSH();
            run = npos;
        }
        else if (zero_copy && (op == 'B' || op == 'C' || op == 0x8e)) {
            int t = zero_copy_target(bufobj, buf, npos, end, memo, live, live_min, live_max);
            if (t < 0)
                goto fatal;
            if (t) {
                FLUSH();
                int64_t hdr = op == 'C' ? 2 : (op == 'B' ? 5 : 9);
                int64_t off = base + pos + hdr, len = npos - pos - hdr;
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
                if (out_put(out, tmp, 22) < 0)
                    goto fatal;
                run = npos;
            }
        }
        pos = npos;
    }
    if (status == RW_OK)
        FLUSH();
#undef FLUSH
    if (set_i64(rw, "memo", memo) < 0 || set_i64(rw, "nslots", nslots) < 0 || set_i64(rw, "status", status) < 0)
        goto fatal;
    if (status == RW_MISSING && set_i64(rw, "missing", missing) < 0)
        goto fatal;
    result = PyLong_FromLongLong(pos);
    goto cleanup;

fatal:
    result = NULL;
    /* keep the counters coherent for the caller even on errors */
    {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (rw != NULL) {
            set_i64(rw, "memo", memo);
            set_i64(rw, "nslots", nslots);
            PyErr_Clear();
        }
        PyErr_Restore(et, ev, tb);
    }
cleanup:
    Py_XDECREF(slot_of);
    Py_XDECREF(live);
    Py_XDECREF(free_list);
    Py_XDECREF(fresh);
    Py_XDECREF(freed);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
setup(PyObject *self, PyObject *args)
{
    PyObject *err, *st_cls, *rw_cls, *ti;
    if (!PyArg_ParseTuple(args, "OOOO", &err, &st_cls, &rw_cls, &ti))
        return NULL;
    Py_XSETREF(ScanError, Py_NewRef(err));
    Py_XSETREF(text_int, Py_NewRef(ti));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"scan_ops", scan_ops, METH_VARARGS, "C twin of pickle_walk.scan_ops (same contract)."},
    {"rewrite_ops", rewrite_ops, METH_VARARGS, "C twin of pickle_walk.rewrite_ops (same contract)."},
    {"setup", setup, METH_VARARGS, "Register ScanError, the state classes and the text-int helper."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "npystream._speedups", "C twins of the pickle walker's hot loops.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    init_tables();
    return PyModule_Create(&moduledef);
}
