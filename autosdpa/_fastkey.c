/* The dispatcher's fast key in C: the same tuple as autosdpa.fastkey.py_key, built without the interpreter.
 *
 * Why: on a cache hit the key is most of autosdpa's cost. In Python each tensor attribute read goes through
 * the generic attribute lookup before PyTorch's getter runs; here the getters of torch.Tensor's own
 * descriptors are called directly. Only plain torch.Tensor inputs take this path (a subclass may override
 * the attributes); everything else is handed to the Python key, so both always agree. The getters are
 * PyTorch's own, so __torch_function__ modes and errors behave exactly as in Python.
 *
 * hit() is the whole cache-hit path: key, lookup, and the call of F.sdpa or of the plan. On a miss it returns
 * the key it built (or () when it could not build one) and the Python dispatcher takes over.
 *
 * Uses only CPython's API (no PyTorch headers): init() and bind() receive what they use from Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

typedef struct {
    getter get;
    void *closure;
} Getter;

#define N_FLAGS 5
#define KEY_LEN 16

static PyTypeObject *tensor_type;        /* torch.Tensor */
static PyObject *descrs[4];              /* shape, dtype, requires_grad, device: kept alive for their getters */
static Getter g_shape, g_dtype, g_grad, g_device;
static PyObject *flag_fns[N_FLAGS];      /* PyTorch's sdp flag getters and the deterministic-algorithms one */
static PyObject *slow_key;               /* autosdpa.fastkey.py_key: every input that is not a plain tensor */
static PyObject *mask_sig;               /* autosdpa.fastkey.mask_sig: masks that are not plain tensors */
static PyObject *plans;                  /* the dispatcher's fast key -> plan dict (None: F.sdpa) */
static PyObject *sdpa;                   /* PyTorch's own F.scaled_dot_product_attention */
static PyObject *last_key, *last_plan;   /* the last key found in plans: a model's layers mostly repeat it */
static PyObject *kw_causal, *kw_scale_gqa;

static int take_getter(PyTypeObject *tt, PyObject *descr, Getter *out, const char *name)
{
    if (!PyObject_TypeCheck(descr, &PyGetSetDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "torch.Tensor.%s is not a C getter", name);
        return -1;
    }
    PyGetSetDef *def = ((PyGetSetDescrObject *)descr)->d_getset;
    if (def->get == NULL || !PyType_IsSubtype(tt, PyDescr_TYPE(descr))) {
        PyErr_Format(PyExc_TypeError, "torch.Tensor.%s: unexpected descriptor", name);
        return -1;
    }
    out->get = def->get;
    out->closure = def->closure;
    return 0;
}

static void clear(void)
{
    Py_CLEAR(tensor_type);
    for (int i = 0; i < 4; i++)
        Py_CLEAR(descrs[i]);
    for (int i = 0; i < N_FLAGS; i++)
        Py_CLEAR(flag_fns[i]);
    Py_CLEAR(slow_key);
    Py_CLEAR(mask_sig);
}

/* init(tensor_type, shape, dtype, requires_grad, device, flag_fns, slow_key, mask_sig) */
static PyObject *init(PyObject *mod, PyObject *args)
{
    PyObject *tt, *shape, *dtype, *grad, *device, *flags, *slow, *msig;
    if (!PyArg_ParseTuple(args, "O!OOOOO!OO:init", &PyType_Type, &tt, &shape, &dtype, &grad, &device,
                          &PyTuple_Type, &flags, &slow, &msig))
        return NULL;
    if (PyTuple_GET_SIZE(flags) != N_FLAGS) {
        PyErr_Format(PyExc_ValueError, "init: %d flag getters expected", N_FLAGS);
        return NULL;
    }
    if (!PyCallable_Check(slow) || !PyCallable_Check(msig)) {
        PyErr_SetString(PyExc_TypeError, "init: slow_key and mask_sig must be callable");
        return NULL;
    }
    Getter gs, gt, gg, gd;  /* checked before anything is replaced: a failed init leaves the last good one */
    if (take_getter((PyTypeObject *)tt, shape, &gs, "shape") < 0 ||
        take_getter((PyTypeObject *)tt, dtype, &gt, "dtype") < 0 ||
        take_getter((PyTypeObject *)tt, grad, &gg, "requires_grad") < 0 ||
        take_getter((PyTypeObject *)tt, device, &gd, "device") < 0)
        return NULL;
    clear();
    tensor_type = (PyTypeObject *)Py_NewRef(tt);
    descrs[0] = Py_NewRef(shape);
    descrs[1] = Py_NewRef(dtype);
    descrs[2] = Py_NewRef(grad);
    descrs[3] = Py_NewRef(device);
    g_shape = gs;
    g_dtype = gt;
    g_grad = gg;
    g_device = gd;
    for (int i = 0; i < N_FLAGS; i++)
        flag_fns[i] = Py_NewRef(PyTuple_GET_ITEM(flags, i));
    slow_key = Py_NewRef(slow);
    mask_sig = Py_NewRef(msig);
    Py_RETURN_NONE;
}

