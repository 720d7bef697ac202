/* The CPU filter's loops, compiled at first use by zsam_hf/selection/kernel.py. It began as two
   memory-bound loops (collect, and climb / put); each later round moved another step of a large tensor's
   selection here, where NumPy and torch took a dozen calls for it (docs/performance.md).

   collect, collect_parts: the entries of a gradient outside [lower, upper] (its candidates), with their
   flat indices, in one pass. NumPy needs five passes over each chunk for this (two comparisons, an or, the
   positions, a gather), and its positions loop costs 1.35 cycles an entry; here AVX-512 compares and
   compresses 16 entries at a time, where the CPU has it (chosen at run time), and a branch-free loop
   elsewhere.

   deviations, narrow_pair, deviations_pair, sample_bracket, narrow_deviations: |g - center| of the
   candidates (or of a strided sample, or of a small tensor's every entry), and the quantile's two order
   statistics among them, narrowed by buckets of their bit patterns until a handful are left to sort.

   count_above, keep_above: the kept entries (the candidates above the threshold) counted, then copied out.

   climb / put: w + e written at the kept entries with the originals saved, and the originals written
   back: one loop each, where NumPy and torch take a gather, an add and a scatter.

   Everything is exact: comparisons, one subtraction or addition per entry in the gradient's own type, and
   the AVX-512 versions give the portable loops' results bit for bit. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define COLLECT_SCALAR(T)                                                                              \
    for (; i < n && c < capacity; i++) {                                                               \
        T v = g[i];                                                                                    \
        idx[c] = (int32_t)i;                                                                           \
        val[c] = v;                                                                                    \
        c += (v >= upper) | (v <= lower);                                                              \
    }

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

__attribute__((target("avx512f"))) static int64_t collect_f32_avx512(
    const float *g, int64_t i, int64_t n, float lower, float upper, int32_t *idx, float *val,
    int64_t capacity, int64_t *stop) {
    int64_t c = 0;
    const __m512 lo = _mm512_set1_ps(lower), hi = _mm512_set1_ps(upper);
    const __m512i sixteen = _mm512_set1_epi32(16);
    __m512i first = _mm512_add_epi32(_mm512_set1_epi32((int32_t)i),
                                     _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    for (; i + 16 <= n && c + 16 <= capacity; i += 16) {
        __m512 v = _mm512_loadu_ps(g + i);
        __mmask16 m = _mm512_cmp_ps_mask(v, hi, _CMP_GE_OQ) | _mm512_cmp_ps_mask(v, lo, _CMP_LE_OQ);
        /* Compress into registers, then store, even when nothing is set: a third of the blocks of 16 hold
           no candidate at ZSAM's density, so a branch on it mispredicts often (the loop was 1.7x slower),
           and the compressing store is slow on some CPUs. 32-bit indices take one compress for 16 entries
           where 64-bit ones took two (the loop was a quarter faster). */
        _mm512_storeu_ps(val + c, _mm512_maskz_compress_ps(m, v));
        _mm512_storeu_si512((void *)(idx + c), _mm512_maskz_compress_epi32(m, first));
        c += __builtin_popcount(m);
        first = _mm512_add_epi32(first, sixteen);
    }
    COLLECT_SCALAR(float)
    *stop = i;
    return c;
}

static int has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}
#else
static int has_avx512(void) { return 0; }
#endif

/* The entries of g[start:n] with g <= lower or g >= upper (NaN is neither): flat index (32 bits: the
   caller passes no gradient of more than 2^31 entries) and value, from idx[0] and val[0]. Stops before the
   output could pass capacity; *stop is where it stopped. Returns the count written. */
static int use_avx512 = -1; /* -1: not asked yet */

/* Chosen at the first call, and before any parallel region, so that the threads only read the choice. */
#if defined(__x86_64__) && defined(__GNUC__)
#define CHOOSE_AVX512 if (use_avx512 < 0) use_avx512 = has_avx512();
#else
#define CHOOSE_AVX512
#endif

int64_t collect_f32(const float *g, int64_t start, int64_t n, float lower, float upper, int32_t *idx,
                    float *val, int64_t capacity, int64_t *stop) {
#if defined(__x86_64__) && defined(__GNUC__)
    CHOOSE_AVX512
    if (use_avx512) return collect_f32_avx512(g, start, n, lower, upper, idx, val, capacity, stop);
#endif
    int64_t i = start, c = 0;
    COLLECT_SCALAR(float)
    *stop = i;
    return c;
}

int64_t collect_f64(const double *g, int64_t start, int64_t n, double lower, double upper, int32_t *idx,
                    double *val, int64_t capacity, int64_t *stop) {
    int64_t i = start, c = 0;
    COLLECT_SCALAR(double)
    *stop = i;
    return c;
}

/* Where part t of ``parts`` near-equal parts of m entries starts (kernel.part_starts). */
#define PART_START(m, t, parts) ((m) * (int64_t)(t) / (parts))

/* The loops below split their work between ``threads`` threads of the OpenMP runtime, where the library was
   built with OpenMP (kernel.py builds it so, and links the runtime torch has loaded, whose worker threads
   are still spinning after torch's own parallel ops); one thread runs them in order otherwise. */

