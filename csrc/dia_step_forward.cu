// Forward of the fused DIA-LSTM step (docs/design.md §1), cell 0:
//   s = mean_HW x;  u_ih = relu(Wih1 s + bih1);  u_hh = relu(Whh1 h0 + bhh1)
//   gates = Wih2 u_ih + bih2 + Whh2 u_hh + bhh2;  (h, c) = LSTM pointwise(gates, c0)
//   out = relu?(x * h + identity)
// s, u and the gate pre-activations are saved for the backward (Cell0Saved).
//
// Two paths (chosen by the bindings):
//   fused  (C <= kFusedMaxChannels, one cell): 1 launch, one block per sample does all of it.
//   split  (any C): pool -> reduced linears -> expansion + pointwise -> scale; 4 launches.
//          Stacked cells (num_cells > 1) run between expansion and scale on the host side.
#include "dia_step_common.cuh"

namespace dia_fused {
namespace detail {
namespace {

struct FusedForwardParams {
  MapLayout layout;           // N, C, HW and the walk order of the maps
  int hidden;                 // R
  FeatureMap x;               // (N, C, H, W)
  FeatureMap identity;        // (N, C, H, W); data nullptr when absent
  FeatureMap out;             // (N, C, H, W)
  const float* h0;            // (N, C) previous hidden state of cell 0
  const float* c0;            // (N, C) previous cell state of cell 0
  Cell0Weights weights;       // shapes in dia_step.h
  bool relu;                  // relu after the residual add
  CellActivation activation;  // act of h = sigmoid(o) * act(c)
  float* h_new;               // (N, C)
  float* c_new;               // (N, C)
  Cell0Saved saved;           // written: pooled, u, gate pre-activations
};

// Floats of dynamic shared memory of fused_forward_kernel.
int fused_forward_smem_floats(int channels, int hidden, int vec) {
  return 3 * channels + 2 * hidden + 4 * channels + kFusedThreads * vec;
}

// grid (N), block (kFusedThreads): block n does the whole step of sample n.
template <class T, int VEC>
__global__ void __launch_bounds__(kFusedThreads) fused_forward_kernel(const FusedForwardParams p) {
  DIA_FUSED_DYNAMIC_SMEM(smem);
  const int C = p.layout.channels, R = p.hidden, HW = p.layout.hw;
  float* pooled = smem;             // (C)
  float* h_prev = pooled + C;       // (C)
  float* attention = h_prev + C;    // (C) new h of cell 0
  float* hidden = attention + C;    // (2R) u_ih, u_hh
  float* gates = hidden + 2 * R;    // (4C) pre-activations, i, f, g, o blocks
  float* scratch = gates + 4 * C;   // (kFusedThreads * VEC) row-reduction partials
  const int64_t n = blockIdx.x;
  const float inv_hw = 1.0f / static_cast<float>(HW);

  const PoolOp<T, VEC> pool{p.x};
  if (p.layout.channels_inner) {
    block_rows_reduce<VEC>(pool, n, 0, C, 0, HW, fused_row_lanes(C, VEC), scratch, pooled, inv_hw);
  } else {
    block_planes_reduce<VEC>(pool, n, C, HW, pooled, inv_hw);
  }
  for (int c = threadIdx.x; c < C; c += blockDim.x) h_prev[c] = p.h0[n * C + c];
  __syncthreads();

  for (int c = threadIdx.x; c < C; c += blockDim.x) p.saved.pooled[n * C + c] = pooled[c];
  sample_reduced_hidden(p.weights, pooled, h_prev, C, R, hidden);
  __syncthreads();
  for (int o = threadIdx.x; o < 2 * R; o += blockDim.x) {
    p.saved.hidden[cell0_hidden_index(o, n, p.layout.n, R)] = hidden[o];
  }
  sample_gate_preacts(p.weights, hidden, C, R, gates);
  __syncthreads();
  for (int r = threadIdx.x; r < 4 * C; r += blockDim.x) p.saved.gates[n * 4 * C + r] = gates[r];
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const float gate[4] = {gates[c], gates[C + c], gates[2 * C + c], gates[3 * C + c]};
    const CellState s = lstm_cell_forward(gate, p.c0[n * C + c], p.activation);
    p.h_new[n * C + c] = s.h;
    p.c_new[n * C + c] = s.c;
    attention[c] = s.h;
  }
  __syncthreads();

