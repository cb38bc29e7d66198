/*
 * npystream._speedups (part 4): WriteBehind, the ragged writer's helper thread in C.
 *
 *   w = WriteBehind(depth=1)
 *   w.submit(fd, data, offset)   wait until fewer than depth writes are unwritten, then queue this one
 *   w.wait()                     wait until every write is done (raise an OSError, if any)
 *   w.busy() -> bool             whether a write is unwritten
 *   w.stop()                     end the thread (after the queued writes; their error is dropped)
 *   w.depth                      the most writes in flight at once
 *
 * A write pwrite()s the bytes of ``data`` (any C-contiguous buffer) to ``fd`` at ``offset``.  The
 * thread is a plain pthread that never touches Python: no GIL hand-over between writes (the Python
 * helper, ragged._WriteBehind, needs the GIL after every write, and the writer's thread, busy
 * decoding, hands it over only every switch interval), and up to ``depth`` writes queued, so that
 * neither thread waits for the jitter of the other.  Each buffer is held (PyObject_GetBuffer) from
 * submit() until a later submit(), wait() or stop() sees its write done.  submit, wait and stop are
 * single C calls, so an exception raised in the writer's thread (Ctrl-C) can never land half-way
 * through one.  A write error is sticky: every later submit()/wait() raises it.  Same contract as
 * the pure-Python helper (its docstring), which has depth 1.  Linked into npystream._speedups;
 * _speedups_build.c's init hook calls npystream_io_init(module).
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
#ifdef __linux__
#include <sys/prctl.h>
#endif

#define QMAX 16 /* most writes queued at once */

typedef struct {
    Py_buffer view; /* view.obj == NULL: empty slot */
    int fd;
    long long offset;
} Job;

typedef struct {
    PyObject_HEAD
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* signalled on every state change */
    int ready, started, stop, depth;
    /* writes ever handed over, done by the thread, and whose buffers were released: write i lives in
       q[i % QMAX] from submit() until collected; submitted - completed <= depth <= QMAX */
    long long submitted, completed, collected;
    Job q[QMAX];
    int err; /* errno of the first failed write (sticky) */
} WBObject;

/* write all of buf[0:n] at off; 0 or an errno */
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

static void *
wb_main(void *arg)
{
    WBObject *w = (WBObject *)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals (Ctrl-C) go to Python's threads */
#ifdef __linux__
    prctl(PR_SET_NAME, "npystream-wb", 0, 0, 0); /* findable in /proc/self/task/N/comm */
#endif
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (w->completed == w->submitted && !w->stop)
            pthread_cond_wait(&w->cv, &w->mu);
        if (w->completed < w->submitted) {
            Job job = w->q[w->completed % QMAX];
            int failed = w->err;
            pthread_mutex_unlock(&w->mu);
            /* after an error, writes are dropped */
            int e = failed ? 0 : write_all(job.fd, (const char *)job.view.buf, job.view.len, job.offset);
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

/* wait (GIL released) until at most `most` writes are unwritten, then release the buffers of the done
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
        PyBuffer_Release(&job->view);
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
    int depth = 1;
    static char *kwlist[] = {"depth", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|i", kwlist, &depth))
        return -1;
    if (w->ready) {
        PyErr_SetString(PyExc_RuntimeError, "WriteBehind is already initialised");
        return -1;
    }
    if (depth < 1 || depth > QMAX) {
        PyErr_Format(PyExc_ValueError, "depth must be 1..%d", QMAX);
        return -1;
    }
    w->depth = depth;
    if (pthread_mutex_init(&w->mu, NULL) != 0)
        goto no_sync;
    if (pthread_cond_init(&w->cv, NULL) != 0) {
        pthread_mutex_destroy(&w->mu);
        goto no_sync;
    }
    w->ready = 1;
    int e = pthread_create(&w->thread, NULL, wb_main, w);
    if (e != 0) {
        errno = e;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    w->started = 1;
    return 0;
no_sync:
    PyErr_SetString(PyExc_RuntimeError, "WriteBehind: cannot create a mutex");
    return -1;
}

static PyObject *
wb_submit(WBObject *w, PyObject *args)
{
    int fd;
    PyObject *data;
    long long offset;
    if (!PyArg_ParseTuple(args, "iOL", &fd, &data, &offset))
        return NULL;
    if (!w->started) {
        PyErr_SetString(PyExc_ValueError, "WriteBehind is stopped");
        return NULL;
    }
    if (offset < 0) {
        PyErr_SetString(PyExc_ValueError, "negative offset");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (collect(w, w->depth - 1) < 0) { /* room for this write */
        PyBuffer_Release(&view);
        return NULL;
    }
    Job *job = &w->q[w->submitted % QMAX]; /* collected: free */
    job->view = view;
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
    if (w->ready && collect(w, 0) < 0)
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

/* end the thread, release every buffer; the sticky error stays for submit() but is not raised */
static void
shut(WBObject *w)
{
    if (!w->ready)
        return;
    stop_thread(w); /* runs the queued writes first */
    int err = w->err;
    w->err = 0;
    collect(w, 0); /* the thread is gone: every write is done */
    w->err = err;
}

static PyObject *
wb_stop(WBObject *w, PyObject *Py_UNUSED(ignored))
{
    shut(w);
    Py_RETURN_NONE;
}

static void
wb_dealloc(WBObject *w)
{
    shut(w);
    if (w->ready) {
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->cv);
    }
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyMemberDef wb_members[] = {
    {"depth", T_INT, offsetof(WBObject, depth), READONLY, "Most writes in flight at once."},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef wb_methods[] = {
    {"submit", (PyCFunction)wb_submit, METH_VARARGS,
     "submit(fd, data, offset): wait for room, then pwrite data (a buffer) at offset of fd from the helper thread."},
    {"wait", (PyCFunction)wb_wait, METH_NOARGS, "Wait until every write is done; raise OSError if one failed."},
    {"busy", (PyCFunction)wb_busy, METH_NOARGS, "Whether a write is unwritten (a hint)."},
    {"stop", (PyCFunction)wb_stop, METH_NOARGS, "End the thread after the queued writes (their error is dropped)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WBType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "npystream._speedups.WriteBehind",
    .tp_basicsize = sizeof(WBObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "WriteBehind(depth=1): the ragged writer's helper thread (see _speedups_io.c).",
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
