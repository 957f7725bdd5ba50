/* The gate's numeric hot loops, hand-written in C because it is measurably faster than the
 * numpy / standard-library versions they replace. On the shared Alpaca answers, this 2-core
 * machine, one process: MinHash 62 -> 12 us a sample, find_repetition 156 -> 40 us, the token
 * count of a rendered sample 86 -> 33 us, the pii prefilter 27 -> 7 us (ASCII), \w+ words of
 * non-ASCII text 58 -> 14 us; the whole gate, one worker on a 10k slice, 1,155-1,297 ->
 * 3,026-3,296 samples/s (docs/BENCHMARKS.md, fourth pass). Every function has a pure-Python twin that stays the reference and the fallback when this
 * module is not built (``optional=True`` in setup.py); tests compare the two on real and
 * generated text.
 *
 *   ngram_hashes(hashes, n)        dedup.ngram_hashes: Horner form of the same polynomial
 *   minhash(shingles, a, b[, bands, rows])  dedup.MinHasher.signature and its 8-bit sketch, or
 *                                  MinHasher.keys: the band keys (dedup.band_key) and the sketch
 *   word_hashes(words, table)      dedup.word_hashes: xxh3_64 of short words here, table[word] else
 *   first_member(values, keys)     dedup.EvalOverlapCheck's search of the sample's n-grams
 *   pii_prefilter(text)            pii's prefilters, all kinds in one pass
 *   char_run_start(text, ...)      repetition.char_run's scan
 *   key_add_all / key_rehash       dedup.KeyIndex inserts and growth
 *   near_check(...)                dedup.DuplicateIndex.check's near path: probe, dedupe, compare
 *   ChunkTable                     models.chat.TokenCounter's per-chunk and per-segment token counts
 *   words(text)                    re.findall(r"\w+", text), for repetition.words_of and dedup
 *   dup_lines(text)                repetition.dup_line_frac's counts, for ASCII text
 *   word_ids(words)                repetition._Screen: word ids, the recurring-word mask, bounds
 *   gram_repeats / top_gram_chars / dup_gram_chars / longest_loop: n-gram measures over word ids
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MIX 0x9E3779B97F4A7C15ULL

/* ---- buffers --------------------------------------------------------------------------- */

static int get_u64(PyObject *obj, Py_buffer *view, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len % 8) {
        PyErr_Format(PyExc_ValueError, "%s: expected uint64 data", what);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* ---- dedup ----------------------------------------------------------------------------- */

static PyObject *ngram_hashes(PyObject *self, PyObject *args) {
    PyObject *obj;
    Py_ssize_t n;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "On", &obj, &n) || get_u64(obj, &view, "hashes") < 0)
        return NULL;
    Py_ssize_t words = view.len / 8, count = words - n + 1;
    if (n < 1 || count < 0)
        count = 0;
    PyObject *out = PyBytes_FromStringAndSize(NULL, count * 8);
    if (out) {
        const uint64_t *h = (const uint64_t *)view.buf;
        uint64_t *g = (uint64_t *)PyBytes_AS_STRING(out);
        for (Py_ssize_t i = 0; i < count; i++) {
            uint64_t acc = 0;
            for (Py_ssize_t k = 0; k < n; k++)
                acc = acc * MIX + h[i + k];  /* sum_k h[i+k] * MIX^(n-1-k), wrapping */
            g[i] = acc;
        }
    }
    PyBuffer_Release(&view);
    return out;
}

/* out[p] = min_i (x[i] * a[p] + b[p]), wrapping mod 2^64 (universal hashing). Four permutations
 * at a time: four independent minimum chains keep the multiplier busy (9.6 us against 12.0 us
 * one at a time, 120 shingles x 128 permutations). */
static void minhash_into(const uint64_t *restrict x, Py_ssize_t shingles, const uint64_t *restrict a,
                         const uint64_t *restrict b, Py_ssize_t perms, uint64_t *restrict out) {
    Py_ssize_t p = 0;
    for (; p + 4 <= perms; p += 4) {
        uint64_t m0 = UINT64_MAX, m1 = UINT64_MAX, m2 = UINT64_MAX, m3 = UINT64_MAX;
        for (Py_ssize_t i = 0; i < shingles; i++) {
            uint64_t v0 = x[i] * a[p] + b[p], v1 = x[i] * a[p + 1] + b[p + 1];
            uint64_t v2 = x[i] * a[p + 2] + b[p + 2], v3 = x[i] * a[p + 3] + b[p + 3];
            m0 = v0 < m0 ? v0 : m0;
            m1 = v1 < m1 ? v1 : m1;
            m2 = v2 < m2 ? v2 : m2;
            m3 = v3 < m3 ? v3 : m3;
        }
        out[p] = m0, out[p + 1] = m1, out[p + 2] = m2, out[p + 3] = m3;
    }
    for (; p < perms; p++) {
        uint64_t m = UINT64_MAX;
        for (Py_ssize_t i = 0; i < shingles; i++) {
            uint64_t v = x[i] * a[p] + b[p];
            m = v < m ? v : m;
        }
        out[p] = m;
    }
}

static uint64_t xxh64_avalanche(uint64_t h);
static uint64_t rotl64(uint64_t x, int r);

/* dedup.band_key: one band's values folded by xor-multiply-rotate, seeded with the band's
 * index, finished with xxh64's avalanche. In C the 8 bands of the default cost ~0.1 us; the
 * xxhash call a band they replace cost ~7 us a sample from Python. */
static uint64_t band_key(const uint64_t *v, Py_ssize_t rows, uint64_t seed) {
    uint64_t h = seed * MIX + (uint64_t)rows;
    for (Py_ssize_t r = 0; r < rows; r++)
        h = rotl64((h ^ v[r]) * 0xC2B2AE3D27D4EB4FULL, 31);
    return xxh64_avalanche(h);
}