#define GET(g, obj) ((g).get((obj), (g).closure))

/* Item i of the new tuple t := x (a new reference); 0 when x is NULL (its error is set). */
static inline int put(PyObject *t, Py_ssize_t i, PyObject *x)
{
    if (x == NULL)
        return 0;
    PyTuple_SET_ITEM(t, i, x);
    return 1;
}

/* (m.shape, m.dtype, m.__class__, m.requires_grad, m.device) for a plain tensor mask */
static PyObject *tensor_mask_sig(PyObject *m)
{
    PyObject *t = PyTuple_New(5);
    if (t == NULL)
        return NULL;
    if (!put(t, 0, GET(g_shape, m)) || !put(t, 1, GET(g_dtype, m)) || !put(t, 2, Py_NewRef(Py_TYPE(m))) ||
        !put(t, 3, GET(g_grad, m)) || !put(t, 4, GET(g_device, m))) {
        Py_DECREF(t);  /* items not yet set are NULL, which a tuple's deallocation skips */
        return NULL;
    }
    return t;
}

static PyObject *mask_key(PyObject *m)
{
    if (m == Py_None)
        return Py_NewRef(Py_None);
    if (Py_TYPE(m) == tensor_type)
        return tensor_mask_sig(m);
    return PyObject_Vectorcall(mask_sig, &m, 1, NULL);
}

/* The key of a = (q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, overrides_key). */
static PyObject *build_key(PyObject *const *a)
{
    PyObject *q = a[0], *k = a[1], *v = a[2];
    if (Py_TYPE(q) != tensor_type || Py_TYPE(k) != tensor_type || Py_TYPE(v) != tensor_type)
        return PyObject_Vectorcall(slow_key, a, 8, NULL);

    PyObject *t = PyTuple_New(KEY_LEN);
    if (t == NULL)
        return NULL;
    /* in Python's order, so the first error raised is the same */
    int ok = put(t, 0, GET(g_shape, q)) && put(t, 1, GET(g_shape, k)) && put(t, 2, GET(g_shape, v)) &&
             put(t, 3, GET(g_dtype, q)) && put(t, 4, GET(g_device, q)) && put(t, 5, mask_key(a[3])) &&
             put(t, 6, Py_NewRef(a[4])) && put(t, 7, Py_NewRef(a[5])) && put(t, 8, Py_NewRef(a[6])) &&
             put(t, 9, GET(g_grad, q));
    for (int i = 0; ok && i < N_FLAGS; i++)
        ok = put(t, 10 + i, PyObject_Vectorcall(flag_fns[i], NULL, 0, NULL));
    if (!ok || !put(t, 15, Py_NewRef(a[7]))) {
        Py_DECREF(t);
        return NULL;
    }
    return t;
}

static int ready(void)
{
    if (tensor_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "autosdpa._fastkey.init() has not been called");
        return 0;
    }
    return 1;
}

/* key(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, overrides_key) -> the fast key */
static PyObject *key(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    if (n != 8) {
        PyErr_Format(PyExc_TypeError, "key() takes 8 arguments (%zd given)", n);
        return NULL;
    }
    return ready() ? build_key(a) : NULL;
}

/* bind(plans, sdpa): the dict hit() looks keys up in and the function it calls for a None plan */
static PyObject *bind(PyObject *mod, PyObject *args)
{
    PyObject *p, *f;
    if (!PyArg_ParseTuple(args, "O!O:bind", &PyDict_Type, &p, &f))
        return NULL;
    Py_XSETREF(plans, Py_NewRef(p));
    Py_XSETREF(sdpa, Py_NewRef(f));
    Py_CLEAR(last_key);
    Py_CLEAR(last_plan);
    Py_RETURN_NONE;
}

/* forget(): drop the last key found (the plans were cleared) */
static PyObject *forget(PyObject *mod, PyObject *unused)
{
    Py_CLEAR(last_key);
    Py_CLEAR(last_plan);
    Py_RETURN_NONE;
}