/* The kept entries are a few percent of a tensor's, scattered over it: each write lands on its own cache
   line, and the hardware's stream prefetchers, which stop at page boundaries, follow them poorly. Asking
   for the line PREFETCH entries ahead halved the restore and took a quarter off the climb over ResNet-18's
   cold weights (docs/performance.md). */
#define PREFETCH 64
#if defined(__GNUC__)
#define PREFETCH_FOR_WRITE(w, idx, j, k)                                                               \
    if ((j) + PREFETCH < (k)) __builtin_prefetch((w) + (idx)[(j) + PREFETCH], 1, 0);
#else
#define PREFETCH_FOR_WRITE(w, idx, j, k)
#endif

#define CLIMB_AND_PUT(T, SUFFIX, I, WIDTH)                                                             \
    /* w[idx[j]] becomes e[j] + w[idx[j]] (the engine's rounding), its original saved in saved[j];     \
       saved may be e itself (e[j] is read before saved[j] is written). Distinct indices: the threads  \
       write disjoint entries. */                                                                      \
    void climb##WIDTH##_##SUFFIX(T *w, const I *idx, const T *e, T *saved, int64_t k, int threads) {  \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if(threads > 1)")              \
        for (int64_t j = 0; j < k; j++) {                                                              \
            PREFETCH_FOR_WRITE(w, idx, j, k)                                                           \
            T offset = e[j], original = w[idx[j]];                                                     \
            saved[j] = original;                                                                       \
            w[idx[j]] = offset + original;                                                             \
        }                                                                                              \
    }                                                                                                  \
    /* w[idx[j]] = values[j]. */                                                                       \
    void put##WIDTH##_##SUFFIX(T *w, const I *idx, const T *values, int64_t k, int threads) {         \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if(threads > 1)")              \
        for (int64_t j = 0; j < k; j++) {                                                              \
            PREFETCH_FOR_WRITE(w, idx, j, k)                                                           \
            w[idx[j]] = values[j];                                                                     \
        }                                                                                              \
    }

/* climb_f32 ... take int64 indices (torch's); climb32_f32 ... the 32-bit ones the CPU selection keeps. */
CLIMB_AND_PUT(float, f32, int64_t, )
CLIMB_AND_PUT(double, f64, int64_t, )
CLIMB_AND_PUT(float, f32, int32_t, 32)
CLIMB_AND_PUT(double, f64, int32_t, 32)

#define COLLECT_PARTS(T, SUFFIX)                                                                       \
    /* collect over ``parts`` parts of g[0:n], one thread each (PART_START): part t is written from the  \
       sum of capacities[0:t], with room for capacities[t]. The parts' outputs are then moved down to    \
       follow one another in order, so the result is what collect_##SUFFIX writes from 0. A part that    \
       filled its room ends the result there: *stop is where that part stopped (the caller resumes with \
       collect_##SUFFIX), else n. Returns the count. */                                                \
    int64_t collect_parts_##SUFFIX(const T *g, int64_t n, T lower, T upper, int32_t *idx, T *val,      \
                                   const int64_t *capacities, int parts, int64_t *stop) {              \
        int64_t offsets[parts], counts[parts], stops[parts];                                           \
        offsets[0] = 0;                                                                                \
        for (int t = 1; t < parts; t++) offsets[t] = offsets[t - 1] + capacities[t - 1];               \
        CHOOSE_AVX512                                                                                  \
        _Pragma("omp parallel for num_threads(parts) schedule(static, 1) if(parts > 1)")               \
        for (int t = 0; t < parts; t++)                                                                \
            counts[t] = collect_##SUFFIX(g, PART_START(n, t, parts), PART_START(n, t + 1, parts), lower, \
                                         upper, idx + offsets[t], val + offsets[t], capacities[t],     \
                                         stops + t);                                                   \
        int64_t total = 0;                                                                             \
        for (int t = 0; t < parts; t++) {                                                              \
            if (offsets[t] != total) {                                                                 \
                memmove(idx + total, idx + offsets[t], (size_t)counts[t] * sizeof(int32_t));           \
                memmove(val + total, val + offsets[t], (size_t)counts[t] * sizeof(T));                 \
            }                                                                                          \
            total += counts[t];                                                                        \
            *stop = stops[t];                                                                          \
            if (stops[t] < PART_START(n, t + 1, parts)) break;                                         \
        }                                                                                              \
        return total;                                                                                  \
    }

COLLECT_PARTS(float, f32)
COLLECT_PARTS(double, f64)

/* After the collecting pass, over the candidates (a few percent of the tensor, in cache): NumPy takes a
   pass per step of each below (subtract, abs, two comparisons, a count, a compress, positions, two
   gathers), at 3-4 ns a candidate in all on our 2-core VM. Each loop splits the candidates into ``parts``
   near-equal parts, m * t / parts to m * (t + 1) / parts (kernel.part_starts), one thread each; the
   results are the one-part results, entry for entry. */

/* The loop over the parts, one thread each (where the library has OpenMP), adding ``sum`` up over them. */
#define PRAGMA(text) _Pragma(#text)
#define EACH_PART_ON_ITS_THREAD(parts, sum)                                                            \
    PRAGMA(omp parallel for num_threads(parts) schedule(static, 1) if(parts > 1) reduction(+:sum))

