// acrf's own CUDA kernels: fused attention (forward and backward) and the fused element-wise ops of a
// Z-Image block, each with its analytic backward.
//
// Storage is bf16 (attention) or bf16/f32 (element-wise ops); every computation runs in f32 registers.
// Element-wise kernels round their intermediate results to the storage type wherever the composed candle
// ops they replace round (an op's output is stored in the tensor's dtype), so that in bf16 they give the
// composed path's values to within one rounding, and in f32 its values to f32 precision.
//
// Attention follows FlashAttention-2 (Dao, 2023): the score matrix never leaves the chip; the forward keeps
// one log-sum-exp per query row; the backward recomputes the probabilities from it. Its matmuls run on the
// tensor cores through `mma.sync.m16n8k16` (bf16 in, f32 accumulate), available from sm_80 (A100, RTX 30xx)
// and used on sm_89 (RTX 4090) and sm_90 (H100/H200) alike. Unlike FlashAttention-2, the backward computes
// dQ in a kernel of its own (one block per query tile, looping over the keys) instead of adding partial dQ
// tiles from every key block with atomics: atomics make the summation order, and so the rounding of dQ,
// change from run to run, which would break acrf's bitwise reproducibility. The price is recomputing the
// scores and dP once more in that kernel.
//
// Layouts: q, k, v, o and their gradients are token-major [B, S, H, D], contiguous, as the projections
// produce them; the log-sum-exp and D = rowsum(dO ∘ O) are head-major [B, H, S] f32. Keys at or after
// `key_lens[b]` are batch padding: they get probability 0 and zero gradients. Every query row, padding
// included, is computed (diffusers masks keys only).

#include <cuda_bf16.h>
#include <math_constants.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define INF CUDART_INF_F

// ---------------------------------------------------------------------------------------------------------
// Tensor-core fragments of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"). With g = lane / 4 and
// t = lane % 4, a thread holds:
//   A (16×16, row-major): reg0 = (g, 2t..2t+1), reg1 = (g+8, 2t..), reg2 = (g, 2t+8..), reg3 = (g+8, 2t+8..)
//   B (16×8,  k × n):     reg0 = (k = 2t..2t+1, n = g), reg1 = (k = 2t+8..2t+9, n = g)
//   C (16×8,  f32):       c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
// Two bf16 share a 32-bit register, the lower column in the lower half. Two C tiles side by side (columns
// 16j..16j+15) are therefore exactly the A fragment of the same 16 columns, which is how the probabilities
// feed the next matmul without leaving registers.
// ---------------------------------------------------------------------------------------------------------

__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack_raw(bf16 lo, bf16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// A fragment of the 16×16 block at (r0, c0) of a row-major shared tile with row stride ld.
__device__ __forceinline__ void load_a(uint32_t a[4], const bf16* tile, int r0, int c0, int ld, int g, int t) {
    const bf16* p = tile + (r0 + g) * ld + c0 + 2 * t;
    a[0] = *reinterpret_cast<const uint32_t*>(p);
    a[1] = *reinterpret_cast<const uint32_t*>(p + 8 * ld);
    a[2] = *reinterpret_cast<const uint32_t*>(p + 8);
    a[3] = *reinterpret_cast<const uint32_t*>(p + 8 * ld + 8);
}

// B fragment for B[k][n] = tile[n0 + n][k0 + k]: the tile's rows are B's columns (K in Q·Kᵀ).
__device__ __forceinline__ void load_b_rows(uint32_t b[2], const bf16* tile, int n0, int k0, int ld, int g, int t) {
    const bf16* p = tile + (n0 + g) * ld + k0 + 2 * t;
    b[0] = *reinterpret_cast<const uint32_t*>(p);
    b[1] = *reinterpret_cast<const uint32_t*>(p + 8);
}

// B fragment for B[k][n] = tile[k0 + k][n0 + n]: the tile's rows are B's rows (V in P·V).
__device__ __forceinline__ void load_b_cols(uint32_t b[2], const bf16* tile, int k0, int n0, int ld, int g, int t) {
    const bf16* p = tile + (k0 + 2 * t) * ld + n0 + g;
    b[0] = pack_raw(p[0], p[ld]);
    b[1] = pack_raw(p[8 * ld], p[9 * ld]);
}

// The A fragment of columns 16j..16j+15 from C tiles 2j and 2j+1, rounded to bf16.
__device__ __forceinline__ void c_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = pack_bf16(c0[0], c0[1]);
    a[1] = pack_bf16(c0[2], c0[3]);
    a[2] = pack_bf16(c1[0], c1[1]);
    a[3] = pack_bf16(c1[2], c1[3]);
}

