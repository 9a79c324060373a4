// Host API of the fused DIA-LSTM step kernels (dia_step_forward.cu, dia_step_backward.cu).
//
// Plain C++ over raw device pointers and a cudaStream_t, so that the .cu files compile without
// torch headers (fast nvcc, CI compile check) and dia_step_bindings.cpp owns every torch concern:
// argument checks, allocation, the current stream, layout selection.
//
// Shapes: N samples, C channels, R = C / r hidden width of cell 0's reduced linears, HW = H * W.
// Every float* below is fp32 and contiguous; feature maps are FeatureMap views in the step's scalar
// type (float, bfloat16 or float16). Every launcher returns cudaGetLastError() after its launches
// (no synchronization: safe under CUDA-graph capture).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

// CellActivation, kFusedThreads, kFusedMaxChannels: generated from dia_fused/kernels/cuda_build.py
#include "dia_step_constants.h"

namespace dia_fused {

enum class ScalarKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// A (N, C, H, W) feature map whose H and W collapse into one axis: element (n, c, hw) is at
// data + n * stride_n + c * stride_c + hw * stride_hw (in elements).
// Contiguous: (C*HW, HW, 1); channels_last: (HW*C, 1, C); expanded (broadcast) maps have 0 strides.
struct FeatureMap {
  void* data;  // (N, C, H, W) in the step's scalar type; nullptr for an absent optional map
  int64_t stride_n;
  int64_t stride_c;
  int64_t stride_hw;
};

// How the streaming kernels walk the feature maps of one call (chosen by the bindings from x).
struct MapLayout {
  int n;                // N
  int channels;         // C
  int hw;               // H * W
  bool channels_inner;  // true: walk rows of C channels per (n, hw) (channels_last);
                        // false: walk planes of HW per (n, c) (contiguous)
  int vec;              // elements per access: 16 / sizeof(scalar) when every map of the call is
                        // contiguous and 16-byte aligned along the inner axis, else 1
};

// Collapses H and W of a (N, C, H, W) map with `sizes` and `strides` (elements) into one axis;
// false when they do not collapse (stride(2) != W * stride(3) with H, W > 1). A size-1 axis gets
// stride 0, so that its meaningless stride never blocks the vectorized walk.
inline bool make_feature_map(void* data, const int64_t sizes[4], const int64_t strides[4],
                             FeatureMap* map) {
  int64_t stride_hw = 0;
  if (sizes[2] > 1 && sizes[3] > 1) {
    if (strides[2] != sizes[3] * strides[3]) return false;
    stride_hw = strides[3];
  } else if (sizes[2] > 1) {
    stride_hw = strides[2];
  } else if (sizes[3] > 1) {
    stride_hw = strides[3];
  }
  *map = FeatureMap{data, sizes[0] > 1 ? strides[0] : 0, sizes[1] > 1 ? strides[1] : 0, stride_hw};
  return true;
}

// The walk order follows x (channels inner when x is channels_last); accesses are 16 bytes wide
// when every map of the call (those with data) is contiguous along the inner axis, its other
// strides and the inner extent are multiples of the vector, and its data is 16-byte aligned.
inline MapLayout choose_map_layout(const int64_t x_sizes[4], const FeatureMap& x,
                                   const FeatureMap* maps, int num_maps, int element_size) {
  MapLayout layout;
  layout.n = static_cast<int>(x_sizes[0]);
  layout.channels = static_cast<int>(x_sizes[1]);
  layout.hw = static_cast<int>(x_sizes[2] * x_sizes[3]);
  layout.channels_inner = x.stride_c == 1 && x.stride_hw != 1;
  const int vec = 16 / element_size;
  const int64_t inner_size = layout.channels_inner ? layout.channels : layout.hw;
  bool vectorize = inner_size % vec == 0;
  for (int i = 0; i < num_maps; ++i) {
    const FeatureMap& m = maps[i];
    if (m.data == nullptr) continue;
    const int64_t inner = layout.channels_inner ? m.stride_c : m.stride_hw;
    const int64_t outer = layout.channels_inner ? m.stride_hw : m.stride_c;
    vectorize = vectorize && inner == 1 && outer % vec == 0 && m.stride_n % vec == 0 &&
                reinterpret_cast<uintptr_t>(m.data) % 16 == 0;
  }
  layout.vec = vectorize ? vec : 1;
  return layout;
}

// Cell 0 of the DIA-LSTM (official names w_ih.0.seq.{0,2}, w_hh.0.seq.{0,2}), fp32, contiguous.
struct Cell0Weights {
  const float* wih1;  // (R, C)   w_ih.0.seq.0.weight
  const float* bih1;  // (R)      w_ih.0.seq.0.bias
  const float* wih2;  // (4C, R)  w_ih.0.seq.2.weight, rows in i, f, g, o order
  const float* bih2;  // (4C)     w_ih.0.seq.2.bias
  const float* whh1;  // (R, C)   w_hh.0.seq.0.weight
  const float* bhh1;  // (R)      w_hh.0.seq.0.bias
  const float* whh2;  // (4C, R)  w_hh.0.seq.2.weight
  const float* bhh2;  // (4C)     w_hh.0.seq.2.bias
};

// Gradients of Cell0Weights, same shapes, fp32, contiguous; fully overwritten.
struct Cell0WeightGrads {
  float* wih1;  // (R, C)
  float* bih1;  // (R)
  float* wih2;  // (4C, R)
  float* bih2;  // (4C)
  float* whh1;  // (R, C)
  float* bhh1;  // (R)
  float* whh2;  // (4C, R)
  float* bhh2;  // (4C)
};

// What the forward saves of cell 0 for the backward, one fp32 buffer of cell0_saved_floats
// floats: the backward reads the gates instead of recomputing them from the weights (a second
// pass over every weight per sample).
struct Cell0Saved {
  float* pooled;  // (N, C)    mean of x over H, W
  float* hidden;  // (2, N, R) u = relu(W1 v + b1) of the ih (v = pooled) and hh (v = h0) paths
  float* gates;   // (N, 4C)   gate pre-activations, biases included, i, f, g, o blocks of C
};

inline int64_t cell0_saved_floats(int64_t n, int64_t channels, int64_t hidden) {
  return n * (5 * channels + 2 * hidden);
}

// The pieces of a Cell0Saved buffer, in the order above.
inline Cell0Saved cell0_saved(float* base, int64_t n, int64_t channels, int64_t hidden) {
  return Cell0Saved{base, base + n * channels, base + n * (channels + 2 * hidden)};
}

// Per-sample intermediates of the cell-0 backward, read (with Cell0Saved's pooled and u) by the
// deterministic weight-grad GEMMs.
struct Cell0Workspace {
  float* grad_hidden;  // (2, N, R) d loss / d(W1 v + b1): relu-masked gradient of u
  float* grad_gates;   // (N, 4C)   d loss / d gates (pre-activation), i, f, g, o blocks of C
  float* hidden_partials;  // (cell0_partials_floats(N, C, R)) split-K partial sums of the split
                           // path's phases, one phase at a time: du = grad_gates @ W2
                           // (hidden_grad_splits(C), 2, N, R), d pooled and d h0
                           // (input_grad_splits(R), 2, N, C); unused by the fused path
};

// Chunks of K = 4C that the split path's hidden-gradient GEMM spreads over blocks.
inline int hidden_grad_splits(int channels) {
  return (4 * channels + kHiddenGradSplitK - 1) / kHiddenGradSplitK;
}

// Chunks of K = C that the split path's reduced linears spread over blocks.
inline int reduced_linear_splits(int channels) {
  return (channels + kReducedLinearSplitK - 1) / kReducedLinearSplitK;
}

// Partial sums of the split path's gate GEMMs: 2 paths x chunks of K = R.
inline int gate_splits(int hidden) { return 2 * ((hidden + kGateSplitK - 1) / kGateSplitK); }

// Chunks of K = R that the split path's input gradients (d pooled, d h0) spread over blocks.
inline int input_grad_splits(int hidden) {
  return (hidden + kInputGradSplitK - 1) / kInputGradSplitK;
}

// Floats of Cell0Workspace::hidden_partials and of the split forward's partial sums.
inline int64_t cell0_partials_floats(int64_t n, int channels, int hidden) {
  const int64_t rows = 2 * n * hidden;
  const int splits = hidden_grad_splits(channels) > reduced_linear_splits(channels)
                         ? hidden_grad_splits(channels)
                         : reduced_linear_splits(channels);
  const int64_t k_sums = splits > 1 ? splits * rows : 0;
  const int64_t gate_sums = gate_splits(hidden) * n * 4 * channels;
  const int64_t input_sums =
      input_grad_splits(hidden) > 1 ? input_grad_splits(hidden) * 2 * n * channels : 0;
  const int64_t most = k_sums > gate_sums ? k_sums : gate_sums;
  return most > input_sums ? most : input_sums;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// One kernel, one block per sample: pool -> cell 0 -> out = relu?(x * a + identity).
// Needs C <= kFusedMaxChannels and 2R <= kFusedThreads (num_cells == 1).
cudaError_t launch_fused_forward(ScalarKind kind, const MapLayout& layout, int hidden,
                                 FeatureMap x,         // (N, C, H, W) input
                                 FeatureMap identity,  // (N, C, H, W) shortcut, data nullptr if none
                                 FeatureMap out,       // (N, C, H, W) output
                                 const float* h0,      // (N, C) previous hidden state of cell 0
                                 const float* c0,      // (N, C) previous cell state of cell 0
                                 Cell0Weights weights, bool relu, CellActivation activation,
                                 float* h_new,  // (N, C) new hidden state of cell 0 (= attention a)
                                 float* c_new,  // (N, C) new cell state of cell 0
                                 Cell0Saved saved,  // written
                                 cudaStream_t stream);

// Blocks along H*W of the streaming passes: channels_last maps with few (sample, channel tile)
// blocks split H*W until about kMapReduceMinBlocks blocks stream. In the reductions (pool, grad
// attention) each block writes its partial sums and a second launch adds them in split order (the
// same bits every run, no atomics). 1 for NCHW maps (one lane group per plane fills the GPU).
int map_reduce_splits(const MapLayout& layout);

// pooled = mean over H, W of x.
cudaError_t launch_pool(ScalarKind kind, const MapLayout& layout,
                        FeatureMap x,     // (N, C, H, W)
                        float* pooled,    // (N, C)
                        float* partials,  // (map_reduce_splits(layout), N, C) workspace; unused
                                          // (may be nullptr) when that is 1
                        cudaStream_t stream);

// Cell 0 of the LSTM over tiles of samples: the reduced linears (split K = C, then their sum),
// the 4C-wide expansion split over paths and K = R chunks, then the LSTM pointwise math adding
// the chunks in order. Reads saved.pooled, writes saved.hidden and saved.gates.
cudaError_t launch_cell0_forward(int n, int channels, int hidden,
                                 Cell0Saved saved,
                                 const float* h0,  // (N, C)
                                 const float* c0,  // (N, C)
                                 Cell0Weights weights, CellActivation activation,
                                 float* partials,  // (cell0_partials_floats(N, C, R)) split-K sums
                                 float* h_new,     // (N, C)
                                 float* c_new,     // (N, C)
                                 cudaStream_t stream);

// out = relu?(x * attention + identity).
cudaError_t launch_scale_residual(ScalarKind kind, const MapLayout& layout,
                                  FeatureMap x,             // (N, C, H, W)
                                  const float* attention,   // (N, C)
                                  FeatureMap identity,      // (N, C, H, W), data nullptr if none
                                  FeatureMap out,           // (N, C, H, W)
                                  bool relu, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Backward. z = grad_out * (out > 0 if relu else 1).
// ---------------------------------------------------------------------------------------------

// Two launches: one block per sample (da, cell-0 backward, dx, grad_identity), then the weight
// grads. Same limits as launch_fused_forward.
cudaError_t launch_fused_backward(ScalarKind kind, const MapLayout& layout, int hidden,
                                  FeatureMap grad_out,       // (N, C, H, W)
                                  FeatureMap x,              // (N, C, H, W)
                                  FeatureMap out,            // (N, C, H, W) forward output (relu mask)
                                  FeatureMap grad_x,         // (N, C, H, W) written
                                  FeatureMap grad_identity,  // (N, C, H, W) written = z, or nullptr
                                  const float* grad_h_new,   // (N, C) or nullptr (zero)
                                  const float* grad_c_new,   // (N, C) or nullptr (zero)
                                  Cell0Saved saved,          // by the forward; read only
                                  const float* h0,           // (N, C)
                                  const float* c0,           // (N, C)
                                  Cell0Weights weights, bool relu, CellActivation activation,
                                  float* grad_h0,  // (N, C) written
                                  float* grad_c0,  // (N, C) written
                                  Cell0WeightGrads weight_grads, Cell0Workspace ws,
                                  cudaStream_t stream);

// grad_attention = sum over H, W of z * x; grad_identity = z (when not nullptr).
cudaError_t launch_grad_attention(ScalarKind kind, const MapLayout& layout,
                                  FeatureMap grad_out,       // (N, C, H, W)
                                  FeatureMap x,              // (N, C, H, W)
                                  FeatureMap out,            // (N, C, H, W) (read only when relu)
                                  FeatureMap grad_identity,  // (N, C, H, W) written, or nullptr
                                  bool relu,
                                  float* grad_attention,     // (N, C) written
                                  float* partials,  // (map_reduce_splits(layout), N, C) workspace;
                                                    // unused (may be nullptr) when that is 1
                                  cudaStream_t stream);

// Cell-0 backward over tiles of samples, from the forward's saved gates: pointwise backward,
// d hidden, d inputs (each split-K GEMM with its in-order finish), weight grads.
// grad_h_new + grad_h_extra is the gradient reaching cell 0's new hidden state.
cudaError_t launch_cell0_backward(int n, int channels, int hidden, int hw,
                                  Cell0Saved saved,           // by the forward; read only
                                  const float* h0,            // (N, C)
                                  const float* c0,            // (N, C)
                                  Cell0Weights weights, CellActivation activation,
                                  const float* grad_h_new,    // (N, C) or nullptr
                                  const float* grad_h_extra,  // (N, C) or nullptr
                                  const float* grad_c_new,    // (N, C) or nullptr
                                  float* grad_pooled_over_hw,  // (N, C) written: d pooled / (H*W)
                                  float* grad_h0,              // (N, C) written
                                  float* grad_c0,              // (N, C) written
                                  float* h_new,                // (N, C) written: h of cell 0
                                  Cell0WeightGrads weight_grads, Cell0Workspace ws,
                                  cudaStream_t stream);

// grad_x = z * attention + grad_pooled_over_hw.
cudaError_t launch_grad_input(ScalarKind kind, const MapLayout& layout,
                              FeatureMap grad_out,                // (N, C, H, W)
                              FeatureMap out,                     // (N, C, H, W) (read when relu)
                              const float* attention,             // (N, C)
                              const float* grad_pooled_over_hw,   // (N, C)
                              FeatureMap grad_x,                  // (N, C, H, W) written
                              bool relu, cudaStream_t stream);

}  // namespace dia_fused
