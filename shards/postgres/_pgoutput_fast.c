/* Optional C accelerator of the change stream's hot path (shards/postgres/change_stream.py).
 *
 * drain() reads every CopyData frame libpq has buffered (PQgetCopyData(conn, &buf, 1), no
 * Python call per frame) and decodes only the hot frames itself: an XLogData frame carrying
 * a pgoutput Insert, or an Update without an old key, of a relation Python marked as a
 * document table shaped (khash, id, doc), inside an open transaction that is not being
 * skipped. Those become Upsert tuples (rows outside the chunk's khash range are dropped, as
 * ChunkDecoder does). Every other frame (Begin, Commit, Relation, Origin, Message, fence
 * rows, Delete, Truncate, keepalives, any odd shape) is handed back to Python as the frame's
 * bytes, in order: Python's ChunkDecoder stays the authority for everything else, and the
 * pure-Python path stays the reference (tests/test_pgoutput_fast.py holds them equal).
 *
 * libpq's functions come as addresses from the very libpq psycopg loaded
 * (shards/postgres/_accel.py), set once with configure(). The module needs no libpq headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef int (*getcopy_fn)(void *conn, char **buffer, int async);
typedef void (*freemem_fn)(void *ptr);

static getcopy_fn pq_getcopy = NULL;
static freemem_fn pq_freemem = NULL;

static PyObject *
configure(PyObject *self, PyObject *args)
{
    unsigned long long getcopy, freemem;
    if (!PyArg_ParseTuple(args, "KK", &getcopy, &freemem))
        return NULL;
    if (getcopy == 0 || freemem == 0) {
        PyErr_SetString(PyExc_ValueError, "null libpq function address");
        return NULL;
    }
    pq_getcopy = (getcopy_fn)(uintptr_t)getcopy;
    pq_freemem = (freemem_fn)(uintptr_t)freemem;
    Py_RETURN_NONE;
}

static inline uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* PostgreSQL's bigint text form: -?[0-9]+ (anything else: 0, Python decides). */
static int
parse_int64(const unsigned char *s, Py_ssize_t n, long long *out)
{
    int neg = 0;
    unsigned long long v = 0;
    Py_ssize_t i = 0;
    if (n > 0 && s[0] == '-') {
        neg = 1;
        i = 1;
    }
    if (i >= n || n - i > 19)
        return 0;
    for (; i < n; i++) {
        unsigned c = s[i] - '0';
        if (c > 9)
            return 0;
        v = v * 10 + c;
    }
    if (neg) {
        if (v > 9223372036854775808ULL)
            return 0;
        *out = (long long)(0ULL - v);
    } else {
        if (v > 9223372036854775807ULL)
            return 0;
        *out = (long long)v;
    }
    return 1;
}

/* Status of drain(): why it returned. */
#define ST_EMPTY 0     /* nothing complete is buffered (PQgetCopyData returned 0) */
#define ST_LIMIT 1     /* a limit was reached, or a Relation frame was handed back */
#define ST_END (-1)    /* the COPY ended (PQgetCopyData returned -1) */
#define ST_ERROR (-2)  /* PQgetCopyData failed (-2) */

/* The hot frame: 1 = decoded (an Upsert in *out, or *out NULL: outside the range),
 * 0 = not a hot frame (hand it to Python), -1 = Python exception. */
