/* The score stage's arithmetic in one pass per candidate set (decision._kernels).
 *
 * decision/scoring.py and learners/features.py describe what is computed; this file only does it
 * without numpy's per-operation overhead (some 80 small array operations per decision, each a few
 * microseconds on 64 rows). tests/test_kernels.py checks every output against a numpy reference
 * on random inputs, NaN and infinities included.
 *
 * Arguments are buffers (numpy arrays, C-contiguous float64 or intp); sizes are checked here, so a
 * wrong shape raises ValueError instead of reading past an array. NaN handling follows numpy:
 * np.minimum / np.maximum propagate NaN (C's fmin / fmax would not), hence np_min / np_max.
 * Built without FP contraction (setup flags) so results match numpy's operation order.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

static inline double np_max(double a, double b) { return (isnan(a) || isnan(b)) ? NAN : (a > b ? a : b); }
static inline double np_min(double a, double b) { return (isnan(a) || isnan(b)) ? NAN : (a < b ? a : b); }
static inline double clip(double x, double lo, double hi) { return np_min(np_max(x, lo), hi); }

/* A buffer of `count` items of `itemsize` bytes, or a ValueError naming `what`. */
static int check_len(const Py_buffer *b, Py_ssize_t count, Py_ssize_t itemsize, const char *what) {
    if (b->len != count * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items of %zd bytes, got %zd bytes", what, count, itemsize,
                     b->len);
        return -1;
    }
    return 0;
}

/* An optional read-only buffer argument (None: absent). */
static int optional_buffer(PyObject *obj, Py_buffer *view) {
    if (obj == Py_None) {
        view->obj = NULL;
        view->buf = NULL;
        return 0;
    }
    return PyObject_GetBuffer(obj, view, PyBUF_SIMPLE);
}

static void release(Py_buffer *views[], int n) {
    for (int i = 0; i < n; i++)
        if (views[i]->obj != NULL) PyBuffer_Release(views[i]);
}

/* Rows of the estimate output (decision/scoring.py ESTIMATE_ROWS). */
enum { E_TTFT, E_COST, E_QUEUE, E_PREFILL, E_COLD, E_RUNNING, E_WAITING, E_KV, E_ADDED, E_COST_MS, E_RANK, E_ROWS };
/* Rows of an own-traffic ledger's state (decision/ledger.py). */
enum { L_INFLIGHT, L_DUE, L_LOG_SLOW, L_RATE, L_RATE_AT, L_ROWS };

PyDoc_STRVAR(estimate_doc,
"estimate(numbers, tel, rtt, egress, ledger, ncols, run_col, wait_col, kv_col, in_tok, out_tok,\n"
"         unknown_load, egress_factor, now, rate_window_s, added_weight, cost_weight_ms, out)\n\n"
"Expected TTFT and cost of n candidates into out (11 x n rows: ttft, cost, queue, prefill, cold,\n"
"running, waiting, kv, added delay, cost penalty, rank = ttft + added delay + cost penalty). numbers: n x 6 (decision.candidates.endpoint_numbers);\n"
"tel: n x ncols telemetry (NaN unknown); rtt: n; egress ($/GB): n, or None; ledger: the\n"
"candidates' own-traffic state, 5 x n (decision.ledger.EndpointLedger.state_of: in flight,\n"
"prefill due, log slowness, arrival rate and when), or None;\n"
"egress_factor: GB sent per 1K output tokens (cost = nominal + egress * egress_factor);\n"
"cost_weight_ms: ms of TTFT traded for $0.001 per 1K tokens (cost penalty = cost_weight_ms * cost * 1000).");