#if defined(__x86_64__) && defined(__GNUC__)
/* |g - center| of 16 entries, stored to d: one IEEE subtraction and a cleared sign bit each, the bits the
   scalar loops' ABS(g - center) gives (under the same MXCSR). */
__attribute__((target("avx512f"))) static inline __m512 deviations16_f32(const float *g, __m512 center,
                                                                        float *d) {
    __m512 dev = _mm512_abs_ps(_mm512_sub_ps(_mm512_loadu_ps(g), center));
    _mm512_storeu_ps(d, dev);
    return dev;
}
/* deviations_f32's loop over one part, on its whole blocks of 16 from *j (advanced to where they end): the
   ordered comparisons are false for NaN, as the scalar ones are. The band is compressed in registers and
   stored whole from *band_end (the next band slot, never past *j): it never reaches past the block just
   read, so it stays within the part's own room. Returns how many are at or above low. Entry by entry this
   took about a nanosecond a candidate, a fifth of that here (docs/performance.md). */
__attribute__((target("avx512f"))) static int64_t deviations_blocks_f32_avx512(
    const float *val, int64_t *j, int64_t end, float center, float low, float high, float *d, float *band,
    int64_t *band_end) {
    int64_t at_least_low = 0, i = *j, b = *band_end;
    const __m512 c = _mm512_set1_ps(center), lo = _mm512_set1_ps(low), hi = _mm512_set1_ps(high);
    for (; i + 16 <= end; i += 16) {
        __m512 dev = deviations16_f32(val + i, c, d + i);
        at_least_low += __builtin_popcount(_mm512_cmp_ps_mask(dev, lo, _CMP_GE_OQ));
        __mmask16 in = _mm512_cmp_ps_mask(dev, hi, _CMP_LT_OQ);
        _mm512_storeu_ps(band + b, _mm512_maskz_compress_ps(in, dev));
        b += __builtin_popcount(in);
    }
    *j = i;
    *band_end = b;
    return at_least_low;
}
#define DEVIATIONS_BLOCKS_AVX512_f32                                                                   \
    if (use_avx512)                                                                                    \
        at_least_low += deviations_blocks_f32_avx512(val, &j, end, center, low, high, d, band, &b);
#else
#define DEVIATIONS_BLOCKS_AVX512_f32
#endif
#define DEVIATIONS_BLOCKS_AVX512_f64

#define DEVIATIONS(T, SUFFIX, ABS)                                                                          \
    /* d[j] = |val[j] - center|, as NumPy's subtract and abs compute it in T; returns how many d[j] >=  \
       low, and writes the d[j] < high, in order, to band (their count to *in_band). Each part writes   \
       its band entries from its own start, and the parts are then moved to follow one another. */      \
    static int64_t deviations_##SUFFIX(const T *val, int64_t m, T center, T low, T high, T *d, T *band,\
                                int64_t *in_band, int parts) {                                         \
        int64_t at_least_low = 0, in_part[parts];                                                      \
        CHOOSE_AVX512                                                                                  \
        EACH_PART_ON_ITS_THREAD(parts, at_least_low)                                                   \
        for (int t = 0; t < parts; t++) {                                                              \
            int64_t start = PART_START(m, t, parts), end = PART_START(m, t + 1, parts), b = start;      \
            int64_t j = start;                                                                         \
            DEVIATIONS_BLOCKS_AVX512_##SUFFIX                                                          \
            for (; j < end; j++) {                                                                     \
                T dev = ABS(val[j] - center); /* the sign bit cleared, as NumPy's abs does */          \
                d[j] = dev;                                                                            \
                at_least_low += dev >= low;                                                            \
                band[b] = dev;                                                                         \
                b += dev < high;                                                                       \
            }                                                                                          \
            in_part[t] = b - start;                                                                    \
        }                                                                                              \
        int64_t b = 0;                                                                                 \
        for (int t = 0; t < parts; t++) {                                                              \
            int64_t start = PART_START(m, t, parts);                                                   \
            if (start != b) memmove(band + b, band + start, (size_t)in_part[t] * sizeof(T));           \
            b += in_part[t];                                                                           \
        }                                                                                              \
        *in_band = b;                                                                                  \
        return at_least_low;                                                                           \
    }                                                                                                  \
    /* How many d[j] > bound: in all (returned), and in each part (counts[t]). */                      \
    int64_t count_above_##SUFFIX(const T *d, int64_t m, T bound, int64_t *counts, int parts) {         \
        int64_t total = 0;                                                                             \
        EACH_PART_ON_ITS_THREAD(parts, total)                                                          \
        for (int t = 0; t < parts; t++) {                                                              \
            int64_t c = 0;                                                                             \
            for (int64_t j = PART_START(m, t, parts); j < PART_START(m, t + 1, parts); j++)            \
                c += d[j] > bound;                                                                     \
            counts[t] = c;                                                                             \
            total += c;                                                                                \
        }                                                                                              \
        return total;                                                                                  \
    }

DEVIATIONS(float, f32, fabsf)
DEVIATIONS(double, f64, fabs)