static PyObject *minhash(PyObject *self, PyObject *args) {
    PyObject *s_obj, *a_obj, *b_obj;
    Py_ssize_t bands = 0, rows = 0;
    Py_buffer s, a, b;
    if (!PyArg_ParseTuple(args, "OOO|nn", &s_obj, &a_obj, &b_obj, &bands, &rows))
        return NULL;
    if (get_u64(s_obj, &s, "shingles") < 0)
        return NULL;
    if (get_u64(a_obj, &a, "a") < 0) {
        PyBuffer_Release(&s);
        return NULL;
    }
    if (get_u64(b_obj, &b, "b") < 0) {
        PyBuffer_Release(&s);
        PyBuffer_Release(&a);
        return NULL;
    }
    Py_ssize_t perms = a.len / 8, shingles = s.len / 8;
    /* rows == 0: the signature form; else bands >= 1 of rows each, within the permutations */
    if (b.len != a.len || bands < 0 || rows < 0 || (bands == 0) != (rows == 0) || (rows && bands > perms / rows)) {
        PyErr_SetString(PyExc_ValueError, b.len != a.len ? "a and b differ in length" : "bands and rows: both 0, or bands x rows within the permutations");
        PyBuffer_Release(&s);
        PyBuffer_Release(&a);
        PyBuffer_Release(&b);
        return NULL;
    }
    PyObject *sig = PyBytes_FromStringAndSize(NULL, perms * 8);
    PyObject *sketch = PyBytes_FromStringAndSize(NULL, perms);
    PyObject *keys = NULL, *result = NULL;
    if (sig && sketch) {
        const uint64_t *x = (const uint64_t *)s.buf, *pa = (const uint64_t *)a.buf, *pb = (const uint64_t *)b.buf;
        uint64_t *out = (uint64_t *)PyBytes_AS_STRING(sig);
        unsigned char *top = (unsigned char *)PyBytes_AS_STRING(sketch);
        minhash_into(x, shingles, pa, pb, perms, out);
        for (Py_ssize_t p = 0; p < perms; p++)
            top[p] = (unsigned char)(out[p] >> 56);
        if (rows == 0) {
            result = PyTuple_Pack(2, sig, sketch);
        } else if ((keys = PyList_New(bands))) {
            Py_ssize_t i = 0;
            for (; i < bands; i++) {
                PyObject *key = PyLong_FromUnsignedLongLong(band_key(out + i * rows, rows, (uint64_t)i));
                if (!key)
                    break;
                PyList_SET_ITEM(keys, i, key);
            }
            if (i == bands)
                result = PyTuple_Pack(2, keys, sketch);
        }
    }
    Py_XDECREF(keys);
    Py_XDECREF(sig);
    Py_XDECREF(sketch);
    PyBuffer_Release(&s);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return result;
}

/* XXH3_64bits (seed 0) of inputs up to 16 bytes, the length of nearly every word, as in
 * xxHash 0.8 (BSD 2-Clause, Yann Collet): the secret's first 72 bytes and the short-input
 * paths. Longer words take the dict (xxhash's own code). Tested equal to xxhash.xxh3_64 on
 * every length 0..16. */
static const unsigned char XXH3_SECRET[72] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb,
};