// Rows [r0, r0 + R) of one head of a token-major [S, H, D] tensor into a shared tile [R][ld]; rows at or past
// S become zeros (a zero key row scores finitely and is masked; a zero value row adds nothing).
template <int D, int R, int THREADS>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* head, int r0, int S, long row_stride, int ld) {
    constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
    for (int i = threadIdx.x; i < R * CHUNKS; i += THREADS) {
        const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < S) v = *reinterpret_cast<const uint4*>(head + (long)(r0 + r) * row_stride + c);
        *reinterpret_cast<uint4*>(tile + r * ld + c) = v;
    }
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------------------------------------
// Forward. Grid (ceil(S/64), H, B), 128 threads: each warp owns 16 query rows and walks the key tiles of
// 64, keeping its rows' running max m, sum l and output accumulator in registers (online softmax in base 2).
// ---------------------------------------------------------------------------------------------------------

template <int D>
__device__ void attn_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                         bf16* __restrict__ o, float* __restrict__ lse, const int* __restrict__ key_lens, int S,
                         int H, float scale) {
    constexpr int BR = 64, BC = 64, LD = D + 8, THREADS = 128;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* qs = reinterpret_cast<bf16*>(smem);
    bf16* ks = qs + BR * LD;
    bf16* vs = ks + BC * LD;

    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * BR;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long row_stride = (long)H * D;
    const long head = (long)b * S * row_stride + (long)h * D;
    const int klen = key_lens ? key_lens[b] : S;
    const float sl2 = scale * LOG2E;

    load_tile<D, BR, THREADS>(qs, q + head, q0, S, row_stride, LD);
    __syncthreads();
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a(qf[kk], qs, warp * 16, kk * 16, LD, g, t);

    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    float m0 = -INF, m1 = -INF, l0 = 0.f, l1 = 0.f;

    const int tiles = (klen + BC - 1) / BC;
    for (int j = 0; j < tiles; ++j) {
        const int k0 = j * BC;
        __syncthreads();
        load_tile<D, BC, THREADS>(ks, k + head, k0, S, row_stride, LD);
        load_tile<D, BC, THREADS>(vs, v + head, k0, S, row_stride, LD);
        __syncthreads();

        float s[BC / 8][4];
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int n = 0; n < BC / 8; ++n) {
                uint32_t bf[2];
                load_b_rows(bf, ks, n * 8, kk * 16, LD, g, t);
                mma_bf16(s[n], qf[kk], bf);
            }
        }
        float mx0 = -INF, mx1 = -INF;
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = k0 + n * 8 + 2 * t + (e & 1);
                const float x = col < klen ? s[n][e] * sl2 : -INF;
                s[n][e] = x;
                if (e < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
            }
        }
        // Tile 0 holds key 0, which every row may attend to, so the maxima are finite from the first tile on.
        const float mn0 = fmaxf(m0, quad_max(mx0)), mn1 = fmaxf(m1, quad_max(mx1));
        const float c0 = exp2f(m0 - mn0), c1 = exp2f(m1 - mn1);
        m0 = mn0;
        m1 = mn1;
        l0 *= c0;
        l1 *= c1;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            acc[n][0] *= c0;
            acc[n][1] *= c0;
            acc[n][2] *= c1;
            acc[n][3] *= c1;
        }
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) {
            s[n][0] = exp2f(s[n][0] - m0);
            s[n][1] = exp2f(s[n][1] - m0);
            s[n][2] = exp2f(s[n][2] - m1);
            s[n][3] = exp2f(s[n][3] - m1);
            l0 += s[n][0] + s[n][1];
            l1 += s[n][2] + s[n][3];
        }
