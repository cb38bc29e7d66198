/*
 * npystream._speedups (part 4): WriteBehind, the ragged writer's helper thread in C.
 *
 *   w = WriteBehind(scratch_size, depth=1)
 *   w.submit(fd, pieces, offset)   wait until fewer than depth jobs are unwritten, then queue this one
 *   w.wait()                       wait until every job is written (raise an OSError, if any)
 *   w.busy() -> bool               whether a job is unwritten
 *   w.stop()                       end the thread (after the queued jobs)
 *   w.depth                        the most jobs in flight at once
 *
 * A job writes the bytes of every buffer in the list ``pieces`` (or of one buffer), in order, to
 * ``fd`` at ``offset``: a piece of at least ``scratch_size`` bytes is pwrite()n from where it is,
 * smaller ones are gathered into a scratch buffer of that size and written together.  The thread
 * is a plain pthread that never touches Python: no GIL hand-over between jobs (the Python helper,
 * ragged._WriteBehind, needs the GIL after every write, and the writer's thread, busy decoding,
 * hands it over only every switch interval), and up to ``depth`` jobs queued, so that neither
 * thread waits for the jitter of the other.  The pieces' buffers are held (PyObject_GetBuffer)
 * from submit() until a later submit(), wait() or stop() sees their job written.  submit, wait
 * and stop are single C calls, so an exception raised in the writer's thread (Ctrl-C) can never
 * land half-way through one.  A write error is sticky: every later submit()/wait() raises it.
 * Same contract as the pure-Python helper (its docstring), which has depth 1.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#ifndef _WIN32
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#define QMAX 16 /* most jobs queued at once */

typedef struct {
    Py_buffer *views;
    Py_ssize_t npieces;
    int fd;
    long long offset;
} Job;

typedef struct {
    PyObject_HEAD
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* signalled on every state change */
    int started, stop, depth;
    /* jobs ever handed over, written by the thread, and whose buffers were released: job i lives in
       q[i % QMAX] from submit() until collected; submitted - completed <= depth <= QMAX */
    long long submitted, completed, collected;
    Job q[QMAX];
    int err; /* errno of the first failed write (sticky) */
    char *scratch;
    Py_ssize_t cap;
} WBObject;

static int
write_all(int fd, const char *buf, Py_ssize_t n, long long off)
{
    while (n > 0) {
        ssize_t w = pwrite(fd, buf, (size_t)n, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)
            return EIO;
        buf += w;
        n -= w;
        off += w;
    }
    return 0;
}

/* runs without the GIL: the views' memory is held by the job */
static int
run_job(WBObject *w, const Job *job)
{
    char *sbuf = w->scratch;
    Py_ssize_t cap = w->cap, used = 0;
    long long off = job->offset;
    for (Py_ssize_t i = 0; i < job->npieces; i++) {
        const char *src = (const char *)job->views[i].buf;
        Py_ssize_t len = job->views[i].len;
        if (used == 0 && len >= cap) { /* a large piece: written from where it is */
            int e = write_all(job->fd, src, len, off);
            if (e)
                return e;
            off += len;
            continue;
        }
        while (len > 0) {
            Py_ssize_t take = cap - used < len ? cap - used : len;
            memcpy(sbuf + used, src, (size_t)take);
            used += take;
            src += take;
            len -= take;
            if (used == cap) {
                int e = write_all(job->fd, sbuf, used, off);
                if (e)
                    return e;
                off += used;
                used = 0;
            }
        }
    }
    return used ? write_all(job->fd, sbuf, used, off) : 0;
}

static void *
wb_main(void *arg)
{
    WBObject *w = (WBObject *)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals (Ctrl-C) go to Python's threads */
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (w->completed == w->submitted && !w->stop)
            pthread_cond_wait(&w->cv, &w->mu);
        if (w->completed < w->submitted) {
            Job job = w->q[w->completed % QMAX];
            int failed = w->err;
            pthread_mutex_unlock(&w->mu);
            int e = failed ? 0 : run_job(w, &job); /* after an error, jobs are dropped */
            pthread_mutex_lock(&w->mu);
            if (e && !w->err)
                w->err = e;
            w->completed++;
            pthread_cond_broadcast(&w->cv);
            continue;
        }
        break; /* stop, nothing queued */
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* wait (GIL released) until at most `most` jobs are unwritten, then release the buffers of the written
   ones; -1 with OSError set if a write failed (now or before) */
static int
collect(WBObject *w, long long most)
{
    long long completed;
    int err;
    pthread_mutex_lock(&w->mu);
    completed = w->completed;
    err = w->err;
    pthread_mutex_unlock(&w->mu);
    if (w->submitted - completed > most) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&w->mu);
        while (w->submitted - w->completed > most)
            pthread_cond_wait(&w->cv, &w->mu);
        completed = w->completed;
        err = w->err;
        pthread_mutex_unlock(&w->mu);
        Py_END_ALLOW_THREADS
    }
    for (; w->collected < completed; w->collected++) {
        Job *job = &w->q[w->collected % QMAX];
        for (Py_ssize_t i = 0; i < job->npieces; i++)
            PyBuffer_Release(&job->views[i]);
        PyMem_Free(job->views);
        job->views = NULL;
        job->npieces = 0;
    }
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static void
stop_thread(WBObject *w)
{
    if (!w->started)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&w->mu);
    w->stop = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    Py_END_ALLOW_THREADS
    w->started = 0;
}