static uint64_t read_le(const unsigned char *p, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static uint64_t xxh64_avalanche(uint64_t h) {
    h ^= h >> 33;
    h *= 0xC2B2AE3D27D4EB4FULL;
    h ^= h >> 29;
    h *= 0x165667B19E3779F9ULL;
    return h ^ (h >> 32);
}

static uint64_t rotl64(uint64_t x, int r) { return x << r | x >> (64 - r); }

static uint64_t xxh3_short(const unsigned char *in, size_t len) {
    const unsigned char *secret = XXH3_SECRET;
    if (len > 8) {
        uint64_t lo = read_le(in, 8) ^ (read_le(secret + 24, 8) ^ read_le(secret + 32, 8));
        uint64_t hi = read_le(in + len - 8, 8) ^ (read_le(secret + 40, 8) ^ read_le(secret + 48, 8));
        unsigned __int128 product = (unsigned __int128)lo * hi;
        uint64_t acc = len + __builtin_bswap64(lo) + hi + ((uint64_t)product ^ (uint64_t)(product >> 64));
        acc ^= acc >> 37;
        acc *= 0x165667919E3779F9ULL;
        return acc ^ (acc >> 32);
    }
    if (len >= 4) {
        uint64_t keyed = (read_le(in + len - 4, 4) + (read_le(in, 4) << 32)) ^ (read_le(secret + 8, 8) ^ read_le(secret + 16, 8));
        keyed ^= rotl64(keyed, 49) ^ rotl64(keyed, 24);
        keyed *= 0x9FB21C651E98DF25ULL;
        keyed ^= (keyed >> 35) + len;
        keyed *= 0x9FB21C651E98DF25ULL;
        return keyed ^ (keyed >> 28);
    }
    if (len)
        return xxh64_avalanche(((uint64_t)in[0] << 16 | (uint64_t)in[len >> 1] << 24 | in[len - 1] | (uint64_t)len << 8) ^
                               (read_le(secret, 4) ^ read_le(secret + 4, 4)));
    return xxh64_avalanche(read_le(secret + 56, 8) ^ read_le(secret + 64, 8));
}

/* word_hashes(words, table) -> bytes of uint64: xxh3_64 of each word's UTF-8, computed here up
 * to 16 bytes, else table[word] (a dict whose __missing__ hashes with xxhash) */
static PyObject *word_hashes(PyObject *self, PyObject *args) {
    PyObject *words, *table;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &words, &PyDict_Type, &table))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(words);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 8);
    if (!out)
        return NULL;
    uint64_t *h = (uint64_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *word = PyList_GET_ITEM(words, i);
        Py_ssize_t size;
        const char *utf8 = PyUnicode_AsUTF8AndSize(word, &size);
        if (!utf8) {
            Py_DECREF(out);
            return NULL;
        }
        if (size <= 16) {
            h[i] = xxh3_short((const unsigned char *)utf8, (size_t)size);
            continue;
        }
        PyObject *value = PyObject_GetItem(table, word);  /* the dict's __missing__ fills it */
        if (!value) {
            Py_DECREF(out);
            return NULL;
        }
        h[i] = PyLong_AsUnsignedLongLong(value);
        Py_DECREF(value);
        if (h[i] == (uint64_t)-1 && PyErr_Occurred()) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

/* first_member(values, sorted_keys) -> index of the first value found in sorted_keys, or -1
 * (EvalOverlapCheck: binary search, instead of a frozenset of Python ints and a sorted search) */
static PyObject *first_member(PyObject *self, PyObject *args) {
    PyObject *v_obj, *k_obj;
    Py_buffer v, k;
    if (!PyArg_ParseTuple(args, "OO", &v_obj, &k_obj) || get_u64(v_obj, &v, "values") < 0)
        return NULL;
    if (get_u64(k_obj, &k, "sorted_keys") < 0) {
        PyBuffer_Release(&v);
        return NULL;
    }
    const uint64_t *values = (const uint64_t *)v.buf, *keys = (const uint64_t *)k.buf;
    Py_ssize_t n = v.len / 8, m = k.len / 8, found = -1;
    for (Py_ssize_t i = 0; i < n && found < 0; i++) {
        Py_ssize_t lo = 0, hi = m;
        while (lo < hi) {
            Py_ssize_t mid = lo + (hi - lo) / 2;
            if (keys[mid] < values[i])
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo < m && keys[lo] == values[i])
            found = i;
    }
    PyBuffer_Release(&v);
    PyBuffer_Release(&k);
    return PyLong_FromSsize_t(found);
}

/* ---- the duplicate index (dedup.KeyIndex, DuplicateIndex.check) ------------------------------
 * KeyIndex keeps uint64 keys in an open-addressing table (linear probing, 0 = empty) and a
 * uint32 value per slot, in two numpy arrays; these probe it in place, with the same slot order
 * as the Python code: (key * MIX >> 20) & mask equals the low bits of the full product. */

typedef struct {
    Py_buffer keys, values;
    Py_ssize_t mask;
} Table;

static int table_open(PyObject *keys, PyObject *values, int writable, Table *t) {
    int flags = writable ? PyBUF_WRITABLE : PyBUF_SIMPLE;
    if (PyObject_GetBuffer(keys, &t->keys, flags) < 0)
        return -1;
    if (PyObject_GetBuffer(values, &t->values, flags) < 0) {
        PyBuffer_Release(&t->keys);
        return -1;
    }
    Py_ssize_t cap = t->keys.len / 8;
    if (cap < 1 || (cap & (cap - 1)) || t->values.len != cap * 4) {
        PyErr_SetString(PyExc_ValueError, "expected a power-of-two uint64 key table and a uint32 value per slot");
        PyBuffer_Release(&t->keys);
        PyBuffer_Release(&t->values);
        return -1;
    }
    t->mask = cap - 1;
    return 0;
}

static void table_close(Table *t) {
    PyBuffer_Release(&t->keys);
    PyBuffer_Release(&t->values);
}

static Py_ssize_t table_slot(const Table *t, uint64_t key) {
    const uint64_t *keys = (const uint64_t *)t->keys.buf;
    Py_ssize_t i = (Py_ssize_t)((key * MIX) >> 20) & t->mask;
    while (keys[i] != 0 && keys[i] != key)
        i = (i + 1) & t->mask;
    return i;
}

static int table_key(PyObject *obj, uint64_t *key) {
    *key = PyLong_AsUnsignedLongLong(obj);
    if (*key == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    if (*key == 0)  /* 0 marks an empty slot: a real 0 is stored as 1 */
        *key = 1;
    return 0;
}

/* key_add_all(keys, values, new_keys, value) -> how many of new_keys were new (stored with value);
 * the caller keeps the table at most half full */
static PyObject *key_add_all(PyObject *self, PyObject *args) {
    PyObject *keys, *values, *new_keys;
    unsigned long value;
    Table t;
    if (!PyArg_ParseTuple(args, "OOO!k", &keys, &values, &PyList_Type, &new_keys, &value) || table_open(keys, values, 1, &t) < 0)
        return NULL;
    Py_ssize_t added = 0;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(new_keys); k++) {
        uint64_t key;
        if (table_key(PyList_GET_ITEM(new_keys, k), &key) < 0) {
            table_close(&t);
            return NULL;
        }
        Py_ssize_t i = table_slot(&t, key);
        if (((uint64_t *)t.keys.buf)[i] == 0) {
            ((uint64_t *)t.keys.buf)[i] = key;
            ((uint32_t *)t.values.buf)[i] = (uint32_t)value;
            added++;
        }
    }
    table_close(&t);
    return PyLong_FromSsize_t(added);
}

/* key_rehash(keys, values, old_keys, old_values) -> entries moved: every filled slot of the old
 * table, in slot order, into the (larger, empty) new one */
static PyObject *key_rehash(PyObject *self, PyObject *args) {
    PyObject *keys, *values, *old_keys, *old_values;
    Table t, old;
    if (!PyArg_ParseTuple(args, "OOOO", &keys, &values, &old_keys, &old_values) || table_open(keys, values, 1, &t) < 0)
        return NULL;
    if (table_open(old_keys, old_values, 0, &old) < 0) {
        table_close(&t);
        return NULL;
    }
    const uint64_t *ok = (const uint64_t *)old.keys.buf;
    const uint32_t *ov = (const uint32_t *)old.values.buf;
    Py_ssize_t moved = 0;
    for (Py_ssize_t j = 0; j <= old.mask; j++) {
        if (!ok[j])
            continue;
        Py_ssize_t i = table_slot(&t, ok[j]);
        if (((uint64_t *)t.keys.buf)[i] == 0) {
            ((uint64_t *)t.keys.buf)[i] = ok[j];
            ((uint32_t *)t.values.buf)[i] = ov[j];
            moved++;
        }
    }
    table_close(&old);
    table_close(&t);
    return PyLong_FromSsize_t(moved);
}

/* near_check(keys, values, sketches, bands, sketch, threshold) -> (ordinal, similarity) or None:
 * DuplicateIndex.check's near path in one call. The kept samples that share a band key with the
 * sample, in band order, each once; the first whose b-bit MinHash similarity to `sketch`
 * (DuplicateIndex.jaccard's float, the same operations in double) reaches the threshold.
 * keys, values: KeyIndex's table; sketches: its C-contiguous uint8 matrix, one sketch a row. */
static PyObject *near_check(PyObject *self, PyObject *args) {
    PyObject *keys, *values, *rows_obj, *bands;
    Py_buffer rows, sketch;
    double threshold;
    Table t;
    if (!PyArg_ParseTuple(args, "OOOO!y*d", &keys, &values, &rows_obj, &PyList_Type, &bands, &sketch, &threshold))
        return NULL;
    if (table_open(keys, values, 0, &t) < 0) {
        PyBuffer_Release(&sketch);
        return NULL;
    }
    if (PyObject_GetBuffer(rows_obj, &rows, PyBUF_C_CONTIGUOUS) < 0) {
        table_close(&t);
        PyBuffer_Release(&sketch);
        return NULL;
    }
    PyObject *result = NULL;
    uint32_t tried[64];  /* candidates already compared; past 64 a repeat is compared again, with the same result */
    Py_ssize_t n_tried = 0;
    const unsigned char *b = sketch.buf;
    if (rows.ndim != 2 || rows.itemsize != 1 || rows.shape[1] != sketch.len || sketch.len == 0) {
        PyErr_SetString(PyExc_ValueError, "expected a uint8 matrix of sketches as wide as the sketch");
        goto done;
    }
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(bands); k++) {
        uint64_t key;
        if (table_key(PyList_GET_ITEM(bands, k), &key) < 0)
            goto done;
        Py_ssize_t i = table_slot(&t, key);
        if (((const uint64_t *)t.keys.buf)[i] != key)
            continue;
        uint32_t ordinal = ((const uint32_t *)t.values.buf)[i];
        int seen = 0;
        for (Py_ssize_t j = 0; j < n_tried && !seen; j++)
            seen = tried[j] == ordinal;
        if (seen)
            continue;
        if (n_tried < 64)
            tried[n_tried++] = ordinal;
        if (ordinal >= rows.shape[0]) {
            PyErr_SetString(PyExc_IndexError, "sketch row out of range");
            goto done;
        }
        const unsigned char *a = (const unsigned char *)rows.buf + (Py_ssize_t)ordinal * sketch.len;
        Py_ssize_t equal = 0;
        for (Py_ssize_t p = 0; p < sketch.len; p++)
            equal += a[p] == b[p];
        /* max(0.0, (equal / len - 1 / 256) / (1 - 1 / 256)): both constants are exact in double */
        double similarity = ((double)equal / (double)sketch.len - 1.0 / 256) / (1.0 - 1.0 / 256);
        similarity = similarity > 0.0 ? similarity : 0.0;
        if (similarity >= threshold) {
            result = Py_BuildValue("Id", (unsigned int)ordinal, similarity);
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&rows);
    table_close(&t);
    PyBuffer_Release(&sketch);
    return result;
}

/* ---- pii --------------------------------------------------------------------------------- */

/* pii_prefilter(text) -> a bit per kind whose pattern may match (1 email, 2 phone, 4 ip,
 * 8 api_key): pii._PREFILTERS' conditions in one pass over the code points, instead of ~20
 * substring searches (ASCII) or four regex scans (other text): ~27 -> ~3 us a sample.
 *   email    "@"
 *   phone    \+\d | \d{3}[ .-]\d{4}
 *   ip       \d\.\d{1,3}\.\d | [0-9a-fA-F]:[0-9a-fA-F]{1,4}:[0-9a-fA-F]
 *   api_key  sk- | AKIA | gh[pousr]_ | xox | AIza | hf_
 * \d is str.isdecimal, as in re's str patterns. A run of digits (hex digits) is contiguous, so
 * \d{1,3} followed by "." can only be the whole run up to the ".". */
typedef struct {
    int kind;
    const void *data;
    Py_ssize_t n;
} Text;

static Py_UCS4 char_at(const Text *t, Py_ssize_t i) { return i < t->n ? PyUnicode_READ(t->kind, t->data, i) : 0; }

static int is_decimal(Py_UCS4 c) { return c < 128 ? c >= '0' && c <= '9' : Py_UNICODE_ISDECIMAL(c); }

static int decimal_at(const Text *t, Py_ssize_t i) { return i < t->n && is_decimal(char_at(t, i)); }

static int hex_at(const Text *t, Py_ssize_t i) {
    Py_UCS4 c = char_at(t, i);
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static int literal_at(const Text *t, Py_ssize_t i, const char *lit) {
    for (; *lit; lit++, i++)
        if (char_at(t, i) != (Py_UCS4)(unsigned char)*lit)
            return 0;
    return 1;
}

/* a run of 1..most characters of a class from i, then `end`, then one more of the class */
static int run_between(const Text *t, Py_ssize_t i, int most, Py_UCS4 end, int (*member)(const Text *, Py_ssize_t)) {
    Py_ssize_t r = 0;
    while (r <= most && member(t, i + r))
        r++;
    return r >= 1 && r <= most && char_at(t, i + r) == end && member(t, i + r + 1);
}

static int phone_at(const Text *t, Py_ssize_t i) {
    if (char_at(t, i) == '+')
        return decimal_at(t, i + 1);
    for (Py_ssize_t k = 0; k < 8; k++) {
        if (k == 3) {
            Py_UCS4 c = char_at(t, i + 3);
            if (c != ' ' && c != '.' && c != '-')
                return 0;
        } else if (!decimal_at(t, i + k))
            return 0;
    }
    return 1;
}

static int github_kind(Py_UCS4 c) { return c == 'p' || c == 'o' || c == 'u' || c == 's' || c == 'r'; }

static PyObject *pii_prefilter(PyObject *self, PyObject *text) {
    if (!PyUnicode_Check(text))
        return PyErr_Format(PyExc_TypeError, "expected str");
    Text t = {PyUnicode_KIND(text), PyUnicode_DATA(text), PyUnicode_GET_LENGTH(text)};
    long mask = 0;
    for (Py_ssize_t i = 0; i < t.n && mask != 15; i++) {
        Py_UCS4 c = char_at(&t, i);
        int decimal = is_decimal(c);
        if (c == '@')
            mask |= 1;
        if (!(mask & 2) && (c == '+' || decimal) && phone_at(&t, i))
            mask |= 2;
        if (!(mask & 4) && ((decimal && char_at(&t, i + 1) == '.' && run_between(&t, i + 2, 3, '.', decimal_at)) ||
                            (hex_at(&t, i) && char_at(&t, i + 1) == ':' && run_between(&t, i + 2, 4, ':', hex_at))))
            mask |= 4;
        if (!(mask & 8) && (c == 's' || c == 'A' || c == 'x' || c == 'h' || c == 'g') &&
            (literal_at(&t, i, "sk-") || literal_at(&t, i, "AKIA") || literal_at(&t, i, "xox") || literal_at(&t, i, "AIza") ||
             literal_at(&t, i, "hf_") || (literal_at(&t, i, "gh") && github_kind(char_at(&t, i + 2)) && char_at(&t, i + 3) == '_')))
            mask |= 8;
    }
    return PyLong_FromLong(mask);
}

/* ---- repetition ------------------------------------------------------------------------ */

static Py_ssize_t table_size(Py_ssize_t n) {
    Py_ssize_t size = 16;
    while (size < 2 * n)
        size *= 2;
    return size;
}

/* word_ids(words) -> (ids: bytes of uint32, id by first occurrence; repeated: bytes, 1 where the
 * word occurs again; top_word_chars; total_chars; repeated_chars) */
static PyObject *word_ids(PyObject *self, PyObject *args) {
    PyObject *words;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &words))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(words), size = table_size(n), distinct = 0;
    PyObject **keys = calloc(size, sizeof(PyObject *));
    Py_hash_t *hashes = malloc(size * sizeof(Py_hash_t));
    uint32_t *slot_id = malloc(size * sizeof(uint32_t));
    Py_ssize_t *counts = calloc(n + 1, sizeof(Py_ssize_t)), *lens = malloc((n + 1) * sizeof(Py_ssize_t));
    PyObject *ids = PyBytes_FromStringAndSize(NULL, n * 4), *repeated = PyBytes_FromStringAndSize(NULL, n);
    PyObject *result = NULL;
    if (!keys || !hashes || !slot_id || !counts || !lens || !ids || !repeated) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    uint32_t *id = (uint32_t *)PyBytes_AS_STRING(ids);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *word = PyList_GET_ITEM(words, i);
        if (!PyUnicode_Check(word)) {
            PyErr_SetString(PyExc_TypeError, "words must be str");
            goto done;
        }
        Py_hash_t hash = PyObject_Hash(word);
        if (hash == -1)
            goto done;
        Py_ssize_t j = (Py_ssize_t)((uint64_t)hash * MIX >> 20) & (size - 1);
        for (;;) {
            if (!keys[j]) {
                keys[j] = word;
                hashes[j] = hash;
                slot_id[j] = (uint32_t)distinct;
                lens[distinct] = PyUnicode_GET_LENGTH(word);
                distinct++;
                break;
            }
            if (hashes[j] == hash && (keys[j] == word || PyUnicode_Compare(keys[j], word) == 0))
                break;
            if (PyErr_Occurred())
                goto done;
            j = (j + 1) & (size - 1);
        }
        id[i] = slot_id[j];
        counts[slot_id[j]]++;
    }
    unsigned char *rep = (unsigned char *)PyBytes_AS_STRING(repeated);
    long long top = 0, total = 0, repeated_chars = 0;
    for (Py_ssize_t d = 0; d < distinct; d++) {
        long long chars = (long long)lens[d] * counts[d];
        top = chars > top ? chars : top;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        rep[i] = counts[id[i]] > 1;
        total += lens[id[i]];
        repeated_chars += rep[i] ? lens[id[i]] : 0;
    }
    result = Py_BuildValue("OOLLL", ids, repeated, top, total, repeated_chars);