static int
decode_hot(const unsigned char *m, Py_ssize_t mlen, PyTypeObject *upsert_type,
           const uint32_t *relids, Py_ssize_t nrel, long long lo, long long hi, int hi_inf,
           PyObject **out)
{
    const unsigned char *end = m + mlen;
    const unsigned char *p, *q, *e;
    uint32_t relid, ln;
    Py_ssize_t i;
    long long khash;
    PyObject *tup, *id, *doc, *kh;

    *out = NULL;
    if (mlen < 9 || (m[0] != 'I' && m[0] != 'U') || m[5] != 'N')
        return 0;
    relid = be32(m + 1);
    for (i = 0; i < nrel; i++)
        if (relids[i] == relid)
            break;
    if (i == nrel)
        return 0;
    p = m + 6;
    if (end - p < 7 || p[0] != 0 || p[1] != 3 || p[2] != 't')
        return 0;
    ln = be32(p + 3);
    if (ln > (uint32_t)(end - (p + 7)))
        return 0;
    if (!parse_int64(p + 7, (Py_ssize_t)ln, &khash))
        return 0;
    q = p + 7 + ln;
    if (end - q < 5 || q[0] != 't')
        return 0;
    ln = be32(q + 1);
    if (ln > (uint32_t)(end - (q + 5)))
        return 0;
    e = q + 5 + ln;
    if (e >= end)
        return 0;
    if (e[0] == 't') {
        if (end - e < 5)
            return 0;
        uint32_t dl = be32(e + 1);
        if (dl > (uint32_t)(end - (e + 5)))
            return 0;
        if (khash < lo || (!hi_inf && khash >= hi))
            return 1;
        doc = PyBytes_FromStringAndSize((const char *)e + 5, (Py_ssize_t)dl);
        if (doc == NULL)
            return -1;
    } else if (e[0] == 'u') {
        if (khash < lo || (!hi_inf && khash >= hi))
            return 1;
        doc = Py_NewRef(Py_None);
    } else {
        return 0;  /* NULL doc or an unknown kind: Python raises its ProtocolError */
    }
    id = PyBytes_FromStringAndSize((const char *)q + 5, (Py_ssize_t)ln);
    kh = PyLong_FromLongLong(khash);
    tup = upsert_type->tp_alloc(upsert_type, 4);
    if (id == NULL || kh == NULL || tup == NULL) {
        Py_XDECREF(id);
        Py_XDECREF(kh);
        Py_XDECREF(tup);
        Py_DECREF(doc);
        return -1;
    }
    PyTuple_SET_ITEM(tup, 0, kh);
    PyTuple_SET_ITEM(tup, 1, id);
    PyTuple_SET_ITEM(tup, 2, doc);
    PyTuple_SET_ITEM(tup, 3, Py_NewRef(m[0] == 'I' ? Py_True : Py_False));
    /* Only an int, bytes, None and a bool inside: it can never be part of a cycle. The
     * cyclic GC untracks such tuples itself, but only exact tuples; left tracked, every
     * Upsert of a backlog would be traversed again by each older-generation collection
     * (profiled: most of the C path's time went there). */
    PyObject_GC_UnTrack(tup);
    *out = tup;
    return 1;
}

/* drain(conn, upsert_type, relids, lo, hi, in_txn, skip, skip_origins, out_len, max_items,
 *       max_changes) -> (status, items, fast_frames, fast_bytes)
 *
 * items: in server order, each either a frame's bytes (for Python's ChangeStream._frame) or
 * a list of consecutive Upserts of the open transaction. fast_frames/fast_bytes: the frames
 * consumed here (for the stream's stats). in_txn/skip: the decoder's state at the call;
 * drain() follows Begin/Origin/Commit to keep it. It stops after a Relation frame (so the
 * next call sees Python's new relation marks), once out_len plus the Commits and keepalives
 * outside a transaction reaches max_items, or once out is non-empty and max_changes (< 0:
 * no limit) Upserts were made; Python applies its exact limits on top. */
