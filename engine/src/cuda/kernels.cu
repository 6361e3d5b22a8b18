// The CUDA backend's kernels, compiled at first use by NVRTC for the device's architecture
// (engine/src/cuda/mod.rs). Each is the CPU backend's kernel of the same name, element for
// element (engine/src/cpu.rs, engine/src/conv.rs): f32 in, f32 accumulation out. One thread per
// output element, one block per row for reductions; attention tiled through shared memory for
// training and the KV cache's prefill (flash_*: an online softmax, no T x T matrix, a backward
// without atomics) and one warp per query row for decode steps and heads above 128 (its backward
// uses atomics); atomics where embedding rows meet. No headers: NVRTC has none.

typedef unsigned long long u64;

#define IGNORE_ID 0xFFFFFFFFu
#define MAX_HEAD_DIM 256
#define PER_LANE (MAX_HEAD_DIM / 32)
#define CUDA_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
    __shared__ float sh[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = (int)threadIdx.x < nw ? sh[threadIdx.x] : 0.0f;
    if (w == 0) v = warp_sum(v);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    return sh[0];
}

__device__ float block_max(float v) {
    __shared__ float sh[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = (int)threadIdx.x < nw ? sh[threadIdx.x] : -CUDA_INF;
    if (w == 0) v = warp_max(v);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    return sh[0];
}

#define GRID_STRIDE(i, n) for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

extern "C" __global__ void fill_f32(float* x, u64 n, float value) {
    GRID_STRIDE(i, n) x[i] = value;
}

extern "C" __global__ void add_assign_f32(float* dst, const float* src, u64 n) {
    GRID_STRIDE(i, n) dst[i] += src[i];
}

extern "C" __global__ void embedding_forward(float* out, const float* table, const unsigned* ids, int rows, int dim) {
    GRID_STRIDE(i, (u64)rows * dim) {
        u64 r = i / dim, c = i % dim;
        out[i] = table[(u64)ids[r] * dim + c];
    }
}

extern "C" __global__ void embedding_backward(float* dtable, const float* dout, const unsigned* ids, int rows, int dim) {
    GRID_STRIDE(i, (u64)rows * dim) {
        u64 r = i / dim, c = i % dim;
        atomicAdd(&dtable[(u64)ids[r] * dim + c], dout[i]);
    }
}

// One block per row.
extern "C" __global__ void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int rows, int dim, float eps) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (u64)r * dim;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss);
    float s = 1.0f / sqrtf(ss / dim + eps);
    if (threadIdx.x == 0) rstd[r] = s;
    float* o = out + (u64)r * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) o[c] = xr[c] * s * w[c];
}

// dx (+)= r w g - r^3 x (sum_j g_j w_j x_j) / dim, one block per row.
extern "C" __global__ void rmsnorm_backward_dx(float* dx, const float* dout, const float* x, const float* w, const float* rstd, int rows, int dim, int accumulate) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (u64)r * dim;
    const float* g = dout + (u64)r * dim;
    float dot = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) dot += g[c] * w[c] * xr[c];
    dot = block_sum(dot);
    float s = rstd[r];
    float k = s * s * s * dot / dim;
    float* d = dx + (u64)r * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float v = s * w[c] * g[c] - k * xr[c];
        d[c] = accumulate ? d[c] + v : v;
    }
}

// dw[c] += sum over rows of dout x rstd: one thread per column (a fixed order).
extern "C" __global__ void rmsnorm_backward_dw(float* dw, const float* dout, const float* x, const float* rstd, int rows, int dim) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    float acc = 0.0f;
    for (int r = 0; r < rows; r++) acc += dout[(u64)r * dim + c] * x[(u64)r * dim + c] * rstd[r];
    dw[c] += acc;
}

