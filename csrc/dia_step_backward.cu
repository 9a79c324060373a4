// Backward of the fused DIA-LSTM step, cell 0 (docs/design.md §1, §2):
//   z = grad_out * (out > 0 if relu);  grad_identity = z;  da = sum_HW z * x
//   LSTM backward from the forward's saved u and gate pre-activations, dh = grad_h_new + da:
//     d gates -> d u (relu-masked) -> d pooled, d h0;  d c0;  weight grads = sums over samples
//   grad_x = z * a + d pooled / HW
//
// Two paths (chosen by the bindings):
//   fused (C <= kFusedMaxChannels, one cell): 2 launches: one block per sample (everything but
//          the weight grads), then the weight-grad GEMMs.
//   split (any C): grad_attention, pointwise backward, d hidden, d inputs (each GEMM with its
//          split-K finish where K is split), weight grads, grad_input.
// Weight grads are reductions over samples done by GEMM tiles, one thread per output element in a
// fixed order: deterministic, no atomics.
#include "dia_step_common.cuh"

namespace dia_fused {
namespace detail {
namespace {

// grad_hidden[o], o = path * R + j: (hidden[o] > 0) * sum_r grad_gates[r] * W2_path[r, j], r < 4C.
// The 2R outputs are split over `parts` ranges of gate rows to keep the block busy; the partial
// sums are added in part order. Needs 2R <= blockDim.x; scratch: blockDim.x floats. Barrier inside.
__device__ void sample_hidden_grad(const Cell0Weights& w, const float* grad_gates,
                                   const float* hidden, int channels, int hidden_size,
                                   float* scratch, float* grad_hidden) {
  const int outs = 2 * hidden_size;
  const int parts = static_cast<int>(blockDim.x) / outs;
  const int rows = 4 * channels;
  const int rows_per_part = (rows + parts - 1) / parts;
  const int t = threadIdx.x;
  if (t < parts * outs) {
    const int o = t % outs, part = t / outs;
    const bool hh = o >= hidden_size;
    const int j = hh ? o - hidden_size : o;
    const float* w2 = hh ? w.whh2 : w.wih2;
    const int r_end = min(rows, (part + 1) * rows_per_part);
    float acc = 0.0f;
    for (int r = part * rows_per_part; r < r_end; ++r)
      acc = fmaf(grad_gates[r], w2[static_cast<int64_t>(r) * hidden_size + j], acc);
    scratch[t] = acc;
  }
  __syncthreads();
  for (int o = t; o < outs; o += blockDim.x) {
    float total = 0.0f;
    for (int part = 0; part < parts; ++part) total += scratch[part * outs + o];
    grad_hidden[o] = hidden[o] > 0.0f ? total : 0.0f;
  }
}

struct FusedBackwardParams {
  MapLayout layout;           // N, C, HW and the walk order of the maps
  int hidden;                 // R
  FeatureMap grad_out;        // (N, C, H, W)
  FeatureMap x;               // (N, C, H, W)
  FeatureMap out;             // (N, C, H, W) forward output (relu mask)
  FeatureMap grad_x;          // (N, C, H, W)
  FeatureMap grad_identity;   // (N, C, H, W); data nullptr when not wanted
  const float* grad_h_new;    // (N, C) or nullptr
  const float* grad_c_new;    // (N, C) or nullptr
  Cell0Saved saved;           // by the forward: u and the gate pre-activations are read
  const float* c0;            // (N, C)
  Cell0Weights weights;       // shapes in dia_step.h
  bool relu;
  CellActivation activation;
  float* grad_h0;             // (N, C)
  float* grad_c0;             // (N, C)
  Cell0Workspace ws;          // (2, N, R), (2, N, R), (N, 4C): inputs of the weight-grad GEMMs
};

// Floats of dynamic shared memory of fused_backward_kernel.
int fused_backward_smem_floats(int channels, int hidden, int vec) {
  return 3 * channels + 4 * hidden + 4 * channels + kFusedThreads * vec;
}

// grid (N), block (kFusedThreads): block n does everything of sample n but the weight grads.
template <class T, int VEC>
__global__ void __launch_bounds__(kFusedThreads, 1) fused_backward_kernel(const FusedBackwardParams p) {
  DIA_FUSED_DYNAMIC_SMEM(smem);
  const int C = p.layout.channels, R = p.hidden, HW = p.layout.hw;
  float* grad_attention = smem;              // (C) da
  float* attention = grad_attention + C;     // (C) h of cell 0
  float* grad_pooled = attention + C;        // (C) d pooled / HW
  float* hidden = grad_pooled + C;           // (2R) u_ih, u_hh
  float* grad_hidden = hidden + 2 * R;       // (2R)
  float* gates = grad_hidden + 2 * R;        // (4C) pre-activations, then their grads
  float* scratch = gates + 4 * C;            // (kFusedThreads * VEC)
  const int64_t n = blockIdx.x;

  // da = sum_HW z * x (and grad_identity = z)
  const GradAttentionOp<T, VEC> grad_att{p.grad_out, p.x, p.out, p.grad_identity, p.relu};
  if (p.layout.channels_inner) {
    block_rows_reduce<VEC>(grad_att, n, 0, C, 0, HW, fused_row_lanes(C, VEC), scratch,
                           grad_attention, 1.0f);
  } else {
    block_planes_reduce<VEC>(grad_att, n, C, HW, grad_attention, 1.0f);
  }
  for (int o = threadIdx.x; o < 2 * R; o += blockDim.x) {
    hidden[o] = p.saved.hidden[cell0_hidden_index(o, n, p.layout.n, R)];
  }
  for (int r = threadIdx.x; r < 4 * C; r += blockDim.x) gates[r] = p.saved.gates[n * 4 * C + r];
  __syncthreads();

  // pointwise backward: gates[] becomes d gates
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float gate[4] = {gates[c], gates[C + c], gates[2 * C + c], gates[3 * C + c]};
    const float grad_h = grad_attention[c] + (p.grad_h_new != nullptr ? p.grad_h_new[n * C + c] : 0.0f);
    const float grad_c = p.grad_c_new != nullptr ? p.grad_c_new[n * C + c] : 0.0f;
    float h;
    p.grad_c0[n * C + c] = lstm_cell_backward(gate, p.c0[n * C + c], grad_h, grad_c, p.activation, &h);
    attention[c] = h;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      gates[q * C + c] = gate[q];
      p.ws.grad_gates[n * 4 * C + q * C + c] = gate[q];
    }
  }
  __syncthreads();

