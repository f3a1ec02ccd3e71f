/*
 * Segmented LoRA for CPU: one call adds the LoRA deltas of every adapter in a
 * forward pass to one fused projection, reading each slot's weights once.
 *
 * Built by kernel.py with the system C compiler (-O3 -march=native -fopenmp)
 * and called through ctypes. Layouts are those of lora.py's stacks, fp32; the
 * activations are fp32 (lorapool_sgmv_f32) or bf16 (lorapool_sgmv_bf16):
 *
 *   x     [tokens, ldx]            the projection's input, in_dim columns used
 *   a     [slots, in_dim, gr]      A^T of this layer, the group's modules side by side
 *   b[m]  [slots, rank, out[m]]    scale * B^T of module m of this layer
 *   y     [tokens, ldy]            the fused output; module m at column y_off[m]
 *   t     [tokens, gr]             scratch for the shrunk activations
 *
 * Tokens are given grouped by slot: segment s covers tok[seg_ptr[s]..seg_ptr[s+1])
 * and uses slot seg_slot[s]. Segments run in parallel (OpenMP, the same runtime
 * as PyTorch's), each shrinking its rows through A (register tiles of up to 4
 * rows x 64 columns) and then streaming B row by row into its output rows,
 * which stay in L1 (fp32 copies of them for bf16, rounded once when added). Decode steps have small segments, so the cost is the bytes
 * of A and B, read sequentially once.
 */
#include <omp.h>
#include <stdint.h>

#if defined(__AVX512F__)
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* t[p, j0 : j0 + 16 * NV] = x[p] @ a[:, j0 : ...] for NR rows; the last vector is masked. */
ALWAYS_INLINE void shrink_tile(const int NR, const int NV, const float *restrict as, int64_t gr,
                               int64_t in_dim, const float *xr[4], float *tr[4], int64_t j0,
                               __mmask16 last)
{
    __m512 acc[4][4];
    for (int p = 0; p < NR; p++)
        for (int v = 0; v < NV; v++) acc[p][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < in_dim; k++) {
        const float *ak = as + k * gr + j0;
        __m512 av[4];
        for (int v = 0; v < NV; v++)
            av[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : (__mmask16)0xFFFF, ak + 16 * v);
        for (int p = 0; p < NR; p++) {
            __m512 xv = _mm512_set1_ps(xr[p][k]);
            for (int v = 0; v < NV; v++) acc[p][v] = _mm512_fmadd_ps(xv, av[v], acc[p][v]);
        }
    }
    for (int p = 0; p < NR; p++)
        for (int v = 0; v < NV; v++)
            _mm512_mask_storeu_ps(tr[p] + j0 + 16 * v, v == NV - 1 ? last : (__mmask16)0xFFFF,
                                  acc[p][v]);
}

#define TILE(R_, V_)                                                                   \
    case (R_) * 8 + (V_):                                                              \
        shrink_tile(R_, V_, as, gr, in_dim, xr, tr, j0, last);                         \
        break;

