/*
 * Segmented LoRA for CPU: one call adds the LoRA deltas of every adapter in a
 * forward pass to one fused projection, reading each slot's weights once, at the
 * slot's own rank.
 *
 * Built by kernel.py with the system C compiler (-O3 -march=native -fopenmp)
 * and called through ctypes. Weights live in lora.py's arena (fp32), each adapter
 * in one block; a slot's descriptor (desc[slot * SGMV_DESC ...], lora.py writes it)
 * says where its pieces of this layer's group are, as element offsets from `base`:
 *
 *   desc[0]            a: A^T of the modules present, [in_dim, desc[1]] (-1: none here)
 *   desc[1]            its width: rank x modules present
 *   desc[2]            the slot's rank r
 *   desc[3 + m]        b[m]: scale * B^T of module m in panels of 16 columns,
 *                      [ceil(out[m] / 16), r, 16], zero past out[m] (-1: absent)
 *   desc[7 + m]        module m's first column among the shrunk activations
 *   desc[11 + m]       DoRA: module m's output scale [out[m]] (-1: plain LoRA)
 *
 * The activations are fp32 (lorapool_sgmv_f32) or bf16 (lorapool_sgmv_bf16):
 *
 *   x     [tokens, ldx]                  the projection's input, in_dim columns used
 *   y     [tokens, ldy]                  the fused output; module m at column y_off[m]
 *   t     [tokens, t_ld]                 scratch for the shrunk activations
 *
 * A DoRA module's rows become y = s * (y + delta): y holds the base projection
 * (no bias: lora.py serves DoRA only on bias-free linears), s the precomputed
 * magnitude / ||W + scale B A|| (PEFT's DoRA, per output row).
 *
 * Tokens are given grouped by slot: segment s covers tok[seg_ptr[s]..seg_ptr[s+1])
 * and uses slot seg_slot[s]. Segments run in parallel (OpenMP: PyTorch's libgomp, which
 * the loader reuses for this library's libgomp.so.1 when torch is loaded first), handed
 * out one at a time by default (lorapool_sgmv_set_schedule), each shrinking its rows through A and expanding them through
 * the B panels in register tiles of up to 4 rows x 64 columns; the panels make
 * the expand read B in one sequential stream. Decode steps have small segments,
 * so the cost is the bytes of A and B, read once. Summation order is the same
 * as a row-by-row loop: y + t[0] * B[0] + t[1] * B[1] + ...
 */
#include <omp.h>
#include <stdint.h>

#if defined(__AVX512F__)
#include <immintrin.h>

/* Software prefetch this many bytes ahead in each weight stream: with it a 16-adapter
 * decode step's group calls took 8.2-8.4 ms instead of 9.5-9.8 (side by side; 2-8 KB
 * all alike, 512 B a little less). */
#define PF_DIST 4096
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* o[p, c0 : c0 + 16 * NV] (+)= sum over k < K of s[p][k] * w[k, 16 NV columns] for NR rows,
 * in order of k. Vector v of row k of w is at w + k * ks + v * vs; the last is masked.
 * The shrink reads A's rows (ks = gr, vs = 16); the expand (add) reads B's panels
 * (ks = 16, vs = rank * 16), zero-padded to 16 columns so their loads need no mask
 * (measured: masked loads there cost 5% of a 16-adapter step), and adds to o. */
ALWAYS_INLINE void fma_tile(const int NR, const int NV, const float *restrict w, int64_t ks,
                            int64_t vs, int64_t K, const float *const s[4], float *const o[4],
                            int64_t c0, __mmask16 last, int add)
{
    __m512 acc[4][4];
    for (int p = 0; p < NR; p++)
        for (int v = 0; v < NV; v++)
            acc[p][v] = add ? _mm512_maskz_loadu_ps(v == NV - 1 ? last : (__mmask16)0xFFFF,
                                                    o[p] + c0 + 16 * v)
                            : _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 wv[4];
        for (int v = 0; v < NV; v++)
            wv[v] = add ? _mm512_loadu_ps(w + k * ks + v * vs)
                        : _mm512_maskz_loadu_ps(v == NV - 1 ? last : (__mmask16)0xFFFF,
                                                w + k * ks + v * vs);
        for (int v = 0; v < NV; v++)
            _mm_prefetch((const char *)(w + k * ks + v * vs) + PF_DIST, _MM_HINT_T0);
        for (int p = 0; p < NR; p++) {
            __m512 sv = _mm512_set1_ps(s[p][k]);
            for (int v = 0; v < NV; v++) acc[p][v] = _mm512_fmadd_ps(sv, wv[v], acc[p][v]);
        }
    }
    for (int p = 0; p < NR; p++)
        for (int v = 0; v < NV; v++)
            _mm512_mask_storeu_ps(o[p] + c0 + 16 * v, v == NV - 1 ? last : (__mmask16)0xFFFF,
                                  acc[p][v]);
}