/* The order statistics rank and rank + 1 of band[0..m) (non-negative, m > rank + 1), narrowed to a few of
   NARROW_BUCKETS buckets: one pass counts the entries of each bucket, a second moves those of the buckets
   from rank's to rank + 1's, in order, to the front of band. An entry's bucket is its bit pattern read as an
   unsigned integer (the order of non-negative floats) less low's, shifted so that [low, high] spans the
   buckets, and clamped to them: it never decreases as the entry grows, so every entry of an earlier bucket
   is below every entry moved and every entry of a later one above. The two order statistics are then those
   of the moved entries at rank - *below and rank + 1 - *below. Returns how many moved.
   Repeated on the same data this is no faster than NumPy's sample-narrowed partition, but it is one call
   where that is about fifteen, and in the step, where each tensor's selection starts cold, the calls are
   the cost (docs/performance.md). */
#define NARROW_BUCKETS 2048
/* At most this many entries left, the order statistics are sorted out of them (refine). */
#define PAIR_SORT 32
/* move_range_f32 16 entries at a time, where the CPU has AVX-512: the keys compared as unsigned integers,
   as the scalar loop compares them, the entries in range compressed in registers and stored whole (to may be
   from: the store at c <= j never reaches past the block just read). */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) static int64_t move_range_f32_avx512(const float *from, int64_t m,
                                                                        uint32_t klo, uint32_t khi,
                                                                        float *to, int64_t *done) {
    int64_t j = 0, c = 0;
    const __m512i lo = _mm512_set1_epi32((int32_t)klo), hi = _mm512_set1_epi32((int32_t)khi);
    for (; j + 16 <= m; j += 16) {
        __m512i keys = _mm512_loadu_si512((const void *)(from + j));
        __mmask16 in =
            _mm512_cmp_epu32_mask(keys, lo, _MM_CMPINT_NLT) & _mm512_cmp_epu32_mask(keys, hi, _MM_CMPINT_LT);
        _mm512_storeu_si512((void *)(to + c), _mm512_maskz_compress_epi32(in, keys));
        c += __builtin_popcount(in);
    }
    *done = j;
    return c;
}
/* The buckets (bucket_f32) of 16 keys: max(key, base) - base is key - base above base and 0 at or under it,
   shifted and clamped to the last bucket as the scalar function does. Their counts are then added one by one
   (a scatter cannot add up repeated buckets). */
__attribute__((target("avx512f"))) static inline void add_buckets16_f32(__m512i keys, __m512i base,
                                                                       __m128i shift, int64_t *counts) {
    __m512i step = _mm512_srl_epi32(_mm512_sub_epi32(_mm512_max_epu32(keys, base), base), shift);
    uint32_t buckets[16];
    _mm512_storeu_si512((void *)buckets, _mm512_min_epu32(step, _mm512_set1_epi32(NARROW_BUCKETS - 1)));
    for (int k = 0; k < 16; k++) counts[buckets[k]]++;
}
/* count_buckets_f32's whole blocks of 16; returns where they end. */
__attribute__((target("avx512f"))) static int64_t count_buckets_f32_avx512(const float *values, int64_t m,
                                                                           uint32_t base, int shift,
                                                                           int64_t *counts) {
    int64_t j = 0;
    const __m512i b = _mm512_set1_epi32((int32_t)base);
    const __m128i s = _mm_cvtsi32_si128(shift);
    for (; j + 16 <= m; j += 16)
        add_buckets16_f32(_mm512_loadu_si512((const void *)(values + j)), b, s, counts);
    return j;
}
/* narrow_deviations_f32's first pass over whole blocks of 16 (the deviations by deviations16_f32); returns
   how many are at most ``largest`` (NaN is not), with *done where the blocks end. */
__attribute__((target("avx512f"))) static int64_t deviations_buckets_f32_avx512(
    const float *g, int64_t n, float center, float largest, uint32_t base, int shift, float *d,
    int64_t *counts, int64_t *done) {
    int64_t j = 0, finite = 0;
    const __m512 c = _mm512_set1_ps(center), top = _mm512_set1_ps(largest);
    const __m512i b = _mm512_set1_epi32((int32_t)base);
    const __m128i s = _mm_cvtsi32_si128(shift);
    for (; j + 16 <= n; j += 16) {
        __m512 dev = deviations16_f32(g + j, c, d + j);
        finite += __builtin_popcount(_mm512_cmp_ps_mask(dev, top, _CMP_LE_OQ));
        add_buckets16_f32(_mm512_castps_si512(dev), b, s, counts);
    }
    *done = j;
    return finite;
}
#define COUNT_BUCKETS_AVX512_f32                                                                       \
    CHOOSE_AVX512                                                                                      \
    if (use_avx512) j = count_buckets_f32_avx512(values, m, base, shift, counts);
#define DEVIATIONS_BUCKETS_AVX512_f32                                                                  \
    CHOOSE_AVX512                                                                                      \
    if (use_avx512) finite = deviations_buckets_f32_avx512(g, n, center, largest, base, shift, d, counts, &j);