static void shrink_rows(const float *as, int64_t gr, int64_t in_dim, const float *xr[4],
                        float *tr[4], int nr)
{
    for (int64_t j0 = 0; j0 < gr; j0 += 64) {
        int64_t width = gr - j0 < 64 ? gr - j0 : 64;
        int nv = (int)((width + 15) / 16);
        int rem = (int)(width - 16 * (nv - 1));
        __mmask16 last = (__mmask16)((1u << rem) - 1u);
        switch (nr * 8 + nv) {
            TILE(1, 1) TILE(1, 2) TILE(1, 3) TILE(1, 4)
            TILE(2, 1) TILE(2, 2) TILE(2, 3) TILE(2, 4)
            TILE(3, 1) TILE(3, 2) TILE(3, 3) TILE(3, 4)
            TILE(4, 1) TILE(4, 2) TILE(4, 3) TILE(4, 4)
        }
    }
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

#endif

/* The arguments of one call, shared by its segments. */
typedef struct {
    const int32_t *seg_ptr, *seg_slot, *tok;
    const void *x;
    int64_t ldx, in_dim;
    const float *a;
    int64_t gr;
    int n_mod;
    const float *const *b;
    const int64_t *out, *y_off;
    void *y;
    int64_t ldy, rank;
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

/* d[p, :od] (+)= t[p, m-th rank block] @ B[slot, m] for the segment's rows p0..p1. */
static void expand(const sgmv_call *c, const float *bs, int m, int64_t od, int p0, int p1,
                   float *const *d)
{
    for (int64_t j = 0; j < c->rank; j++) {
        const float *restrict bj = bs + j * od;
        for (int p = p0; p < p1; p++) {
            const float tv = c->t[(int64_t)p * c->gr + m * c->rank + j];
            if (tv == 0.f) continue; /* rank columns the adapter does not use */
            float *restrict dp = d[p - p0];
            for (int64_t col = 0; col < od; col++) dp[col] += tv * bj[col];
        }
    }
}

/* One segment; 16-bit x and y go through fp32 copies of the segment's rows. */
static void run_segment(const sgmv_call *c, int s, int bf16, float *work)
{
    const float *as = c->a + (int64_t)c->seg_slot[s] * c->in_dim * c->gr;
    const int p0 = c->seg_ptr[s], p1 = c->seg_ptr[s + 1];
    for (int q = p0; q < p1; q += 4) {
        const int nr = p1 - q < 4 ? p1 - q : 4;
        const float *xr[4];
        float *tr[4];
        for (int p = 0; p < nr; p++) {
            const int64_t row = (int64_t)c->tok[q + p] * c->ldx;
            if (bf16) {
                float *xw = work + (int64_t)p * c->in_dim;
                const uint16_t *xs = (const uint16_t *)c->x + row;
                for (int64_t k = 0; k < c->in_dim; k++) xw[k] = bf16_to_f32(xs[k]);
                xr[p] = xw;
            } else {
                xr[p] = (const float *)c->x + row;
            }
            tr[p] = c->t + (int64_t)(q + p) * c->gr;
        }
        shrink_rows(as, c->gr, c->in_dim, xr, tr, nr);
    }
    for (int m = 0; m < c->n_mod; m++) {
        const int64_t od = c->out[m];
        const float *bs = c->b[m] + (int64_t)c->seg_slot[s] * c->rank * od;
        float *d[p1 - p0 > 0 ? p1 - p0 : 1];
        for (int p = p0; p < p1; p++) {
            const int64_t at = (int64_t)c->tok[p] * c->ldy + c->y_off[m];
            if (bf16) {
                d[p - p0] = work + (int64_t)(p - p0) * od;
                for (int64_t col = 0; col < od; col++) d[p - p0][col] = 0.f;
            } else {
                d[p - p0] = (float *)c->y + at; /* accumulate straight into the output */
            }
        }
        expand(c, bs, m, od, p0, p1, d);
        if (bf16)
            for (int p = p0; p < p1; p++) {
                uint16_t *yp = (uint16_t *)c->y + (int64_t)c->tok[p] * c->ldy + c->y_off[m];
                const float *dp = d[p - p0];
                for (int64_t col = 0; col < od; col++)
                    yp[col] = f32_to_bf16(bf16_to_f32(yp[col]) + dp[col]);
            }
    }
}

static void run(const sgmv_call *c, int n_seg, int bf16, float *work, int64_t work_per_thread,
                int n_threads)
{
#pragma omp parallel num_threads(n_threads)
    {
        float *mine = work + (int64_t)omp_get_thread_num() * work_per_thread;
#pragma omp for schedule(static)
        for (int s = 0; s < n_seg; s++) run_segment(c, s, bf16, mine);
    }
}

/* y[tok] += (x[tok] @ A[slot]) @ B[slot] for every segment, fp32 activations. */
void lorapool_sgmv_f32(int n_seg, const int32_t *seg_ptr, const int32_t *seg_slot,
                       const int32_t *tok, const float *x, int64_t ldx, int64_t in_dim,
                       const float *a, int64_t gr, int n_mod, const float *const *b,
                       const int64_t *out, const int64_t *y_off, float *y, int64_t ldy,
                       int64_t rank, float *t, int n_threads)
{
    const sgmv_call c = {seg_ptr, seg_slot, tok, x, ldx, in_dim, a, gr, n_mod, b, out, y_off,
                         y, ldy, rank, t};
    run(&c, n_seg, 0, 0, 0, n_threads);
}

/* The same with bf16 activations and output (fp32 stacks); work holds n_threads *
 * work_per_thread floats, work_per_thread >= segment rows * max(in_dim, out[m]). */
void lorapool_sgmv_bf16(int n_seg, const int32_t *seg_ptr, const int32_t *seg_slot,
                        const int32_t *tok, const uint16_t *x, int64_t ldx, int64_t in_dim,
                        const float *a, int64_t gr, int n_mod, const float *const *b,
                        const int64_t *out, const int64_t *y_off, uint16_t *y, int64_t ldy,
                        int64_t rank, float *t, float *work, int64_t work_per_thread,
                        int n_threads)
{
    const sgmv_call c = {seg_ptr, seg_slot, tok, x, ldx, in_dim, a, gr, n_mod, b, out, y_off,
                         y, ldy, rank, t};
    run(&c, n_seg, 1, work, work_per_thread, n_threads);
}