done:
    free(keys);
    free(hashes);
    free(slot_id);
    free(counts);
    free(lens);
    Py_XDECREF(ids);
    Py_XDECREF(repeated);
    return result;
}

/* char_run_start(text, length, rule_chars) -> where the first run of one character not in
 * rule_chars, `length` times or more, starts, or -1: the position repetition.char_run's regex
 * search would match at (the first maximal run long enough). */
static PyObject *char_run_start(PyObject *self, PyObject *args) {
    PyObject *text, *rule;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "UnU", &text, &length, &rule))
        return NULL;
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), i = 0;
    while (i < n) {
        Py_UCS4 ch = PyUnicode_READ(kind, data, i);
        Py_ssize_t j = i + 1;
        while (j < n && PyUnicode_READ(kind, data, j) == ch)
            j++;
        if (j - i >= length && PyUnicode_FindChar(rule, ch, 0, PyUnicode_GET_LENGTH(rule), 1) == -1)
            return PyLong_FromSsize_t(i);
        i = j;
    }
    return PyLong_FromLong(-1);
}

/* words(text) -> the maximal runs of word characters (str.isalnum or "_", what re's \w matches
 * in str patterns): re.findall(r"\w+", text) without the regex engine */
static int word_char(Py_UCS4 c) {
    return c < 128 ? (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' : Py_UNICODE_ISALNUM(c);
}

static PyObject *words(PyObject *self, PyObject *text) {
    if (!PyUnicode_Check(text))
        return PyErr_Format(PyExc_TypeError, "expected str");
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = 0; out && i < n;) {
        if (!word_char(PyUnicode_READ(kind, data, i))) {
            i++;
            continue;
        }
        Py_ssize_t j = i + 1;
        while (j < n && word_char(PyUnicode_READ(kind, data, j)))
            j++;
        PyObject *word = PyUnicode_Substring(text, i, j);
        if (!word || PyList_Append(out, word) < 0)
            Py_CLEAR(out);
        Py_XDECREF(word);
        i = j;
    }
    return out;
}