#pragma unroll
        for (int kc = 0; kc < BC / 16; ++kc) {
            uint32_t pa[4];
            c_to_a(pa, s[2 * kc], s[2 * kc + 1]);
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                uint32_t bf[2];
                load_b_cols(bf, vs, kc * 16, n * 8, LD, g, t);
                mma_bf16(acc[n], pa, bf);
            }
        }
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        const int c = n * 8 + 2 * t;
        if (r0 < S)
            *reinterpret_cast<uint32_t*>(o + head + (long)r0 * row_stride + c) =
                pack_bf16(acc[n][0] * inv0, acc[n][1] * inv0);
        if (r1 < S)
            *reinterpret_cast<uint32_t*>(o + head + (long)r1 * row_stride + c) =
                pack_bf16(acc[n][2] * inv1, acc[n][3] * inv1);
    }
    if (t == 0) {
        float* row = lse + ((long)b * H + h) * S;
        if (r0 < S) row[r0] = (m0 + log2f(l0)) * LN2;
        if (r1 < S) row[r1] = (m1 + log2f(l1)) * LN2;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Backward, step 1: D = rowsum(dO ∘ O) per query row and head, [B, H, S] f32. One warp per (token, head).
// ---------------------------------------------------------------------------------------------------------

template <int D>
__device__ void attn_bwd_dot(const bf16* __restrict__ o, const bf16* __restrict__ dout, float* __restrict__ dvec,
                             int B, int S, int H) {
    const long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= (long)B * S * H) return;
    const long base = row * D;
    float acc = 0.f;
#pragma unroll
    for (int d = lane; d < D; d += 32) acc += __bfloat162float(o[base + d]) * __bfloat162float(dout[base + d]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) {
        const int h = row % H;
        const long bs = row / H;
        const int s = bs % S, b = bs / S;
        dvec[((long)b * H + h) * S + s] = acc;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Backward, step 2: dK and dV. Grid (ceil(S/64), H, B), 128 threads: the block owns 64 keys, each warp 16 of
// them, and walks the query tiles of 32 with its keys' dK and dV in registers. In the transposed frame
// (rows = keys) Sᵀ = K Qᵀ, Pᵀ and dSᵀ come out of the tensor cores as C fragments, which are the A operands
// of dV += Pᵀ dO and dK += dSᵀ Q.
// ---------------------------------------------------------------------------------------------------------

template <int D>
__device__ void attn_bwd_dkdv(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                              const bf16* __restrict__ dout, const float* __restrict__ lse,
                              const float* __restrict__ dvec, const int* __restrict__ key_lens,
                              bf16* __restrict__ dk, bf16* __restrict__ dv, int S, int H, float scale) {
    constexpr int BC = 64, BQ = 32, LD = D + 8, THREADS = 128;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* ks = reinterpret_cast<bf16*>(smem);
    bf16* vs = ks + BC * LD;
    bf16* qs = vs + BC * LD;
    bf16* dos = qs + BQ * LD;
    float* lse_s = reinterpret_cast<float*>(dos + BQ * LD);
    float* dvec_s = lse_s + BQ;

    const int b = blockIdx.z, h = blockIdx.y, kb = blockIdx.x * BC;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long row_stride = (long)H * D;
    const long head = (long)b * S * row_stride + (long)h * D;
    const float* lse_row = lse + ((long)b * H + h) * S;
    const float* dvec_row = dvec + ((long)b * H + h) * S;
    const int klen = key_lens ? key_lens[b] : S;
    const float sl2 = scale * LOG2E;

    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[n][e] = dva[n][e] = 0.f;

    const int kr0 = kb + warp * 16 + g, kr1 = kr0 + 8;
    if (kb < klen) {
        load_tile<D, BC, THREADS>(ks, k + head, kb, S, row_stride, LD);
        load_tile<D, BC, THREADS>(vs, v + head, kb, S, row_stride, LD);
        const bool valid0 = kr0 < klen, valid1 = kr1 < klen;
        for (int i0 = 0; i0 < S; i0 += BQ) {
            __syncthreads();
            load_tile<D, BQ, THREADS>(qs, q + head, i0, S, row_stride, LD);
            load_tile<D, BQ, THREADS>(dos, dout + head, i0, S, row_stride, LD);
            for (int r = threadIdx.x; r < BQ; r += THREADS) {
                // A query row past S scores P = exp(x − ∞) = 0 and so contributes nothing.
                lse_s[r] = i0 + r < S ? lse_row[i0 + r] * LOG2E : INF;
                dvec_s[r] = i0 + r < S ? dvec_row[i0 + r] : 0.f;
            }
            __syncthreads();

            float st[BQ / 8][4];
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n) st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                uint32_t af[4];
                load_a(af, ks, warp * 16, kk * 16, LD, g, t);
#pragma unroll
                for (int n = 0; n < BQ / 8; ++n) {
                    uint32_t bf[2];
                    load_b_rows(bf, qs, n * 8, kk * 16, LD, g, t);
                    mma_bf16(st[n], af, bf);
                }
            }
            // Pᵀ = exp(s·scale − lse) of each (key row, query column), 0 for padding keys.
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qc = n * 8 + 2 * t + (e & 1);
                    const bool valid = e < 2 ? valid0 : valid1;
                    st[n][e] = valid ? exp2f(st[n][e] * sl2 - lse_s[qc]) : 0.f;
                }
            }
            // dV += Pᵀ dO
#pragma unroll
            for (int kc = 0; kc < BQ / 16; ++kc) {
                uint32_t pa[4];
                c_to_a(pa, st[2 * kc], st[2 * kc + 1]);
#pragma unroll
                for (int n = 0; n < D / 8; ++n) {
                    uint32_t bf[2];
                    load_b_cols(bf, dos, kc * 16, n * 8, LD, g, t);
                    mma_bf16(dva[n], pa, bf);
                }
            }
            // dPᵀ = V dOᵀ
            float dpt[BQ / 8][4];
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n) dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                uint32_t af[4];
                load_a(af, vs, warp * 16, kk * 16, LD, g, t);