#define MOVE_RANGE_AVX512_f32                                                                          \
    CHOOSE_AVX512                                                                                      \
    if (use_avx512) c = move_range_f32_avx512(from, m, klo, khi, to, &j);
#else
#define MOVE_RANGE_AVX512_f32
#define COUNT_BUCKETS_AVX512_f32
#define DEVIATIONS_BUCKETS_AVX512_f32
#endif
#define MOVE_RANGE_AVX512_f64
#define COUNT_BUCKETS_AVX512_f64
#define DEVIATIONS_BUCKETS_AVX512_f64

#define NARROW(T, U, SUFFIX, ABS)                                                                      \
    static inline U key_##SUFFIX(T value) {                                                          \
        U key;                                                                                       \
        memcpy(&key, &value, sizeof key);                                                            \
        return key;                                                                                  \
    }                                                                                                \
    /* The buckets of [low, high]: keys from *base, shifted right by *shift. */                        \
    static inline void buckets_##SUFFIX(T low, T high, U *base, int *shift) {                        \
        U span = key_##SUFFIX(high) > key_##SUFFIX(low) ? key_##SUFFIX(high) - key_##SUFFIX(low) : 0; \
        *base = key_##SUFFIX(low);                                                                   \
        *shift = 0;                                                                                  \
        while ((span >> *shift) >= NARROW_BUCKETS - 1) (*shift)++;                                   \
    }                                                                                                \
    static inline int64_t bucket_##SUFFIX(T value, U base, int shift) {                              \
        U key = key_##SUFFIX(value);                                                                 \
        U step = key > base ? (key - base) >> shift : 0;                                             \
        return step < NARROW_BUCKETS - 1 ? (int64_t)step : NARROW_BUCKETS - 1;                      \
    }                                                                                                \
    /* counts[b] += how many of values[0..m) lie in bucket b. */                                     \
    static inline void count_buckets_##SUFFIX(const T *values, int64_t m, U base, int shift,         \
                                              int64_t *counts) {                                     \
        int64_t j = 0;                                                                               \
        COUNT_BUCKETS_AVX512_##SUFFIX                                                                \
        for (; j < m; j++) counts[bucket_##SUFFIX(values[j], base, shift)]++;                       \
    }                                                                                                \
    /* The least and greatest keys of values[0..m) (m >= 1), and a key's value. */                  \
    static inline void key_range_##SUFFIX(const T *values, int64_t m, U *least, U *most) {          \
        *least = *most = key_##SUFFIX(values[0]);                                                   \
        for (int64_t j = 1; j < m; j++) {                                                           \
            U key = key_##SUFFIX(values[j]);                                                        \
            *least = key < *least ? key : *least;                                                   \
            *most = key > *most ? key : *most;                                                      \
        }                                                                                           \
    }                                                                                               \
    static inline T value_##SUFFIX(U key) {                                                         \
        T value;                                                                                    \
        memcpy(&value, &key, sizeof value);                                                         \
        return value;                                                                               \
    }                                                                                               \
    /* From the buckets' counts, the keys [*klo, *khi) of the buckets that hold order statistics rank   \
       and rank + 1; returns how many entries lie in the buckets before them. */                      \
    static inline int64_t bucket_range_##SUFFIX(const int64_t *counts, U base, int shift, int64_t rank, \
                                                U *klo, U *khi) {                                    \
        int64_t first = 0, seen = 0;                                                                 \
        while (seen + counts[first] <= rank) seen += counts[first++];                                \
        int64_t last = first, through = seen + counts[first];                                       \
        while (through <= rank + 1) through += counts[++last];                                       \
        /* Buckets first..last are the keys from klo up to khi (excluded): bucket 0 and the last one  \
           are open below and above. base + span (< 2^(bits - 1)) plus at most twice span stays in U. */ \
        *klo = first > 0 ? base + ((U)first << shift) : 0;                                           \
        *khi = last < NARROW_BUCKETS - 1 ? base + ((U)(last + 1) << shift) : (U)~(U)0;               \
        return seen;                                                                                 \
    }                                                                                                \
    /* The entries of from[0..m) with keys in [klo, khi), in order, into to[0..); returns how many. to  \
       may be from itself. */                                                                        \
    static inline int64_t move_range_##SUFFIX(const T *from, int64_t m, U klo, U khi, T *to) {       \
        int64_t c = 0, j = 0;                                                                        \
        MOVE_RANGE_AVX512_##SUFFIX                                                                   \
        for (; j < m; j++) {                                                                         \
            T value = from[j];                                                                       \
            U key = key_##SUFFIX(value);                                                             \
            to[c] = value;                                                                           \
            c += (key >= klo) & (key < khi);                                                         \
        }                                                                                            \
        return c;                                                                                    \
    }                                                                                                \
    static int64_t narrow_##SUFFIX(T *band, int64_t m, T low, T high, int64_t rank, int64_t *below) {\
        U base, klo, khi;                                                                            \
        int shift;                                                                                   \
        buckets_##SUFFIX(low, high, &base, &shift);                                                  \
        int64_t counts[NARROW_BUCKETS] = {0};                                                        \
        count_buckets_##SUFFIX(band, m, base, shift, counts);                                        \
        *below = bucket_range_##SUFFIX(counts, base, shift, rank, &klo, &khi);                       \
        return move_range_##SUFFIX(band, m, klo, khi, band);                                         \
    }                                                                                                \
    /* Order statistics rank and rank + 1 of band[0..m) (narrowed, non-negative, finite), into pair:\
       narrowed again between the entries' least and greatest until at most PAIR_SORT are left, which\
       are then sorted. Returns how many are left, with *below counting those set aside under them; \
       more than PAIR_SORT (ties the buckets cannot split) leaves pair unset, for the caller to select.  */\
    static int64_t refine_##SUFFIX(T *band, int64_t m, int64_t rank, int64_t *below, T *pair) {     \
        *below = 0;                                                                                 \
        while (m > PAIR_SORT) {                                                                     \
            U least, most;                                                                          \
            key_range_##SUFFIX(band, m, &least, &most);                                             \
            if (least == most) return m; /* all tied: no bucket can split them */                   \
            int64_t under, moved = narrow_##SUFFIX(band, m, value_##SUFFIX(least), value_##SUFFIX(most),\
                                                   rank - *below, &under);                          \
            if (moved == m) return m; /* no bucket split them */                                    \
            m = moved;                                                                              \
            *below += under;                                                                        \
        }                                                                                           \
        for (int64_t j = 1; j < m; j++) { /* insertion sort, by key: the order of non-negative floats */\
            T value = band[j];                                                                      \
            U key = key_##SUFFIX(value);                                                            \
            int64_t i = j;                                                                          \
            for (; i > 0 && key_##SUFFIX(band[i - 1]) > key; i--) band[i] = band[i - 1];            \
            band[i] = value;                                                                        \
        }                                                                                           \
        pair[0] = band[rank - *below];                                                              \
        pair[1] = band[rank + 1 - *below];                                                          \
        return m;                                                                                   \
    }                                                                                               \
    /* narrow_##SUFFIX, then refine_##SUFFIX: the two order statistics themselves into pair where at\
       most PAIR_SORT entries are left (the return value); *below counts all the entries set aside  \
       under those left. */                                                                         \
    int64_t narrow_pair_##SUFFIX(T *band, int64_t m, T low, T high, int64_t rank, int64_t *below,   \
                                 T *pair) {                                                         \
        int64_t first, more;                                                                        \
        int64_t moved = narrow_##SUFFIX(band, m, low, high, rank, &first);                          \
        int64_t left = refine_##SUFFIX(band, moved, rank - first, &more, pair);                     \
        *below = first + more;                                                                      \
        return left;                                                                                \
    }                                                                                               \
    /* Order statistics first and last (first <= last < m) of values[0..m) (non-negative), into     \
       out[0] and out[1], with work (m entries) for the narrowing: the least and greatest keys in one\
       pass, the buckets between them counted in a second, then for each rank the entries of the buckets\
       that hold it (and its neighbour) moved into work and refined. values is left as it was. Returns\
       0; -1 if an entry is infinite or NaN, or ties the buckets cannot split leave more than PAIR_SORT\
       entries (the caller then selects). */                                                        \
    static int64_t order_statistics_##SUFFIX(const T *values, int64_t m, int64_t first, int64_t last,\
                                             T largest, T *work, T *out) {                          \
        U least, most, base, klo, khi;                                                              \
        key_range_##SUFFIX(values, m, &least, &most);                                               \
        if (most > key_##SUFFIX(largest)) return -1;                                                \
        if (least == most) {                                                                        \
            out[0] = out[1] = values[0];                                                            \
            return 0;                                                                               \
        }                                                                                           \
        int shift;                                                                                  \
        buckets_##SUFFIX(value_##SUFFIX(least), value_##SUFFIX(most), &base, &shift);               \
        int64_t counts[NARROW_BUCKETS] = {0};                                                       \
        count_buckets_##SUFFIX(values, m, base, shift, counts);                                     \
        int64_t ranks[2] = {first, last};                                                           \
        for (int r = 0; r < 2; r++) {                                                               \
            /* the pair (rank, rank + 1) that holds ranks[r]: its lower member, or the upper one at the end */\
            int64_t rank = ranks[r] < m - 1 ? ranks[r] : ranks[r] - 1, more;                        \
            T pair[2];                                                                              \
            int64_t first_below = bucket_range_##SUFFIX(counts, base, shift, rank, &klo, &khi);     \
            int64_t moved = move_range_##SUFFIX(values, m, klo, khi, work);                         \
            if (refine_##SUFFIX(work, moved, rank - first_below, &more, pair) > PAIR_SORT) return -1;\
            out[r] = pair[ranks[r] == rank ? 0 : 1];                                                \
        }                                                                                           \
        return 0;                                                                                   \
    }                                                                                               \
    /* A large tensor's sample and its bracket in one call: sample[k] = |g[start + k stride] - center|\
       (as deviations_##SUFFIX computes it) for k < m, then its order statistics first and last into out,\
       as order_statistics_##SUFFIX finds them (with work), and with its return value. */           \
    int64_t sample_bracket_##SUFFIX(const T *g, int64_t start, int64_t stride, int64_t m, T center, \
                                    int64_t first, int64_t last, T largest, T *sample, T *work, T *out) {\
        for (int64_t k = 0; k < m; k++) sample[k] = ABS(g[start + k * stride] - center);            \
        return order_statistics_##SUFFIX(sample, m, first, last, largest, work, out);               \
    }                                                                                               \
    /* A small tensor's whole selection up to its order statistics, in one thread and two passes:       \
       d[j] = |g[j] - center| (as deviations_##SUFFIX computes it) and the buckets of [0, the largest    \
       finite value] counted in one, then the d of the buckets that hold order statistics rank and       \
       rank + 1 moved, in order, into band: narrow_##SUFFIX's result for a band that is all of d, without \
       writing that band first and reading it back; then refine_##SUFFIX. Returns how many are left,   \
       *below and pair as narrow_pair_##SUFFIX does; -1 if a deviation is infinite or NaN, which the     \
       buckets would misplace. */                                                                        \
    int64_t narrow_deviations_##SUFFIX(const T *g, int64_t n, T center, T largest, int64_t rank, T *d,   \
                                       T *band, int64_t *below, T *pair) {                                    \
        U base, klo, khi;                                                                            \
        int shift;                                                                                   \
        buckets_##SUFFIX(0, largest, &base, &shift);                                                 \
        int64_t counts[NARROW_BUCKETS] = {0}, finite = 0, j = 0;                                     \
        DEVIATIONS_BUCKETS_AVX512_##SUFFIX                                                           \
        for (; j < n; j++) {                                                                         \
            T dev = ABS(g[j] - center);                                                              \
            d[j] = dev;                                                                              \
            finite += dev <= largest;                                                                \
            counts[bucket_##SUFFIX(dev, base, shift)]++;                                             \
        }                                                                                            \
        if (finite < n) return -1;                                                                  \
        int64_t first = bucket_range_##SUFFIX(counts, base, shift, rank, &klo, &khi), more;         \
        int64_t moved = move_range_##SUFFIX(d, n, klo, khi, band);                                  \
        int64_t left = refine_##SUFFIX(band, moved, rank - first, &more, pair);                     \
        *below = first + more;                                                                      \
        return left;                                                                                \
    }

NARROW(float, uint32_t, f32, fabsf)
NARROW(double, uint64_t, f64, fabs)

#define DEVIATIONS_PAIR(T, SUFFIX)                                                                  \
    /* deviations_##SUFFIX, then, where the band holds order statistics rank and rank + 1 (rank >= 0 and\
       more than rank + 1 entries), narrow_pair_##SUFFIX over it between low and high: in one call what a\
       large tensor's selection does between collecting its candidates and keeping them. Returns how many\
       d[j] >= low, *in_band as deviations_##SUFFIX; *left, *below and pair as narrow_pair_##SUFFIX, or\
       *left -1 where the band was not narrowed. */                                                 \
    int64_t deviations_pair_##SUFFIX(const T *val, int64_t m, T center, T low, T high, int64_t rank, T *d,\
                                     T *band, int64_t *in_band, int64_t *left, int64_t *below, T *pair,\
                                     int parts) {                                                   \
        int64_t at_least_low = deviations_##SUFFIX(val, m, center, low, high, d, band, in_band, parts);\
        *left = -1;                                                                                 \
        if (rank >= 0 && *in_band > rank + 1)                                                       \
            *left = narrow_pair_##SUFFIX(band, *in_band, low, high, rank, below, pair);             \
        return at_least_low;                                                                        \
    }