static PyObject *estimate(PyObject *self, PyObject *args) {
    Py_buffer numbers = {0}, tel = {0}, rtt = {0}, egress = {0}, ledger = {0}, out = {0};
    PyObject *egress_obj, *ledger_obj;
    Py_ssize_t ncols, run_col, wait_col, kv_col;
    double in_tok, out_tok, unknown_load, egress_factor, now, rate_window, added_weight, cost_weight;
    if (!PyArg_ParseTuple(args, "y*y*y*OOnnnnddddddddw*", &numbers, &tel, &rtt, &egress_obj, &ledger_obj, &ncols,
                          &run_col, &wait_col, &kv_col, &in_tok, &out_tok, &unknown_load, &egress_factor, &now,
                          &rate_window, &added_weight, &cost_weight, &out))
        return NULL;
    Py_buffer *views[] = {&numbers, &tel, &rtt, &egress, &ledger, &out};
    PyObject *result = NULL;
    if (optional_buffer(egress_obj, &egress) < 0 || optional_buffer(ledger_obj, &ledger) < 0) goto done;
    const Py_ssize_t n = rtt.len / (Py_ssize_t)sizeof(double);
    if (check_len(&rtt, n, sizeof(double), "rtt") < 0 || check_len(&numbers, n * 6, sizeof(double), "numbers") < 0 ||
        check_len(&tel, n * ncols, sizeof(double), "tel") < 0 ||
        check_len(&out, n * E_ROWS, sizeof(double), "out") < 0 ||
        (egress.obj && check_len(&egress, n, sizeof(double), "egress") < 0) ||
        (ledger.obj && check_len(&ledger, n * L_ROWS, sizeof(double), "ledger") < 0))
        goto done;
    if (run_col < 0 || run_col >= ncols || wait_col < 0 || wait_col >= ncols || kv_col < 0 || kv_col >= ncols) {
        PyErr_SetString(PyExc_ValueError, "telemetry column out of range");
        goto done;
    }
    const double *num = numbers.buf, *t = tel.buf, *r = rtt.buf, *eg = egress.buf, *led = ledger.buf;
    double *o = out.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        const double *e = num + i * 6, *row = t + i * ncols;
        const double conc = e[0], prefill_tps = e[1], decode_tps = e[2], cold_ms = e[3], nominal = e[4],
                     batch_half = e[5];
        double running = row[run_col], waiting = row[wait_col], kv = row[kv_col];
        if (isnan(running)) running = unknown_load * conc;
        if (isnan(waiting)) waiting = unknown_load * conc * 0.25;
        if (isnan(kv)) kv = unknown_load;
        /* The router's own traffic: in flight (a lower bound on the load), what is left of the
           prompts it sent (ms), how much slower than its numbers the endpoint has been
           (outcome-calibrated) and its recent arrivals per second. */
        double backlog = 0.0, slow = 1.0, rate = 0.0;
        if (led) {
            const double inf = led[L_INFLIGHT * n + i], due = led[L_DUE * n + i];
            running = np_max(running, np_min(inf, conc));
            waiting = np_max(waiting, inf - conc);
            backlog = due > now ? (due - now) * 1000.0 : 0.0;
            slow = exp(led[L_LOG_SLOW * n + i]);
            rate = led[L_RATE * n + i] * exp(np_min(led[L_RATE_AT * n + i] - now, 0.0) / rate_window);
        }
        const double prefill_s = slow * in_tok / prefill_tps;
        /* A request's time in a full batch: the per-sequence decode rate falls with the batch
           (r1 / (1 + (b - 1) / batch_half)), and a queued request waits for full-batch completions. */
        const double full_rate = batch_half > 0.0 ? decode_tps / (1.0 + (conc - 1.0) / batch_half) : decode_tps;
        const double service_s = prefill_s + slow * out_tok / full_rate;
        /* Completions needed before this request gets a slot: one per request waiting ahead of it (they
           may wait for slots or for KV cache), plus one more when every slot is taken. */
        const double ahead = waiting + np_max(running + 1.0 - conc, 0.0);
        double queue_ms = 1000.0 * service_s * ahead / conc;
        queue_ms = queue_ms + 1000.0 * service_s * np_max(kv - 0.9, 0.0) * 10.0;
        queue_ms = queue_ms + backlog;  /* this router's prompts still ahead in its prefill */
        const double prefill_ms = 1000.0 * prefill_s * (1.0 + running / conc);
        const double ttft = queue_ms + prefill_ms + r[i] + cold_ms;
        /* The delay this prompt adds to the requests expected there while the backlog (it included)
           drains, weighted (decision.scoring.ADDED_DELAY_WEIGHT): what choices also rank by. */
        const double added = added_weight * prefill_ms * rate * (backlog + prefill_ms) / 1000.0;
        const double cost = eg ? nominal + eg[i] * egress_factor : nominal;
        /* The operator's price of a millisecond: choices trade this much TTFT for $0.001 per 1K tokens. */
        const double cost_ms = cost_weight * cost * 1000.0;
        o[E_TTFT * n + i] = ttft;
        o[E_ADDED * n + i] = added;
        o[E_COST_MS * n + i] = cost_ms;
        o[E_RANK * n + i] = ttft + added + cost_ms;
        o[E_COST * n + i] = cost;
        o[E_QUEUE * n + i] = queue_ms;
        o[E_PREFILL * n + i] = prefill_ms;
        o[E_COLD * n + i] = cold_ms;
        o[E_RUNNING * n + i] = running;
        o[E_WAITING * n + i] = waiting;
        o[E_KV * n + i] = kv;
    }
    result = Py_NewRef(Py_None);