// HF rotate_half on the q and k heads of each packed row, in place; sign -1 is the backward.
extern "C" __global__ void rope(float* qkv, const float* cosv, const float* sinv, int rows, int seq, int heads, int kv_heads, int dh, int pos0, float sign) {
    int half = dh / 2, rotated = heads + kv_heads, row = (heads + 2 * kv_heads) * dh;
    GRID_STRIDE(idx, (u64)rows * rotated * half) {
        u64 r = idx / ((u64)rotated * half);
        int rest = (int)(idx % ((u64)rotated * half));
        int head = rest / half, i = rest % half;
        int pos = pos0 + (int)(r % seq);
        float c = cosv[(u64)pos * half + i], s = sign * sinv[(u64)pos * half + i];
        float* x = qkv + r * row + (u64)head * dh;
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
    }
}

// One warp per (batch row, head, query row): keys lo..=qpos of its key/value head with an
// online softmax. Queries at q + (b * seq + i) * q_rs + h * dh; keys and values at
// k/v + (b * kv_rows + j) * kv_rs + g * dh; the first pads[b] keys are left padding no real
// query sees (pads may be null). lse may be null.
extern "C" __global__ void attention_forward(float* out, float* lse, const float* q, int q_rs, const float* k, const float* v, int kv_rs, int kv_rows, int n_keys, int pos0, const u64* pads, int batch, int seq, int heads, int kv_heads, int dh) {
    u64 warp = (blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= (u64)batch * heads * seq) return;
    int i = (int)(warp % seq), h = (int)(warp / seq % heads), b = (int)(warp / ((u64)seq * heads));
    int g = h / (heads / kv_heads);
    int pad = pads ? (int)pads[b] : 0;
    int qpos = pos0 + i;
    int lo = qpos >= pad ? pad : 0;
    int hi = qpos + 1 < n_keys ? qpos + 1 : n_keys;
    float scale = 1.0f / sqrtf((float)dh);
    const float* qp = q + ((u64)b * seq + i) * q_rs + (u64)h * dh;
    float qr[PER_LANE], acc[PER_LANE];
    for (int c = 0; c < PER_LANE; c++) {
        int d = lane + 32 * c;
        qr[c] = d < dh ? qp[d] : 0.0f;
        acc[c] = 0.0f;
    }
    float m = -CUDA_INF, s = 0.0f;
    for (int j = lo; j < hi; j++) {
        const float* kp = k + ((u64)b * kv_rows + j) * kv_rs + (u64)g * dh;
        const float* vp = v + ((u64)b * kv_rows + j) * kv_rs + (u64)g * dh;
        float dot = 0.0f;
        for (int c = 0; c < PER_LANE; c++) {
            int d = lane + 32 * c;
            if (d < dh) dot += qr[c] * kp[d];
        }
        dot = warp_sum(dot) * scale;
        float mn = fmaxf(m, dot);
        float alpha = expf(m - mn), p = expf(dot - mn);
        s = s * alpha + p;
        for (int c = 0; c < PER_LANE; c++) {
            int d = lane + 32 * c;
            if (d < dh) acc[c] = acc[c] * alpha + p * vp[d];
        }
        m = mn;
    }
    float inv = s > 0.0f ? 1.0f / s : 0.0f;
    float* op = out + ((u64)b * seq + i) * heads * dh + (u64)h * dh;
    for (int c = 0; c < PER_LANE; c++) {
        int d = lane + 32 * c;
        if (d < dh) op[d] = acc[c] * inv;
    }
    if (lse && lane == 0) lse[((u64)b * heads + h) * seq + i] = m + logf(s);
}