/* dup_lines(text) -> (distinct, lines) over the lines of ASCII text with three or more words,
 * each lower-cased with its words joined by one space: repetition.dup_line_frac's
 * str.splitlines / lower / split / set, without a string object a line. */
static int line_break(char c) { return c == '\n' || c == '\r' || (c >= '\x0b' && c <= '\x0c') || (c >= '\x1c' && c <= '\x1e'); }

static int ascii_space(char c) { return c == ' ' || c == '\t' || line_break(c) || c == '\x1f'; }

static PyObject *dup_lines(PyObject *self, PyObject *text) {
    if (!PyUnicode_Check(text) || !PyUnicode_IS_ASCII(text))
        return PyErr_Format(PyExc_TypeError, "expected ASCII str");
    const char *s = (const char *)PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), lines = 0, used = 0;
    char *buf = malloc(n + 1);
    Py_ssize_t *start = malloc((n + 2) * sizeof(Py_ssize_t)), *len = malloc((n + 2) * sizeof(Py_ssize_t));
    if (!buf || !start || !len) {
        free(buf), free(start), free(len);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i <= n;) {
        Py_ssize_t j = i, words = 0, begin = used;
        while (j < n && !line_break(s[j])) {
            while (j < n && !line_break(s[j]) && ascii_space(s[j]))
                j++;
            if (j >= n || line_break(s[j]))
                break;
            if (words++)
                buf[used++] = ' ';
            for (; j < n && !ascii_space(s[j]); j++)
                buf[used++] = (s[j] >= 'A' && s[j] <= 'Z') ? (char)(s[j] + 32) : s[j];
        }
        if (words >= 3) {
            start[lines] = begin;
            len[lines++] = used - begin;
        } else
            used = begin;
        i = j + 1;
    }
    Py_ssize_t size = table_size(lines), distinct = 0;
    Py_ssize_t *slots = malloc(size * sizeof(Py_ssize_t));
    if (!slots) {
        free(buf), free(start), free(len);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t k = 0; k < size; k++)
        slots[k] = -1;
    for (Py_ssize_t l = 0; l < lines; l++) {
        uint64_t h = 0;
        for (Py_ssize_t k = 0; k < len[l]; k++)
            h = (h ^ (unsigned char)buf[start[l] + k]) * MIX;
        Py_ssize_t k = (Py_ssize_t)((h ^ h >> 29) >> 20) & (size - 1);
        while (slots[k] >= 0 && !(len[slots[k]] == len[l] && !memcmp(buf + start[slots[k]], buf + start[l], len[l])))
            k = (k + 1) & (size - 1);
        if (slots[k] < 0) {
            slots[k] = l;
            distinct++;
        }
    }
    free(buf), free(start), free(len), free(slots);
    return Py_BuildValue("nn", distinct, lines);
}

/* Word ids and their lengths, borrowed from the caller's objects for the duration of a call. */
typedef struct {
    Py_buffer view;
    const uint32_t *id;
    Py_ssize_t n;
} Ids;

static int get_ids(PyObject *obj, Ids *ids) {
    if (PyObject_GetBuffer(obj, &ids->view, PyBUF_SIMPLE) < 0)
        return -1;
    ids->id = (const uint32_t *)ids->view.buf;
    ids->n = ids->view.len / 4;
    return 0;
}

/* Counts of the n-grams of ids: gram_of[i] = the slot of the n-gram starting at i, whose
 * count is count[slot] and first start first[slot]. */
typedef struct {
    Py_ssize_t size, grams;
    Py_ssize_t *first, *count, *gram_of;
} Grams;

static uint64_t gram_hash(const uint32_t *id, Py_ssize_t n) {
    uint64_t h = 0;
    for (Py_ssize_t k = 0; k < n; k++)
        h = (h ^ id[k]) * MIX;
    return h ^ (h >> 29);
}

static void grams_free(Grams *g) {
    free(g->first);
    free(g->count);
    free(g->gram_of);
}

static int grams_count(const Ids *ids, Py_ssize_t n, Grams *g) {
    g->grams = n >= 1 && ids->n >= n ? ids->n - n + 1 : 0;
    g->size = table_size(g->grams);
    g->first = malloc(g->size * sizeof(Py_ssize_t));
    g->count = calloc(g->size, sizeof(Py_ssize_t));
    g->gram_of = malloc((g->grams + 1) * sizeof(Py_ssize_t));
    if (!g->first || !g->count || !g->gram_of) {
        grams_free(g);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < g->grams; i++) {
        Py_ssize_t j = (Py_ssize_t)(gram_hash(ids->id + i, n) >> 20) & (g->size - 1);
        while (g->count[j] && memcmp(ids->id + g->first[j], ids->id + i, n * sizeof(uint32_t)))
            j = (j + 1) & (g->size - 1);
        if (!g->count[j])
            g->first[j] = i;
        g->count[j]++;
        g->gram_of[i] = j;
    }
    return 0;
}

