/*
 * Segmented LoRA for CPU: one call adds the LoRA deltas of every adapter in a
 * forward pass to one fused projection, reading each slot's weights once.
 *
 * Built by kernel.py with the system C compiler (-O3 -march=native -fopenmp)
 * and called through ctypes. Layouts are those of lora.py's stacks, fp32:
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
 * which stay in L1. Decode steps have small segments, so the cost is the bytes
 * of A and B, read sequentially once.
 */
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

static void run_segment(int s, const int32_t *seg_ptr, const int32_t *seg_slot,
                        const int32_t *tok, const float *x, int64_t ldx, int64_t in_dim,
                        const float *a, int64_t gr, int n_mod, const float *const *b,
                        const int64_t *out, const int64_t *y_off, float *y, int64_t ldy,
                        int64_t rank, float *t)
{
    const float *as = a + (int64_t)seg_slot[s] * in_dim * gr;
    const int p0 = seg_ptr[s], p1 = seg_ptr[s + 1];
    for (int q = p0; q < p1; q += 4) {
        const int nr = p1 - q < 4 ? p1 - q : 4;
        const float *xr[4];
        float *tr[4];
        for (int p = 0; p < nr; p++) {
            xr[p] = x + (int64_t)tok[q + p] * ldx;
            tr[p] = t + (int64_t)(q + p) * gr;
        }
        shrink_rows(as, gr, in_dim, xr, tr, nr);
    }
    for (int m = 0; m < n_mod; m++) {
        const int64_t od = out[m];
        const float *bs = b[m] + (int64_t)seg_slot[s] * rank * od;
        for (int64_t j = 0; j < rank; j++) {
            const float *restrict bj = bs + j * od;
            for (int p = p0; p < p1; p++) {
                const float tv = t[(int64_t)p * gr + m * rank + j];
                if (tv == 0.f) continue; /* rank columns the adapter does not use */
                float *restrict yp = y + (int64_t)tok[p] * ldy + y_off[m];
                for (int64_t c = 0; c < od; c++) yp[c] += tv * bj[c];
            }
        }
    }
}

/* y[tok] += (x[tok] @ A[slot]) @ B[slot] for every segment; see the header comment. */
void lorapool_sgmv_f32(int n_seg, const int32_t *seg_ptr, const int32_t *seg_slot,
                       const int32_t *tok, const float *x, int64_t ldx, int64_t in_dim,
                       const float *a, int64_t gr, int n_mod, const float *const *b,
                       const int64_t *out, const int64_t *y_off, float *y, int64_t ldy,
                       int64_t rank, float *t, int n_threads)
{
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int s = 0; s < n_seg; s++)
        run_segment(s, seg_ptr, seg_slot, tok, x, ldx, in_dim, a, gr, n_mod, b, out, y_off, y,
                    ldy, rank, t);
}
