/* fxqbn._ckernels: the fused backend's integer kernels on raw CPU buffers (no torch headers).
 *
 * bn:         out = clamp(zout + rne(fma(a[c], x - zin, b[c])), lo, hi) per channel, or a 256-entry
 *             table for the channels the caller marks (where this map differs from the native op);
 * mismatches: which channels of bn's outputs on every code differ from the table (the caller's check);
 * quantize:   float32 -> codes, rne(fma(x, inv, zp)) or zp + rne(x * inv) (whichever torch uses),
 *             reporting whether any value left the range where both of torch's code paths agree;
 * dequantize: codes -> float32, (q - zp) * scale.
 *
 * Python passes data pointers and sizes as ints (METH_FASTCALL), the thread count included. Work
 * is split with pthreads (no OpenMP: torch already loads one runtime). The GIL is released while
 * the kernels run. AVX-512 (F/BW/VL) or AVX2+FMA code is chosen at import with
 * __builtin_cpu_supports (FXQBN_NO_VBMI=1: no byte permutes; FXQBN_NO_AVX512=1: AVX2 at most;
 * FXQBN_SCALAR=1: scalar, for tests); with AVX-512 VBMI a row of one channel is a table lookup. Every
 * kernel also has a portable scalar version with the same results (fmaf, nearbyintf in the default
 * rounding). Whatever a path computes, the Python side checks the BN map on every code against
 * torch's own op before using it (fxqbn/fused.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FXQBN_X86 1
#include <immintrin.h>
#endif

#define MAX_THREADS 64
#define MIN_PER_THREAD (1 << 20) /* elements: below this a new thread costs more than it saves (and on a loaded machine may wait ms to run) */
#define CLIP 1073741824.0f   /* quantize: a value with |t| beyond this (or NaN) flags the call, and the caller
                              * quantizes the whole tensor with torch (fxqbn.qops.quantize saturates it). */

/* -- the parallel loop ------------------------------------------------------------------------- */

typedef void (*range_fn)(const void *job, int64_t begin, int64_t end, int *flag);

static int use_avx512 = 0, use_vbmi = 0; /* set at import, from the CPU's features */

typedef struct {
    range_fn fn;
    const void *job;
    int64_t begin, end;
    int flag;
} task;

static void *run_task(void *arg) {
    task *t = (task *)arg;
    t->fn(t->job, t->begin, t->end, &t->flag);
    return NULL;
}

/* Run fn over [0, units) split into contiguous ranges, one per thread; each unit is `grain`
 * elements. Returns the OR of the threads' flags. */
static int parallel(range_fn fn, const void *job, int64_t units, int64_t grain, int threads) {
    int64_t work = units * grain;
    int64_t most = work / MIN_PER_THREAD;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > most) threads = (int)most;
    if (threads > units) threads = (int)units;
    if (threads <= 1) {
        int flag = 0;
        fn(job, 0, units, &flag);
        return flag;
    }
    task tasks[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int i = 0; i < threads; i++) {
        tasks[i] = (task){fn, job, units * i / threads, units * (i + 1) / threads, 0};
        started[i] = i > 0 && pthread_create(&ids[i], NULL, run_task, &tasks[i]) == 0;
    }
    run_task(&tasks[0]);
    int flag = tasks[0].flag;
    for (int i = 1; i < threads; i++) {
        if (started[i]) pthread_join(ids[i], NULL);
        else run_task(&tasks[i]); /* could not start a thread: do its share here */
        flag |= tasks[i].flag;
    }
    return flag;
}

/* -- BatchNorm ----------------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *src;
    uint8_t *dst;
    int64_t rows, row_len, channels;
    int per_element;         /* 0: row r is channel r % C; 1: element j of the flat array is channel j % C */
    const float *a, *b;      /* per channel; with per_element, `period` entries repeating the channels
                              * (then at least 64 more, read by a last partial block) */
    int64_t period;          /* per_element: a multiple of C and of 64, where the constants repeat */
    const uint8_t *table;    /* (C, 256) output codes, indexed by the input code's byte ^ flip */
    const uint8_t *use_table;/* (C,) 1 where the channel runs the table */
    const int32_t *table_channels; /* the channels where use_table is 1 */
    int64_t n_table;
    int zin, zout, lo, hi, is_signed;
} bn_job;