static Py_ssize_t *word_lengths(PyObject *words, Py_ssize_t n) {
    if (!PyList_Check(words) || PyList_GET_SIZE(words) != n) {
        PyErr_SetString(PyExc_ValueError, "words and ids differ");
        return NULL;
    }
    Py_ssize_t *lens = malloc((n + 1) * sizeof(Py_ssize_t));
    if (!lens)
        return (Py_ssize_t *)PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *word = PyList_GET_ITEM(words, i);
        lens[i] = PyUnicode_Check(word) ? PyUnicode_GET_LENGTH(word) : 0;
    }
    return lens;
}

/* The arguments (words, ids, n) of the n-gram measures over words: the ids, their n-gram
 * counts and the words' lengths; on failure (-1) nothing is left to release. */
static int word_grams(PyObject *args, Py_ssize_t *n, Ids *ids, Grams *g, Py_ssize_t **lens) {
    PyObject *words, *obj;
    if (!PyArg_ParseTuple(args, "OOn", &words, &obj, n) || get_ids(obj, ids) < 0)
        return -1;
    *lens = word_lengths(words, ids->n);
    if (!*lens || grams_count(ids, *n, g) < 0) {
        free(*lens);
        PyBuffer_Release(&ids->view);
        return -1;
    }
    return 0;
}

/* Releases what word_grams set up and returns a measure's character count. */
static PyObject *word_grams_result(Ids *ids, Grams *g, Py_ssize_t *lens, long long chars) {
    grams_free(g);
    free(lens);
    PyBuffer_Release(&ids->view);
    return PyLong_FromLongLong(chars);
}

/* gram_repeats(ids, n) -> whether some n-gram occurs twice */
static PyObject *gram_repeats(PyObject *self, PyObject *args) {
    PyObject *obj;
    Py_ssize_t n;
    Ids ids;
    Grams g;
    if (!PyArg_ParseTuple(args, "On", &obj, &n) || get_ids(obj, &ids) < 0)
        return NULL;
    if (grams_count(&ids, n, &g) < 0) {
        PyBuffer_Release(&ids.view);
        return NULL;
    }
    int found = 0;
    for (Py_ssize_t i = 0; i < g.grams && !found; i++)
        found = g.count[g.gram_of[i]] > 1;
    grams_free(&g);
    PyBuffer_Release(&ids.view);
    return PyBool_FromLong(found);
}

/* top_gram_chars(words, ids, n) -> characters of the most frequent n-gram (the first seen of
 * those tied) times its count, 0 when every n-gram is unique: the numerator of
 * repetition.top_ngram_char_frac */
static PyObject *top_gram_chars(PyObject *self, PyObject *args) {
    Py_ssize_t n, *lens;
    Ids ids;
    Grams g;
    if (word_grams(args, &n, &ids, &g, &lens) < 0)
        return NULL;
    Py_ssize_t best = -1, best_count = 1;
    for (Py_ssize_t i = 0; i < g.grams; i++) {  /* in order of first occurrence, as a Counter's */
        Py_ssize_t slot = g.gram_of[i];
        if (g.first[slot] == i && g.count[slot] > best_count) {
            best = slot;
            best_count = g.count[slot];
        }
    }
    long long chars = 0;
    if (best >= 0) {
        for (Py_ssize_t k = 0; k < n; k++)
            chars += lens[g.first[best] + k];
        chars *= best_count;
    }
    return word_grams_result(&ids, &g, lens, chars);
}

/* dup_gram_chars(words, ids, n) -> characters of the words covered by n-grams occurring twice or
 * more: the numerator of repetition.dup_ngram_char_frac */
static PyObject *dup_gram_chars(PyObject *self, PyObject *args) {
    Py_ssize_t n, *lens;
    Ids ids;
    Grams g;
    if (word_grams(args, &n, &ids, &g, &lens) < 0)
        return NULL;
    long long chars = 0;
    Py_ssize_t covered_to = 0;  /* words before this index are counted */
    for (Py_ssize_t i = 0; i < g.grams; i++) {
        if (g.count[g.gram_of[i]] < 2)
            continue;
        for (Py_ssize_t k = i > covered_to ? i : covered_to; k < i + n; k++)
            chars += lens[k];
        covered_to = covered_to > i + n ? covered_to : i + n;
    }
    return word_grams_result(&ids, &g, lens, chars);
}

/* longest_loop(ids, min_repeats, max_period) -> (period, repeats, start) or None: the search of
 * repetition.longest_loop over word ids, in the same order, so ties resolve the same way. */
static PyObject *longest_loop(PyObject *self, PyObject *args) {
    PyObject *obj;
    Py_ssize_t min_repeats, max_period;
    Ids ids;
    if (!PyArg_ParseTuple(args, "Onn", &obj, &min_repeats, &max_period) || get_ids(obj, &ids) < 0)
        return NULL;
    Py_ssize_t n = ids.n, distinct = 0;
    const uint32_t *w = ids.id;
    for (Py_ssize_t i = 0; i < n; i++)
        distinct = w[i] + 1 > (uint32_t)distinct ? w[i] + 1 : distinct;
    Py_ssize_t *count = calloc(distinct + 1, sizeof(Py_ssize_t)), *offset = malloc((distinct + 2) * sizeof(Py_ssize_t));
    Py_ssize_t *pos = malloc((n + 1) * sizeof(Py_ssize_t)), *fill = malloc((distinct + 1) * sizeof(Py_ssize_t));
    unsigned char *tried = calloc((size_t)(n + 1) * (max_period + 1), 1);
    PyObject *result = NULL;
    if (!count || !offset || !pos || !fill || !tried) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        count[w[i]]++;
    offset[0] = 0;
    for (Py_ssize_t d = 0; d < distinct; d++)
        offset[d + 1] = offset[d] + count[d];
    memcpy(fill, offset, distinct * sizeof(Py_ssize_t));
    for (Py_ssize_t i = 0; i < n; i++)
        pos[fill[w[i]]++] = i;
    Py_ssize_t span = min_repeats >= 3 ? 3 : 2, best_period = 0, best_repeats = 0, best_start = 0;
    for (Py_ssize_t d = 0; d < distinct; d++) {  /* ids number words by first occurrence */
        if (count[d] < min_repeats)
            continue;
        const Py_ssize_t *p = pos + offset[d];
        for (Py_ssize_t k = 0; k + span <= count[d]; k++) {
            Py_ssize_t a = p[k], b = p[k + 1], period = b - a;
            if ((span == 3 && period != p[k + 2] - b) || period > max_period || tried[a * (max_period + 1) + period])
                continue;
            Py_ssize_t start = a, end = a;
            while (start > 0 && w[start - 1] == w[start - 1 + period])
                start--;
            while (end + period < n && w[end] == w[end + period])
                end++;
            for (Py_ssize_t s = start; s < end; s += period)
                tried[s * (max_period + 1) + period] = 1;
            Py_ssize_t repeats = (end - start) / period + 1;
            if (repeats >= min_repeats && (best_period == 0 || period * repeats > best_period * best_repeats)) {
                best_period = period;
                best_repeats = repeats;
                best_start = start;
            }
        }
    }
    if (best_period)
        result = Py_BuildValue("nnn", best_period, best_repeats, best_start);
    else
        result = Py_NewRef(Py_None);
done:
    free(count);
    free(offset);
    free(pos);
    free(fill);
    free(tried);
    PyBuffer_Release(&ids.view);
    return result;
}