#pragma unroll
                for (int n = 0; n < BQ / 8; ++n) {
                    uint32_t bf[2];
                    load_b_rows(bf, dos, n * 8, kk * 16, LD, g, t);
                    mma_bf16(dpt[n], af, bf);
                }
            }
            // dSᵀ = Pᵀ ∘ (dPᵀ − D); the scale is applied to dK once at the end.
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) dpt[n][e] = st[n][e] * (dpt[n][e] - dvec_s[n * 8 + 2 * t + (e & 1)]);
            // dK += dSᵀ Q
#pragma unroll
            for (int kc = 0; kc < BQ / 16; ++kc) {
                uint32_t da[4];
                c_to_a(da, dpt[2 * kc], dpt[2 * kc + 1]);
#pragma unroll
                for (int n = 0; n < D / 8; ++n) {
                    uint32_t bf[2];
                    load_b_cols(bf, qs, kc * 16, n * 8, LD, g, t);
                    mma_bf16(dka[n], da, bf);
                }
            }
        }
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        const int c = n * 8 + 2 * t;
        if (kr0 < S) {
            *reinterpret_cast<uint32_t*>(dk + head + (long)kr0 * row_stride + c) =
                pack_bf16(dka[n][0] * scale, dka[n][1] * scale);
            *reinterpret_cast<uint32_t*>(dv + head + (long)kr0 * row_stride + c) = pack_bf16(dva[n][0], dva[n][1]);
        }
        if (kr1 < S) {
            *reinterpret_cast<uint32_t*>(dk + head + (long)kr1 * row_stride + c) =
                pack_bf16(dka[n][2] * scale, dka[n][3] * scale);
            *reinterpret_cast<uint32_t*>(dv + head + (long)kr1 * row_stride + c) = pack_bf16(dva[n][2], dva[n][3]);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Backward, step 3: dQ. Grid (ceil(S/64), H, B), 128 threads: each warp owns 16 query rows, as in the
// forward, and walks the key tiles of 32: S = Q Kᵀ, P, dP = dO Vᵀ, dS = P ∘ (dP − D), dQ += dS K.
// ---------------------------------------------------------------------------------------------------------

template <int D>
__device__ void attn_bwd_dq(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                            const bf16* __restrict__ dout, const float* __restrict__ lse,
                            const float* __restrict__ dvec, const int* __restrict__ key_lens, bf16* __restrict__ dq,
                            int S, int H, float scale) {
    constexpr int BR = 64, BC = 32, LD = D + 8, THREADS = 128;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* qs = reinterpret_cast<bf16*>(smem);
    bf16* dos = qs + BR * LD;
    bf16* ks = dos + BR * LD;
    bf16* vs = ks + BC * LD;

    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * BR;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long row_stride = (long)H * D;
    const long head = (long)b * S * row_stride + (long)h * D;
    const int klen = key_lens ? key_lens[b] : S;
    const float sl2 = scale * LOG2E;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    const float* lse_row = lse + ((long)b * H + h) * S;
    const float* dvec_row = dvec + ((long)b * H + h) * S;
    const float lse0 = r0 < S ? lse_row[r0] * LOG2E : 0.f, lse1 = r1 < S ? lse_row[r1] * LOG2E : 0.f;
    const float dv0 = r0 < S ? dvec_row[r0] : 0.f, dv1 = r1 < S ? dvec_row[r1] : 0.f;

    load_tile<D, BR, THREADS>(qs, q + head, q0, S, row_stride, LD);
    load_tile<D, BR, THREADS>(dos, dout + head, q0, S, row_stride, LD);
    __syncthreads();
    uint32_t qf[D / 16][4], df[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        load_a(qf[kk], qs, warp * 16, kk * 16, LD, g, t);
        load_a(df[kk], dos, warp * 16, kk * 16, LD, g, t);
    }
    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

    const int tiles = (klen + BC - 1) / BC;
    for (int j = 0; j < tiles; ++j) {
        const int k0 = j * BC;
        __syncthreads();
        load_tile<D, BC, THREADS>(ks, k + head, k0, S, row_stride, LD);
        load_tile<D, BC, THREADS>(vs, v + head, k0, S, row_stride, LD);
        __syncthreads();
        float s[BC / 8][4], dp[BC / 8][4];
#pragma unroll
        for (int n = 0; n < BC / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int n = 0; n < BC / 8; ++n) {
                uint32_t bf[2];
                load_b_rows(bf, ks, n * 8, kk * 16, LD, g, t);
                mma_bf16(s[n], qf[kk], bf);
                load_b_rows(bf, vs, n * 8, kk * 16, LD, g, t);
                mma_bf16(dp[n], df[kk], bf);
            }
        }
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = k0 + n * 8 + 2 * t + (e & 1);
                const float p = col < klen ? exp2f(s[n][e] * sl2 - (e < 2 ? lse0 : lse1)) : 0.f;
                s[n][e] = p * (dp[n][e] - (e < 2 ? dv0 : dv1));
            }
        }