static inline int code_of(const bn_job *j, uint8_t byte) { return j->is_signed ? (int)(int8_t)byte : (int)byte; }

static inline int sat16(int64_t v) { return v < -32768 ? -32768 : (v > 32767 ? 32767 : (int)v); }

/* What the AVX2 kernel computes for one code: rne to int32 (INT32_MIN when out of range, as
 * cvtps2dq), saturate to int16, add zout saturating, clamp. */
static inline uint8_t bn_scalar(const bn_job *j, uint8_t byte, float a, float b) {
    float t = fmaf(a, (float)(code_of(j, byte) - j->zin), b);
    int64_t r = (t > -2147483648.0f && t < 2147483648.0f) ? (int64_t)nearbyintf(t) : INT32_MIN;
    int q = sat16(sat16(r) + j->zout);
    q = q < j->lo ? j->lo : (q > j->hi ? j->hi : q);
    return (uint8_t)q;
}

static inline uint8_t bn_lookup(const bn_job *j, int64_t c, uint8_t byte) {
    return j->table[c * 256 + (uint8_t)(byte ^ (j->is_signed ? 0x80 : 0))];
}

/* Channels that run the table, in a range of whole rows of C (per-element layout). */
static void patch_table_channels(const bn_job *j, int64_t first, int64_t last) {
    for (int64_t e = first; e < last; e += j->channels)
        for (int64_t k = 0; k < j->n_table; k++) {
            int64_t c = j->table_channels[k];
            j->dst[e + c] = bn_lookup(j, c, j->src[e + c]);
        }
}

static void bn_scalar_range(const void *job, int64_t begin, int64_t end, int *flag) {
    const bn_job *j = (const bn_job *)job;
    (void)flag;
    if (!j->per_element) {
        for (int64_t r = begin; r < end; r++) {
            int64_t c = r % j->channels, base = r * j->row_len;
            for (int64_t i = 0; i < j->row_len; i++)
                j->dst[base + i] = j->use_table[c] ? bn_lookup(j, c, j->src[base + i]) : bn_scalar(j, j->src[base + i], j->a[c], j->b[c]);
        }
        return;
    }
    int64_t first = begin * j->period, last = end * j->period;
    if (last > j->rows * j->row_len) last = j->rows * j->row_len;
    for (int64_t e = first; e < last; e++) j->dst[e] = bn_scalar(j, j->src[e], j->a[e % j->period], j->b[e % j->period]);
    patch_table_channels(j, first, last);
}

#ifdef FXQBN_X86
#define AVX2 __attribute__((target("avx2,fma")))