DEVIATIONS_PAIR(float, f32)
DEVIATIONS_PAIR(double, f64)

#define KEEP_ABOVE_SCALAR(T, SUFFIX, O, WIDTH)                                                         \
    static int64_t keep_above_scalar##WIDTH##_##SUFFIX(const int32_t *idx, const T *val, const T *d,    \
                                                       int64_t m, T bound, O *idx_out, T *val_out,      \
                                                       int64_t capacity) {                              \
        int64_t c = 0;                                                                                 \
        for (int64_t j = 0; j < m; j++) {                                                              \
            if (d[j] > bound) {                                                                        \
                if (c < capacity) {                                                                    \
                    idx_out[c] = idx[j];                                                               \
                    val_out[c] = val[j];                                                               \
                }                                                                                      \
                c++;                                                                                   \
            }                                                                                          \
        }                                                                                              \
        return c;                                                                                      \
    }

/* keep_above_..._f32 write int64 indices (torch's); keep_above32_..._f32 the 32-bit ones as collected. */
KEEP_ABOVE_SCALAR(float, f32, int64_t, )
KEEP_ABOVE_SCALAR(double, f64, int64_t, )
KEEP_ABOVE_SCALAR(float, f32, int32_t, 32)
KEEP_ABOVE_SCALAR(double, f64, int32_t, 32)