static int
wb_init(WBObject *w, PyObject *args, PyObject *kwds)
{
    Py_ssize_t cap;
    int depth = 1;
    static char *kwlist[] = {"scratch_size", "depth", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n|i", kwlist, &cap, &depth))
        return -1;
    if (depth < 1 || depth > QMAX) {
        PyErr_Format(PyExc_ValueError, "depth must be 1..%d", QMAX);
        return -1;
    }
    w->depth = depth;
    if (w->started || w->scratch != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "WriteBehind is already initialised");
        return -1;
    }
    if (cap < 1) {
        PyErr_SetString(PyExc_ValueError, "scratch_size must be >= 1");
        return -1;
    }
    w->scratch = PyMem_RawMalloc((size_t)cap);
    if (w->scratch == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    w->cap = cap;
    if (pthread_mutex_init(&w->mu, NULL) != 0 || pthread_cond_init(&w->cv, NULL) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "WriteBehind: cannot create a mutex");
        return -1;
    }
    int e = pthread_create(&w->thread, NULL, wb_main, w);
    if (e != 0) {
        errno = e;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    w->started = 1;
    return 0;
}

static PyObject *
wb_submit(WBObject *w, PyObject *args)
{
    int fd;
    PyObject *pieces;
    long long offset;
    if (!PyArg_ParseTuple(args, "iOL", &fd, &pieces, &offset))
        return NULL;
    if (!w->started) {
        PyErr_SetString(PyExc_ValueError, "WriteBehind is stopped");
        return NULL;
    }
    if (offset < 0) {
        PyErr_SetString(PyExc_ValueError, "negative offset");
        return NULL;
    }
    PyObject *seq = PyList_Check(pieces) ? Py_NewRef(pieces) : PyTuple_Pack(1, pieces); /* one buffer */
    if (seq == NULL)
        return NULL;
    if (collect(w, w->depth - 1) < 0) { /* room for this job */
        Py_DECREF(seq);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_buffer *views = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
    if (views == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    Py_ssize_t got = 0;
    for (; got < n; got++)
        if (PyObject_GetBuffer(items[got], &views[got], PyBUF_C_CONTIGUOUS) < 0)
            break;
    Py_DECREF(seq);
    if (got < n) {
        while (got-- > 0)
            PyBuffer_Release(&views[got]);
        PyMem_Free(views);
        return NULL;
    }
    Job *job = &w->q[w->submitted % QMAX]; /* collected: free */
    job->views = views;
    job->npieces = n;
    job->fd = fd;
    job->offset = offset;
    pthread_mutex_lock(&w->mu); /* the thread holds it only briefly */
    w->submitted++;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    Py_RETURN_NONE;
}

static PyObject *
wb_wait(WBObject *w, PyObject *Py_UNUSED(ignored))
{
    if (collect(w, 0) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
wb_busy(WBObject *w, PyObject *Py_UNUSED(ignored))
{
    int busy;
    if (!w->started)
        Py_RETURN_FALSE;
    pthread_mutex_lock(&w->mu);
    busy = w->completed < w->submitted;
    pthread_mutex_unlock(&w->mu);
    return PyBool_FromLong(busy);
}

static PyObject *
wb_stop(WBObject *w, PyObject *Py_UNUSED(ignored))
{
    stop_thread(w); /* runs the queued jobs first */
    int err = w->err;
    w->err = 0; /* stop() drops the error, like the Python helper's */
    collect(w, 0);
    w->err = err;
    Py_RETURN_NONE;
}

static void
wb_dealloc(WBObject *w)
{
    if (w->scratch != NULL) { /* initialised */
        stop_thread(w);
        w->err = 0;
        collect(w, 0); /* the thread is gone: every job is written */
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->cv);
        PyMem_RawFree(w->scratch);
    }
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyMemberDef wb_members[] = {
    {"depth", T_INT, offsetof(WBObject, depth), READONLY, "Most jobs in flight at once."},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef wb_methods[] = {
    {"submit", (PyCFunction)wb_submit, METH_VARARGS,
     "submit(fd, pieces, offset): wait for the job in flight, then write pieces (a list of buffers, or one "
     "buffer) at offset of fd from the helper thread."},
    {"wait", (PyCFunction)wb_wait, METH_NOARGS, "Wait for the job in flight; raise OSError if a write failed."},
    {"busy", (PyCFunction)wb_busy, METH_NOARGS, "Whether a job is in flight (a hint)."},
    {"stop", (PyCFunction)wb_stop, METH_NOARGS, "End the thread after the job in flight (its error is dropped)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WBType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "npystream._speedups.WriteBehind",
    .tp_basicsize = sizeof(WBObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "WriteBehind(scratch_size): the ragged writer's helper thread (see _speedups_io.c).",
    .tp_methods = wb_methods,
    .tp_members = wb_members,
    .tp_init = (initproc)wb_init,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)wb_dealloc,
};

int
npystream_io_init(PyObject *module)
{
    if (PyType_Ready(&WBType) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "WriteBehind", (PyObject *)&WBType);
}

#else /* _WIN32: no C helper; npystream.formats.ragged uses its Python one */

int
npystream_io_init(PyObject *module)
{
    (void)module;
    return 0;
}

#endif