// One warp per (batch row, head, query row): dq of its row, dk and dv of keys 0..=i added
// atomically. dqkv's k and v parts must be zero on entry.
extern "C" __global__ void attention_backward(float* dqkv, const float* dout, const float* out, const float* lse, const float* qkv, int batch, int seq, int heads, int kv_heads, int dh) {
    u64 warp = (blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= (u64)batch * heads * seq) return;
    int i = (int)(warp % seq), h = (int)(warp / seq % heads), b = (int)(warp / ((u64)seq * heads));
    int g = h / (heads / kv_heads);
    u64 row = (u64)(heads + 2 * kv_heads) * dh, d_out = (u64)heads * dh;
    u64 koff = (u64)heads * dh + (u64)g * dh, voff = (u64)(heads + kv_heads) * dh + (u64)g * dh;
    float scale = 1.0f / sqrtf((float)dh);
    const float* qp = qkv + ((u64)b * seq + i) * row + (u64)h * dh;
    const float* gp = dout + ((u64)b * seq + i) * d_out + (u64)h * dh;
    const float* op = out + ((u64)b * seq + i) * d_out + (u64)h * dh;
    float qr[PER_LANE], gr[PER_LANE], dq[PER_LANE];
    float di = 0.0f;
    for (int c = 0; c < PER_LANE; c++) {
        int d = lane + 32 * c;
        qr[c] = d < dh ? qp[d] : 0.0f;
        gr[c] = d < dh ? gp[d] : 0.0f;
        dq[c] = 0.0f;
        if (d < dh) di += gr[c] * op[d];
    }
    di = warp_sum(di);
    float l = lse[((u64)b * heads + h) * seq + i];
    for (int j = 0; j <= i; j++) {
        const float* kp = qkv + ((u64)b * seq + j) * row + koff;
        const float* vp = qkv + ((u64)b * seq + j) * row + voff;
        float sc = 0.0f, dp = 0.0f;
        for (int c = 0; c < PER_LANE; c++) {
            int d = lane + 32 * c;
            if (d < dh) {
                sc += qr[c] * kp[d];
                dp += gr[c] * vp[d];
            }
        }
        sc = warp_sum(sc);
        dp = warp_sum(dp);
        float p = expf(sc * scale - l);
        float ds = scale * p * (dp - di);
        float* dk = dqkv + ((u64)b * seq + j) * row + koff;
        float* dv = dqkv + ((u64)b * seq + j) * row + voff;
        for (int c = 0; c < PER_LANE; c++) {
            int d = lane + 32 * c;
            if (d < dh) {
                dq[c] += ds * kp[d];
                atomicAdd(&dk[d], ds * qr[c]);
                atomicAdd(&dv[d], p * gr[c]);
            }
        }
    }
    float* dqp = dqkv + ((u64)b * seq + i) * row + (u64)h * dh;
    for (int c = 0; c < PER_LANE; c++) {
        int d = lane + 32 * c;
        if (d < dh) dqp[d] = dq[c];
    }
}

// The k and v heads of qkv's rows into the caches [batch, cache_len, kv_heads * dh].
// Tiled causal attention of a training (or prefill) batch, flash-attention style: a block holds
// FQ query rows of one (batch row, head), one thread each, and walks the keys FK rows at a time
// through shared memory (each key and value row is read from global memory once per block, not
// once per query); an online softmax in f32, the log-sum-exp kept for the backward. Head
// dimensions up to FD (the warp kernels above take larger ones). qkv rows are packed
// [q heads | k heads | v heads]; out is [B, T, heads, dh].
#define FQ 64
#define FK 32
#define FD 128