/* The candidates whose d[j] > bound: their idx and val, in order, into idx_out and val_out, which have
   room for capacity entries (the vector loop stores whole blocks of 16 while they fit, then the rest goes
   entry by entry). Returns how many there are: more than capacity means those past it were not written. */
#if defined(__x86_64__) && defined(__GNUC__)
/* The kept 32-bit indices of a block of 16, packed to the front, stored as they are or widened to 64 bits. */
__attribute__((target("avx512f"))) static inline void store_indices(int32_t *out, __m512i packed) {
    _mm512_storeu_si512((void *)out, packed);
}
__attribute__((target("avx512f"))) static inline void store_indices64(int64_t *out, __m512i packed) {
    _mm512_storeu_si512((void *)out, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(packed)));
    _mm512_storeu_si512((void *)(out + 8), _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(packed, 1)));
}
#define KEEP_ABOVE_F32_AVX512(O, WIDTH, STORE)                                                          \
    __attribute__((target("avx512f"))) static int64_t keep_above##WIDTH##_f32_avx512(                   \
        const int32_t *idx, const float *val, const float *d, int64_t m, float bound, O *idx_out,       \
        float *val_out, int64_t capacity) {                                                             \
        int64_t j = 0, c = 0;                                                                           \
        const __m512 b = _mm512_set1_ps(bound);                                                         \
        for (; j + 16 <= m && c + 16 <= capacity; j += 16) {                                            \
            __mmask16 keep = _mm512_cmp_ps_mask(_mm512_loadu_ps(d + j), b, _CMP_GT_OQ);                 \
            _mm512_storeu_ps(val_out + c, _mm512_maskz_compress_ps(keep, _mm512_loadu_ps(val + j)));    \
            STORE(idx_out + c, _mm512_maskz_compress_epi32(keep, _mm512_loadu_si512(idx + j)));         \
            c += __builtin_popcount(keep);                                                              \
        }                                                                                               \
        /* the tail, and the last blocks, whose full-block stores could overrun */                      \
        return c + keep_above_scalar##WIDTH##_f32(idx + j, val + j, d + j, m - j, bound, idx_out + c,   \
                                                  val_out + c, capacity - c);                           \
    }