/* The plan for key ``fk`` (a new reference), or NULL with no error set when it is not in the plans. */
static PyObject *find(PyObject *fk)
{
    /* references of our own: another thread may replace last_* while a comparison runs Python code */
    PyObject *lk = Py_XNewRef(last_key), *lp = Py_XNewRef(last_plan);
    int same = lk == NULL ? 0 : PyObject_RichCompareBool(fk, lk, Py_EQ);
    Py_XDECREF(lk);
    if (same > 0)
        return lp;
    Py_XDECREF(lp);
    if (same < 0)
        return NULL;
    PyObject *plan = PyDict_GetItemWithError(plans, fk);  /* borrowed */
    if (plan == NULL)
        return NULL;
    Py_INCREF(plan);
    /* only keys found in plans: a plan not cached must not be reused */
    Py_XSETREF(last_key, Py_NewRef(fk));
    Py_XSETREF(last_plan, Py_NewRef(plan));
    return plan;
}

/* An Exception while keying: () so that Python redoes it and handles it as always (``except Exception``).
 * Anything else (KeyboardInterrupt, SystemExit) propagates, as it does from the Python path. */
static PyObject *retry_in_python(void)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return NULL;
    PyErr_Clear();
    return PyTuple_New(0);
}

/* hit(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, overrides_key): the output of a cache hit;
 * on a miss the fast key (a tuple: outputs never are), or () where keying or the lookup raised (Python redoes
 * them and handles the error as it always does). Errors from F.sdpa or the plan propagate. */
static PyObject *hit(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    if (n != 9) {
        PyErr_Format(PyExc_TypeError, "hit() takes 9 arguments (%zd given)", n);
        return NULL;
    }
    if (!ready())
        return NULL;
    if (plans == NULL)
        return PyTuple_New(0);
    PyObject *q = a[0], *k = a[1], *v = a[2], *m = a[3], *dp = a[4], *ic = a[5], *sc = a[6], *gqa = a[7];
    PyObject *ka[8] = {q, k, v, m, dp, ic, gqa, a[8]};
    PyObject *fk = build_key(ka);
    if (fk == NULL)
        return retry_in_python();
    PyObject *plan = find(fk);
    if (plan == NULL) {
        if (!PyErr_Occurred())
            return fk;
        Py_DECREF(fk);
        return retry_in_python();
    }
    Py_DECREF(fk);
    PyObject *out;
    if (plan != Py_None) {
        out = PyObject_Vectorcall(plan, a, 8, NULL);
    } else if (m == Py_None && PyFloat_CheckExact(dp) && PyFloat_AS_DOUBLE(dp) == 0.0 && sc == Py_None &&
               gqa == Py_False && (ic == Py_True || ic == Py_False)) {
        /* only what differs from the defaults: PyTorch's argument parsing costs for every explicit one */
        PyObject *args[4] = {q, k, v, Py_True};
        out = PyObject_Vectorcall(sdpa, args, 3, ic == Py_True ? kw_causal : NULL);
    } else {
        PyObject *args[8] = {q, k, v, m, dp, ic, sc, gqa};
        out = PyObject_Vectorcall(sdpa, args, 6, kw_scale_gqa);
    }
    Py_DECREF(plan);
    return out;
}

static PyMethodDef methods[] = {
    {"init", init, METH_VARARGS, "init(tensor_type, shape, dtype, requires_grad, device, flag_fns, "
                                 "slow_key, mask_sig): what key() reads, from Python."},
    {"key", (PyCFunction)(void (*)(void))key, METH_FASTCALL,
     "key(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, overrides_key): the dispatcher's fast key."},
    {"bind", bind, METH_VARARGS, "bind(plans, sdpa): the plans hit() looks up and PyTorch's F.sdpa."},
    {"forget", forget, METH_NOARGS, "forget(): drop the last key found (call when the plans are cleared)."},
    {"hit", (PyCFunction)(void (*)(void))hit, METH_FASTCALL,
     "hit(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, overrides_key): a cache hit's output; "
     "on a miss the fast key, or () where it could not be built."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastkey", "The dispatcher's fast key, in C.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastkey(void)
{
    if (kw_causal == NULL) {
        kw_causal = Py_BuildValue("(N)", PyUnicode_InternFromString("is_causal"));
        kw_scale_gqa = Py_BuildValue("(NN)", PyUnicode_InternFromString("scale"),
                                     PyUnicode_InternFromString("enable_gqa"));
        if (kw_causal == NULL || kw_scale_gqa == NULL) {
            Py_CLEAR(kw_causal);
            Py_CLEAR(kw_scale_gqa);
            return NULL;
        }
    }
    return PyModule_Create(&module);
}