#pragma unroll
        for (int kc = 0; kc < BC / 16; ++kc) {
            uint32_t da[4];
            c_to_a(da, s[2 * kc], s[2 * kc + 1]);
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                uint32_t bf[2];
                load_b_cols(bf, ks, kc * 16, n * 8, LD, g, t);
                mma_bf16(acc[n], da, bf);
            }
        }
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        const int c = n * 8 + 2 * t;
        if (r0 < S)
            *reinterpret_cast<uint32_t*>(dq + head + (long)r0 * row_stride + c) =
                pack_bf16(acc[n][0] * scale, acc[n][1] * scale);
        if (r1 < S)
            *reinterpret_cast<uint32_t*>(dq + head + (long)r1 * row_stride + c) =
                pack_bf16(acc[n][2] * scale, acc[n][3] * scale);
    }
}

// Entry points, one per head dimension. The shared memory each needs (bytes):
//   fwd:  (64 + 64 + 64) · (D + 8) · 2
//   dkdv: (64 + 64 + 32 + 32) · (D + 8) · 2 + 2 · 32 · 4
//   dq:   (64 + 64 + 32 + 32) · (D + 8) · 2
#define ATTENTION_ENTRIES(D)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128) attn_fwd_d##D(                                            \
        const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, const int* key_lens, int S, int H,     \
        float scale) {                                                                                           \
        attn_fwd<D>(q, k, v, o, lse, key_lens, S, H, scale);                                                     \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) attn_bwd_dot_d##D(const bf16* o, const bf16* dout,         \
                                                                        float* dvec, int B, int S, int H) {      \
        attn_bwd_dot<D>(o, dout, dvec, B, S, H);                                                                 \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dkdv_d##D(                                       \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* dvec,      \
        const int* key_lens, bf16* dk, bf16* dv, int S, int H, float scale) {                                    \
        attn_bwd_dkdv<D>(q, k, v, dout, lse, dvec, key_lens, dk, dv, S, H, scale);                               \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dq_d##D(                                         \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* dvec,      \
        const int* key_lens, bf16* dq, int S, int H, float scale) {                                              \
        attn_bwd_dq<D>(q, k, v, dout, lse, dvec, key_lens, dq, S, H, scale);                                     \
    }

ATTENTION_ENTRIES(32)
ATTENTION_ENTRIES(64)
ATTENTION_ENTRIES(128)

// ---------------------------------------------------------------------------------------------------------
// Element-wise ops, templated on the storage type T (bf16 or float).
// ---------------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }
// x rounded to T and back: what a composed op's stored output holds.
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_f(from_f<T>(x)); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    return total;
}