  const ScaleResidualOp<T, VEC> scale{p.x, p.identity, p.out, p.relu};
  if (p.layout.channels_inner) {
    block_rows_apply<VEC>(scale, n, 0, C, 0, HW, fused_row_lanes(C, VEC), attention, nullptr);
  } else {
    block_planes_apply<VEC>(scale, n, C, HW, attention, nullptr);
  }
}

// grid stream_grid(layout, kUnroll, splits), block (kStreamThreads). splits = gridDim.z
// (channels inner only): block z sums rows [z * split_rows, (z + 1) * split_rows) of H*W into
// partials[z] (unscaled) and sum_splits_kernel adds them in order.
template <class T, int VEC>
__global__ void __launch_bounds__(kStreamThreads)
pool_kernel(const MapLayout layout,  // N, C, HW, walk order
            const FeatureMap x,      // (N, C, H, W)
            int split_rows,          // rows of H*W per block along grid axis z
            float* pooled,           // (N, C), written when gridDim.z == 1
            float* partials) {       // (gridDim.z, N, C), written when gridDim.z > 1
  __shared__ float scratch[kStreamThreads * VEC];
  stream_reduce<VEC>(PoolOp<T, VEC>{x}, layout, split_rows, 1.0f / static_cast<float>(layout.hw),
                     pooled, partials, scratch);
}

// grid stream_grid(layout, kUnroll, splits), block (kStreamThreads): the H*W splits of
// pool_kernel (channels inner), without partial sums.
template <class T, int VEC>
__global__ void __launch_bounds__(kStreamThreads)
scale_residual_kernel(const MapLayout layout,   // N, C, HW, walk order
                      int split_rows,            // rows of H*W per block along grid axis z
                      const FeatureMap x,        // (N, C, H, W)
                      const float* attention,    // (N, C)
                      const FeatureMap identity, // (N, C, H, W); data nullptr when absent
                      const FeatureMap out,      // (N, C, H, W)
                      bool relu) {
  stream_apply<VEC>(ScaleResidualOp<T, VEC>{x, identity, out, relu}, layout, split_rows, attention,
                    nullptr);
}

struct GateForwardParams {
  int n, channels, splits;    // N, C, gate_splits(R)
  const float* gate_sums;     // (splits, N, 4C) from gate_gemm_kernel
  const float* c0;            // (N, C)
  Cell0Weights weights;       // shapes in dia_step.h
  CellActivation activation;
  float* h_new;               // (N, C)
  float* c_new;               // (N, C)
  float* gates;               // (N, 4C) written: the pre-activations, saved for the backward
};

// grid (ceil(N * C / kStreamThreads)), block (kStreamThreads): the LSTM pointwise forward of one
// (sample, channel) per thread.
__global__ void __launch_bounds__(kStreamThreads) gate_forward_kernel(const GateForwardParams p) {
  const int C = p.channels;
  for_each_cell0_gates(p.weights, p.gate_sums, p.n, C, p.splits, [&](int m, int c, float (&gate)[4]) {
    const int64_t at = static_cast<int64_t>(m) * C + c;
#pragma unroll
    for (int q = 0; q < 4; ++q) p.gates[static_cast<int64_t>(m) * 4 * C + q * C + c] = gate[q];
    const CellState s = lstm_cell_forward(gate, p.c0[at], p.activation);
    p.h_new[at] = s.h;
    p.c_new[at] = s.c;
  });
}

}  // namespace

struct ReducedLinearParams {
  int n, channels, hidden;  // N, C, R
  const float* pooled;      // (N, C) input of the ih path
  const float* h0;          // (N, C) input of the hh path
  Cell0Weights weights;     // W1 (R, C), b1 (R) of both paths are read
  int splits;               // chunks of K = C, one block each (blockIdx.z / 2)
  float* hidden_out;        // (2, N, R) relu(W1 v + b1): ih path, then hh path (splits == 1)
  float* partials;          // (splits, 2, N, R) chunk sums of W1 v (splits > 1)
};

// grid (ceil(R / kN), ceil(N / kM), 2 paths x splits), block (GemmTile::kThreads): K = C in
// chunks of kReducedLinearSplitK; with several chunks each block writes its chunk's partial
// product and reduced_linear_finish_kernel adds them in chunk order (deterministic, no atomics).
__global__ void __launch_bounds__(GemmTile::kThreads) reduced_linear_kernel(const ReducedLinearParams p) {
  __shared__ GemmSmem smem;
  const bool hh = (blockIdx.z % 2) == 1;
  const int split = static_cast<int>(blockIdx.z) / 2;
  const int k_begin = split * kReducedLinearSplitK;
  const int k_size = min(p.channels - k_begin, kReducedLinearSplitK);
  const int m0 = static_cast<int>(blockIdx.y) * GemmTile::kM;
  const int n0 = static_cast<int>(blockIdx.x) * GemmTile::kN;
  const StridedLoad a{(hh ? p.h0 : p.pooled) + k_begin, p.channels, 1};  // A(n, k) = v[n, k]
  const StridedLoad b{(hh ? p.weights.whh1 : p.weights.wih1) + k_begin, 1, p.channels};  // W1[j, k]
  float acc[GemmTile::kTM][GemmTile::kTN];
  gemm_zero(acc);
  gemm_tile_accumulate<true, true>(acc, a, b, m0, n0, p.n, p.hidden, k_size, smem);
  const float* bias = hh ? p.weights.bhh1 : p.weights.bih1;
  const int64_t path = hh ? static_cast<int64_t>(p.n) * p.hidden : 0;
  const int64_t part = static_cast<int64_t>(split) * 2 * p.n * p.hidden;
  gemm_tile_store(acc, m0, n0, p.n, p.hidden, [&](int m, int col, float v) {
    const int64_t at = path + static_cast<int64_t>(m) * p.hidden + col;
    if (p.splits == 1) {
      p.hidden_out[at] = fmaxf(v + bias[col], 0.0f);
    } else {
      p.partials[part + at] = v;
    }
  });
}

// grid (ceil(2NR / kStreamThreads)), block (kStreamThreads): u = relu(the sum of the split-K
// partials, in chunk order, + b1).
__global__ void __launch_bounds__(kStreamThreads) reduced_linear_finish_kernel(const ReducedLinearParams p) {
  const int64_t path_size = static_cast<int64_t>(p.n) * p.hidden;
  const int64_t at = static_cast<int64_t>(blockIdx.x) * kStreamThreads + threadIdx.x;
  if (at >= 2 * path_size) return;
  const float total = sum_in_order(p.partials, p.splits, 2 * path_size, at);
  const float* bias = at >= path_size ? p.weights.bhh1 : p.weights.bih1;
  p.hidden_out[at] = fmaxf(total + bias[at % p.hidden], 0.0f);
}

struct GateGemmParams {
  int n, channels, hidden;  // N, C, R
  const float* hidden_in;   // (2, N, R) u_ih, u_hh
  Cell0Weights weights;     // W2 (4C, R) of both paths are read
  float* partials;          // (gate_splits(R), N, 4C), column 4 * channel + gate
};

// grid (ceil(4C / kN), ceil(N / kM), gate_splits(R)), block (GemmTile::kThreads): block z takes
// path z % 2 and chunk z / 2 of K = R: a tile of samples x 8 channels, all 4 gates.
__global__ void __launch_bounds__(GemmTile::kThreads) gate_gemm_kernel(const GateGemmParams p) {
  __shared__ GemmSmem smem;
  const bool hh = (blockIdx.z % 2) == 1;
  const int k_begin = static_cast<int>(blockIdx.z / 2) * kGateSplitK;
  const int k_size = min(p.hidden - k_begin, kGateSplitK);
  const int m0 = static_cast<int>(blockIdx.y) * GemmTile::kM;
  const int n0 = static_cast<int>(blockIdx.x) * GemmTile::kN;
  const int64_t path = hh ? static_cast<int64_t>(p.n) * p.hidden : 0;
  const StridedLoad a{p.hidden_in + path + k_begin, p.hidden, 1};  // A(m, k) = u[m, k]
  const GateColumnsLoad b{(hh ? p.weights.whh2 : p.weights.wih2) + k_begin, p.channels, p.hidden};
  float acc[GemmTile::kTM][GemmTile::kTN];
  gemm_zero(acc);
  gemm_tile_accumulate<true, true>(acc, a, b, m0, n0, p.n, 4 * p.channels, k_size, smem);
  float* out = p.partials + blockIdx.z * static_cast<int64_t>(p.n) * 4 * p.channels;
  gemm_tile_store(acc, m0, n0, p.n, 4 * p.channels, [&](int m, int col, float v) {
    out[static_cast<int64_t>(m) * 4 * p.channels + col] = v;
  });
}

cudaError_t launch_gate_gemm(int n, int channels, int hidden, const float* hidden_in,
                             const Cell0Weights& weights, float* partials, cudaStream_t stream) {
  const GateGemmParams p{n, channels, hidden, hidden_in, weights, partials};
  const dim3 grid((4 * channels + GemmTile::kN - 1) / GemmTile::kN,
                  (n + GemmTile::kM - 1) / GemmTile::kM, gate_splits(hidden));
  DIA_FUSED_LAUNCH(grid, GemmTile::kThreads, 0, stream, gate_gemm_kernel)(p);
  return cudaGetLastError();
}

cudaError_t launch_reduced_linear(int n, int channels, int hidden, const float* pooled,
                                  const float* h0, const Cell0Weights& weights, float* hidden_out,
                                  float* partials, cudaStream_t stream) {
  const int splits = reduced_linear_splits(channels);
  const ReducedLinearParams p{n, channels, hidden, pooled, h0, weights, splits, hidden_out, partials};
  const dim3 grid((hidden + GemmTile::kN - 1) / GemmTile::kN, (n + GemmTile::kM - 1) / GemmTile::kM,
                  2 * splits);
  DIA_FUSED_LAUNCH(grid, GemmTile::kThreads, 0, stream, reduced_linear_kernel)(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  const int64_t size = 2 * static_cast<int64_t>(n) * hidden;
  const unsigned blocks = static_cast<unsigned>((size + kStreamThreads - 1) / kStreamThreads);
  DIA_FUSED_LAUNCH(blocks, kStreamThreads, 0, stream, reduced_linear_finish_kernel)(p);
  return cudaGetLastError();
}

// grid (ceil(size / kStreamThreads)), block (kStreamThreads): out[i] = scale * the sum of
// partials[s][i] over s in order.
__global__ void __launch_bounds__(kStreamThreads)
sum_splits_kernel(int splits,               // S
                  int64_t size,             // N * C
                  const float* partials,    // (S, N, C)
                  float scale,
                  float* out) {             // (N, C)
  const int64_t at = static_cast<int64_t>(blockIdx.x) * kStreamThreads + threadIdx.x;
  if (at >= size) return;
  out[at] = sum_in_order(partials, splits, size, at) * scale;
}

cudaError_t launch_sum_splits(int splits, int64_t size, const float* partials, float scale,
                              float* out, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((size + kStreamThreads - 1) / kStreamThreads);
  DIA_FUSED_LAUNCH(blocks, kStreamThreads, 0, stream, sum_splits_kernel)(splits, size, partials,
                                                                         scale, out);
  return cudaGetLastError();
}

}  // namespace detail

int map_reduce_splits(const MapLayout& layout) {
  using namespace detail;
  if (!layout.channels_inner) return 1;
  const dim3 grid = stream_grid(layout, 1);
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y;
  if (blocks >= kMapReduceMinBlocks) return 1;
  const int rows_per_step = kStreamThreads / stream_row_lanes(layout.channels, layout.vec);
  const int steps = (layout.hw + rows_per_step - 1) / rows_per_step;
  const int wanted = static_cast<int>((kMapReduceMinBlocks + blocks - 1) / blocks);
  const int splits = steps < wanted ? steps : wanted;
  const int steps_per_split = (steps + splits - 1) / splits;
  return (steps + steps_per_split - 1) / steps_per_split;
}

using namespace detail;

cudaError_t launch_fused_forward(ScalarKind kind, const MapLayout& layout, int hidden, FeatureMap x,
                                 FeatureMap identity, FeatureMap out, const float* h0,
                                 const float* c0, Cell0Weights weights, bool relu,
                                 CellActivation activation, float* h_new, float* c_new,
                                 Cell0Saved saved, cudaStream_t stream) {
  const FusedForwardParams p{layout, hidden, x, identity, out, h0, c0, weights,
                             relu, activation, h_new, c_new, saved};
  return dispatch_scalar_vec(kind, layout.vec, [&](auto scalar, auto vec) {
    using T = decltype(scalar);
    constexpr int VEC = decltype(vec)::value;
    const size_t smem = sizeof(float) * fused_forward_smem_floats(layout.channels, hidden, VEC);
    DIA_FUSED_LAUNCH(layout.n, kFusedThreads, smem, stream, fused_forward_kernel<T, VEC>)(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_pool(ScalarKind kind, const MapLayout& layout, FeatureMap x, float* pooled,
                        float* partials, cudaStream_t stream) {
  const int splits = map_reduce_splits(layout);
  const int split_rows = map_split_rows(layout, splits);
  const cudaError_t err = dispatch_scalar_vec(kind, layout.vec, [&](auto scalar, auto vec) {
    using T = decltype(scalar);
    constexpr int VEC = decltype(vec)::value;
    DIA_FUSED_LAUNCH(stream_grid(layout, PoolOp<T, VEC>::kUnroll, splits), kStreamThreads, 0, stream,
                     pool_kernel<T, VEC>)(layout, x, split_rows, pooled, partials);
    return cudaGetLastError();
  });
  if (err != cudaSuccess || splits == 1) return err;
  return launch_sum_splits(splits, static_cast<int64_t>(layout.n) * layout.channels, partials,
                           1.0f / static_cast<float>(layout.hw), pooled, stream);
}

cudaError_t launch_cell0_forward(int n, int channels, int hidden, Cell0Saved saved,
                                 const float* h0, const float* c0, Cell0Weights weights,
                                 CellActivation activation, float* partials, float* h_new,
                                 float* c_new, cudaStream_t stream) {
  cudaError_t err = launch_reduced_linear(n, channels, hidden, saved.pooled, h0, weights,
                                          saved.hidden, partials, stream);
  if (err != cudaSuccess) return err;
  if ((err = launch_gate_gemm(n, channels, hidden, saved.hidden, weights, partials, stream)) !=
      cudaSuccess)
    return err;
  const GateForwardParams p{n,       channels,   gate_splits(hidden), partials, c0,
                            weights, activation, h_new,               c_new,   saved.gates};
  const int64_t size = static_cast<int64_t>(n) * channels;
  const unsigned blocks = static_cast<unsigned>((size + kStreamThreads - 1) / kStreamThreads);
  DIA_FUSED_LAUNCH(blocks, kStreamThreads, 0, stream, gate_forward_kernel)(p);
  return cudaGetLastError();
}

cudaError_t launch_scale_residual(ScalarKind kind, const MapLayout& layout, FeatureMap x,
                                  const float* attention, FeatureMap identity, FeatureMap out,
                                  bool relu, cudaStream_t stream) {
  const int splits = map_reduce_splits(layout);
  const int split_rows = map_split_rows(layout, splits);
  return dispatch_scalar_vec(kind, layout.vec, [&](auto scalar, auto vec) {
    using T = decltype(scalar);
    constexpr int VEC = decltype(vec)::value;
    DIA_FUSED_LAUNCH(stream_grid(layout, ScaleResidualOp<T, VEC>::kUnroll, splits), kStreamThreads,
                     0, stream, scale_residual_kernel<T, VEC>)(layout, split_rows, x, attention,
                                                               identity, out, relu);
    return cudaGetLastError();
  });
}

}  // namespace dia_fused