done:
    release(views, 6);
    return result;
}

PyDoc_STRVAR(route_features_doc,
"route_features(static, tel, ttft, queue, cost, rtt, ages, same_region, out, ncols, kv_col, util_col, fb_used_col,\n"
"               fb_free_col, power_col, temp_col, session, modality, site_buckets, target, budget,\n"
"               size_in, size_out, stale_after_s)\n\n"
"The RouteFeatures matrix (learners/features.py) of n candidates into out (n x (32 + site_buckets)).\n"
"static: n x (11 + site_buckets) endpoint rows; tel: n x ncols; ttft, queue (ms), cost ($/1K),\n"
"rtt, ages, same_region: n; session: the session's bucket or -1; modality: index or -1.");

static PyObject *route_features(PyObject *self, PyObject *args) {
    Py_buffer st = {0}, tel = {0}, tt = {0}, qu = {0}, co = {0}, rtt = {0}, ages = {0}, same = {0}, out = {0};
    Py_ssize_t c[7], session, modality, buckets;
    double target, budget, size_in, size_out, stale_after;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*y*w*nnnnnnnnnnddddd", &st, &tel, &tt, &qu, &co, &rtt, &ages, &same, &out, &c[0],
                          &c[1], &c[2], &c[3], &c[4], &c[5], &c[6], &session, &modality, &buckets, &target, &budget,
                          &size_in, &size_out, &stale_after))
        return NULL;
    Py_buffer *views[] = {&st, &tel, &tt, &qu, &co, &rtt, &ages, &same, &out};
    PyObject *result = NULL;
    const Py_ssize_t ncols = c[0];
    if (ncols < 1 || buckets < 0) {
        PyErr_SetString(PyExc_ValueError, "ncols / site_buckets out of range");
        goto done;
    }
    for (int k = 1; k < 7; k++)
        if (c[k] < 0 || c[k] >= ncols) {
            PyErr_SetString(PyExc_ValueError, "telemetry column out of range");
            goto done;
        }
    const Py_ssize_t n = rtt.len / (Py_ssize_t)sizeof(double);
    const Py_ssize_t width = 11 + buckets, d = 32 + buckets;
    if (ncols < 1 || buckets < 0) {
        PyErr_SetString(PyExc_ValueError, "cols / ints out of range");
        goto done;
    }
    for (int k = 1; k < 7; k++)
        if (c[k] < 0 || c[k] >= ncols) {
            PyErr_SetString(PyExc_ValueError, "telemetry column out of range");
            goto done;
        }
    if (check_len(&rtt, n, sizeof(double), "rtt") < 0 || check_len(&ages, n, sizeof(double), "ages") < 0 ||
        check_len(&same, n, sizeof(double), "same_region") < 0 ||
        check_len(&st, n * width, sizeof(double), "static") < 0 ||
        check_len(&tel, n * ncols, sizeof(double), "tel") < 0 ||
        check_len(&tt, n, sizeof(double), "ttft") < 0 || check_len(&qu, n, sizeof(double), "queue") < 0 ||
        check_len(&co, n, sizeof(double), "cost") < 0 || check_len(&out, n * d, sizeof(double), "out") < 0)
        goto done;
    const double *S = st.buf, *T = tel.buf, *TT = tt.buf, *QU = qu.buf, *CO = co.buf, *R = rtt.buf, *A = ages.buf, *SR = same.buf;
    double *X = out.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        const double *srow = S + i * width, *trow = T + i * ncols;
        double *x = X + i * d;
        const double ttft_r = clip(TT[i] / target, 0.0, 5.0);
        const double queue_r = clip(QU[i] / target, 0.0, 5.0);
        /* Telemetry: unknown (NaN) takes the neutral 0.5. */
        double tv[5];
        tv[0] = clip(trow[c[1]], 0.0, 1.0);
        tv[1] = clip(trow[c[2]] / 100.0, 0.0, 1.0);
        const double used = trow[c[3]], total = used + trow[c[4]];
        tv[2] = total > 0 ? clip(used / total, 0.0, 1.0) : NAN;
        tv[4] = srow[9] > 0 ? clip(trow[c[5]] / srow[9], 0.0, 1.5) : NAN;
        tv[3] = clip((trow[c[6]] - 30.0) / 60.0, 0.0, 1.5);
        int unknown = 1;
        for (Py_ssize_t k = 0; k < ncols; k++)
            if (!isnan(trow[k])) {
                unknown = 0;
                break;
            }
        x[0] = 1.0;
        x[1] = ttft_r;
        x[2] = queue_r;
        x[3] = clip(R[i] / target, 0.0, 5.0);
        for (int k = 0; k < 5; k++) x[4 + k] = isnan(tv[k]) ? 0.5 : tv[k];
        x[9] = clip(A[i] / stale_after, 0.0, 1.0);
        x[10] = unknown ? 1.0 : 0.0;
        x[11] = srow[0];
        x[12] = srow[10] == (double)session ? 1.0 : 0.0;
        x[13] = SR[i];
        memcpy(x + 14, srow + 1, 8 * sizeof(double));
        x[22] = clip(CO[i] / budget, 0.0, 5.0);
        x[23] = size_in;
        x[24] = size_out;
        for (int k = 0; k < 4; k++) x[25 + k] = modality == k ? 1.0 : 0.0;
        x[29] = ttft_r * size_in;
        x[30] = queue_r * x[4];
        x[31] = srow[2] * size_in;
        if (buckets) memcpy(x + 32, srow + 11, (size_t)buckets * sizeof(double));
    }
    result = Py_NewRef(Py_None);