// RMSNorm of each row of x [rows, n], as diffusers computes it: r = (mean(x²) + eps)^(-1/2) in f32, the normed
// row rounded to T, times the weight (rounded), times an optional per-sample scale s [rows / per_sample, n]
// (adaLN's scale or gate, rounded), plus an optional residual res [rows, n] (rounded). One block per row.
template <typename T>
__device__ void rms_norm_fwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ s,
                             const T* __restrict__ res, T* __restrict__ y, int n, int per_sample, float eps) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const T* xr = x + row * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = to_f(xr[i]);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss, scratch) / n + eps);
    const T* sr = s ? s + (row / per_sample) * n : nullptr;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = round_to<T>(round_to<T>(to_f(xr[i]) * r) * to_f(w[i]));
        if (sr) v = round_to<T>(v * to_f(sr[i]));
        if (res) v = to_f(res[row * n + i]) + v;
        y[row * n + i] = from_f<T>(v);
    }
}

// dL/dx of rms_norm_fwd (the residual's gradient is g itself): with gw = (g·s)·w and r as above,
// dx = r·gw − x·r³·mean(gw·x).
template <typename T>
__device__ void rms_norm_bwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ s,
                             const T* __restrict__ gy, T* __restrict__ dx, int n, int per_sample, float eps) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const T* xr = x + row * n;
    const T* gr = gy + row * n;
    const T* sr = s ? s + (row / per_sample) * n : nullptr;
    float ss = 0.f, dot = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = to_f(xr[i]);
        const float gs = sr ? round_to<T>(to_f(gr[i]) * to_f(sr[i])) : to_f(gr[i]);
        ss += v * v;
        dot += gs * to_f(w[i]) * v;
    }
    const float ms = block_sum(ss, scratch) / n;
    dot = block_sum(dot, scratch) / n;
    const float r = rsqrtf(ms + eps), r3dot = r * r * r * dot;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float gs = sr ? round_to<T>(to_f(gr[i]) * to_f(sr[i])) : to_f(gr[i]);
        dx[row * n + i] = from_f<T>(gs * to_f(w[i]) * r - to_f(xr[i]) * r3dot);
    }
}

// The qk-norm and then the rotary embedding, on rows of x [B, S, H, hd] (one warp per row): the normed row
// (rounded, times the weight, rounded) has its pairs (x₂ᵢ, x₂ᵢ₊₁) rotated by θ with cos/sin [B, S, hd/2] f32.
template <typename T>
__device__ void rms_norm_rope_fwd(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ cos_,
                                  const float* __restrict__ sin_, T* __restrict__ y, long rows, int H, int hd,
                                  float eps) {
    const long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + row * hd;
    const long tok = row / H;  // (b, s)
    float ss = 0.f;
    for (int i = lane; i < hd; i += 32) {
        const float v = to_f(xr[i]);
        ss += v * v;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    const float r = rsqrtf(ss / hd + eps);
    for (int p = lane; p < hd / 2; p += 32) {
        const float re = round_to<T>(round_to<T>(to_f(xr[2 * p]) * r) * to_f(w[2 * p]));
        const float im = round_to<T>(round_to<T>(to_f(xr[2 * p + 1]) * r) * to_f(w[2 * p + 1]));
        const float c = cos_[tok * (hd / 2) + p], sn = sin_[tok * (hd / 2) + p];
        y[row * hd + 2 * p] = from_f<T>(re * c - im * sn);
        y[row * hd + 2 * p + 1] = from_f<T>(re * sn + im * c);
    }
}

// dL/dx of rms_norm_rope_fwd: the gradient rotated back by −θ (rounded, as the composed path stores it), then
// the norm's backward.
template <typename T>
__device__ void rms_norm_rope_bwd(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ cos_,
                                  const float* __restrict__ sin_, const T* __restrict__ gy, T* __restrict__ dx,
                                  long rows, int H, int hd, float eps) {
    const long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + row * hd;
    const T* gr = gy + row * hd;
    const long tok = row / H;
    float ss = 0.f, dot = 0.f;
    for (int p = lane; p < hd / 2; p += 32) {
        const float c = cos_[tok * (hd / 2) + p], sn = sin_[tok * (hd / 2) + p];
        const float gre = to_f(gr[2 * p]), gim = to_f(gr[2 * p + 1]);
        const float ure = round_to<T>(gre * c + gim * sn), uim = round_to<T>(gim * c - gre * sn);
        const float xre = to_f(xr[2 * p]), xim = to_f(xr[2 * p + 1]);
        ss += xre * xre + xim * xim;
        dot += ure * to_f(w[2 * p]) * xre + uim * to_f(w[2 * p + 1]) * xim;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        ss += __shfl_xor_sync(0xffffffffu, ss, off);
        dot += __shfl_xor_sync(0xffffffffu, dot, off);
    }
    const float r = rsqrtf(ss / hd + eps), r3dot = r * r * r * (dot / hd);
    for (int p = lane; p < hd / 2; p += 32) {
        const float c = cos_[tok * (hd / 2) + p], sn = sin_[tok * (hd / 2) + p];
        const float gre = to_f(gr[2 * p]), gim = to_f(gr[2 * p + 1]);
        const float ure = round_to<T>(gre * c + gim * sn), uim = round_to<T>(gim * c - gre * sn);
        dx[row * hd + 2 * p] = from_f<T>(ure * to_f(w[2 * p]) * r - to_f(xr[2 * p]) * r3dot);
        dx[row * hd + 2 * p + 1] = from_f<T>(uim * to_f(w[2 * p + 1]) * r - to_f(xr[2 * p + 1]) * r3dot);
    }
}

// SwiGLU's gate silu(a)·b (silu rounded, as the composed op stores it) and its backward: with σ = sigmoid(a),
// da = g·b·σ·(1 + a·(1 − σ)), db = g·silu(a).
template <typename T>
__device__ void swiglu_fwd(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ h, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float x = to_f(a[i]);
        h[i] = from_f<T>(round_to<T>(x / (1.f + __expf(-x))) * to_f(b[i]));
    }
}