/* ---- token counting (models.chat.TokenCounter) -----------------------------------------------
 * ChunkTable: the token count of every space-led chunk " word," seen so far, keyed by the
 * chunk's code points in a table of its own, so that summing the chunks of a text makes no
 * string object and hashes no str (the dict it replaces: ~25 us a sample of the ~80 us of
 * counting). count(text) cuts text at every space like text.split(" ") and returns
 * (sum of the known chunks' counts, the unknown chunks as str, where the first space is), or
 * None where a space ends the text or precedes whitespace (those cuts are no pre-token borders). */

typedef struct {
    uint64_t hash;  /* 0: empty slot */
    Py_ssize_t start, len;  /* the key: pool[start : start + len] */
    long long count;
} ChunkSlot;

typedef struct {
    PyObject_HEAD
    ChunkSlot *slots;
    Py_ssize_t cap, size;
    Py_UCS4 *pool;
    Py_ssize_t pool_len, pool_cap;
} ChunkTable;

static uint64_t chunk_hash(int kind, const void *data, Py_ssize_t start, Py_ssize_t len) {
    uint64_t h = 0x243F6A8885A308D3ULL ^ (uint64_t)len;
    for (Py_ssize_t i = 0; i < len; i++)
        h = (h ^ PyUnicode_READ(kind, data, start + i)) * MIX;
    h ^= h >> 31;
    return h ? h : 1;
}

static int chunk_equal(const ChunkTable *t, const ChunkSlot *slot, int kind, const void *data, Py_ssize_t start, Py_ssize_t len) {
    if (slot->len != len)
        return 0;
    const Py_UCS4 *key = t->pool + slot->start;
    for (Py_ssize_t i = 0; i < len; i++)
        if (key[i] != PyUnicode_READ(kind, data, start + i))
            return 0;
    return 1;
}

static ChunkSlot *chunk_find(const ChunkTable *t, uint64_t hash, int kind, const void *data, Py_ssize_t start, Py_ssize_t len) {
    Py_ssize_t i = (Py_ssize_t)(hash * MIX >> 20) & (t->cap - 1);
    while (t->slots[i].hash && !(t->slots[i].hash == hash && chunk_equal(t, &t->slots[i], kind, data, start, len)))
        i = (i + 1) & (t->cap - 1);
    return &t->slots[i];
}

static int chunk_table_reset(ChunkTable *t, Py_ssize_t cap) {
    ChunkSlot *slots = calloc(cap, sizeof(ChunkSlot));
    if (!slots) {
        PyErr_NoMemory();
        return -1;
    }
    free(t->slots);
    t->slots = slots;
    t->cap = cap;
    t->size = 0;
    return 0;
}

static int chunk_table_grow(ChunkTable *t) {
    ChunkSlot *old = t->slots;
    Py_ssize_t old_cap = t->cap;
    t->slots = NULL;
    if (chunk_table_reset(t, old_cap * 2) < 0) {
        t->slots = old;
        t->cap = old_cap;
        return -1;
    }
    for (Py_ssize_t i = 0; i < old_cap; i++) {
        if (!old[i].hash)
            continue;
        Py_ssize_t j = (Py_ssize_t)(old[i].hash * MIX >> 20) & (t->cap - 1);
        while (t->slots[j].hash)
            j = (j + 1) & (t->cap - 1);
        t->slots[j] = old[i];
        t->size++;
    }
    free(old);
    return 0;
}

static PyObject *chunk_table_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    ChunkTable *t = (ChunkTable *)type->tp_alloc(type, 0);
    if (t && chunk_table_reset(t, 1024) < 0)
        Py_CLEAR(t);
    return (PyObject *)t;
}

static void chunk_table_dealloc(ChunkTable *t) {
    free(t->slots);
    free(t->pool);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

/* Unicode White_Space, what the tokenizer's \s matches (models.chat._WHITE_SPACE) */
static int white_space(Py_UCS4 c) {
    return (c >= 0x09 && c <= 0x0d) || c == ' ' || c == 0x85 || c == 0xa0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200a) ||
           c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

/* Adds the count of text[start:end] to *total where the table knows it, else appends that
 * substring to missing (for the caller to count and add). -1 on error. */
static int chunk_lookup(ChunkTable *t, PyObject *text, int kind, const void *data, Py_ssize_t start, Py_ssize_t end,
                        long long *total, PyObject *missing) {
    ChunkSlot *slot = chunk_find(t, chunk_hash(kind, data, start, end - start), kind, data, start, end - start);
    if (slot->hash) {
        *total += slot->count;
        return 0;
    }
    PyObject *chunk = PyUnicode_Substring(text, start, end);
    int failed = !chunk || PyList_Append(missing, chunk) < 0;
    Py_XDECREF(chunk);
    return failed ? -1 : 0;
}

static PyObject *chunk_table_count(ChunkTable *t, PyObject *text) {
    if (!PyUnicode_Check(text))
        return PyErr_Format(PyExc_TypeError, "expected str");
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), first_end = n;
    long long total = 0;
    PyObject *missing = PyList_New(0);
    if (!missing)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyUnicode_READ(kind, data, i) != ' ')
            continue;
        if (i + 1 == n || white_space(PyUnicode_READ(kind, data, i + 1))) {  /* not cut at pre-token borders */
            Py_DECREF(missing);
            Py_RETURN_NONE;
        }
        if (first_end == n)
            first_end = i;
        Py_ssize_t start = i + 1, end = start;
        while (end < n && PyUnicode_READ(kind, data, end) != ' ')
            end++;
        if (chunk_lookup(t, text, kind, data, start, end, &total, missing) < 0) {
            Py_DECREF(missing);
            return NULL;
        }
        i = end - 1;
    }
    PyObject *result = Py_BuildValue("LOn", total, missing, first_end);
    Py_DECREF(missing);
    return result;
}

/* The end of the piece of models.chat._segments_regex() that starts at i < n, the same leftmost
 * alternative: " ?[^ws]+" (a space joins the word it leads); "[ws]+(?![^ws])", a whitespace run
 * to the end of the text, else all of it but its last character; "[ws]" where the run is one
 * character before a non-space. */