done:
    release(views, 9);
    return result;
}

PyDoc_STRVAR(mask_stale_doc,
"mask_stale(values, stamps, at, stale_after_s, max_age)\n\n"
"Telemetry of n endpoints (n x k values and their timestamps, NaN: none): blank (NaN) in place the\n"
"values older than stale_after_s at `at`, and write each endpoint's oldest value's age (stale ones\n"
"included; inf when nothing was ever reported) into max_age (n).");

static PyObject *mask_stale(PyObject *self, PyObject *args) {
    Py_buffer values = {0}, stamps = {0}, max_age = {0};
    double at, stale_after;
    if (!PyArg_ParseTuple(args, "w*y*ddw*", &values, &stamps, &at, &stale_after, &max_age)) return NULL;
    Py_buffer *views[] = {&values, &stamps, &max_age};
    PyObject *result = NULL;
    const Py_ssize_t n = max_age.len / (Py_ssize_t)sizeof(double);
    const Py_ssize_t k = n ? values.len / (Py_ssize_t)sizeof(double) / n : 0;
    if (check_len(&values, n * k, sizeof(double), "values") < 0 ||
        check_len(&stamps, n * k, sizeof(double), "stamps") < 0)
        goto done;
    double *v = values.buf, *age = max_age.buf;
    const double *st = stamps.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        double oldest = NAN;
        for (Py_ssize_t j = 0; j < k; j++) {
            const double s = st[i * k + j];
            if (isnan(s)) continue;
            if (isnan(oldest) || s < oldest) oldest = s;
            if (at - s > stale_after) v[i * k + j] = NAN;
        }
        age[i] = isnan(oldest) ? INFINITY : at - oldest;
    }
    result = Py_NewRef(Py_None);