// An element of qkv as f32: f32 itself, or bf16 bits (the attention of the bf16 mode).
__device__ __forceinline__ float ld(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ float ld(const unsigned short* p, u64 i) { return __uint_as_float(((unsigned)p[i]) << 16); }

// Key and value rows j0..j0+nk (row stride rs from kb, vb: one key/value head of one batch row)
// into shared ks, vs (rows of FD), between barriers (the previous tile is consumed before it is
// overwritten).
template <typename T>
__device__ void kv_tile(float* ks, float* vs, const T* kb, const T* vb, u64 rs, int dh, int j0, int nk) {
    __syncthreads();
    for (int e = threadIdx.x; e < nk * dh; e += blockDim.x) {
        int r = e / dh, d = e % dh;
        ks[r * FD + d] = ld(kb, (u64)(j0 + r) * rs + d);
        vs[r * FD + d] = ld(vb, (u64)(j0 + r) * rs + d);
    }
    __syncthreads();
}

// A block's query tile, batch row, head and key/value head (blocks run tile-fastest).
struct FlashTile {
    int tile, b, h, g;
};

__device__ FlashTile flash_tile(int seq, int heads, int kv_heads) {
    int nt = (seq + FQ - 1) / FQ;
    int bh = blockIdx.x / nt;
    FlashTile t = {(int)(blockIdx.x % nt), bh / heads, bh % heads, (bh % heads) / (heads / kv_heads)};
    return t;
}

// The general form (the warp kernel attention_forward's arguments): queries at
// q + (b * seq + i) * q_rs + h * dh at positions pos0 + i, keys and values at
// k/v + (b * kv_rows + j) * kv_rs + g * dh for j < n_keys, causal, the first pads[b] keys left
// padding no real query sees (pads may be null); lse may be null. Training passes the packed
// qkv (pos0 0, no pads); the KV cache's prefill passes the cache.
template <typename T>
__device__ void flash_attend_t(float* out, float* lse, const T* q, int q_rs, const T* k, const T* v, int kv_rs, int kv_rows, int n_keys, int pos0, const u64* pads, int batch, int seq, int heads, int kv_heads, int dh) {
    __shared__ float ks[FK * FD];
    __shared__ float vs[FK * FD];
    FlashTile t = flash_tile(seq, heads, kv_heads);
    int tile = t.tile, b = t.b, h = t.h, g = t.g;
    if (b >= batch) return;
    const T* kb = k + (u64)b * kv_rows * kv_rs + (u64)g * dh;
    const T* vb = v + (u64)b * kv_rows * kv_rs + (u64)g * dh;
    int pad = pads ? (int)pads[b] : 0;
    int i = tile * FQ + threadIdx.x;
    bool live = i < seq;
    int qpos = pos0 + i;
    int lo = qpos >= pad ? pad : 0;
    int hi = qpos + 1 < n_keys ? qpos + 1 : n_keys;
    float qr[FD], acc[FD];
    for (int d = 0; d < dh; d++) {
        qr[d] = live ? ld(q, ((u64)b * seq + i) * q_rs + (u64)h * dh + d) : 0.0f;
        acc[d] = 0.0f;
    }
    float scale = 1.0f / sqrtf((float)dh), m = -CUDA_INF, s = 0.0f;
    // The keys some query of the block sees: from the pad (0 if a query is itself padding) to
    // the block's last query.
    int first_q = pos0 + tile * FQ;
    int last_q = pos0 + (tile * FQ + FQ < seq ? tile * FQ + FQ : seq) - 1;
    int j_begin = first_q >= pad ? pad : 0;
    int j_end = last_q + 1 < n_keys ? last_q + 1 : n_keys;
    for (int j0 = j_begin; j0 < j_end; j0 += FK) {
        int nk = j_end - j0 < FK ? j_end - j0 : FK;
        kv_tile(ks, vs, kb, vb, (u64)kv_rs, dh, j0, nk);
        if (!live) continue;
        int r0 = lo > j0 ? lo - j0 : 0;
        int r1 = hi - j0 < nk ? hi - j0 : nk;
        for (int r = r0; r < r1; r++) {
            float dot = 0.0f;
            for (int d = 0; d < dh; d++) dot += qr[d] * ks[r * FD + d];
            dot *= scale;
            float mn = fmaxf(m, dot);
            float alpha = expf(m - mn), p = expf(dot - mn);
            s = s * alpha + p;
            for (int d = 0; d < dh; d++) acc[d] = acc[d] * alpha + p * vs[r * FD + d];
            m = mn;
        }
    }
    if (!live) return;
    float inv = s > 0.0f ? 1.0f / s : 0.0f;
    float* op = out + ((u64)b * seq + i) * heads * dh + (u64)h * dh;
    for (int d = 0; d < dh; d++) op[d] = acc[d] * inv;
    if (lse) lse[((u64)b * heads + h) * seq + i] = m + logf(s);
}

extern "C" __global__ void flash_attend(float* out, float* lse, const float* q, int q_rs, const float* k, const float* v, int kv_rs, int kv_rows, int n_keys, int pos0, const u64* pads, int batch, int seq, int heads, int kv_heads, int dh) { flash_attend_t(out, lse, q, q_rs, k, v, kv_rs, kv_rows, n_keys, pos0, pads, batch, seq, heads, kv_heads, dh); }
extern "C" __global__ void flash_attend_bf16(float* out, float* lse, const unsigned short* q, int q_rs, const unsigned short* k, const unsigned short* v, int kv_rs, int kv_rows, int n_keys, int pos0, const u64* pads, int batch, int seq, int heads, int kv_heads, int dh) { flash_attend_t(out, lse, q, q_rs, k, v, kv_rs, kv_rows, n_keys, pos0, pads, batch, seq, heads, kv_heads, dh); }

// The backward of flash_attend's training form (packed qkv, no cache) without atomics, in two kernels. dq: a block of FQ query rows
// (one thread each) walks the keys in shared tiles, recomputing each probability from the saved
// log-sum-exp: ds = p (dout . v - D) with D = dout . out of the row.
template <typename T>
__device__ void flash_backward_dq_t(float* dqkv, const float* dout, const float* out, const float* lse, const T* qkv, int batch, int seq, int heads, int kv_heads, int dh) {
    __shared__ float ks[FK * FD];
    __shared__ float vs[FK * FD];
    FlashTile t = flash_tile(seq, heads, kv_heads);
    int tile = t.tile, b = t.b, h = t.h, g = t.g;
    if (b >= batch) return;
    u64 row = (u64)(heads + 2 * kv_heads) * dh, d_out = (u64)heads * dh;
    const T* base = qkv + (u64)b * seq * row;
    int i = tile * FQ + threadIdx.x;
    bool live = i < seq;
    float q[FD], go[FD], dq[FD];
    float di = 0.0f, l = 0.0f;
    for (int d = 0; d < dh; d++) {
        q[d] = live ? ld(base, (u64)i * row + (u64)h * dh + d) : 0.0f;
        go[d] = live ? dout[((u64)b * seq + i) * d_out + (u64)h * dh + d] : 0.0f;
        dq[d] = 0.0f;
        if (live) di += go[d] * out[((u64)b * seq + i) * d_out + (u64)h * dh + d];
    }
    if (live) l = lse[((u64)b * heads + h) * seq + i];
    float scale = 1.0f / sqrtf((float)dh);
    int last = tile * FQ + FQ < seq ? tile * FQ + FQ : seq;
    for (int j0 = 0; j0 < last; j0 += FK) {
        int nk = last - j0 < FK ? last - j0 : FK;
        kv_tile(ks, vs, base + (u64)(heads + g) * dh, base + (u64)(heads + kv_heads + g) * dh, row, dh, j0, nk);
        int jend = live ? (i - j0 + 1 < nk ? i - j0 + 1 : nk) : 0;
        for (int r = 0; r < jend; r++) {
            float sc = 0.0f, dp = 0.0f;
            for (int d = 0; d < dh; d++) {
                sc += q[d] * ks[r * FD + d];
                dp += go[d] * vs[r * FD + d];
            }
            float p = expf(sc * scale - l);
            float ds = scale * p * (dp - di);
            for (int d = 0; d < dh; d++) dq[d] += ds * ks[r * FD + d];
        }
    }
    if (!live) return;
    float* dqp = dqkv + ((u64)b * seq + i) * row + (u64)h * dh;
    for (int d = 0; d < dh; d++) dqp[d] = dq[d];
}

extern "C" __global__ void flash_backward_dq(float* dqkv, const float* dout, const float* out, const float* lse, const float* qkv, int batch, int seq, int heads, int kv_heads, int dh) { flash_backward_dq_t(dqkv, dout, out, lse, qkv, batch, seq, heads, kv_heads, dh); }
extern "C" __global__ void flash_backward_dq_bf16(float* dqkv, const float* dout, const float* out, const float* lse, const unsigned short* qkv, int batch, int seq, int heads, int kv_heads, int dh) { flash_backward_dq_t(dqkv, dout, out, lse, qkv, batch, seq, heads, kv_heads, dh); }

// dk and dv: a block of FQ key rows of one (batch row, key/value head), one thread each, walks
// the queries that see them (i >= j) of every head of its group in shared tiles (q, dout, the
// log-sum-exp and D per query row) and writes its rows once.
template <typename T>
__device__ void flash_backward_dkv_t(float* dqkv, const float* dout, const float* out, const float* lse, const T* qkv, int batch, int seq, int heads, int kv_heads, int dh) {
    __shared__ float qs[FK * FD];
    __shared__ float gs[FK * FD];
    __shared__ float ls[FK];
    __shared__ float dd[FK];
    int nt = (seq + FQ - 1) / FQ;
    int tile = blockIdx.x % nt, bg = blockIdx.x / nt;
    int b = bg / kv_heads, g = bg % kv_heads;
    if (b >= batch) return;
    int group = heads / kv_heads;
    u64 row = (u64)(heads + 2 * kv_heads) * dh, d_out = (u64)heads * dh;
    const T* base = qkv + (u64)b * seq * row;
    int j = tile * FQ + threadIdx.x;
    bool live = j < seq;
    float k[FD], v[FD], dk[FD], dv[FD];
    for (int d = 0; d < dh; d++) {
        k[d] = live ? ld(base, (u64)j * row + (u64)(heads + g) * dh + d) : 0.0f;
        v[d] = live ? ld(base, (u64)j * row + (u64)(heads + kv_heads + g) * dh + d) : 0.0f;
        dk[d] = 0.0f;
        dv[d] = 0.0f;
    }
    float scale = 1.0f / sqrtf((float)dh);
    for (int hh = 0; hh < group; hh++) {
        int h = g * group + hh;
        for (int i0 = tile * FQ; i0 < seq; i0 += FK) {
            int nq = seq - i0 < FK ? seq - i0 : FK;
            __syncthreads();
            for (int e = threadIdx.x; e < nq * dh; e += blockDim.x) {
                int r = e / dh, d = e % dh;
                qs[r * FD + d] = ld(base, (u64)(i0 + r) * row + (u64)h * dh + d);
                gs[r * FD + d] = dout[((u64)b * seq + i0 + r) * d_out + (u64)h * dh + d];
            }
            for (int r = threadIdx.x; r < nq; r += blockDim.x) {
                const float* gr = dout + ((u64)b * seq + i0 + r) * d_out + (u64)h * dh;
                const float* orow = out + ((u64)b * seq + i0 + r) * d_out + (u64)h * dh;
                float di = 0.0f;
                for (int d = 0; d < dh; d++) di += gr[d] * orow[d];
                dd[r] = di;
                ls[r] = lse[((u64)b * heads + h) * seq + i0 + r];
            }
            __syncthreads();
            if (!live) continue;
            for (int r = 0; r < nq; r++) {
                if (i0 + r < j) continue;  // causal: query i sees keys j <= i
                float sc = 0.0f, dp = 0.0f;
                for (int d = 0; d < dh; d++) {
                    sc += qs[r * FD + d] * k[d];
                    dp += gs[r * FD + d] * v[d];
                }
                float p = expf(sc * scale - ls[r]);
                float ds = scale * p * (dp - dd[r]);
                for (int d = 0; d < dh; d++) {
                    dv[d] += p * gs[r * FD + d];
                    dk[d] += ds * qs[r * FD + d];
                }
            }
        }
    }
    if (!live) return;
    float* dkp = dqkv + ((u64)b * seq + j) * row + (u64)(heads + g) * dh;
    float* dvp = dqkv + ((u64)b * seq + j) * row + (u64)(heads + kv_heads + g) * dh;
    for (int d = 0; d < dh; d++) {
        dkp[d] = dk[d];
        dvp[d] = dv[d];
    }
}

extern "C" __global__ void flash_backward_dkv(float* dqkv, const float* dout, const float* out, const float* lse, const float* qkv, int batch, int seq, int heads, int kv_heads, int dh) { flash_backward_dkv_t(dqkv, dout, out, lse, qkv, batch, seq, heads, kv_heads, dh); }
extern "C" __global__ void flash_backward_dkv_bf16(float* dqkv, const float* dout, const float* out, const float* lse, const unsigned short* qkv, int batch, int seq, int heads, int kv_heads, int dh) { flash_backward_dkv_t(dqkv, dout, out, lse, qkv, batch, seq, heads, kv_heads, dh); }

extern "C" __global__ void kv_store(float* kc, float* vc, const float* qkv, int batch, int seq, int heads, int kv_heads, int dh, int cache_len, int pos0) {
    u64 kvd = (u64)kv_heads * dh, row = (u64)(heads + 2 * kv_heads) * dh;
    GRID_STRIDE(idx, (u64)batch * seq * kvd) {
        u64 e = idx % kvd, bt = idx / kvd;
        u64 b = bt / seq, t = bt % seq;
        const float* src = qkv + bt * row + (u64)heads * dh;
        u64 at = (b * cache_len + pos0 + t) * kvd + e;
        kc[at] = src[e];
        vc[at] = src[kvd + e];
    }
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

extern "C" __global__ void swiglu_forward(float* out, const float* gate_up, int rows, int ffn) {
    GRID_STRIDE(idx, (u64)rows * ffn) {
        u64 r = idx / ffn, c = idx % ffn;
        float g = gate_up[r * 2 * ffn + c], u = gate_up[r * 2 * ffn + ffn + c];
        out[idx] = g * sigmoidf(g) * u;
    }
}

extern "C" __global__ void swiglu_backward(float* dgate_up, const float* dout, const float* gate_up, int rows, int ffn) {
    GRID_STRIDE(idx, (u64)rows * ffn) {
        u64 r = idx / ffn, c = idx % ffn;
        float g = gate_up[r * 2 * ffn + c], u = gate_up[r * 2 * ffn + ffn + c];
        float sg = sigmoidf(g), d = dout[idx];
        dgate_up[r * 2 * ffn + ffn + c] = d * g * sg;
        dgate_up[r * 2 * ffn + c] = d * u * sg * (1.0f + g * (1.0f - sg));
    }
}

// One block per row: the loss, and with has_grad the row overwritten by
// scale * (softmax - onehot) (zero for an IGNORE target).
extern "C" __global__ void cross_entropy(float* losses, float* logits, const unsigned* targets, int rows, int vocab, int has_grad, float scale) {
    int r = blockIdx.x;
    if (r >= rows) return;
    float* x = logits + (u64)r * vocab;
    unsigned t = targets[r];
    if (t == IGNORE_ID) {
        if (threadIdx.x == 0) losses[r] = 0.0f;
        if (has_grad) for (int c = threadIdx.x; c < vocab; c += blockDim.x) x[c] = 0.0f;
        return;
    }
    float mx = -CUDA_INF;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) mx = fmaxf(mx, x[c]);
    mx = block_max(mx);
    float sum = 0.0f;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) sum += expf(x[c] - mx);
    sum = block_sum(sum);
    float lse = mx + logf(sum);
    float target = x[t];
    __syncthreads();  // every thread has read x[t] before the row is overwritten
    if (threadIdx.x == 0) losses[r] = lse - target;
    if (has_grad) {
        float inv = 1.0f / sum;
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
            float p = expf(x[c] - mx) * inv;
            x[c] = scale * (p - ((unsigned)c == t ? 1.0f : 0.0f));
        }
    }
}