/* Four vectors of 8 int32 codes (already clamped to the code range) -> 32 bytes in order. */
AVX2 static inline __m256i pack32(__m256i q0, __m256i q1, __m256i q2, __m256i q3, int is_signed) {
    __m256i p01 = _mm256_packs_epi32(q0, q1), p23 = _mm256_packs_epi32(q2, q3);
    __m256i bytes = is_signed ? _mm256_packs_epi16(p01, p23) : _mm256_packus_epi16(p01, p23);
    return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* 32 codes src -> dst with constants a[0..32), b[0..32) (per_element) or a[0], b[0]. No clipping
 * before the conversion: an out-of-range t gives INT32_MIN, as bn_scalar emulates, and channels
 * where that changes a code fail the build-time check and run the table. zout is added, and the
 * clamp done, on int16 lanes after a saturating pack (16 lanes per instruction). */
AVX2 static inline __attribute__((always_inline)) void bn_block(const uint8_t *src, uint8_t *dst, const float *a, const float *b,
                                                               int per_element, int is_signed, __m256i vzin, __m256 a0,
                                                               __m256 b0, __m256i vzout, __m256i vlo, __m256i vhi) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)src);
    __m128i low = _mm256_castsi256_si128(raw), high = _mm256_extracti128_si256(raw, 1);
    __m128i parts[4] = {low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)};
    __m256i r[4];
    for (int k = 0; k < 4; k++) {
        __m256i x = is_signed ? _mm256_cvtepi8_epi32(parts[k]) : _mm256_cvtepu8_epi32(parts[k]);
        __m256 av = per_element ? _mm256_loadu_ps(a + 8 * k) : a0;
        __m256 bv = per_element ? _mm256_loadu_ps(b + 8 * k) : b0;
        r[k] = _mm256_cvtps_epi32(_mm256_fmadd_ps(av, _mm256_cvtepi32_ps(_mm256_sub_epi32(x, vzin)), bv));
    }
    __m256i h01 = _mm256_adds_epi16(_mm256_packs_epi32(r[0], r[1]), vzout);
    __m256i h23 = _mm256_adds_epi16(_mm256_packs_epi32(r[2], r[3]), vzout);
    h01 = _mm256_min_epi16(_mm256_max_epi16(h01, vlo), vhi);
    h23 = _mm256_min_epi16(_mm256_max_epi16(h23, vlo), vhi);
    __m256i bytes = is_signed ? _mm256_packs_epi16(h01, h23) : _mm256_packus_epi16(h01, h23);
    bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)dst, bytes);
}

/* n codes src -> dst (not in place); a last partial block is redone as the last 32 codes, or, when
 * n < 32, goes through a 32-byte buffer (a, b are padded for it).
 * Inlined into four callers with constant per_element / is_signed, so each gets its own loop, with
 * every invariant in registers (dst is a byte pointer: stores through it could alias anything). */
AVX2 static inline __attribute__((always_inline)) void bn_span(const uint8_t *restrict src, uint8_t *restrict dst, int64_t n,
                                                              const float *restrict a, const float *restrict b, int per_element,
                                                              int is_signed, int zin, int zout, int lo, int hi) {
    const __m256i vzin = _mm256_set1_epi32(zin), vzout = _mm256_set1_epi16((short)zout);
    const __m256i vlo = _mm256_set1_epi16((short)lo), vhi = _mm256_set1_epi16((short)hi);
    const __m256 a0 = _mm256_set1_ps(a[0]), b0 = _mm256_set1_ps(b[0]);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        bn_block(src + i, dst + i, a + (per_element ? i : 0), b + (per_element ? i : 0), per_element, is_signed, vzin, a0, b0, vzout, vlo, vhi);
    if (i < n && n >= 32) { /* the last 32 codes once more: the same constants give the same codes */
        i = n - 32;
        bn_block(src + i, dst + i, a + (per_element ? i : 0), b + (per_element ? i : 0), per_element, is_signed, vzin, a0, b0, vzout, vlo, vhi);
    } else if (i < n) {
        uint8_t in[32] = {0}, out[32];
        memcpy(in, src + i, (size_t)(n - i));
        bn_block(in, out, a + (per_element ? i : 0), b + (per_element ? i : 0), per_element, is_signed, vzin, a0, b0, vzout, vlo, vhi);
        memcpy(dst + i, out, (size_t)(n - i));
    }
}

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