KEEP_ABOVE_F32_AVX512(int64_t, , store_indices64)
KEEP_ABOVE_F32_AVX512(int32_t, 32, store_indices)
#define KEEP_ABOVE_AVX512(WIDTH)                                                                       \
    CHOOSE_AVX512                                                                                      \
    if (use_avx512) return keep_above##WIDTH##_f32_avx512(idx, val, d, m, bound, idx_out, val_out, capacity);
#else
#define KEEP_ABOVE_AVX512(WIDTH)
#endif

#define KEEP_ABOVE(T, SUFFIX, O, WIDTH, VECTOR)                                                        \
    static int64_t keep_above##WIDTH##_##SUFFIX(const int32_t *idx, const T *val, const T *d,          \
                                                int64_t m, T bound, O *idx_out, T *val_out,            \
                                                int64_t capacity) {                                    \
        VECTOR                                                                                         \
        return keep_above_scalar##WIDTH##_##SUFFIX(idx, val, d, m, bound, idx_out, val_out, capacity); \
    }

KEEP_ABOVE(float, f32, int64_t, , KEEP_ABOVE_AVX512())
KEEP_ABOVE(float, f32, int32_t, 32, KEEP_ABOVE_AVX512(32))
KEEP_ABOVE(double, f64, int64_t, , )
KEEP_ABOVE(double, f64, int32_t, 32, )

#define KEEP_ABOVE_PARTS(T, SUFFIX, O, WIDTH)                                                          \
    /* keep_above over ``parts`` parts, one thread each: part t writes from the sum of counts[0:t], with  \
       room for counts[t] entries (count_above's counts for the same d and bound), so the outputs follow \
       one another in order. Returns how many entries are above the bound: more than the counts' sum    \
       means counts were not d's (and no part wrote past its room). */                                   \
    int64_t keep_above_parts##WIDTH##_##SUFFIX(const int32_t *idx, const T *val, const T *d, int64_t m,  \
                                               T bound, O *idx_out, T *val_out, const int64_t *counts,  \
                                               int parts) {                                             \
        CHOOSE_AVX512                                                                                  \
        int64_t kept = 0;                                                                              \
        EACH_PART_ON_ITS_THREAD(parts, kept)                                                           \
        for (int t = 0; t < parts; t++) {                                                              \
            int64_t start = PART_START(m, t, parts), offset = 0;                                       \
            for (int u = 0; u < t; u++) offset += counts[u];                                           \
            kept += keep_above##WIDTH##_##SUFFIX(idx + start, val + start, d + start,                  \
                                                 PART_START(m, t + 1, parts) - start, bound,           \
                                                 idx_out + offset, val_out + offset, counts[t]);        \
        }                                                                                              \
        return kept;                                                                                   \
    }

KEEP_ABOVE_PARTS(float, f32, int64_t, )
KEEP_ABOVE_PARTS(double, f64, int64_t, )
KEEP_ABOVE_PARTS(float, f32, int32_t, 32)
KEEP_ABOVE_PARTS(double, f64, int32_t, 32)

/* Whether the loops can use more than one thread (the library was built with OpenMP). */
int zsam_entries_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Whether collect_f32 runs its AVX-512 version; ``allow`` 0 makes it take the portable loop (the tests
   run both), 1 lets it take AVX-512 where the CPU has it. */
int zsam_entries_avx512(int allow) {
    use_avx512 = allow && has_avx512();
    return use_avx512;
}