// Per-block partial sums of x^2 in f64 (the host adds them in order: the same value every run).
extern "C" __global__ void sum_squares(double* partials, const float* x, u64 n) {
    __shared__ double sh[256];
    double acc = 0.0;
    GRID_STRIDE(i, n) acc += (double)x[i] * (double)x[i];
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = sh[0];
}

// torch.optim.AdamW over one span: p *= keep; m += w1 (g - m); v = b2 v + (1 - b2) g^2;
// p -= step * m / (sqrt(v) / bc2 + eps), with g scaled by grad_scale first.
extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, u64 n, float grad_scale, float keep, float w1, float b2, float bc2, float eps, float step) {
    GRID_STRIDE(i, n) {
        float gi = g[i] * grad_scale;
        float pi = p[i] * keep;
        float mi = m[i] + w1 * (gi - m[i]);
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - step * (mi / (sqrtf(vi) / bc2 + eps));
    }
}

// -- convolutional inference (NHWC), the FID network ---------------------------------------

// Round to the nearest bf16, ties to even (NaN stays a quiet NaN): the bf16 matmuls' inputs.
extern "C" __global__ void f32_to_bf16(unsigned short* dst, const float* src, u64 n) {
    GRID_STRIDE(i, n) {
        unsigned u = __float_as_uint(src[i]);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            dst[i] = (unsigned short)((u >> 16) | 0x40u);
        } else {
            dst[i] = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        }
    }
}