template <typename T>
__device__ void swiglu_bwd(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ g,
                           T* __restrict__ da, T* __restrict__ db, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float x = to_f(a[i]), gi = to_f(g[i]);
        const float sig = 1.f / (1.f + __expf(-x));
        da[i] = from_f<T>(gi * to_f(b[i]) * sig * (1.f + x * (1.f - sig)));
        db[i] = from_f<T>(gi * x * sig);
    }
}

#define ELEMENTWISE_ENTRIES(T, SUFFIX)                                                                          \
    extern "C" __global__ void rms_norm_fwd_##SUFFIX(const T* x, const T* w, const T* s, const T* res, T* y,     \
                                                     int n, int per_sample, float eps) {                         \
        rms_norm_fwd<T>(x, w, s, res, y, n, per_sample, eps);                                                    \
    }                                                                                                            \
    extern "C" __global__ void rms_norm_bwd_##SUFFIX(const T* x, const T* w, const T* s, const T* gy, T* dx,     \
                                                     int n, int per_sample, float eps) {                         \
        rms_norm_bwd<T>(x, w, s, gy, dx, n, per_sample, eps);                                                    \
    }                                                                                                            \
    extern "C" __global__ void rms_norm_rope_fwd_##SUFFIX(const T* x, const T* w, const float* c,               \
                                                          const float* sn, T* y, long rows, int H, int hd,       \
                                                          float eps) {                                           \
        rms_norm_rope_fwd<T>(x, w, c, sn, y, rows, H, hd, eps);                                                  \
    }                                                                                                            \
    extern "C" __global__ void rms_norm_rope_bwd_##SUFFIX(const T* x, const T* w, const float* c,               \
                                                          const float* sn, const T* gy, T* dx, long rows, int H, \
                                                          int hd, float eps) {                                   \
        rms_norm_rope_bwd<T>(x, w, c, sn, gy, dx, rows, H, hd, eps);                                             \
    }                                                                                                            \
    extern "C" __global__ void swiglu_fwd_##SUFFIX(const T* a, const T* b, T* h, long n) {                       \
        swiglu_fwd<T>(a, b, h, n);                                                                               \
    }                                                                                                            \
    extern "C" __global__ void swiglu_bwd_##SUFFIX(const T* a, const T* b, const T* g, T* da, T* db, long n) {   \
        swiglu_bwd<T>(a, b, g, da, db, n);                                                                       \
    }

ELEMENTWISE_ENTRIES(bf16, bf16)
ELEMENTWISE_ENTRIES(float, f32)