/* bn_block's arithmetic, 64 codes at a time with 16-lane vectors: the same codes, fewer instructions. */
AVX512 static inline __attribute__((always_inline)) void bn_block64(const uint8_t *src, uint8_t *dst, const float *a, const float *b,
                                                                   int per_element, int is_signed, __m512i vzin, __m512 a0,
                                                                   __m512 b0, __m512i vzout, __m512i vlo, __m512i vhi) {
    __m512i raw = _mm512_loadu_si512((const void *)src);
    __m512i r[4];
    for (int k = 0; k < 4; k++) {
        __m128i part = _mm512_extracti32x4_epi32(raw, k);
        __m512i x = is_signed ? _mm512_cvtepi8_epi32(part) : _mm512_cvtepu8_epi32(part);
        __m512 av = per_element ? _mm512_loadu_ps(a + 16 * k) : a0;
        __m512 bv = per_element ? _mm512_loadu_ps(b + 16 * k) : b0;
        r[k] = _mm512_cvtps_epi32(_mm512_fmadd_ps(av, _mm512_cvtepi32_ps(_mm512_sub_epi32(x, vzin)), bv));
    }
    /* packs work per 128-bit lane: dword 4L + k of the bytes holds codes 4L..4L+3 of r[k] */
    __m512i h01 = _mm512_min_epi16(_mm512_max_epi16(_mm512_adds_epi16(_mm512_packs_epi32(r[0], r[1]), vzout), vlo), vhi);
    __m512i h23 = _mm512_min_epi16(_mm512_max_epi16(_mm512_adds_epi16(_mm512_packs_epi32(r[2], r[3]), vzout), vlo), vhi);
    __m512i bytes = is_signed ? _mm512_packs_epi16(h01, h23) : _mm512_packus_epi16(h01, h23);
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_storeu_si512((void *)dst, _mm512_permutexvar_epi32(order, bytes));
}

AVX512 static inline __attribute__((always_inline)) void bn_span64(const uint8_t *restrict src, uint8_t *restrict dst, int64_t n,
                                                                  const float *restrict a, const float *restrict b, int per_element,
                                                                  int is_signed, int zin, int zout, int lo, int hi) {
    const __m512i vzin = _mm512_set1_epi32(zin), vzout = _mm512_set1_epi16((short)zout);
    const __m512i vlo = _mm512_set1_epi16((short)lo), vhi = _mm512_set1_epi16((short)hi);
    const __m512 a0 = _mm512_set1_ps(a[0]), b0 = _mm512_set1_ps(b[0]);
    int64_t i = 0;
    for (; i + 64 <= n; i += 64)
        bn_block64(src + i, dst + i, a + (per_element ? i : 0), b + (per_element ? i : 0), per_element, is_signed, vzin, a0, b0, vzout, vlo, vhi);
    if (i < n) { /* the last 64 codes once more */
        i = n - 64;
        bn_block64(src + i, dst + i, a + (per_element ? i : 0), b + (per_element ? i : 0), per_element, is_signed, vzin, a0, b0, vzout, vlo, vhi);
    }
}

#define VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma")))

/* One channel's row through its 256-entry table (the native op's codes themselves): two 128-byte
 * permutes (vpermi2b) and a blend on the index's top bit per 64 codes; masked loads and stores for
 * the tail. `flip` (0x80 for int8) turns a code's byte into its table index. */
VBMI static void bn_row_lut(const uint8_t *restrict table, const uint8_t *restrict src, uint8_t *restrict dst, int64_t n, int flip) {
    const __m512i t0 = _mm512_loadu_si512((const void *)table), t1 = _mm512_loadu_si512((const void *)(table + 64));
    const __m512i t2 = _mm512_loadu_si512((const void *)(table + 128)), t3 = _mm512_loadu_si512((const void *)(table + 192));
    const __m512i vflip = _mm512_set1_epi8((char)flip);
    for (int64_t i = 0; i < n; i += 64) {
        __mmask64 m = n - i >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (n - i)) - 1);
        __m512i idx = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, src + i), vflip);
        __m512i lo = _mm512_permutex2var_epi8(t0, idx, t1), hi = _mm512_permutex2var_epi8(t2, idx, t3);
        _mm512_mask_storeu_epi8(dst + i, m, _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi));
    }
}

AVX512 static void bn_span_avx512(const bn_job *j, const uint8_t *src, uint8_t *dst, int64_t n, const float *a, const float *b) {
    int zin = j->zin, zout = j->zout, lo = j->lo, hi = j->hi;
    if (j->per_element) {
        if (j->is_signed) bn_span64(src, dst, n, a, b, 1, 1, zin, zout, lo, hi);
        else bn_span64(src, dst, n, a, b, 1, 0, zin, zout, lo, hi);
    } else {
        if (j->is_signed) bn_span64(src, dst, n, a, b, 0, 1, zin, zout, lo, hi);
        else bn_span64(src, dst, n, a, b, 0, 0, zin, zout, lo, hi);
    }
}