struct Window {
    int batch, h, w, c, kh, kw, stride, pad_h, pad_w;
};

__device__ __forceinline__ int out_h(Window g) { return (g.h + 2 * g.pad_h - g.kh) / g.stride + 1; }
__device__ __forceinline__ int out_w(Window g) { return (g.w + 2 * g.pad_w - g.kw) / g.stride + 1; }

extern "C" __global__ void im2col(float* col, const float* x, Window g) {
    int oh = out_h(g), ow = out_w(g);
    u64 width = (u64)g.kh * g.kw * g.c;
    GRID_STRIDE(idx, (u64)g.batch * oh * ow * width) {
        u64 r = idx / width, e = idx % width;
        int ky = (int)(e / ((u64)g.kw * g.c)), kx = (int)(e / g.c % g.kw), ch = (int)(e % g.c);
        int b = (int)(r / ((u64)oh * ow)), oy = (int)(r / ow % oh), ox = (int)(r % ow);
        int iy = oy * g.stride + ky - g.pad_h, ix = ox * g.stride + kx - g.pad_w;
        col[idx] = (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) ? x[(((u64)b * g.h + iy) * g.w + ix) * g.c + ch] : 0.0f;
    }
}

extern "C" __global__ void bias_relu(float* x, const float* bias, int rows, int channels) {
    GRID_STRIDE(idx, (u64)rows * channels) x[idx] = fmaxf(x[idx] + bias[idx % channels], 0.0f);
}