#define TILE(R_, V_)                                                                   \
    case (R_) * 8 + (V_):                                                              \
        fma_tile(R_, V_, wb, ks, vs, K, s, o, c0, last, add);                          \
        break;

/* fma_tile over width columns in blocks of 64 (4 vectors), for nr <= 4 rows. */
ALWAYS_INLINE void fma_rows(const float *w, int64_t ks, int64_t vs, int64_t K, int64_t width,
                     const float *const s[4], float *const o[4], int nr, int add)
{
    for (int64_t c0 = 0; c0 < width; c0 += 64) {
        int64_t cols = width - c0 < 64 ? width - c0 : 64;
        int nv = (int)((cols + 15) / 16);
        int rem = (int)(cols - 16 * (nv - 1));
        __mmask16 last = (__mmask16)((1u << rem) - 1u);
        const float *wb = w + (c0 / 16) * vs;
        switch (nr * 8 + nv) {
            TILE(1, 1) TILE(1, 2) TILE(1, 3) TILE(1, 4)
            TILE(2, 1) TILE(2, 2) TILE(2, 3) TILE(2, 4)
            TILE(3, 1) TILE(3, 2) TILE(3, 3) TILE(3, 4)
            TILE(4, 1) TILE(4, 2) TILE(4, 3) TILE(4, 4)
        }
    }
}

/* t[p, :gr] = x[p] @ A for nr rows. */
static void shrink_rows(const float *as, int64_t gr, int64_t in_dim, const float *xr[4],
                        float *tr[4], int nr)
{
    fma_rows(as, gr, 16, in_dim, gr, xr, tr, nr, 0);
}

/* d[p, :od] += t[p] @ B for nr rows, B in panels of 16 columns. */
static void expand_rows(const float *bs, int64_t rank, int64_t od, const float *tr[4],
                        float *const *d, int nr)
{
    fma_rows(bs, 16, rank * 16, rank, od, tr, d, nr, 1);
}

#else /* portable: plain loops the compiler vectorises */

static void shrink_rows(const float *as, int64_t gr, int64_t in_dim, const float *xr[4],
                        float *tr[4], int nr)
{
    for (int p = 0; p < nr; p++)
        for (int64_t j = 0; j < gr; j++) tr[p][j] = 0.f;
    for (int64_t k = 0; k < in_dim; k++) {
        const float *restrict ak = as + k * gr;
        for (int p = 0; p < nr; p++) {
            const float xv = xr[p][k];
            float *restrict tp = tr[p];
            for (int64_t j = 0; j < gr; j++) tp[j] += xv * ak[j];
        }
    }
}

static void expand_rows(const float *bs, int64_t rank, int64_t od, const float *tr[4],
                        float *const *d, int nr)
{
    for (int64_t c0 = 0; c0 < od; c0 += 16) {
        const float *restrict bp = bs + (c0 / 16) * rank * 16;
        const int w = od - c0 < 16 ? (int)(od - c0) : 16;
        for (int p = 0; p < nr; p++) {
            float acc[16];
            for (int i = 0; i < w; i++) acc[i] = d[p][c0 + i];
            for (int64_t j = 0; j < rank; j++) {
                const float tv = tr[p][j];
                for (int i = 0; i < w; i++) acc[i] += tv * bp[j * 16 + i];
            }
            for (int i = 0; i < w; i++) d[p][c0 + i] = acc[i];
        }
    }
}