AVX2 static void bn_span_avx2(const bn_job *j, const uint8_t *src, uint8_t *dst, int64_t n, const float *a, const float *b) {
    if (use_avx512 && n >= 64) {
        bn_span_avx512(j, src, dst, n, a, b);
        return;
    }
    int zin = j->zin, zout = j->zout, lo = j->lo, hi = j->hi;
    if (j->per_element) {
        if (j->is_signed) bn_span(src, dst, n, a, b, 1, 1, zin, zout, lo, hi);
        else bn_span(src, dst, n, a, b, 1, 0, zin, zout, lo, hi);
    } else {
        if (j->is_signed) bn_span(src, dst, n, a, b, 0, 1, zin, zout, lo, hi);
        else bn_span(src, dst, n, a, b, 0, 0, zin, zout, lo, hi);
    }
}

AVX2 static void bn_avx2_range(const void *job, int64_t begin, int64_t end, int *flag) {
    const bn_job *j = (const bn_job *)job;
    (void)flag;
    if (!j->per_element) {
        for (int64_t r = begin; r < end; r++) {
            int64_t c = r % j->channels, base = r * j->row_len;
            if (use_vbmi) /* a row is one channel: its table is exact and fastest */
                bn_row_lut(j->table + c * 256, j->src + base, j->dst + base, j->row_len, j->is_signed ? 0x80 : 0);
            else if (j->use_table[c])
                for (int64_t i = 0; i < j->row_len; i++) j->dst[base + i] = bn_lookup(j, c, j->src[base + i]);
            else
                bn_span_avx2(j, j->src + base, j->dst + base, j->row_len, j->a + c, j->b + c);
        }
        return;
    }
    int64_t first = begin * j->period, last = end * j->period, total = j->rows * j->row_len;
    if (last > total) last = total;
    for (int64_t e = first; e < last; e += j->period) {
        int64_t n = last - e < j->period ? last - e : j->period;
        bn_span_avx2(j, j->src + e, j->dst + e, n, j->a, j->b);
    }
    patch_table_channels(j, first, last);
}
#endif

static range_fn bn_range = bn_scalar_range;

/* -- quantize / dequantize ------------------------------------------------------------------------ */

typedef struct {
    const float *src;
    uint8_t *dst;
    float inv, zpf;
    int zp, lo, hi, mul_first; /* mul_first: zp + rne(x * inv) (else rne(fma(x, inv, zp))) */
    int64_t n;
} quantize_job;

#define QGRAIN 4096 /* elements per unit of work */

static inline int64_t unit_end(int64_t end, int64_t n) { return end * QGRAIN < n ? end * QGRAIN : n; }

static inline uint8_t quantize_one(const quantize_job *j, float x, int *flag) {
    float t = j->mul_first ? x * j->inv : fmaf(x, j->inv, j->zpf);
    if (!(fabsf(t) <= CLIP)) { /* NaN too */
        *flag = 1;
        return 0;
    }
    int q = (int)nearbyintf(t) + (j->mul_first ? j->zp : 0);
    return (uint8_t)(q < j->lo ? j->lo : (q > j->hi ? j->hi : q));
}

static void quantize_scalar_range(const void *job, int64_t begin, int64_t end, int *flag) {
    const quantize_job *j = (const quantize_job *)job;
    end = unit_end(end, j->n);
    for (int64_t i = begin * QGRAIN; i < end; i++) j->dst[i] = quantize_one(j, j->src[i], flag);
}

#ifdef FXQBN_X86
/* The vector bodies take every field as a local: dst is a byte pointer, and stores through it could
 * alias the job's fields. The chunk's flag is all that matters for inputs out of range (the caller
 * then quantizes the whole tensor with torch), so those lanes are not clipped. */