  sample_hidden_grad(p.weights, gates, hidden, C, R, scratch, grad_hidden);
  for (int o = threadIdx.x; o < 2 * R; o += blockDim.x) {
    p.ws.grad_hidden[cell0_hidden_index(o, n, p.layout.n, R)] = grad_hidden[o];
  }
  __syncthreads();

  // d pooled (/ HW) and d h0: sum_j grad_hidden_path[j] * W1_path[j, c]
  const float inv_hw = 1.0f / static_cast<float>(HW);
  for (int o = threadIdx.x; o < 2 * C; o += blockDim.x) {
    const bool hh = o >= C;
    const int c = hh ? o - C : o;
    const float* w1 = hh ? p.weights.whh1 : p.weights.wih1;
    const float* g = grad_hidden + (hh ? R : 0);
    float acc = 0.0f;
    for (int j = 0; j < R; ++j) acc = fmaf(g[j], w1[static_cast<int64_t>(j) * C + c], acc);
    if (hh) {
      p.grad_h0[n * C + c] = acc;
    } else {
      grad_pooled[c] = acc * inv_hw;
    }
  }
  __syncthreads();

  // grad_x = z * a + d pooled / HW
  const GradInputOp<T, VEC> grad_in{p.grad_out, p.out, p.grad_x, p.relu};
  if (p.layout.channels_inner) {
    block_rows_apply<VEC>(grad_in, n, 0, C, 0, HW, fused_row_lanes(C, VEC), attention, grad_pooled);
  } else {
    block_planes_apply<VEC>(grad_in, n, C, HW, attention, grad_pooled);
  }
}

// grid stream_grid(layout, kUnroll, splits), block (kStreamThreads); splits as in pool_kernel.
template <class T, int VEC>
__global__ void __launch_bounds__(kStreamThreads)
grad_attention_kernel(const MapLayout layout,          // N, C, HW, walk order
                      const FeatureMap grad_out,       // (N, C, H, W)
                      const FeatureMap x,              // (N, C, H, W)
                      const FeatureMap out,            // (N, C, H, W) (read when relu)
                      const FeatureMap grad_identity,  // (N, C, H, W); data nullptr if not wanted
                      bool relu,
                      int split_rows,                  // rows of H*W per block along grid axis z
                      float* grad_attention,           // (N, C), written when gridDim.z == 1
                      float* partials) {               // (gridDim.z, N, C), when gridDim.z > 1
  __shared__ float scratch[kStreamThreads * VEC];
  stream_reduce<VEC>(GradAttentionOp<T, VEC>{grad_out, x, out, grad_identity, relu}, layout,
                     split_rows, 1.0f, grad_attention, partials, scratch);
}

// grid stream_grid(layout, kUnroll, splits), block (kStreamThreads): the H*W splits of
// grad_attention_kernel (channels inner), without partial sums.
template <class T, int VEC>
__global__ void __launch_bounds__(kStreamThreads)
grad_input_kernel(const MapLayout layout,             // N, C, HW, walk order
                  int split_rows,                     // rows of H*W per block along grid axis z
                  const FeatureMap grad_out,          // (N, C, H, W)
                  const FeatureMap out,               // (N, C, H, W) (read when relu)
                  const float* attention,             // (N, C)
                  const float* grad_pooled_over_hw,   // (N, C)
                  const FeatureMap grad_x,            // (N, C, H, W)
                  bool relu) {
  stream_apply<VEC>(GradInputOp<T, VEC>{grad_out, out, grad_x, relu}, layout, split_rows,
                    attention, grad_pooled_over_hw);
}

struct GateBackwardParams {
  int n, channels;            // N, C
  const float* gates;         // (N, 4C) pre-activations saved by the forward
  const float* c0;            // (N, C)
  CellActivation activation;
  const float* grad_h_new;    // (N, C) or nullptr
  const float* grad_h_extra;  // (N, C) or nullptr (da when cell 0 is the last cell)
  const float* grad_c_new;    // (N, C) or nullptr
  float* grad_gates;          // (N, 4C)
  float* grad_c0;             // (N, C)
  float* h_new;               // (N, C) h of cell 0 (from the saved gates)
};

// grid (ceil(N * C / kStreamThreads)), block (kStreamThreads): the LSTM pointwise backward of
// one (sample, channel) per thread.
__global__ void __launch_bounds__(kStreamThreads) gate_backward_kernel(const GateBackwardParams p) {
  const int C = p.channels;
  const int64_t at = static_cast<int64_t>(blockIdx.x) * kStreamThreads + threadIdx.x;
  if (at >= static_cast<int64_t>(p.n) * C) return;
  const int64_t m = at / C;
  const int c = static_cast<int>(at % C);
  float gate[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) gate[q] = p.gates[m * 4 * C + q * C + c];
  const float grad_h = (p.grad_h_new != nullptr ? p.grad_h_new[at] : 0.0f) +
                       (p.grad_h_extra != nullptr ? p.grad_h_extra[at] : 0.0f);
  const float grad_c = p.grad_c_new != nullptr ? p.grad_c_new[at] : 0.0f;
  float h;
  p.grad_c0[at] = lstm_cell_backward(gate, p.c0[at], grad_h, grad_c, p.activation, &h);  // gate -> grads
  p.h_new[at] = h;
#pragma unroll
  for (int q = 0; q < 4; ++q) p.grad_gates[m * 4 * C + q * C + c] = gate[q];
}

struct HiddenGradParams {
  int n, channels, hidden;   // N, C, R
  int splits;                // chunks of K = 4C, one block each (blockIdx.z / 2)
  const float* grad_gates;   // (N, 4C)
  const float* hidden_in;    // (2, N, R) u (relu mask)
  Cell0Weights weights;      // W2 (4C, R) of both paths are read
  float* grad_hidden;        // (2, N, R), written when splits == 1
  float* partials;           // (splits, 2, N, R), written when splits > 1
};

// grid (ceil(R / kN), ceil(N / kM), 2 paths x splits), block (GemmTile::kThreads):
// grad_hidden_p = (u_p > 0) * (grad_gates @ W2_p), K = 4C in `splits` chunks of
// kHiddenGradSplitK; with several chunks each block writes its chunk's partial product and
// hidden_grad_finish_kernel adds them in chunk order (deterministic, no atomics).
__global__ void __launch_bounds__(GemmTile::kThreads) hidden_grad_kernel(const HiddenGradParams p) {
  __shared__ GemmSmem smem;
  const bool hh = (blockIdx.z % 2) == 1;
  const int split = static_cast<int>(blockIdx.z) / 2;
  const int k_begin = split * kHiddenGradSplitK;
  const int k_size = min(4 * p.channels - k_begin, kHiddenGradSplitK);
  const int m0 = static_cast<int>(blockIdx.y) * GemmTile::kM;
  const int n0 = static_cast<int>(blockIdx.x) * GemmTile::kN;
  const float* w2 = hh ? p.weights.whh2 : p.weights.wih2;
  const StridedLoad a{p.grad_gates + k_begin, 4 * p.channels, 1};                // A(n, r)
  const StridedLoad b{w2 + static_cast<int64_t>(k_begin) * p.hidden, p.hidden, 1};  // B(r, j)
  float acc[GemmTile::kTM][GemmTile::kTN];
  gemm_zero(acc);
  gemm_tile_accumulate<true, false>(acc, a, b, m0, n0, p.n, p.hidden, k_size, smem);
  const int64_t path = hh ? static_cast<int64_t>(p.n) * p.hidden : 0;
  const int64_t part = static_cast<int64_t>(split) * 2 * p.n * p.hidden;
  gemm_tile_store(acc, m0, n0, p.n, p.hidden, [&](int m, int col, float v) {
    const int64_t at = path + static_cast<int64_t>(m) * p.hidden + col;
    if (p.splits == 1) {
      p.grad_hidden[at] = p.hidden_in[at] > 0.0f ? v : 0.0f;
    } else {
      p.partials[part + at] = v;
    }
  });
}

// grid (ceil(2NR / kStreamThreads)), block (kStreamThreads): grad_hidden = (u > 0) * the sum of
// the split-K partials, in chunk order.
__global__ void __launch_bounds__(kStreamThreads) hidden_grad_finish_kernel(const HiddenGradParams p) {
  const int64_t size = 2 * static_cast<int64_t>(p.n) * p.hidden;
  const int64_t at = static_cast<int64_t>(blockIdx.x) * kStreamThreads + threadIdx.x;
  if (at >= size) return;
  const float total = sum_in_order(p.partials, p.splits, size, at);
  p.grad_hidden[at] = p.hidden_in[at] > 0.0f ? total : 0.0f;
}

struct InputGradParams {
  int n, channels, hidden, hw;  // N, C, R, H * W
  int splits;                   // chunks of K = R, one block each (blockIdx.z / 2)
  const float* grad_hidden;     // (2, N, R)
  Cell0Weights weights;         // W1 (R, C) of both paths are read
  float* grad_pooled_over_hw;   // (N, C) ih path, divided by HW
  float* grad_h0;               // (N, C) hh path
  float* partials;              // (splits, 2, N, C) chunk sums (splits > 1)
};

// d pooled / HW (path 0) or d h0 (path 1) of element `at` of the (2, N, C) pair, given its sum.
__device__ __forceinline__ void store_input_grad(const InputGradParams& p, int64_t at, float v) {
  const int64_t path_size = static_cast<int64_t>(p.n) * p.channels;
  if (at >= path_size) {
    p.grad_h0[at - path_size] = v;
  } else {
    p.grad_pooled_over_hw[at] = v * (1.0f / static_cast<float>(p.hw));
  }
}

// grid (ceil(C / kN), ceil(N / kM), 2 paths x splits), block (GemmTile::kThreads):
// d pooled = grad_hidden_ih @ Wih1, d h0 = grad_hidden_hh @ Whh1, K = R in chunks of
// kInputGradSplitK; with several chunks each block writes its chunk's partial product and
// input_grad_finish_kernel adds them in chunk order (deterministic, no atomics).
__global__ void __launch_bounds__(GemmTile::kThreads) input_grad_kernel(const InputGradParams p) {
  __shared__ GemmSmem smem;
  const bool hh = (blockIdx.z % 2) == 1;
  const int split = static_cast<int>(blockIdx.z) / 2;
  const int k_begin = split * kInputGradSplitK;
  const int k_size = min(p.hidden - k_begin, kInputGradSplitK);
  const int m0 = static_cast<int>(blockIdx.y) * GemmTile::kM;
  const int n0 = static_cast<int>(blockIdx.x) * GemmTile::kN;
  const StridedLoad a{p.grad_hidden + (hh ? static_cast<int64_t>(p.n) * p.hidden : 0) + k_begin,
                      p.hidden, 1};
  const StridedLoad b{(hh ? p.weights.whh1 : p.weights.wih1) + static_cast<int64_t>(k_begin) * p.channels,
                      p.channels, 1};  // B(j, c) = W1[k_begin + j, c]
  float acc[GemmTile::kTM][GemmTile::kTN];
  gemm_zero(acc);
  gemm_tile_accumulate<true, false>(acc, a, b, m0, n0, p.n, p.channels, k_size, smem);
  const int64_t path = hh ? static_cast<int64_t>(p.n) * p.channels : 0;
  const int64_t part = static_cast<int64_t>(split) * 2 * p.n * p.channels;
  gemm_tile_store(acc, m0, n0, p.n, p.channels, [&](int m, int col, float v) {
    const int64_t at = path + static_cast<int64_t>(m) * p.channels + col;
    if (p.splits == 1) {
      store_input_grad(p, at, v);
    } else {
      p.partials[part + at] = v;
    }
  });
}

// grid (ceil(2NC / kStreamThreads)), block (kStreamThreads): d pooled / HW and d h0 from the
// split-K partials, added in chunk order.
__global__ void __launch_bounds__(kStreamThreads) input_grad_finish_kernel(const InputGradParams p) {
  const int64_t size = 2 * static_cast<int64_t>(p.n) * p.channels;
  const int64_t at = static_cast<int64_t>(blockIdx.x) * kStreamThreads + threadIdx.x;
  if (at >= size) return;
  const float total = sum_in_order(p.partials, p.splits, size, at);
  store_input_grad(p, at, total);
}

// One weight-grad GEMM: W[m, j] = sum_s A[s, m] * B[s, j] for j < cols, bias[m] = sum_s A[s, m].
struct WeightGradProblem {
  const float* a;    // (N, rows): d gates (N, 4C) or d hidden (N, R) of one path
  const float* b;    // (N, cols): u (N, R) of one path, or its input pooled / h0 (N, C)
  int rows, cols;
  float* weight;     // (rows, cols)
  float* bias;       // (rows)
};

constexpr int kWeightGradProblems = 4;  // Wih2, Whh2, Wih1, Whh1 with their biases

struct WeightGradParams {
  int n;                                          // N: the reduction length
  WeightGradProblem problems[kWeightGradProblems];
  int col_tiles[kWeightGradProblems];             // tiles along cols + 1 (the bias column)
  int first_tile[kWeightGradProblems + 1];        // prefix sums of the problems' tile counts
};

// grid (total tiles of the 4 problems), block (GemmTile::kThreads): block b takes tile
// b - first_tile[p] of the problem p it falls in, row-major over (row tiles, col tiles).
__global__ void __launch_bounds__(GemmTile::kThreads) weight_grad_kernel(const WeightGradParams p) {
  __shared__ GemmSmem smem;
  const int block = static_cast<int>(blockIdx.x);
  int index = 0;
  while (block >= p.first_tile[index + 1]) ++index;
  const WeightGradProblem& problem = p.problems[index];
  const int tile = block - p.first_tile[index];
  const int m0 = (tile / p.col_tiles[index]) * GemmTile::kM;
  const int n0 = (tile % p.col_tiles[index]) * GemmTile::kN;
  const StridedLoad a{problem.a, 1, problem.rows};                  // A(m, s) = a[s, m]
  const OnesColumnLoad b{problem.b, problem.cols, problem.cols};    // B(s, j) = b[s, j] | 1
  float acc[GemmTile::kTM][GemmTile::kTN];
  gemm_zero(acc);
  gemm_tile_accumulate<false, false>(acc, a, b, m0, n0, problem.rows, problem.cols + 1, p.n, smem);
  // column `cols` is the virtual column of ones: its sums are the bias gradient
  gemm_tile_store(acc, m0, n0, problem.rows, problem.cols + 1, [&](int m, int col, float v) {
    if (col < problem.cols) {
      problem.weight[static_cast<int64_t>(m) * problem.cols + col] = v;
    } else {
      problem.bias[m] = v;
    }
  });
}

cudaError_t launch_weight_grads(int n, int channels, int hidden, const Cell0Saved& saved,
                                const float* h0, const Cell0Workspace& ws,
                                const Cell0WeightGrads& grads, cudaStream_t stream) {
  const int64_t path = static_cast<int64_t>(n) * hidden;
  WeightGradParams p;
  p.n = n;
  p.problems[0] = {ws.grad_gates, saved.hidden, 4 * channels, hidden, grads.wih2, grads.bih2};
  p.problems[1] = {ws.grad_gates, saved.hidden + path, 4 * channels, hidden, grads.whh2, grads.bhh2};
  p.problems[2] = {ws.grad_hidden, saved.pooled, hidden, channels, grads.wih1, grads.bih1};
  p.problems[3] = {ws.grad_hidden + path, h0, hidden, channels, grads.whh1, grads.bhh1};
  p.first_tile[0] = 0;
  for (int i = 0; i < kWeightGradProblems; ++i) {
    const int row_tiles = (p.problems[i].rows + GemmTile::kM - 1) / GemmTile::kM;
    p.col_tiles[i] = (p.problems[i].cols + 1 + GemmTile::kN - 1) / GemmTile::kN;
    p.first_tile[i + 1] = p.first_tile[i] + row_tiles * p.col_tiles[i];
  }
  DIA_FUSED_LAUNCH(p.first_tile[kWeightGradProblems], GemmTile::kThreads, 0, stream,
                   weight_grad_kernel)(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace detail

using namespace detail;

cudaError_t launch_fused_backward(ScalarKind kind, const MapLayout& layout, int hidden,
                                  FeatureMap grad_out, FeatureMap x, FeatureMap out,
                                  FeatureMap grad_x, FeatureMap grad_identity,
                                  const float* grad_h_new, const float* grad_c_new,
                                  Cell0Saved saved, const float* h0, const float* c0,
                                  Cell0Weights weights, bool relu, CellActivation activation,
                                  float* grad_h0, float* grad_c0, Cell0WeightGrads weight_grads,
                                  Cell0Workspace ws, cudaStream_t stream) {
  const FusedBackwardParams p{layout, hidden, grad_out, x, out, grad_x, grad_identity,
                              grad_h_new, grad_c_new, saved, c0, weights, relu,
                              activation, grad_h0, grad_c0, ws};
  const cudaError_t err = dispatch_scalar_vec(kind, layout.vec, [&](auto scalar, auto vec) {
    using T = decltype(scalar);
    constexpr int VEC = decltype(vec)::value;
    const size_t smem = sizeof(float) * fused_backward_smem_floats(layout.channels, hidden, VEC);
    DIA_FUSED_LAUNCH(layout.n, kFusedThreads, smem, stream, fused_backward_kernel<T, VEC>)(p);
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  return launch_weight_grads(layout.n, layout.channels, hidden, saved, h0, ws, weight_grads, stream);
}

cudaError_t launch_grad_attention(ScalarKind kind, const MapLayout& layout, FeatureMap grad_out,
                                  FeatureMap x, FeatureMap out, FeatureMap grad_identity,
                                  bool relu, float* grad_attention, float* partials,
                                  cudaStream_t stream) {
  const int splits = map_reduce_splits(layout);
  const int split_rows = map_split_rows(layout, splits);
  const cudaError_t err = dispatch_scalar_vec(kind, layout.vec, [&](auto scalar, auto vec) {
    using T = decltype(scalar);
    constexpr int VEC = decltype(vec)::value;
    DIA_FUSED_LAUNCH(stream_grid(layout, GradAttentionOp<T, VEC>::kUnroll, splits), kStreamThreads,
                     0, stream, grad_attention_kernel<T, VEC>)(layout, grad_out, x, out,
                                                               grad_identity, relu, split_rows,
                                                               grad_attention, partials);
    return cudaGetLastError();
  });
  if (err != cudaSuccess || splits == 1) return err;
  return launch_sum_splits(splits, static_cast<int64_t>(layout.n) * layout.channels, partials, 1.0f,
                           grad_attention, stream);
}

cudaError_t launch_cell0_backward(int n, int channels, int hidden, int hw, Cell0Saved saved,
                                  const float* h0, const float* c0, Cell0Weights weights,
                                  CellActivation activation, const float* grad_h_new,
                                  const float* grad_h_extra, const float* grad_c_new,
                                  float* grad_pooled_over_hw, float* grad_h0, float* grad_c0,
                                  float* h_new, Cell0WeightGrads weight_grads, Cell0Workspace ws,
                                  cudaStream_t stream) {
  const unsigned sample_tiles = (n + GemmTile::kM - 1) / GemmTile::kM;
  const GateBackwardParams gate{n,          channels,     saved.gates,   c0,      activation,
                                grad_h_new, grad_h_extra, grad_c_new,    ws.grad_gates,
                                grad_c0,    h_new};
  const int64_t cells = static_cast<int64_t>(n) * channels;
  const unsigned gate_blocks = static_cast<unsigned>((cells + kStreamThreads - 1) / kStreamThreads);
  DIA_FUSED_LAUNCH(gate_blocks, kStreamThreads, 0, stream, gate_backward_kernel)(gate);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int splits = hidden_grad_splits(channels);
  const HiddenGradParams hid{n,          channels,  hidden,         splits,
                             ws.grad_gates, saved.hidden, weights, ws.grad_hidden, ws.hidden_partials};
  const dim3 hidden_grid((hidden + GemmTile::kN - 1) / GemmTile::kN, sample_tiles, 2 * splits);
  DIA_FUSED_LAUNCH(hidden_grid, GemmTile::kThreads, 0, stream, hidden_grad_kernel)(hid);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (splits > 1) {
    const int64_t size = 2 * static_cast<int64_t>(n) * hidden;
    const unsigned finish_blocks = static_cast<unsigned>((size + kStreamThreads - 1) / kStreamThreads);
    DIA_FUSED_LAUNCH(finish_blocks, kStreamThreads, 0, stream, hidden_grad_finish_kernel)(hid);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }

  const int input_splits = input_grad_splits(hidden);
  const InputGradParams in{n,       channels,           hidden,  hw, input_splits, ws.grad_hidden,
                           weights, grad_pooled_over_hw, grad_h0, ws.hidden_partials};
  const dim3 input_grid((channels + GemmTile::kN - 1) / GemmTile::kN, sample_tiles, 2 * input_splits);
  DIA_FUSED_LAUNCH(input_grid, GemmTile::kThreads, 0, stream, input_grad_kernel)(in);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (input_splits > 1) {
    const int64_t size = 2 * static_cast<int64_t>(n) * channels;
    const unsigned finish_blocks = static_cast<unsigned>((size + kStreamThreads - 1) / kStreamThreads);
    DIA_FUSED_LAUNCH(finish_blocks, kStreamThreads, 0, stream, input_grad_finish_kernel)(in);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }

  return launch_weight_grads(n, channels, hidden, saved, h0, ws, weight_grads, stream);
}

cudaError_t launch_grad_input(ScalarKind kind, const MapLayout& layout, FeatureMap grad_out,
                              FeatureMap out, const float* attention,
                              const float* grad_pooled_over_hw, FeatureMap grad_x, bool relu,
                              cudaStream_t stream) {
  const int splits = map_reduce_splits(layout);
  const int split_rows = map_split_rows(layout, splits);
  return dispatch_scalar_vec(kind, layout.vec, [&](auto scalar, auto vec) {
    using T = decltype(scalar);
    constexpr int VEC = decltype(vec)::value;
    DIA_FUSED_LAUNCH(stream_grid(layout, GradInputOp<T, VEC>::kUnroll, splits), kStreamThreads, 0,
                     stream, grad_input_kernel<T, VEC>)(layout, split_rows, grad_out, out,
                                                        attention, grad_pooled_over_hw, grad_x,
                                                        relu);
    return cudaGetLastError();
  });
}

}  // namespace dia_fused