static PyObject *
drain(PyObject *self, PyObject *args)
{
    unsigned long long conn_addr;
    PyObject *upsert_obj, *relids_obj, *lo_obj, *hi_obj;
    int in_txn, skip, skip_origins;
    Py_ssize_t out_len, max_items, max_changes;
    uint32_t relids[16];
    Py_ssize_t nrel, i;
    long long lo, hi = 0;
    int hi_inf = 0, overflow;
    void *conn;
    PyTypeObject *upsert_type;
    PyObject *items = NULL, *run = NULL, *res;
    long long fast_frames = 0, fast_bytes = 0;
    Py_ssize_t made = 0;
    int status = ST_EMPTY;

    if (!PyArg_ParseTuple(args, "KOO!OOpppnnn", &conn_addr, &upsert_obj, &PyTuple_Type,
                          &relids_obj, &lo_obj, &hi_obj, &in_txn, &skip, &skip_origins,
                          &out_len, &max_items, &max_changes))
        return NULL;
    if (pq_getcopy == NULL || pq_freemem == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure() was not called");
        return NULL;
    }
    if (!PyType_Check(upsert_obj) ||
        !PyType_IsSubtype((PyTypeObject *)upsert_obj, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "upsert_type must be a tuple subclass");
        return NULL;
    }
    upsert_type = (PyTypeObject *)upsert_obj;
    nrel = PyTuple_GET_SIZE(relids_obj);
    if (nrel > 16) {
        PyErr_SetString(PyExc_ValueError, "at most 16 document relations");
        return NULL;
    }
    for (i = 0; i < nrel; i++) {
        unsigned long v = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(relids_obj, i));
        if (v == (unsigned long)-1 && PyErr_Occurred())
            return NULL;
        relids[i] = (uint32_t)v;
    }
    lo = PyLong_AsLongLongAndOverflow(lo_obj, &overflow);
    if (lo == -1 && PyErr_Occurred())
        return NULL;
    if (overflow < 0)
        lo = INT64_MIN;
    else if (overflow > 0)
        nrel = 0;  /* an empty range: nothing is hot */
    hi = PyLong_AsLongLongAndOverflow(hi_obj, &overflow);
    if (hi == -1 && PyErr_Occurred())
        return NULL;
    if (overflow > 0)
        hi_inf = 1;
    else if (overflow < 0)
        nrel = 0;
    if (conn_addr == 0) {
        PyErr_SetString(PyExc_ValueError, "null PGconn");
        return NULL;
    }
    conn = (void *)(uintptr_t)conn_addr;

    items = PyList_New(0);
    if (items == NULL)
        return NULL;

    for (;;) {
        char *buf = NULL;
        int n = pq_getcopy(conn, &buf, 1);
        if (n <= 0) {
            if (buf != NULL)
                pq_freemem(buf);
            status = n == 0 ? ST_EMPTY : (n == -1 ? ST_END : ST_ERROR);
            break;
        }
        const unsigned char *f = (const unsigned char *)buf;
        int hot = 0, stop = 0;
        PyObject *upsert = NULL;
        if (f[0] == 'w' && n > 25) {
            const unsigned char *m = f + 25;
            switch (m[0]) {
            case 'I':
            case 'U':
                if (in_txn && !skip) {
                    hot = decode_hot(m, n - 25, upsert_type, relids, nrel, lo, hi, hi_inf,
                                     &upsert);
                    if (hot < 0) {
                        pq_freemem(buf);
                        goto fail;
                    }
                }
                break;
            case 'B':
                in_txn = 1;
                skip = 0;
                break;
            case 'O':
                if (in_txn && skip_origins)
                    skip = 1;
                break;
            case 'C':
                in_txn = 0;
                out_len++;
                break;
            case 'R':
                stop = 1;
                break;
            }
        } else if (f[0] == 'k' && !in_txn) {
            out_len++;
        }
        if (hot) {
            fast_frames++;
            fast_bytes += n;
            if (upsert != NULL) {
                if (run == NULL) {
                    run = PyList_New(0);
                    if (run == NULL || PyList_Append(items, run) < 0) {
                        Py_DECREF(upsert);
                        pq_freemem(buf);
                        goto fail;
                    }
                    Py_DECREF(run);  /* items holds it */
                }
                if (PyList_Append(run, upsert) < 0) {
                    Py_DECREF(upsert);
                    pq_freemem(buf);
                    goto fail;
                }
                Py_DECREF(upsert);
                made++;
            }
        } else {
            PyObject *raw = PyBytes_FromStringAndSize(buf, n);
            if (raw == NULL || PyList_Append(items, raw) < 0) {
                Py_XDECREF(raw);
                pq_freemem(buf);
                goto fail;
            }
            Py_DECREF(raw);
            run = NULL;
        }
        pq_freemem(buf);
        if (stop || out_len >= max_items ||
            (max_changes >= 0 && out_len > 0 && made >= max_changes)) {
            status = ST_LIMIT;
            break;
        }
    }
    res = Py_BuildValue("(iNLL)", status, items, fast_frames, fast_bytes);
    return res;

fail:
    Py_DECREF(items);
    return NULL;
}

/* -- the batch: collapse and COPY buffers (shards/postgres/apply_batch.py) -------------- */

#define OP_DELETE 0
#define OP_UPSERT 1
#define OP_INSERT 2
#define OP_NOTHING (-1)

typedef struct {
    PyObject *khash;  /* borrowed from the changes (alive for the call) */
    PyObject *id;
    PyObject *doc;    /* borrowed, or NULL for None */
    int absent;
    int op;
} Entry;