AVX2 static void quantize_avx2_range(const void *job, int64_t begin, int64_t end, int *flag) {
    const quantize_job *j = (const quantize_job *)job;
    const float *src = j->src;
    uint8_t *dst = j->dst;
    const int mul_first = j->mul_first, is_signed = j->lo < 0;
    const __m256 inv = _mm256_set1_ps(j->inv), zpf = _mm256_set1_ps(j->zpf), clip = _mm256_set1_ps(CLIP);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i add = _mm256_set1_epi32(mul_first ? j->zp : 0), lo = _mm256_set1_epi32(j->lo), hi = _mm256_set1_epi32(j->hi);
    __m256 bad = _mm256_setzero_ps();
    int64_t i = begin * QGRAIN;
    end = unit_end(end, j->n);
    for (; i + 32 <= end; i += 32) {
        __m256i q[4];
        for (int k = 0; k < 4; k++) {
            __m256 x = _mm256_loadu_ps(src + i + 8 * k);
            __m256 t = mul_first ? _mm256_mul_ps(x, inv) : _mm256_fmadd_ps(x, inv, zpf);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(t, absmask), clip, _CMP_NLE_UQ));
            q[k] = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(t), add), lo), hi);
        }
        _mm256_storeu_si256((__m256i *)(dst + i), pack32(q[0], q[1], q[2], q[3], is_signed));
    }
    if (_mm256_movemask_ps(bad)) *flag = 1;
    for (; i < end; i++) dst[i] = quantize_one(j, src[i], flag);
}

AVX512 static void quantize_avx512_range(const void *job, int64_t begin, int64_t end, int *flag) {
    const quantize_job *j = (const quantize_job *)job;
    const float *src = j->src;
    uint8_t *dst = j->dst;
    const int mul_first = j->mul_first;
    const __m512 inv = _mm512_set1_ps(j->inv), zpf = _mm512_set1_ps(j->zpf), clip = _mm512_set1_ps(CLIP);
    const __m512i add = _mm512_set1_epi32(mul_first ? j->zp : 0), lo = _mm512_set1_epi32(j->lo), hi = _mm512_set1_epi32(j->hi);
    __mmask16 bad = 0;
    int64_t i = begin * QGRAIN;
    end = unit_end(end, j->n);
    for (; i + 16 <= end; i += 16) {
        __m512 x = _mm512_loadu_ps(src + i);
        __m512 t = mul_first ? _mm512_mul_ps(x, inv) : _mm512_fmadd_ps(x, inv, zpf);
        bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(t), clip, _CMP_NLE_UQ);
        __m512i q = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(t), add), lo), hi);
        _mm_storeu_si128((__m128i *)(dst + i), _mm512_cvtepi32_epi8(q));
    }
    if (bad) *flag = 1;
    for (; i < end; i++) dst[i] = quantize_one(j, src[i], flag);
}
#endif

static range_fn quantize_range = quantize_scalar_range;

typedef struct {
    const uint8_t *src;
    float *dst;
    float scale;
    int zp, is_signed;
    int64_t n;
} dequantize_job;

static void dequantize_elements(const dequantize_job *j, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
        int q = j->is_signed ? (int)(int8_t)j->src[i] : (int)j->src[i];
        j->dst[i] = (float)(q - j->zp) * j->scale;
    }
}

static void dequantize_scalar_range(const void *job, int64_t begin, int64_t end, int *flag) {
    const dequantize_job *j = (const dequantize_job *)job;
    (void)flag;
    dequantize_elements(j, begin * QGRAIN, unit_end(end, j->n));
}

#ifdef FXQBN_X86
AVX2 static void dequantize_avx2_range(const void *job, int64_t begin, int64_t end, int *flag) {
    const dequantize_job *j = (const dequantize_job *)job;
    const uint8_t *src = j->src;
    float *dst = j->dst;
    const int is_signed = j->is_signed;
    const __m256i zp = _mm256_set1_epi32(j->zp);
    const __m256 scale = _mm256_set1_ps(j->scale);
    int64_t i = begin * QGRAIN;
    (void)flag;
    end = unit_end(end, j->n);
    for (; i + 8 <= end; i += 8) {
        __m128i bytes = _mm_loadl_epi64((const __m128i *)(src + i));
        __m256i x = is_signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(x, zp)), scale));
    }
    dequantize_elements(j, i, end);
}