done:
    release(views, 3);
    return result;
}

PyDoc_STRVAR(telemetry_block_doc,
"telemetry_block(values, stamps, ncols, at, value_cols, age_cols) -> bytes\n\n"
"What telemetry rules see of n endpoints, one row each: values[value_cols], then the ages\n"
"ceil(at - stamps[age_cols]) in whole seconds, as float64, every NaN as the one quiet NaN (so\n"
"equal inputs give equal bytes). values and stamps: n x ncols; the column lists: intp arrays.");

static PyObject *telemetry_block(PyObject *self, PyObject *args) {
    Py_buffer values = {0}, stamps = {0}, vcols = {0}, acols = {0};
    double at;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "y*y*ndy*y*", &values, &stamps, &k, &at, &vcols, &acols)) return NULL;
    Py_buffer *views[] = {&values, &stamps, &vcols, &acols};
    PyObject *result = NULL;
    const Py_ssize_t nv = vcols.len / (Py_ssize_t)sizeof(Py_ssize_t), na = acols.len / (Py_ssize_t)sizeof(Py_ssize_t);
    if (k < 1) {
        PyErr_SetString(PyExc_ValueError, "ncols must be >= 1");
        goto done;
    }
    const Py_ssize_t n = values.len / (Py_ssize_t)sizeof(double) / k;
    if (check_len(&values, n * k, sizeof(double), "values") < 0 ||
        check_len(&stamps, n * k, sizeof(double), "stamps") < 0)
        goto done;
    const Py_ssize_t *vc = vcols.buf, *ac = acols.buf;
    for (Py_ssize_t j = 0; j < nv; j++)
        if (vc[j] < 0 || vc[j] >= k) { PyErr_SetString(PyExc_ValueError, "value column out of range"); goto done; }
    for (Py_ssize_t j = 0; j < na; j++)
        if (ac[j] < 0 || ac[j] >= k) { PyErr_SetString(PyExc_ValueError, "age column out of range"); goto done; }
    const Py_ssize_t width = nv + na;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * width * (Py_ssize_t)sizeof(double));
    if (out == NULL) goto done;
    double *o = (double *)PyBytes_AS_STRING(out);
    const double *v = values.buf, *st = stamps.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        double *row = o + i * width;
        for (Py_ssize_t j = 0; j < nv; j++) {
            const double x = v[i * k + vc[j]];
            row[j] = isnan(x) ? NAN : x;
        }
        for (Py_ssize_t j = 0; j < na; j++) {
            const double a = ceil(at - st[i * k + ac[j]]);
            row[nv + j] = isnan(a) ? NAN : a;
        }
    }
    result = out;
done:
    release(views, 4);
    return result;
}

PyDoc_STRVAR(row_keys_doc,
"row_keys(ids, block, width) -> list[bytes]\n\n"
"Memo keys of n rows: each row's 8-byte id (ids: n int64) followed by its `width` bytes of block.");

static PyObject *row_keys(PyObject *self, PyObject *args) {
    Py_buffer ids = {0}, block = {0};
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "y*y*n", &ids, &block, &width)) return NULL;
    Py_buffer *views[] = {&ids, &block};
    PyObject *result = NULL;
    const Py_ssize_t n = ids.len / (Py_ssize_t)sizeof(long long);
    if (width < 0 || check_len(&ids, n, sizeof(long long), "ids") < 0 || check_len(&block, n * width, 1, "block") < 0)
        goto done;
    PyObject *list = PyList_New(n);
    if (list == NULL) goto done;
    const char *id = ids.buf, *row = block.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)sizeof(long long) + width);
        if (key == NULL) {
            Py_DECREF(list);
            goto done;
        }
        char *k = PyBytes_AS_STRING(key);
        memcpy(k, id + i * (Py_ssize_t)sizeof(long long), sizeof(long long));
        if (width) memcpy(k + sizeof(long long), row + i * width, (size_t)width);
        PyList_SET_ITEM(list, i, key);
    }
    result = list;