static PyObject *
row4(long op, PyObject *khash, PyObject *id, PyObject *doc)
{
    PyObject *o = PyLong_FromLong(op);
    if (o == NULL)
        return NULL;
    PyObject *t = PyTuple_New(4);
    if (t == NULL) {
        Py_DECREF(o);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, o);
    PyTuple_SET_ITEM(t, 1, Py_NewRef(khash));
    PyTuple_SET_ITEM(t, 2, Py_NewRef(id));
    PyTuple_SET_ITEM(t, 3, Py_NewRef(doc == NULL ? Py_None : doc));
    PyObject_GC_UnTrack(t);  /* ints, bytes, None: never in a cycle */
    return t;
}

/* collapse_changes(txns, Upsert, Delete, TruncateChunk)
 *   -> (rows, truncate, changes, deletes, upserts, inserts)
 * apply_batch.collapse's loop over the changes, exactly (the Python function is the
 * reference; tests/properties/test_pgoutput_fast.py holds them equal). */
static PyObject *
collapse_changes(PyObject *self, PyObject *args)
{
    PyObject *txns, *upsert_t, *delete_t, *truncate_t;
    PyObject *ops = NULL, *rows = NULL, *txns_fast = NULL, *changes_name = NULL;
    Entry *entries = NULL;
    Py_ssize_t n_entries = 0, cap = 0, i, j;
    long long changes = 0, deletes = 0, upserts = 0, inserts = 0;
    int truncated = 0;

    if (!PyArg_ParseTuple(args, "OOOO", &txns, &upsert_t, &delete_t, &truncate_t))
        return NULL;
    txns_fast = PySequence_Fast(txns, "txns must be a sequence");
    if (txns_fast == NULL)
        return NULL;
    ops = PyDict_New();
    rows = PyList_New(0);
    changes_name = PyUnicode_InternFromString("changes");
    if (ops == NULL || rows == NULL || changes_name == NULL)
        goto fail;
    /* The changes lists are read while the txns are alive; no Python code runs here. */
    PyObject **lists = NULL;
    Py_ssize_t ntx = PySequence_Fast_GET_SIZE(txns_fast);
    lists = PyMem_Calloc(ntx > 0 ? ntx : 1, sizeof(PyObject *));
    if (lists == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (i = 0; i < ntx; i++) {
        PyObject *lst = PyObject_GetAttr(PySequence_Fast_GET_ITEM(txns_fast, i), changes_name);
        if (lst == NULL)
            goto fail_lists;
        if (!PyList_Check(lst)) {
            Py_DECREF(lst);
            PyErr_SetString(PyExc_TypeError, "Transaction.changes must be a list");
            goto fail_lists;
        }
        lists[i] = lst;
    }
    for (i = 0; i < ntx; i++) {
        PyObject *lst = lists[i];
        for (j = 0; j < PyList_GET_SIZE(lst); j++) {
            PyObject *ch = PyList_GET_ITEM(lst, j);
            PyObject *t = (PyObject *)Py_TYPE(ch);
            changes++;
            if (t == upsert_t || t == delete_t) {
                if (PyTuple_GET_SIZE(ch) < (t == upsert_t ? 4 : 2)) {
                    PyErr_SetString(PyExc_TypeError, "a change with too few fields");
                    goto fail_lists;
                }
                PyObject *khash = PyTuple_GET_ITEM(ch, 0), *id = PyTuple_GET_ITEM(ch, 1);
                PyObject *key = PyTuple_Pack(2, khash, id);
                if (key == NULL)
                    goto fail_lists;
                PyObject *found = PyDict_GetItemWithError(ops, key);
                if (found == NULL && PyErr_Occurred()) {
                    Py_DECREF(key);
                    goto fail_lists;
                }
                Entry *e;
                if (found == NULL) {
                    if (n_entries == cap) {
                        Py_ssize_t ncap = cap ? cap * 2 : 1024;
                        Entry *ne = PyMem_Realloc(entries, ncap * sizeof(Entry));
                        if (ne == NULL) {
                            Py_DECREF(key);
                            PyErr_NoMemory();
                            goto fail_lists;
                        }
                        entries = ne;
                        cap = ncap;
                    }
                    PyObject *idx = PyLong_FromSsize_t(n_entries);
                    if (idx == NULL || PyDict_SetItem(ops, key, idx) < 0) {
                        Py_XDECREF(idx);
                        Py_DECREF(key);
                        goto fail_lists;
                    }
                    Py_DECREF(idx);
                    e = &entries[n_entries++];
                    e->khash = khash;
                    e->id = id;
                    if (t == upsert_t) {
                        PyObject *doc = PyTuple_GET_ITEM(ch, 2);
                        int fresh = PyObject_IsTrue(PyTuple_GET_ITEM(ch, 3));
                        if (fresh < 0) {
                            Py_DECREF(key);
                            goto fail_lists;
                        }
                        e->absent = fresh || truncated;
                        e->op = doc == Py_None ? OP_NOTHING : OP_UPSERT;
                        e->doc = doc == Py_None ? NULL : doc;
                    } else {
                        e->absent = truncated;
                        e->op = OP_DELETE;
                        e->doc = NULL;
                    }
                } else {
                    e = &entries[PyLong_AsSsize_t(found)];
                    if (t == upsert_t) {
                        PyObject *doc = PyTuple_GET_ITEM(ch, 2);
                        if (doc != Py_None) {
                            e->op = OP_UPSERT;
                            e->doc = doc;
                        }
                    } else {
                        e->op = OP_DELETE;
                        e->doc = NULL;
                    }
                }
                Py_DECREF(key);
            } else if (t == truncate_t) {
                PyDict_Clear(ops);
                n_entries = 0;
                truncated = 1;
            }
        }
    }
    for (i = 0; i < n_entries; i++) {
        Entry *e = &entries[i];
        PyObject *row;
        if (e->op == OP_NOTHING)
            continue;
        if (e->op == OP_DELETE) {
            if (e->absent)
                continue;
            deletes++;
            row = row4(OP_DELETE, e->khash, e->id, NULL);
        } else if (e->absent) {
            inserts++;
            row = row4(OP_INSERT, e->khash, e->id, e->doc);
        } else {
            upserts++;
            row = row4(OP_UPSERT, e->khash, e->id, e->doc);
        }
        if (row == NULL || PyList_Append(rows, row) < 0) {
            Py_XDECREF(row);
            goto fail_lists;
        }
        Py_DECREF(row);
    }
    for (i = 0; i < ntx; i++)
        Py_XDECREF(lists[i]);
    PyMem_Free(lists);
    PyMem_Free(entries);
    Py_DECREF(ops);
    Py_DECREF(txns_fast);
    Py_DECREF(changes_name);
    return Py_BuildValue("(NOLLLL)", rows, truncated ? Py_True : Py_False, changes, deletes,
                         upserts, inserts);

fail_lists:
    for (i = 0; i < ntx; i++)
        Py_XDECREF(lists[i]);
    PyMem_Free(lists);
fail:
    PyMem_Free(entries);
    Py_XDECREF(ops);
    Py_XDECREF(rows);
    Py_XDECREF(txns_fast);
    Py_XDECREF(changes_name);
    return NULL;
}

static const char COPY_HEADER[19] = "PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

static inline char *
put16(char *p, int v)
{
    p[0] = (char)((v >> 8) & 0xff);
    p[1] = (char)(v & 0xff);
    return p + 2;
}

static inline char *
put32(char *p, uint32_t v)
{
    p[0] = (char)(v >> 24);
    p[1] = (char)(v >> 16);
    p[2] = (char)(v >> 8);
    p[3] = (char)v;
    return p + 4;
}

static inline char *
put64(char *p, uint64_t v)
{
    p = put32(p, (uint32_t)(v >> 32));
    return put32(p, (uint32_t)v);
}

/* copy_buffers(rows) -> (staged, fresh): apply_batch.copy_buffers, exactly. */
static PyObject *
copy_buffers(PyObject *self, PyObject *args)
{
    PyObject *rows_obj, *rows;
    Py_ssize_t n, i, staged_len = 19 + 2, fresh_len = 19 + 2;
    PyObject *staged = NULL, *fresh = NULL;
    char *sp, *fp;

    if (!PyArg_ParseTuple(args, "O", &rows_obj))
        return NULL;
    rows = PySequence_Fast(rows_obj, "rows must be a sequence");
    if (rows == NULL)
        return NULL;
    n = PySequence_Fast_GET_SIZE(rows);
    /* First pass: check the rows and size the buffers. */
    for (i = 0; i < n; i++) {
        PyObject *r = PySequence_Fast_GET_ITEM(rows, i);
        if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 4 ||
            !PyLong_Check(PyTuple_GET_ITEM(r, 0)) || !PyLong_Check(PyTuple_GET_ITEM(r, 1)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(r, 2)) ||
            (PyTuple_GET_ITEM(r, 3) != Py_None && !PyBytes_Check(PyTuple_GET_ITEM(r, 3)))) {
            PyErr_SetString(PyExc_TypeError, "a row must be (op, khash, id: bytes, doc)");
            Py_DECREF(rows);
            return NULL;
        }
        long op = PyLong_AsLong(PyTuple_GET_ITEM(r, 0));
        if (op == -1 && PyErr_Occurred()) {
            Py_DECREF(rows);
            return NULL;
        }
        PyObject *doc = PyTuple_GET_ITEM(r, 3);
        Py_ssize_t size = PyBytes_GET_SIZE(PyTuple_GET_ITEM(r, 2)) +
                          (doc == Py_None ? 4 : 5 + PyBytes_GET_SIZE(doc));
        if (op == OP_INSERT)
            fresh_len += 2 + 4 + 8 + 4 + size;
        else
            staged_len += 2 + 4 + 2 + 4 + 8 + 4 + size;
    }
    staged = PyBytes_FromStringAndSize(NULL, staged_len);
    fresh = PyBytes_FromStringAndSize(NULL, fresh_len);
    if (staged == NULL || fresh == NULL)
        goto fail;
    sp = PyBytes_AS_STRING(staged);
    fp = PyBytes_AS_STRING(fresh);
    memcpy(sp, COPY_HEADER, 19);
    memcpy(fp, COPY_HEADER, 19);
    sp += 19;
    fp += 19;
    for (i = 0; i < n; i++) {
        PyObject *r = PySequence_Fast_GET_ITEM(rows, i);
        long op = PyLong_AsLong(PyTuple_GET_ITEM(r, 0));
        int overflow;
        long long khash = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(r, 1), &overflow);
        if (overflow || (khash == -1 && PyErr_Occurred()) || op < -32768 || op > 32767) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_OverflowError, "khash or op out of range");
            goto fail;
        }
        PyObject *id = PyTuple_GET_ITEM(r, 2), *doc = PyTuple_GET_ITEM(r, 3);
        Py_ssize_t idlen = PyBytes_GET_SIZE(id);
        char *p = op == OP_INSERT ? fp : sp;
        if (op == OP_INSERT) {
            p = put16(p, 3);
        } else {
            p = put16(p, 4);
            p = put32(p, 2);
            p = put16(p, (int)op);
        }
        p = put32(p, 8);
        p = put64(p, (uint64_t)khash);
        p = put32(p, (uint32_t)idlen);
        memcpy(p, PyBytes_AS_STRING(id), idlen);
        p += idlen;
        if (doc == Py_None) {
            p = put32(p, 0xffffffffu);
        } else {
            Py_ssize_t dl = PyBytes_GET_SIZE(doc);
            p = put32(p, (uint32_t)(dl + 1));
            *p++ = 1;
            memcpy(p, PyBytes_AS_STRING(doc), dl);
            p += dl;
        }
        if (op == OP_INSERT)
            fp = p;
        else
            sp = p;
    }
    sp = put16(sp, 0xffff);
    fp = put16(fp, 0xffff);
    Py_DECREF(rows);
    return Py_BuildValue("(NN)", staged, fresh);

fail:
    Py_XDECREF(staged);
    Py_XDECREF(fresh);
    Py_DECREF(rows);
    return NULL;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(PQgetCopyData_address, PQfreemem_address): the libpq psycopg uses."},
    {"drain", drain, METH_VARARGS,
     "Drain buffered CopyData frames; decode the hot document rows (see the source)."},
    {"collapse_changes", collapse_changes, METH_VARARGS,
     "apply_batch.collapse's loop over the changes (see the source)."},
    {"copy_buffers", copy_buffers, METH_VARARGS,
     "apply_batch.copy_buffers: the binary COPY inputs of a batch."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pgoutput_fast",
    "Optional C accelerator of the pgoutput change stream's hot path.", -1, methods,
};

PyMODINIT_FUNC
PyInit__pgoutput_fast(void)
{
    return PyModule_Create(&module);
}