// Max (is_max) or mean over the window's real pixels (padding never counts).
extern "C" __global__ void pool(float* out, const float* x, Window g, int is_max) {
    int oh = out_h(g), ow = out_w(g);
    GRID_STRIDE(idx, (u64)g.batch * oh * ow * g.c) {
        u64 r = idx / g.c;
        int ch = (int)(idx % g.c);
        int b = (int)(r / ((u64)oh * ow)), oy = (int)(r / ow % oh), ox = (int)(r % ow);
        int y0 = oy * g.stride - g.pad_h, x0 = ox * g.stride - g.pad_w;
        int y1 = y0 + g.kh < g.h ? y0 + g.kh : g.h, x1 = x0 + g.kw < g.w ? x0 + g.kw : g.w;
        y0 = y0 > 0 ? y0 : 0;
        x0 = x0 > 0 ? x0 : 0;
        float acc = is_max ? -CUDA_INF : 0.0f;
        for (int iy = y0; iy < y1; iy++)
            for (int ix = x0; ix < x1; ix++) {
                float v = x[(((u64)b * g.h + iy) * g.w + ix) * g.c + ch];
                acc = is_max ? fmaxf(acc, v) : acc + v;
            }
        int count = (y1 - y0) * (x1 - x0);
        out[idx] = is_max ? acc : (count > 0 ? acc / count : 0.0f);
    }
}

extern "C" __global__ void copy_columns(float* dst, const float* src, int rows, int c, int dst_c, int c0) {
    GRID_STRIDE(idx, (u64)rows * c) {
        u64 r = idx / c, j = idx % c;
        dst[r * dst_c + c0 + j] = src[idx];
    }
}

extern "C" __global__ void global_avg_pool(float* out, const float* x, int batch, int pixels, int c) {
    GRID_STRIDE(idx, (u64)batch * c) {
        u64 b = idx / c, ch = idx % c;
        float acc = 0.0f;
        for (int p = 0; p < pixels; p++) acc += x[(b * pixels + p) * c + ch];
        out[idx] = acc / pixels;
    }
}