done:
    release(views, 2);
    return result;
}

/* numpy's argmax rule: the first maximum, where NaN counts as the maximum (its first occurrence). */
static inline int beats(double v, double best) { return !isnan(best) && (isnan(v) || v > best); }

PyDoc_STRVAR(safe_scores_doc,
"safe_scores(X, ttft, theta, a_inv, alpha, slack, margin_ms, scores, eligible) -> (best, m)\n\n"
"The linear learners' safe set and scores (learners/_linear.py) for n arms of d features.\n"
"Eligible: ttft <= min(ttft) * (1 + slack) + margin_ms (every arm when slack < 0 or n < 2); their\n"
"indices go to eligible (intp, n), m of them. Each arm's score is x . theta, plus\n"
"alpha * sqrt(max(x . a_inv x, 0)) when a_inv is given (UCB). When some arm is not eligible,\n"
"those arms keep their order by x . theta but rank below every eligible one: score\n"
"mean - max(mean) + (min eligible score - 1 - (max(mean) - min(mean))). Returns the position in\n"
"eligible of the best eligible score (numpy's argmax) and m; ValueError when none is eligible.");

static PyObject *safe_scores(PyObject *self, PyObject *args) {
    Py_buffer X = {0}, ttft = {0}, theta = {0}, a_inv = {0}, scores = {0}, eligible = {0};
    PyObject *a_inv_obj;
    double alpha, slack, margin;
    if (!PyArg_ParseTuple(args, "y*y*y*Odddw*w*", &X, &ttft, &theta, &a_inv_obj, &alpha, &slack, &margin, &scores,
                          &eligible))
        return NULL;
    Py_buffer *views[] = {&X, &ttft, &theta, &a_inv, &scores, &eligible};
    PyObject *result = NULL;
    if (optional_buffer(a_inv_obj, &a_inv) < 0) goto done;
    const Py_ssize_t n = ttft.len / (Py_ssize_t)sizeof(double), d = theta.len / (Py_ssize_t)sizeof(double);
    if (check_len(&ttft, n, sizeof(double), "ttft") < 0 || check_len(&X, n * d, sizeof(double), "X") < 0 ||
        check_len(&scores, n, sizeof(double), "scores") < 0 ||
        check_len(&eligible, n, sizeof(Py_ssize_t), "eligible") < 0 ||
        (a_inv.obj && check_len(&a_inv, d * d, sizeof(double), "a_inv") < 0))
        goto done;
    if (n == 0) {
        PyErr_SetString(PyExc_ValueError, "no arms offered");
        goto done;
    }
    const double *x = X.buf, *t = ttft.buf, *th = theta.buf, *ai = a_inv.buf;
    double *sc = scores.buf;
    Py_ssize_t *el = eligible.buf, m = 0;
    int all = 1;
    if (slack >= 0.0 && n >= 2) {
        double lo = t[0];
        for (Py_ssize_t i = 1; i < n; i++) lo = np_min(lo, t[i]);
        const double bound = lo * (1.0 + slack) + margin;
        for (Py_ssize_t i = 0; i < n; i++)
            if (t[i] <= bound) el[m++] = i;
        all = m == n;
    } else {
        for (Py_ssize_t i = 0; i < n; i++) el[i] = i;
        m = n;
    }
    if (m == 0) {
        PyErr_SetString(PyExc_ValueError, "no arm is eligible (an expected TTFT is NaN)");
        goto done;
    }
    /* Every arm's mean first (the ineligible keep it, shifted); then the eligible arms' own scores. */
    double mean_lo = 0.0, mean_hi = 0.0, best_score = 0.0, primary_lo = 0.0;
    Py_ssize_t best = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        double mean = 0.0;
        for (Py_ssize_t j = 0; j < d; j++) mean += x[i * d + j] * th[j];
        sc[i] = mean;
        mean_lo = i ? np_min(mean_lo, mean) : mean;
        mean_hi = i ? np_max(mean_hi, mean) : mean;
    }
    for (Py_ssize_t k = 0; k < m; k++) {
        const Py_ssize_t i = el[k];
        double v = sc[i];
        if (ai != NULL && alpha != 0.0) {
            double w = 0.0;
            const double *xi = x + i * d;
            for (Py_ssize_t j = 0; j < d; j++) {
                double row = 0.0; /* (x A^-1)_j */
                for (Py_ssize_t l = 0; l < d; l++) row += xi[l] * ai[l * d + j];
                w += row * xi[j];
            }
            v = v + alpha * sqrt(np_max(w, 0.0));
        }
        sc[i] = v;
        if (k == 0 || beats(v, best_score)) {
            best = k;
            best_score = v;
        }
        primary_lo = k ? np_min(primary_lo, v) : v;
    }
    if (!all) { /* eligible indices ascend: walk them beside i */
        const double low = primary_lo - 1.0 - (mean_hi - mean_lo);
        for (Py_ssize_t i = 0, k = 0; i < n; i++) {
            if (k < m && el[k] == i)
                k++;
            else
                sc[i] = sc[i] - mean_hi + low;
        }
    }
    result = Py_BuildValue("nn", best, m);