#endif

#define SGMV_MAX_MODULES 4
#define SGMV_DESC 16

/* One projection group of one layer: what stays the same from call to call (lora.py
 * builds one per layer and group, as a ctypes Structure of the same layout). The
 * descriptors it points to change between calls, when adapters are loaded. */
typedef struct {
    const float *base;
    const int64_t *desc;
    int64_t in_dim, n_mod, t_ld;
    int64_t out[SGMV_MAX_MODULES], y_off[SGMV_MAX_MODULES];
} sgmv_group;

/* One call: its group and its segments, activations and scratch. */
typedef struct {
    const sgmv_group *g;
    const int32_t *seg_ptr, *seg_slot, *tok;
    const void *x;
    int64_t ldx;
    void *y;
    int64_t ldy;
    float *t;
} sgmv_call;

static inline float bf16_to_f32(uint16_t h)
{
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) /* round to nearest even, as PyTorch does */
{
    union { float f; uint32_t u; } v = {.f = f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u); /* NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* d[p, :od] += t[p, col .. col + rank] @ B for the segment's rows p0..p1. */
static void expand(const sgmv_call *c, const float *bs, int64_t rank, int64_t col, int64_t od,
                   int p0, int p1, float *const *d)
{
    for (int q = p0; q < p1; q += 4) {
        const int nr = p1 - q < 4 ? p1 - q : 4;
        const float *tr[4];
        for (int p = 0; p < nr; p++) tr[p] = c->t + (int64_t)(q + p) * c->g->t_ld + col;
        expand_rows(bs, rank, od, tr, d + (q - p0), nr);
    }
}

/* One segment; 16-bit x and y go through fp32 copies of the segment's rows. */
static void run_segment(const sgmv_call *c, int s, int bf16, float *work)
{
    const sgmv_group *g = c->g;
    const int64_t *desc = g->desc + (int64_t)c->seg_slot[s] * SGMV_DESC;
    if (desc[0] < 0) return; /* the slot's adapter has nothing in this group */
    const float *as = g->base + desc[0];
    const int64_t gr = desc[1], rank = desc[2];
    const int p0 = c->seg_ptr[s], p1 = c->seg_ptr[s + 1];
    for (int q = p0; q < p1; q += 4) {
        const int nr = p1 - q < 4 ? p1 - q : 4;
        const float *xr[4];
        float *tr[4];
        for (int p = 0; p < nr; p++) {
            const int64_t row = (int64_t)c->tok[q + p] * c->ldx;
            if (bf16) {
                float *xw = work + (int64_t)p * g->in_dim;
                const uint16_t *xs = (const uint16_t *)c->x + row;
                for (int64_t k = 0; k < g->in_dim; k++) xw[k] = bf16_to_f32(xs[k]);
                xr[p] = xw;
            } else {
                xr[p] = (const float *)c->x + row;
            }
            tr[p] = c->t + (int64_t)(q + p) * g->t_ld;
        }
        shrink_rows(as, gr, g->in_dim, xr, tr, nr);
    }
    for (int m = 0; m < g->n_mod; m++) {
        if (desc[3 + m] < 0) continue;
        const int64_t od = g->out[m];
        const float *bs = g->base + desc[3 + m];
        const float *sc = desc[11 + m] >= 0 ? g->base + desc[11 + m] : 0;
        float *d[p1 - p0 > 0 ? p1 - p0 : 1];
        for (int p = p0; p < p1; p++) {
            const int64_t at = (int64_t)c->tok[p] * c->ldy + g->y_off[m];
            if (bf16) {
                d[p - p0] = work + (int64_t)(p - p0) * od;
                for (int64_t col = 0; col < od; col++) d[p - p0][col] = 0.f;
            } else {
                d[p - p0] = (float *)c->y + at; /* accumulate straight into the output */
            }
        }
        expand(c, bs, rank, desc[7 + m], od, p0, p1, d);
        if (bf16) {
            for (int p = p0; p < p1; p++) {
                uint16_t *yp = (uint16_t *)c->y + (int64_t)c->tok[p] * c->ldy + g->y_off[m];
                const float *dp = d[p - p0];
                if (sc)
                    for (int64_t col = 0; col < od; col++)
                        yp[col] = f32_to_bf16((bf16_to_f32(yp[col]) + dp[col]) * sc[col]);
                else
                    for (int64_t col = 0; col < od; col++)
                        yp[col] = f32_to_bf16(bf16_to_f32(yp[col]) + dp[col]);
            }
        } else if (sc) {
            for (int p = p0; p < p1; p++) {
                float *yp = d[p - p0];
                for (int64_t col = 0; col < od; col++) yp[col] *= sc[col];
            }
        }
    }
}

/* How run() hands segments to its threads. Dynamic (the default): `chunk` segments at a
 * time to whichever thread asks next, so a thread the OS has descheduled (another process
 * took its core) holds up only the segments it took, and the others run the rest. Static:
 * equal contiguous blocks fixed in advance, as before, so every thread waits at the end for
 * the slowest block's thread. One setting for the process (every kernel call reads it). */
static int sched_dynamic = 1;
static int sched_chunk = 1;

/* Set the schedule: dynamic != 0 for dynamic(chunk), 0 for static; chunk < 1 counts as 1. */
void lorapool_sgmv_set_schedule(int dynamic, int chunk)
{
    __atomic_store_n(&sched_chunk, chunk < 1 ? 1 : chunk, __ATOMIC_RELAXED);
    __atomic_store_n(&sched_dynamic, dynamic != 0, __ATOMIC_RELAXED);
}

/* The schedule: 1 dynamic, 0 static; its chunk in *chunk. */
int lorapool_sgmv_get_schedule(int *chunk)
{
    *chunk = __atomic_load_n(&sched_chunk, __ATOMIC_RELAXED);
    return __atomic_load_n(&sched_dynamic, __ATOMIC_RELAXED);
}

static void run(const sgmv_call *c, int n_seg, int bf16, float *work, int64_t work_per_thread,
                int n_threads)
{
    const int dynamic = __atomic_load_n(&sched_dynamic, __ATOMIC_RELAXED);
    const int chunk = __atomic_load_n(&sched_chunk, __ATOMIC_RELAXED);
    /* No more threads than segments: a thread with nothing to do would still be woken and
     * waited for at the region's end. */
    int team = n_threads < n_seg ? n_threads : n_seg;
    if (team < 1) team = 1;
#pragma omp parallel num_threads(team)
    {
        float *mine = work + (int64_t)omp_get_thread_num() * work_per_thread;
        if (dynamic) {
#pragma omp for schedule(dynamic, chunk)
            for (int s = 0; s < n_seg; s++) run_segment(c, s, bf16, mine);
        } else {
#pragma omp for schedule(static)
            for (int s = 0; s < n_seg; s++) run_segment(c, s, bf16, mine);
        }
    }
}

/* y[tok] += (x[tok] @ A[slot]) @ B[slot] for every segment of group g, fp32 activations. */
void lorapool_sgmv_f32(const sgmv_group *g, int n_seg, const int32_t *seg_ptr,
                       const int32_t *seg_slot, const int32_t *tok, const float *x, int64_t ldx,
                       float *y, int64_t ldy, float *t, int n_threads)
{
    const sgmv_call c = {g, seg_ptr, seg_slot, tok, x, ldx, y, ldy, t};
    run(&c, n_seg, 0, 0, 0, n_threads);
}

/* The same with bf16 activations and output (fp32 stacks); work holds n_threads *
 * work_per_thread floats, work_per_thread >= segment rows * max(in_dim, out[m]). */
void lorapool_sgmv_bf16(const sgmv_group *g, int n_seg, const int32_t *seg_ptr,
                        const int32_t *seg_slot, const int32_t *tok, const uint16_t *x,
                        int64_t ldx, uint16_t *y, int64_t ldy, float *t, float *work,
                        int64_t work_per_thread, int n_threads)
{
    const sgmv_call c = {g, seg_ptr, seg_slot, tok, x, ldx, y, ldy, t};
    run(&c, n_seg, 1, work, work_per_thread, n_threads);
}