static Py_ssize_t segment_end(int kind, const void *data, Py_ssize_t n, Py_ssize_t i) {
    Py_UCS4 c = PyUnicode_READ(kind, data, i);
    Py_ssize_t j = i + 1;
    if (!white_space(c) || (c == ' ' && j < n && !white_space(PyUnicode_READ(kind, data, j)))) {
        while (j < n && !white_space(PyUnicode_READ(kind, data, j)))
            j++;
        return j;
    }
    while (j < n && white_space(PyUnicode_READ(kind, data, j)))
        j++;
    if (j == n)
        return n;
    return j - 1 > i ? j - 1 : j;
}

/* count_segments(text) -> (sum of the known segments' counts, the unknown segments): text cut as
 * _segments_regex().findall cuts it. For a table of its own, keyed by segments counted as they
 * are (the chunk table's keys are counted with a space before them). */
static PyObject *chunk_table_count_segments(ChunkTable *t, PyObject *text) {
    if (!PyUnicode_Check(text))
        return PyErr_Format(PyExc_TypeError, "expected str");
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    long long total = 0;
    PyObject *missing = PyList_New(0);
    if (!missing)
        return NULL;
    for (Py_ssize_t i = 0, end; i < n; i = end) {
        end = segment_end(kind, data, n, i);
        if (chunk_lookup(t, text, kind, data, i, end, &total, missing) < 0) {
            Py_DECREF(missing);
            return NULL;
        }
    }
    PyObject *result = Py_BuildValue("LO", total, missing);
    Py_DECREF(missing);
    return result;
}

static PyObject *chunk_table_add(ChunkTable *t, PyObject *args) {
    PyObject *chunk;
    long long count;
    if (!PyArg_ParseTuple(args, "UL", &chunk, &count))
        return NULL;
    int kind = PyUnicode_KIND(chunk);
    const void *data = PyUnicode_DATA(chunk);
    Py_ssize_t len = PyUnicode_GET_LENGTH(chunk);
    uint64_t hash = chunk_hash(kind, data, 0, len);
    ChunkSlot *slot = chunk_find(t, hash, kind, data, 0, len);
    if (slot->hash) {  /* known: keep the first count */
        Py_RETURN_NONE;
    }
    if (t->pool_len + len > t->pool_cap) {
        Py_ssize_t cap = t->pool_cap ? t->pool_cap : 4096;
        while (cap < t->pool_len + len)
            cap *= 2;
        Py_UCS4 *pool = realloc(t->pool, cap * sizeof(Py_UCS4));
        if (!pool)
            return PyErr_NoMemory();
        t->pool = pool;
        t->pool_cap = cap;
    }
    for (Py_ssize_t i = 0; i < len; i++)
        t->pool[t->pool_len + i] = PyUnicode_READ(kind, data, i);
    slot->hash = hash;
    slot->start = t->pool_len;
    slot->len = len;
    slot->count = count;
    t->pool_len += len;
    t->size++;
    if (t->size * 2 > t->cap && chunk_table_grow(t) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *chunk_table_clear(ChunkTable *t, PyObject *unused) {
    if (chunk_table_reset(t, 1024) < 0)
        return NULL;
    t->pool_len = 0;
    Py_RETURN_NONE;
}

static Py_ssize_t chunk_table_len(ChunkTable *t) { return t->size; }

static PyMethodDef chunk_table_methods[] = {
    {"count", (PyCFunction)chunk_table_count, METH_O,
     "count(text) -> (sum of the known chunks' counts, the unknown chunks, index of the first space or len(text)), or None"},
    {"count_segments", (PyCFunction)chunk_table_count_segments, METH_O,
     "count_segments(text) -> (sum of the known whitespace-run segments' counts, the unknown segments)"},
    {"add", (PyCFunction)chunk_table_add, METH_VARARGS, "add(chunk, count): remember a chunk's token count"},
    {"clear", (PyCFunction)chunk_table_clear, METH_NOARGS, "forget every chunk"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods chunk_table_sequence = {.sq_length = (lenfunc)chunk_table_len};

static PyTypeObject ChunkTableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "loraforge.gate._native.ChunkTable",
    .tp_basicsize = sizeof(ChunkTable),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Token counts of the chunks text.split(' ')[1:] yields, keyed by their code points.",
    .tp_new = chunk_table_new,
    .tp_dealloc = (destructor)chunk_table_dealloc,
    .tp_methods = chunk_table_methods,
    .tp_as_sequence = &chunk_table_sequence,
};

static PyMethodDef methods[] = {
    {"ngram_hashes", ngram_hashes, METH_VARARGS, "ngram_hashes(hashes, n) -> bytes of uint64 n-gram hashes"},
    {"minhash", minhash, METH_VARARGS, "minhash(shingles, a, b[, bands, rows]) -> (signature bytes, 8-bit sketch bytes), or (band keys, sketch) given rows"},
    {"word_hashes", word_hashes, METH_VARARGS, "word_hashes(words, table) -> bytes of uint64 xxh3_64 of each word"},
    {"first_member", first_member, METH_VARARGS, "first_member(values, sorted_keys) -> index of the first value present, or -1"},
    {"pii_prefilter", pii_prefilter, METH_O, "pii_prefilter(text) -> bits of the kinds that may match: 1 email, 2 phone, 4 ip, 8 api_key"},
    {"char_run_start", char_run_start, METH_VARARGS, "char_run_start(text, length, rule_chars) -> start of the first long run, or -1"},
    {"key_add_all", key_add_all, METH_VARARGS, "key_add_all(keys, values, new_keys, value) -> how many were added"},
    {"key_rehash", key_rehash, METH_VARARGS, "key_rehash(keys, values, old_keys, old_values) -> entries moved"},
    {"near_check", near_check, METH_VARARGS,
     "near_check(keys, values, sketches, bands, sketch, threshold) -> (ordinal, similarity) of the first near duplicate, or None"},
    {"words", words, METH_O, "words(text) -> re.findall(r'\\w+', text)"},
    {"dup_lines", dup_lines, METH_O, "dup_lines(ascii_text) -> (distinct, lines) of three words or more"},
    {"word_ids", word_ids, METH_VARARGS, "word_ids(words) -> (ids, repeated, top_word_chars, total_chars, repeated_chars)"},
    {"gram_repeats", gram_repeats, METH_VARARGS, "gram_repeats(ids, n) -> whether an n-gram occurs twice"},
    {"top_gram_chars", top_gram_chars, METH_VARARGS, "top_gram_chars(words, ids, n) -> top n-gram characters x count"},
    {"dup_gram_chars", dup_gram_chars, METH_VARARGS, "dup_gram_chars(words, ids, n) -> characters in repeated n-grams"},
    {"longest_loop", longest_loop, METH_VARARGS, "longest_loop(ids, min_repeats, max_period) -> (period, repeats, start) | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_native", .m_doc = "The gate's hot loops in C.", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&ChunkTableType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddObjectRef(m, "ChunkTable", (PyObject *)&ChunkTableType) < 0)
        Py_CLEAR(m);
    return m;
}