done:
    release(views, 6);
    return result;
}

PyDoc_STRVAR(thompson_draws_doc,
"thompson_draws(X, eligible, theta, chol, v, z, counts, factor) -> int\n\n"
"Linear Thompson sampling's draws over some arms (learners/thompson.py). X holds n arms of d\n"
"features, eligible (intp, m) the rows drawn among, theta (d) the posterior mean and chol (d x d,\n"
"lower triangular) a factor of A^-1. The eligible arms' scores under theta ~ N(theta, v^2 A^-1)\n"
"are N(mean, v^2 B B^T) with mean = X_e theta and B = X_e chol; factor (m x m, written) gets a\n"
"lower-triangular C with C C^T = B B^T (modified Gram-Schmidt on B's rows, a dependent row giving\n"
"a zero column), and draw r scores mean + v C z_r for each row z_r of z (s x m standard normals):\n"
"the same distribution as drawing theta in d dimensions, from m numbers instead of d. The arm\n"
"(position in eligible) with the greatest score (numpy's argmax) gets one more in counts (intp, m).\n"
"Returns the first draw's winner.");

static PyObject *thompson_draws(PyObject *self, PyObject *args) {
    Py_buffer X = {0}, eligible = {0}, theta = {0}, chol = {0}, z = {0}, counts = {0}, factor = {0};
    double v;
    if (!PyArg_ParseTuple(args, "y*y*y*y*dy*w*w*", &X, &eligible, &theta, &chol, &v, &z, &counts, &factor))
        return NULL;
    Py_buffer *views[] = {&X, &eligible, &theta, &chol, &z, &counts, &factor};
    PyObject *result = NULL;
    double *work = NULL;
    const Py_ssize_t d = theta.len / (Py_ssize_t)sizeof(double);
    const Py_ssize_t m = eligible.len / (Py_ssize_t)sizeof(Py_ssize_t);
    const Py_ssize_t n = d > 0 ? X.len / (Py_ssize_t)sizeof(double) / d : 0;
    const Py_ssize_t s = m > 0 ? z.len / (Py_ssize_t)sizeof(double) / m : 0;
    if (d < 1 || m < 1 || s < 1) {
        PyErr_SetString(PyExc_ValueError, "thompson_draws: need features, at least one eligible arm and one draw");
        goto done;
    }
    if (check_len(&theta, d, sizeof(double), "theta") < 0 || check_len(&X, n * d, sizeof(double), "X") < 0 ||
        check_len(&chol, d * d, sizeof(double), "chol") < 0 || check_len(&z, s * m, sizeof(double), "z") < 0 ||
        check_len(&eligible, m, sizeof(Py_ssize_t), "eligible") < 0 ||
        check_len(&counts, m, sizeof(Py_ssize_t), "counts") < 0 ||
        check_len(&factor, m * m, sizeof(double), "factor") < 0)
        goto done;
    const double *x = X.buf, *th = theta.buf, *L = chol.buf, *zz = z.buf;
    const Py_ssize_t *el = eligible.buf;
    Py_ssize_t *cnt = counts.buf, first = 0;
    double *C = factor.buf;
    for (Py_ssize_t k = 0; k < m; k++) {
        if (el[k] < 0 || el[k] >= n) {
            PyErr_SetString(PyExc_ValueError, "thompson_draws: eligible index out of range");
            goto done;
        }
    }
    /* work: mean (m), then B's rows turned into Q's (m x d). */
    work = PyMem_Malloc((size_t)(m + m * d) * sizeof(double));
    if (work == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    double *mean = work, *Q = work + m;
    memset(C, 0, (size_t)(m * m) * sizeof(double));
    for (Py_ssize_t i = 0; i < m; i++) {
        const double *xi = x + el[i] * d;
        double *q = Q + i * d, mu = 0.0, scale = 0.0;
        for (Py_ssize_t j = 0; j < d; j++) mu += xi[j] * th[j];
        mean[i] = mu;
        for (Py_ssize_t l = 0; l < d; l++) { /* (x^T L)_l: L is lower triangular */
            double acc = 0.0;
            for (Py_ssize_t j = l; j < d; j++) acc += xi[j] * L[j * d + l];
            q[l] = acc;
            scale += acc * acc;
        }
        for (Py_ssize_t k = 0; k < i; k++) { /* modified Gram-Schmidt against the earlier rows */
            const double *qk = Q + k * d;
            double c = 0.0;
            for (Py_ssize_t l = 0; l < d; l++) c += q[l] * qk[l];
            C[i * m + k] = c;
            for (Py_ssize_t l = 0; l < d; l++) q[l] -= c * qk[l];
        }
        double norm = 0.0;
        for (Py_ssize_t l = 0; l < d; l++) norm += q[l] * q[l];
        norm = sqrt(norm);
        if (norm > 1e-12 * sqrt(scale) && norm > 0.0) {
            C[i * m + i] = norm;
            for (Py_ssize_t l = 0; l < d; l++) q[l] /= norm;
        } else { /* a combination of earlier rows: no direction of its own */
            for (Py_ssize_t l = 0; l < d; l++) q[l] = 0.0;
        }
    }
    for (Py_ssize_t r = 0; r < s; r++) {
        const double *zr = zz + r * m;
        Py_ssize_t best = 0;
        double best_v = 0.0;
        for (Py_ssize_t i = 0; i < m; i++) {
            const double *ci = C + i * m;
            double dev = 0.0;
            for (Py_ssize_t k = 0; k <= i; k++) dev += ci[k] * zr[k];
            const double val = mean[i] + v * dev;
            if (i == 0 || beats(val, best_v)) {
                best = i;
                best_v = val;
            }
        }
        cnt[best] += 1;
        if (r == 0) first = best;
    }
    result = PyLong_FromSsize_t(first);
done:
    PyMem_Free(work);
    release(views, 7);
    return result;
}

static PyMethodDef methods[] = {
    {"estimate", estimate, METH_VARARGS, estimate_doc},
    {"route_features", route_features, METH_VARARGS, route_features_doc},
    {"mask_stale", mask_stale, METH_VARARGS, mask_stale_doc},
    {"telemetry_block", telemetry_block, METH_VARARGS, telemetry_block_doc},
    {"row_keys", row_keys, METH_VARARGS, row_keys_doc},
    {"safe_scores", safe_scores, METH_VARARGS, safe_scores_doc},
    {"thompson_draws", thompson_draws, METH_VARARGS, thompson_draws_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "decision._kernels",
                                    "The score stage's arithmetic, one pass per candidate set.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