AVX512 static void dequantize_avx512_range(const void *job, int64_t begin, int64_t end, int *flag) {
    const dequantize_job *j = (const dequantize_job *)job;
    const uint8_t *src = j->src;
    float *dst = j->dst;
    const int is_signed = j->is_signed;
    const __m512i zp = _mm512_set1_epi32(j->zp);
    const __m512 scale = _mm512_set1_ps(j->scale);
    int64_t i = begin * QGRAIN;
    (void)flag;
    end = unit_end(end, j->n);
    for (; i + 16 <= end; i += 16) {
        __m128i bytes = _mm_loadu_si128((const __m128i *)(src + i));
        __m512i x = is_signed ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
        _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(x, zp)), scale));
    }
    dequantize_elements(j, i, end);
}
#endif

static range_fn dequantize_range = dequantize_scalar_range;

/* -- Python entry points ---------------------------------------------------------------------------- */

static int ints(PyObject *const *args, Py_ssize_t n, Py_ssize_t want, const char *name, long long *out) {
    if (n != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", name, want, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyFloat_Check(args[i])) continue; /* read by the caller */
        out[i] = PyLong_AsLongLong(args[i]);
        if (out[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

/* bn(src, dst, rows, row_len, channels, per_element, a, b, period, table, use_table, table_channels,
 *    n_table, zin, zout, lo, hi, is_signed, threads) */
static PyObject *py_bn(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long v[19];
    (void)self;
    if (ints(args, n, 19, "bn", v) < 0) return NULL;
    bn_job j = {(const uint8_t *)(intptr_t)v[0], (uint8_t *)(intptr_t)v[1], v[2], v[3], v[4], (int)v[5],
                (const float *)(intptr_t)v[6], (const float *)(intptr_t)v[7], v[8], (const uint8_t *)(intptr_t)v[9],
                (const uint8_t *)(intptr_t)v[10], (const int32_t *)(intptr_t)v[11], v[12],
                (int)v[13], (int)v[14], (int)v[15], (int)v[16], (int)v[17]};
    int64_t total = j.rows * j.row_len;
    int64_t units = j.per_element ? (total + j.period - 1) / j.period : j.rows;
    int64_t grain = j.per_element ? j.period : j.row_len;
    Py_BEGIN_ALLOW_THREADS
    parallel(bn_range, &j, units, grain, (int)v[18]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The per-element layout holds channel c's codes a row of C apart: compared in blocks of 64 channels,
 * so that both the rows and the table's lines are read in order. */
static void per_element_mismatches(const uint8_t *got, const uint8_t *table, int64_t channels, uint8_t *mask) {
    for (int64_t c0 = 0; c0 < channels; c0 += 64) {
        int64_t width = channels - c0 < 64 ? channels - c0 : 64;
        uint8_t differ[64] = {0};
        for (int64_t k = 0; k < 256; k++)
            for (int64_t i = 0; i < width; i++) differ[i] |= got[k * channels + c0 + i] ^ table[(c0 + i) * 256 + k];
        for (int64_t i = 0; i < width; i++) mask[c0 + i] |= differ[i] != 0;
    }
}

/* mismatches(per_element, rows, short, table, channels, mask): bn's outputs on the three probe layouts
 * of fxqbn/fused.py's _probe_layouts ((256, C), (C, 256) and (16, C, 16) bytes; code k of a channel is
 * the one whose table entry is k) against the (C, 256) table: mask[c] = 1 where channel c differs. */
static PyObject *py_mismatches(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long v[6];
    (void)self;
    if (ints(args, n, 6, "mismatches", v) < 0) return NULL;
    const uint8_t *per_element = (const uint8_t *)(intptr_t)v[0], *rows = (const uint8_t *)(intptr_t)v[1];
    const uint8_t *shorts = (const uint8_t *)(intptr_t)v[2], *table = (const uint8_t *)(intptr_t)v[3];
    int64_t channels = v[4];
    uint8_t *mask = (uint8_t *)(intptr_t)v[5];
    Py_BEGIN_ALLOW_THREADS
    for (int64_t c = 0; c < channels; c++) {
        const uint8_t *want = table + c * 256;
        int bad = memcmp(rows + c * 256, want, 256) != 0;
        for (int64_t k = 0; k < 16; k++) bad |= memcmp(shorts + (k * channels + c) * 16, want + 16 * k, 16) != 0;
        mask[c] = (uint8_t)bad;
    }
    per_element_mismatches(per_element, table, channels, mask);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* quantize(src, dst, n, inv, zp, lo, hi, mul_first, threads) -> True when some value left the range */
static PyObject *py_quantize(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long v[9];
    (void)self;
    if (ints(args, n, 9, "quantize", v) < 0) return NULL;
    double inv = PyFloat_AsDouble(args[3]);
    if (inv == -1.0 && PyErr_Occurred()) return NULL;
    quantize_job j = {(const float *)(intptr_t)v[0], (uint8_t *)(intptr_t)v[1], (float)inv, (float)v[4],
                      (int)v[4], (int)v[5], (int)v[6], (int)v[7], v[2]};
    int flag;
    Py_BEGIN_ALLOW_THREADS
    flag = parallel(quantize_range, &j, (v[2] + QGRAIN - 1) / QGRAIN, QGRAIN, (int)v[8]);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(flag);
}

/* dequantize(src, dst, n, scale, zp, is_signed, threads) */
static PyObject *py_dequantize(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long v[7];
    (void)self;
    if (ints(args, n, 7, "dequantize", v) < 0) return NULL;
    double scale = PyFloat_AsDouble(args[3]);
    if (scale == -1.0 && PyErr_Occurred()) return NULL;
    dequantize_job j = {(const uint8_t *)(intptr_t)v[0], (float *)(intptr_t)v[1], (float)scale, (int)v[4], (int)v[5], v[2]};
    Py_BEGIN_ALLOW_THREADS
    parallel(dequantize_range, &j, (v[2] + QGRAIN - 1) / QGRAIN, QGRAIN, (int)v[6]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_isa(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyUnicode_FromString(bn_range == bn_scalar_range ? "scalar" : (use_vbmi ? "avx512vbmi" : (use_avx512 ? "avx512" : "avx2")));
}

static PyMethodDef methods[] = {
    {"bn", (PyCFunction)(void (*)(void))py_bn, METH_FASTCALL, "The BN map on codes (see fxqbn/_ckernels.c)."},
    {"mismatches", (PyCFunction)(void (*)(void))py_mismatches, METH_FASTCALL, "Channels where bn's probe outputs differ from the table."},
    {"quantize", (PyCFunction)(void (*)(void))py_quantize, METH_FASTCALL, "float32 -> codes; True if a value left the range."},
    {"dequantize", (PyCFunction)(void (*)(void))py_dequantize, METH_FASTCALL, "codes -> float32."},
    {"isa", py_isa, METH_NOARGS, "The instruction set the BN kernel uses: 'avx512vbmi', 'avx512', 'avx2' or 'scalar'."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ckernels", "fxqbn's native integer kernels.", -1, methods};

PyMODINIT_FUNC PyInit__ckernels(void) {
#ifdef FXQBN_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !getenv("FXQBN_SCALAR")) {
        bn_range = bn_avx2_range;
        quantize_range = quantize_avx2_range;
        dequantize_range = dequantize_avx2_range;
        use_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl") && !getenv("FXQBN_NO_AVX512");
        use_vbmi = use_avx512 && __builtin_cpu_supports("avx512vbmi") && !getenv("FXQBN_NO_VBMI");
        if (use_avx512) {
            quantize_range = quantize_avx512_range;
            dequantize_range = dequantize_avx512_range;
        }
    }
#endif
    return PyModule_Create(&module);
}
