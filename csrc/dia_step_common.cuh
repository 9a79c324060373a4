// Device building blocks shared by dia_step_forward.cu and dia_step_backward.cu:
// scalar conversion, the LSTM pointwise math, feature-map streaming passes, a small tiled SIMT GEMM
// and the per-sample LSTM pieces of the one-block-per-sample kernels.
//
// Determinism: every sum below is computed by one thread (or one fixed tree) in a fixed order;
// there are no float atomics anywhere.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dia_step.h"

// Hooks for python_tests/emulation, which compiles these kernels as host C++ and runs them on the
// CPU with emulated threads (it defines the macros first); on the GPU they are the plain CUDA forms.
#ifndef DIA_FUSED_LAUNCH
#define DIA_FUSED_LAUNCH(grid, block, smem_bytes, stream, ...) \
  __VA_ARGS__<<<(grid), (block), (smem_bytes), (stream)>>>
#endif
#ifndef DIA_FUSED_DYNAMIC_SMEM
#define DIA_FUSED_DYNAMIC_SMEM(name) extern __shared__ float name[]
#endif
#ifndef DIA_FUSED_CHECK_ALIGNED
#define DIA_FUSED_CHECK_ALIGNED(pointer, bytes) ((void)0)
#endif

namespace dia_fused {
namespace detail {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Threads per block of the multi-kernel streaming passes (pool, scale, grad_attention, grad_input).
constexpr int kStreamThreads = 256;
// Vector lanes along C per row in those passes when channels are the inner axis.
constexpr int kStreamRowLanes = 64;

// ---------------------------------------------------------------------------------------------
// Scalars
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive elements moved as one access (16 bytes when VEC * sizeof(T) == 16).
template <class T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <class T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  DIA_FUSED_CHECK_ALIGNED(p, sizeof(Pack<T, VEC>));
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <class T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const float (&v)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int e = 0; e < VEC; ++e) pack.v[e] = from_float<T>(v[e]);
  DIA_FUSED_CHECK_ALIGNED(p, sizeof(Pack<T, VEC>));
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

__device__ __forceinline__ int64_t map_offset(const FeatureMap& m, int64_t n, int c, int hw) {
  return n * m.stride_n + static_cast<int64_t>(c) * m.stride_c +
         static_cast<int64_t>(hw) * m.stride_hw;
}

// Sum over each aligned group of `lanes` lanes (a power of 2 up to a warp), in a fixed tree;
// every lane of the warp must call it.
__device__ __forceinline__ float group_sum(float v, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) { return group_sum(v, kWarpSize); }

// ---------------------------------------------------------------------------------------------
// LSTM pointwise math (fp32), gates in i, f, g, o order
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }

__device__ __forceinline__ float cell_act(float c, CellActivation act) {
  switch (act) {
    case CellActivation::kTanh: return tanhf(c);
    case CellActivation::kRelu: return fmaxf(c, 0.0f);
    default: return sigmoidf(c);
  }
}

// d act(c) / dc given c and act(c) (relu: 0 at c == 0, like torch).
__device__ __forceinline__ float cell_act_grad(float c, float act_c, CellActivation act) {
  switch (act) {
    case CellActivation::kTanh: return 1.0f - act_c * act_c;
    case CellActivation::kRelu: return c > 0.0f ? 1.0f : 0.0f;
    default: return act_c * (1.0f - act_c);
  }
}

struct CellState {
  float h;
  float c;
};

__device__ __forceinline__ CellState lstm_cell_forward(const float (&gate)[4], float c_prev,
                                                       CellActivation act) {
  const float i = sigmoidf(gate[0]), f = sigmoidf(gate[1]);
  const float g = tanhf(gate[2]), o = sigmoidf(gate[3]);
  CellState s;
  s.c = f * c_prev + i * g;
  s.h = o * cell_act(s.c, act);
  return s;
}

// Backward of lstm_cell_forward: overwrites gate[] (pre-activations) with their gradients,
// returns d c_prev; *h_out receives the recomputed h.
__device__ __forceinline__ float lstm_cell_backward(float (&gate)[4], float c_prev, float grad_h,
                                                    float grad_c, CellActivation act,
                                                    float* h_out) {
  const float i = sigmoidf(gate[0]), f = sigmoidf(gate[1]);
  const float g = tanhf(gate[2]), o = sigmoidf(gate[3]);
  const float c = f * c_prev + i * g;
  const float act_c = cell_act(c, act);
  *h_out = o * act_c;
  const float dc = grad_c + grad_h * o * cell_act_grad(c, act_c, act);
  gate[0] = dc * g * i * (1.0f - i);
  gate[1] = dc * c_prev * f * (1.0f - f);
  gate[2] = dc * i * (1.0f - g * g);
  gate[3] = grad_h * act_c * o * (1.0f - o);
  return dc * f;
}

// ---------------------------------------------------------------------------------------------
// Feature-map streaming passes.
//
// An op streams VEC consecutive elements along the inner axis per access; when VEC > 1 every map of
// the call is contiguous and 16-byte aligned along that axis (checked by the bindings), so element
// e of the access is at offset + e. Ops expose:
//   struct Regs;                      raw packs of one access (kept narrow: half types stay half)
//   load(Regs&, n, c, hw)             issue the loads
//   reduce(Regs&, acc, n, c, hw)      (reductions) acc[e] += term of element e; may also store
//   store(Regs&, p0, p1, n, c, hw)    (elementwise) write outputs given per-element channel
//                                     parameters p0[e], p1[e]
// Loads of UNROLL accesses are issued before their use so several are in flight per thread.
// ---------------------------------------------------------------------------------------------

// The load-ahead loop of every pass: positions first, first + stride, ... below `limit` of the
// plane or row (n, c); Op::kUnroll accesses are loaded before any is used, so several are in
// flight per thread; then visit(regs, position) for each.
template <class Op, class Visit>
__device__ __forceinline__ void stream_accesses(const Op& op, int64_t n, int c, int first, int limit,
                                                int stride, const Visit& visit) {
  constexpr int kUnroll = Op::kUnroll;
  for (int base = first; base < limit; base += stride * kUnroll) {
    typename Op::Regs regs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * stride < limit) op.load(regs[u], n, c, base + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * stride < limit) visit(regs[u], base + u * stride);
  }
}

// A group of `lanes` lanes (aligned, a power of 2 up to a warp) streams the plane (n, c)
// (channels outer); lane is the lane within the group. Returns the plane's sum in every lane of
// the group. Every lane of the warp must call it (shuffles); a lane with valid == false loads
// nothing and contributes 0.
template <int VEC, class Op>
__device__ __forceinline__ float plane_reduce(const Op& op, int64_t n, int c, int hw_size, int lane,
                                              int lanes, bool valid) {
  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
  if (valid) {
    stream_accesses(op, n, c, lane * VEC, hw_size, lanes * VEC,
                    [&](typename Op::Regs& regs, int hw) { op.reduce(regs, acc, n, c, hw); });
  }
  float total = 0.0f;
#pragma unroll
  for (int e = 0; e < VEC; ++e) total += acc[e];
  return group_sum(total, lanes);
}

// A group of `lanes` lanes streams the plane (n, c) writing outputs; p0, p1 are the channel's
// parameters.
template <int VEC, class Op>
__device__ __forceinline__ void plane_apply(const Op& op, int64_t n, int c, int hw_size, int lane,
                                            int lanes, float p0, float p1) {
  float p0v[VEC], p1v[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    p0v[e] = p0;
    p1v[e] = p1;
  }
  stream_accesses(op, n, c, lane * VEC, hw_size, lanes * VEC,
                  [&](typename Op::Regs& regs, int hw) { op.store(regs, p0v, p1v, n, c, hw); });
}

// Rows [hw_begin, hw_end) of sample n (channels inner), channels [c_begin, c_end) with
// c_end - c_begin <= lanes * VEC: thread t takes channel vector (t % lanes) of every
// (t / lanes)-th row. Threads past the last full group of `lanes` idle. All threads of the block
// must call (barriers inside). out[j] = scale * sum over those rows of the terms of channel
// c_begin + j, the groups added in order. scratch: (blockDim.x * VEC) floats of shared memory.
template <int VEC, class Op>
__device__ void block_rows_reduce(const Op& op, int64_t n, int c_begin, int c_end, int hw_begin,
                                  int hw_end, int lanes, float* scratch, float* out, float scale) {
  const int groups = static_cast<int>(blockDim.x) / lanes;
  const int lane = static_cast<int>(threadIdx.x) % lanes;
  const int group = static_cast<int>(threadIdx.x) / lanes;
  const int c = c_begin + lane * VEC;
  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
  if (group < groups && c < c_end) {
    stream_accesses(op, n, c, hw_begin + group, hw_end, groups,
                    [&](typename Op::Regs& regs, int hw) { op.reduce(regs, acc, n, c, hw); });
  }
  if (group < groups) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) scratch[(group * lanes + lane) * VEC + e] = acc[e];
  }
  __syncthreads();
  const int width = c_end - c_begin;
  for (int j = threadIdx.x; j < width; j += blockDim.x) {
    float total = 0.0f;
    for (int g = 0; g < groups; ++g) total += scratch[g * lanes * VEC + j];
    out[j] = total * scale;
  }
  __syncthreads();  // scratch is free again
}

// Rows of sample n (channels inner) writing outputs; channel parameters p0[c], p1[c] indexed by
// the channel (p1 may be nullptr: zeros). Same thread mapping as block_rows_reduce; no barrier.
template <int VEC, class Op>
__device__ __forceinline__ void block_rows_apply(const Op& op, int64_t n, int c_begin, int c_end,
                                                 int hw_begin, int hw_end, int lanes,
                                                 const float* p0, const float* p1) {
  const int groups = static_cast<int>(blockDim.x) / lanes;
  const int lane = static_cast<int>(threadIdx.x) % lanes;
  const int group = static_cast<int>(threadIdx.x) / lanes;
  const int c = c_begin + lane * VEC;
  if (group >= groups || c >= c_end) return;
  float p0v[VEC], p1v[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    p0v[e] = p0[c + e];
    p1v[e] = p1 != nullptr ? p1[c + e] : 0.0f;
  }
  stream_accesses(op, n, c, hw_begin + group, hw_end, groups,
                  [&](typename Op::Regs& regs, int hw) { op.store(regs, p0v, p1v, n, c, hw); });
}

// The block of a streaming pass's grid in the mirror position (linear index reversed). The apply
// passes (scale, grad input) run on the grid of the reduction pass before them (pool, grad
// attention) in reverse, so the rows that pass touched last, the likeliest still in L2, come first.
__device__ __forceinline__ dim3 mirrored_block() {
  return dim3(gridDim.x - 1 - blockIdx.x, gridDim.y - 1 - blockIdx.y, gridDim.z - 1 - blockIdx.z);
}

// Vector lanes per row of the one-block-per-sample kernels: a whole row of C per thread group.
__host__ __device__ __forceinline__ int fused_row_lanes(int channels, int vec) {
  return (channels + vec - 1) / vec;
}

// Vector lanes per row of the multi-kernel streaming passes: a tile of lanes * vec channels per
// block, so that C up to 2048 spreads over several blocks per sample.
__host__ __device__ __forceinline__ int stream_row_lanes(int channels, int vec) {
  const int lanes = (channels + vec - 1) / vec;
  return lanes < kStreamRowLanes ? lanes : kStreamRowLanes;
}

// Lanes per (n, c) plane of the multi-kernel streaming passes (channels outer): the fewest, a
// power of 2 up to a warp, whose `unroll` accesses of `vec` elements cover the plane at once, so
// that small planes (7x7, 14x14) share a warp instead of leaving most of its lanes idle.
__host__ __device__ __forceinline__ int stream_plane_lanes(int hw, int vec, int unroll) {
  const int accesses = (hw + vec * unroll - 1) / (vec * unroll);
  int lanes = 1;
  while (lanes < accesses && lanes < kWarpSize) lanes *= 2;
  return lanes;
}

// The planes (n, c), c < channels, of sample n (channels outer) over the whole block of the
// one-block-per-sample kernels, with the lane groups of the streaming passes
// (stream_plane_lanes): small planes (8x8, 7x7) share a warp, so every thread has its accesses
// in flight instead of one warp walking its planes one round trip each. out[c] = scale * sum.
// All threads of the block call it (shuffles; every warp runs the same iterations).
template <int VEC, class Op>
__device__ __forceinline__ void block_planes_reduce(const Op& op, int64_t n, int channels,
                                                    int hw_size, float* out, float scale) {
  const int lanes = stream_plane_lanes(hw_size, VEC, Op::kUnroll);
  const int lane = static_cast<int>(threadIdx.x) % lanes;
  const int groups = static_cast<int>(blockDim.x) / lanes;
  for (int base = 0; base < channels; base += groups) {
    const int c = base + static_cast<int>(threadIdx.x) / lanes;
    const float sum = plane_reduce<VEC>(op, n, c, hw_size, lane, lanes, c < channels);
    if (lane == 0 && c < channels) out[c] = sum * scale;
  }
}

// The apply pass of block_planes_reduce's mapping: channel parameters p0[c], p1[c] (p1 may be
// nullptr: zeros). No barrier.
template <int VEC, class Op>
__device__ __forceinline__ void block_planes_apply(const Op& op, int64_t n, int channels,
                                                   int hw_size, const float* p0, const float* p1) {
  const int lanes = stream_plane_lanes(hw_size, VEC, Op::kUnroll);
  const int lane = static_cast<int>(threadIdx.x) % lanes;
  const int groups = static_cast<int>(blockDim.x) / lanes;
  for (int c = static_cast<int>(threadIdx.x) / lanes; c < channels; c += groups)
    plane_apply<VEC>(op, n, c, hw_size, lane, lanes, p0[c], p1 != nullptr ? p1[c] : 0.0f);
}

// The tile of block (n, channel tile, z) of a channels-inner streaming pass: sample n, channels
// [c_begin, c_end), rows [hw_begin, hw_end) of H*W (z's split), `lanes` vector lanes per row.
struct StreamRowTile {
  int lanes, c_begin, c_end, hw_begin, hw_end;
  int64_t n;
};

template <int VEC>
__device__ __forceinline__ StreamRowTile stream_row_tile(const MapLayout& layout, dim3 block,
                                                         int split_rows) {
  const int lanes = stream_row_lanes(layout.channels, VEC);
  const int c_begin = static_cast<int>(block.y) * lanes * VEC;
  const int hw_begin = static_cast<int>(block.z) * split_rows;
  return {lanes, c_begin, min(layout.channels, c_begin + lanes * VEC), hw_begin,
          min(layout.hw, hw_begin + split_rows), static_cast<int64_t>(block.x)};
}

// The body of a multi-kernel streaming reduction (pool, grad attention) on stream_grid's grid.
// Channels inner: block (n, channel tile, z) sums rows [z * split_rows, (z + 1) * split_rows) of
// H*W, into out (N, C) times `scale` when gridDim.z == 1, else unscaled into partials[z] (N, C),
// which sum_splits_kernel adds in order. Channels outer: one lane group per (n, c) plane, out =
// scale * sum. `scratch`: kStreamThreads * VEC floats of shared memory.
template <int VEC, class Op>
__device__ __forceinline__ void stream_reduce(const Op& op, const MapLayout& layout, int split_rows,
                                              float scale, float* out, float* partials,
                                              float* scratch) {
  const int C = layout.channels;
  if (layout.channels_inner) {
    const StreamRowTile t = stream_row_tile<VEC>(layout, blockIdx, split_rows);
    const bool split = gridDim.z > 1;
    float* sums = split ? partials + (blockIdx.z * static_cast<int64_t>(layout.n) + t.n) * C : out + t.n * C;
    block_rows_reduce<VEC>(op, t.n, t.c_begin, t.c_end, t.hw_begin, t.hw_end, t.lanes, scratch,
                           sums + t.c_begin, split ? 1.0f : scale);
  } else {
    const int lanes = stream_plane_lanes(layout.hw, VEC, Op::kUnroll);
    const int lane = static_cast<int>(threadIdx.x) % lanes;
    const int64_t planes = static_cast<int64_t>(layout.n) * C;
    const int64_t plane = static_cast<int64_t>(blockIdx.x) * (kStreamThreads / lanes) + threadIdx.x / lanes;
    if (plane - static_cast<int>(threadIdx.x) % kWarpSize / lanes >= planes) return;  // whole warp
    const float sum = plane_reduce<VEC>(op, plane / C, static_cast<int>(plane % C), layout.hw, lane,
                                        lanes, plane < planes);
    if (lane == 0 && plane < planes) out[plane] = sum * scale;
  }
}

// The body of a multi-kernel streaming apply pass (scale, grad input) on the grid of the
// reduction before it, in the mirror order (mirrored_block): channel parameters p0 (N, C) and p1
// (N, C; nullptr: zeros), the H*W splits of stream_reduce.
template <int VEC, class Op>
__device__ __forceinline__ void stream_apply(const Op& op, const MapLayout& layout, int split_rows,
                                             const float* p0, const float* p1) {
  const int C = layout.channels;
  const dim3 block = mirrored_block();  // reverse of the reduction pass's order (L2)
  if (layout.channels_inner) {
    const StreamRowTile t = stream_row_tile<VEC>(layout, block, split_rows);
    block_rows_apply<VEC>(op, t.n, t.c_begin, t.c_end, t.hw_begin, t.hw_end, t.lanes, p0 + t.n * C,
                          p1 != nullptr ? p1 + t.n * C : nullptr);
  } else {
    const int lanes = stream_plane_lanes(layout.hw, VEC, Op::kUnroll);
    const int lane = static_cast<int>(threadIdx.x) % lanes;
    const int64_t plane = static_cast<int64_t>(block.x) * (kStreamThreads / lanes) + threadIdx.x / lanes;
    if (plane >= static_cast<int64_t>(layout.n) * C) return;
    plane_apply<VEC>(op, plane / C, static_cast<int>(plane % C), layout.hw, lane, lanes, p0[plane],
                     p1 != nullptr ? p1[plane] : 0.0f);
  }
}

// The sum of partials[s * stride + at] over the splits s = 0 .. splits - 1, added in that order:
// the deterministic second pass of every split reduction (same bits run to run, no atomics).
__device__ __forceinline__ float sum_in_order(const float* partials, int splits, int64_t stride,
                                              int64_t at) {
  float total = 0.0f;
#pragma unroll 8
  for (int s = 0; s < splits; ++s) total += partials[s * stride + at];
  return total;
}

// Grid of the multi-kernel streaming passes whose ops keep `unroll` accesses in flight per
// thread: channels inner: (N, channel tiles, map_reduce_splits H*W splits) blocks of
// kStreamThreads; channels outer: a group of stream_plane_lanes lanes per (n, c) plane.
inline dim3 stream_grid(const MapLayout& layout, int unroll, int splits = 1) {
  if (layout.channels_inner) {
    const int tile = stream_row_lanes(layout.channels, layout.vec) * layout.vec;
    return dim3(static_cast<unsigned>(layout.n),
                static_cast<unsigned>((layout.channels + tile - 1) / tile),
                static_cast<unsigned>(splits));
  }
  const int64_t planes = static_cast<int64_t>(layout.n) * layout.channels;
  const int per_block = kStreamThreads / stream_plane_lanes(layout.hw, layout.vec, unroll);
  return dim3(static_cast<unsigned>((planes + per_block - 1) / per_block));
}

// Rows of H*W per block of a channels-inner reduction split over `splits` blocks along H*W: whole
// steps of the block's kStreamThreads / lanes rows.
inline int map_split_rows(const MapLayout& layout, int splits) {
  const int rows_per_step = kStreamThreads / stream_row_lanes(layout.channels, layout.vec);
  const int steps = (layout.hw + rows_per_step - 1) / rows_per_step;
  return (steps + splits - 1) / splits * rows_per_step;
}

// Accesses each thread of a streaming pass keeps in flight: `base`, doubled up to 4 when an access
// is a single 2-byte element, so that small unvectorized planes still move enough bytes per trip
// (more would need over 32 registers: spills at 8 blocks of 256 threads per SM).
template <class T, int VEC>
__host__ __device__ constexpr int stream_unroll(int base) {
  return sizeof(T) * VEC < 4 && base < 4 ? 2 * base : base;
}

// Runs f(T{}, std::integral_constant<int, VEC>{}) for the scalar type of `kind` and the vector
// width `vec` (1, or 16 bytes' worth), i.e. picks the kernel instantiation.
template <class F>
cudaError_t dispatch_scalar_vec(ScalarKind kind, int vec, F&& f) {
  switch (kind) {
    case ScalarKind::kBFloat16:
      return vec > 1 ? f(__nv_bfloat16{}, std::integral_constant<int, 8>{})
                     : f(__nv_bfloat16{}, std::integral_constant<int, 1>{});
    case ScalarKind::kFloat16:
      return vec > 1 ? f(__half{}, std::integral_constant<int, 8>{})
                     : f(__half{}, std::integral_constant<int, 1>{});
    default:
      return vec > 1 ? f(float{}, std::integral_constant<int, 4>{})
                     : f(float{}, std::integral_constant<int, 1>{});
  }
}

// ---------------------------------------------------------------------------------------------
// Feature-map ops
// ---------------------------------------------------------------------------------------------

// Term x: the pooled sum.
template <class T, int VEC>
struct PoolOp {
  static constexpr int kUnroll = stream_unroll<T, VEC>(4);
  FeatureMap x;
  struct Regs {
    Pack<T, VEC> x;
  };
  __device__ __forceinline__ void load(Regs& r, int64_t n, int c, int hw) const {
    r.x = load_pack<T, VEC>(static_cast<const T*>(x.data) + map_offset(x, n, c, hw));
  }
  __device__ __forceinline__ void reduce(Regs& r, float (&acc)[VEC], int64_t, int, int) const {
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] += to_float(r.x.v[e]);
  }
};

// out = relu?(x * a + identity); p0 = a.
template <class T, int VEC>
struct ScaleResidualOp {
  static constexpr int kUnroll = stream_unroll<T, VEC>(2);
  FeatureMap x, identity, out;  // identity.data may be nullptr
  bool relu;
  struct Regs {
    Pack<T, VEC> x, identity;
  };
  __device__ __forceinline__ void load(Regs& r, int64_t n, int c, int hw) const {
    r.x = load_pack<T, VEC>(static_cast<const T*>(x.data) + map_offset(x, n, c, hw));
    if (identity.data != nullptr)
      r.identity = load_pack<T, VEC>(static_cast<const T*>(identity.data) +
                                     map_offset(identity, n, c, hw));
  }
  __device__ __forceinline__ void store(Regs& r, const float (&a)[VEC], const float (&)[VEC],
                                        int64_t n, int c, int hw) const {
    float y[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      y[e] = to_float(r.x.v[e]) * a[e];
      if (identity.data != nullptr) y[e] += to_float(r.identity.v[e]);
      if (relu) y[e] = fmaxf(y[e], 0.0f);
    }
    store_pack<T, VEC>(static_cast<T*>(out.data) + map_offset(out, n, c, hw), y);
  }
};

// z = grad_out * (out > 0 if relu); term z * x; grad_identity = z when requested.
template <class T, int VEC>
struct GradAttentionOp {
  static constexpr int kUnroll = stream_unroll<T, VEC>(2);
  FeatureMap grad_out, x, out, grad_identity;  // grad_identity.data may be nullptr
  bool relu;
  struct Regs {
    Pack<T, VEC> grad_out, x, out;
  };
  __device__ __forceinline__ void load(Regs& r, int64_t n, int c, int hw) const {
    r.grad_out = load_pack<T, VEC>(static_cast<const T*>(grad_out.data) +
                                   map_offset(grad_out, n, c, hw));
    r.x = load_pack<T, VEC>(static_cast<const T*>(x.data) + map_offset(x, n, c, hw));
    if (relu) r.out = load_pack<T, VEC>(static_cast<const T*>(out.data) + map_offset(out, n, c, hw));
  }
  __device__ __forceinline__ void reduce(Regs& r, float (&acc)[VEC], int64_t n, int c,
                                         int hw) const {
    float z[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      z[e] = to_float(r.grad_out.v[e]);
      if (relu && !(to_float(r.out.v[e]) > 0.0f)) z[e] = 0.0f;
      acc[e] += z[e] * to_float(r.x.v[e]);
    }
    if (grad_identity.data != nullptr)
      store_pack<T, VEC>(static_cast<T*>(grad_identity.data) + map_offset(grad_identity, n, c, hw),
                         z);
  }
};

// grad_x = z * a + d pooled / HW; p0 = a, p1 = d pooled / HW.
template <class T, int VEC>
struct GradInputOp {
  static constexpr int kUnroll = stream_unroll<T, VEC>(2);
  FeatureMap grad_out, out, grad_x;
  bool relu;
  struct Regs {
    Pack<T, VEC> grad_out, out;
  };
  __device__ __forceinline__ void load(Regs& r, int64_t n, int c, int hw) const {
    r.grad_out = load_pack<T, VEC>(static_cast<const T*>(grad_out.data) +
                                   map_offset(grad_out, n, c, hw));
    if (relu) r.out = load_pack<T, VEC>(static_cast<const T*>(out.data) + map_offset(out, n, c, hw));
  }
  __device__ __forceinline__ void store(Regs& r, const float (&a)[VEC],
                                        const float (&grad_pooled_over_hw)[VEC], int64_t n, int c,
                                        int hw) const {
    float dx[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float z = to_float(r.grad_out.v[e]);
      if (relu && !(to_float(r.out.v[e]) > 0.0f)) z = 0.0f;
      dx[e] = z * a[e] + grad_pooled_over_hw[e];
    }
    store_pack<T, VEC>(static_cast<T*>(grad_x.data) + map_offset(grad_x, n, c, hw), dx);
  }
};

// ---------------------------------------------------------------------------------------------
// Tiled SIMT GEMM: acc[TM][TN] += sum_k A(m, k) * B(k, n) over one BM x BN output tile, fp32.
// The LSTM matrices are small (K <= 4C, N-sample tiles), so a plain shared-memory tiling is
// enough; each output is summed by one thread in k order (deterministic).
// ---------------------------------------------------------------------------------------------

struct GemmTile {
  static constexpr int kM = 32;  // rows per block (samples, or weight rows for weight grads)
  static constexpr int kN = 32;  // columns per block
  static constexpr int kK = 32;  // k per shared-memory stage
  static constexpr int kTM = 2;  // rows per thread
  static constexpr int kTN = 4;  // columns per thread (the 4 gates of one channel in the expansion)
  static constexpr int kThreadCols = kN / kTN;
  static constexpr int kThreads = (kM / kTM) * kThreadCols;  // 128
};

struct GemmSmem {
  float a[GemmTile::kK][GemmTile::kM + 1];  // +1: conflict-free transposed stores
  float b[GemmTile::kK][GemmTile::kN + 1];
};

// Thread (row, col) of the tile owns rows m0 + row * kTM + i and columns n0 + col * kTN + j.
__device__ __forceinline__ int gemm_thread_row() {
  return static_cast<int>(threadIdx.x) / GemmTile::kThreadCols;
}
__device__ __forceinline__ int gemm_thread_col() {
  return static_cast<int>(threadIdx.x) % GemmTile::kThreadCols;
}

// A_K_INNER / B_K_INNER: the loader's memory is contiguous along k (else along m / n), so that
// consecutive threads load consecutive addresses. a(m, k), b(k, n) are called only in bounds.
// The next k-stage is loaded into registers while the current one is multiplied from shared
// memory, so that a block's chain of stages costs one load latency plus, per stage, the larger
// of a load latency and the stage's FMAs (short-K launches are that chain).
template <bool A_K_INNER, bool B_K_INNER, class LoadA, class LoadB>
__device__ void gemm_tile_accumulate(float (&acc)[GemmTile::kTM][GemmTile::kTN], const LoadA& a,
                                     const LoadB& b, int m0, int n0, int m_size, int n_size,
                                     int k_size, GemmSmem& smem) {
  using G = GemmTile;
  constexpr int kALoads = G::kM * G::kK / G::kThreads;
  constexpr int kBLoads = G::kN * G::kK / G::kThreads;
  const int t = static_cast<int>(threadIdx.x);
  const int row = gemm_thread_row(), col = gemm_thread_col();
  float a_next[kALoads], b_next[kBLoads];
  // element i of this thread's share of a stage: (kk, mm) / (kk, nn) inside the tile
  const auto a_at = [&](int i, int& kk, int& mm) {
    const int e = t + i * G::kThreads;
    kk = A_K_INNER ? e % G::kK : e / G::kM;
    mm = A_K_INNER ? e / G::kK : e % G::kM;
  };
  const auto b_at = [&](int i, int& kk, int& nn) {
    const int e = t + i * G::kThreads;
    kk = B_K_INNER ? e % G::kK : e / G::kN;
    nn = B_K_INNER ? e / G::kK : e % G::kN;
  };
  const auto load_stage = [&](int k0) {
#pragma unroll
    for (int i = 0; i < kALoads; ++i) {
      int kk, mm;
      a_at(i, kk, mm);
      const int m = m0 + mm, k = k0 + kk;
      a_next[i] = (m < m_size && k < k_size) ? a(m, k) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kBLoads; ++i) {
      int kk, nn;
      b_at(i, kk, nn);
      const int nc = n0 + nn, k = k0 + kk;
      b_next[i] = (nc < n_size && k < k_size) ? b(k, nc) : 0.0f;
    }
  };
  if (k_size > 0) load_stage(0);
  for (int k0 = 0; k0 < k_size; k0 += G::kK) {
#pragma unroll
    for (int i = 0; i < kALoads; ++i) {
      int kk, mm;
      a_at(i, kk, mm);
      smem.a[kk][mm] = a_next[i];
    }
#pragma unroll
    for (int i = 0; i < kBLoads; ++i) {
      int kk, nn;
      b_at(i, kk, nn);
      smem.b[kk][nn] = b_next[i];
    }
    __syncthreads();
    if (k0 + G::kK < k_size) load_stage(k0 + G::kK);  // in flight during the FMAs below
#pragma unroll 8
    for (int kk = 0; kk < G::kK; ++kk) {
      float av[G::kTM], bv[G::kTN];
#pragma unroll
      for (int i = 0; i < G::kTM; ++i) av[i] = smem.a[kk][row * G::kTM + i];
#pragma unroll
      for (int j = 0; j < G::kTN; ++j) bv[j] = smem.b[kk][col * G::kTN + j];
#pragma unroll
      for (int i = 0; i < G::kTM; ++i)
#pragma unroll
        for (int j = 0; j < G::kTN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
}

__device__ __forceinline__ void gemm_zero(float (&acc)[GemmTile::kTM][GemmTile::kTN]) {
#pragma unroll
  for (int i = 0; i < GemmTile::kTM; ++i)
#pragma unroll
    for (int j = 0; j < GemmTile::kTN; ++j) acc[i][j] = 0.0f;
}

// (i, j) -> p[i * stride_i + j * stride_j]
struct StridedLoad {
  const float* p;
  int64_t stride_i, stride_j;
  __device__ __forceinline__ float operator()(int i, int j) const {
    return p[i * stride_i + j * stride_j];
  }
};

// Index in a (2, N, R) buffer (u or its gradient: the ih path, then the hh path) of element o < 2R
// of sample n's [ih | hh] row, as the one-block-per-sample kernels hold it.
__device__ __forceinline__ int64_t cell0_hidden_index(int o, int64_t n, int samples, int hidden) {
  return (o >= hidden ? static_cast<int64_t>(samples) * hidden : 0) + n * hidden + o % hidden;
}

// Cell-0 expansion weights as B(k, col) with col = 4 * channel + gate: row gate * C + channel of
// a (4C, R) matrix, so that a thread's kTN = 4 columns are the i, f, g, o gates of one channel.
struct GateColumnsLoad {
  const float* w2;  // (4C, R)
  int channels, hidden;
  __device__ __forceinline__ float operator()(int k, int col) const {
    const int row = (col & 3) * channels + (col >> 2);
    return w2[static_cast<int64_t>(row) * hidden + k];
  }
};
static_assert(GemmTile::kTN == 4, "the expansion epilogue needs the 4 gates of a channel per thread");

// (k, j) -> p[k * stride_k + j] for j < cols, 1 for j == cols: a virtual column of ones, so that
// the same GEMM that reduces a weight gradient over samples also yields its bias gradient.
struct OnesColumnLoad {
  const float* p;
  int64_t stride_k;
  int cols;
  __device__ __forceinline__ float operator()(int k, int j) const {
    return j < cols ? p[k * stride_k + j] : 1.0f;
  }
};

// The pointwise kernels after the split gate GEMMs (grid (ceil(N * C / kStreamThreads)), block
// kStreamThreads): the cell-0 gates of sample m, channel c, biases included, the partial sums
// (gate_splits(R), N, 4C) (column 4 * c + gate) added in split order; calls fn(m, c, gate)
// (float (&)[4], i f g o) for this thread's (m, c).
template <class Fn>
__device__ __forceinline__ void for_each_cell0_gates(const Cell0Weights& w,
                                                     const float* partials,
                                                     int n, int channels, int splits,
                                                     const Fn& fn) {
  const int64_t at = static_cast<int64_t>(blockIdx.x) * kStreamThreads + threadIdx.x;
  if (at >= static_cast<int64_t>(n) * channels) return;
  const int64_t m = at / channels;
  const int c = static_cast<int>(at % channels);
  const int64_t split_size = static_cast<int64_t>(n) * 4 * channels;
  float gate[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int s = 0; s < splits; ++s) {
    const float* sums = partials + s * split_size + m * 4 * channels + 4 * c;
#pragma unroll
    for (int q = 0; q < 4; ++q) gate[q] += sums[q];
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) gate[q] += w.bih2[q * channels + c] + w.bhh2[q * channels + c];
  fn(static_cast<int>(m), c, gate);
}

// Calls store(m, col, value) for every element of this thread's GEMM tile inside [0, rows) x [0, cols).
template <class Store>
__device__ __forceinline__ void gemm_tile_store(const float (&acc)[GemmTile::kTM][GemmTile::kTN],
                                                int m0, int n0, int rows, int cols,
                                                const Store& store) {
#pragma unroll
  for (int i = 0; i < GemmTile::kTM; ++i) {
    const int m = m0 + gemm_thread_row() * GemmTile::kTM + i;
#pragma unroll
    for (int j = 0; j < GemmTile::kTN; ++j) {
      const int col = n0 + gemm_thread_col() * GemmTile::kTN + j;
      if (m < rows && col < cols) store(m, col, acc[i][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Per-sample cell-0 pieces of the one-block-per-sample kernels (vectors in shared memory)
// ---------------------------------------------------------------------------------------------

// hidden[p * R + j] = relu(b1_p[j] + W1_p[j, :] . v_p) with v_0 = pooled, v_1 = h_prev:
// one warp per output, lanes along C (coalesced rows of W1).
__device__ __forceinline__ void sample_reduced_hidden(const Cell0Weights& w, const float* pooled,
                                                      const float* h_prev, int channels,
                                                      int hidden_size, float* hidden) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  for (int out = static_cast<int>(threadIdx.x) / kWarpSize; out < 2 * hidden_size; out += warps) {
    const bool hh = out >= hidden_size;
    const int j = hh ? out - hidden_size : out;
    const float* row = (hh ? w.whh1 : w.wih1) + static_cast<int64_t>(j) * channels;
    const float* v = hh ? h_prev : pooled;
    float acc = 0.0f;
    for (int k = lane; k < channels; k += kWarpSize) acc = fmaf(row[k], v[k], acc);
    acc = warp_sum(acc);
    if (lane == 0) hidden[out] = fmaxf(acc + (hh ? w.bhh1 : w.bih1)[j], 0.0f);
  }
}

// gates[r] = bih2[r] + bhh2[r] + Wih2[r, :] . hidden_ih + Whh2[r, :] . hidden_hh, r < 4C:
// one thread per gate row.
__device__ __forceinline__ void sample_gate_preacts(const Cell0Weights& w, const float* hidden,
                                                    int channels, int hidden_size, float* gates) {
  for (int r = threadIdx.x; r < 4 * channels; r += blockDim.x) {
    const float* ih = w.wih2 + static_cast<int64_t>(r) * hidden_size;
    const float* hh = w.whh2 + static_cast<int64_t>(r) * hidden_size;
    float acc_ih = 0.0f, acc_hh = 0.0f;
    for (int k = 0; k < hidden_size; ++k) {
      acc_ih = fmaf(ih[k], hidden[k], acc_ih);
      acc_hh = fmaf(hh[k], hidden[hidden_size + k], acc_hh);
    }
    gates[r] = (acc_ih + w.bih2[r]) + (acc_hh + w.bhh2[r]);
  }
}

// out = scale * sum over s of partials[s] ((S, N, C) -> (N, C), s in order): the second pass of
// the reductions split over H*W (dia_step_forward.cu).
cudaError_t launch_sum_splits(int splits, int64_t size, const float* partials, float scale,
                              float* out, cudaStream_t stream);

// The cell-0 gate pre-activations without biases, as gate_splits(R) partial sums (2 paths x
// chunks of kGateSplitK of K = R) over tiles of samples x gate columns (dia_step_forward.cu);
// for_each_cell0_gates adds them.
cudaError_t launch_gate_gemm(int n, int channels, int hidden,
                             const float* hidden_in,  // (2, N, R) u_ih, u_hh
                             const Cell0Weights& weights,
                             float* partials,  // (gate_splits(R), N, 4C), column 4 * channel + gate
                             cudaStream_t stream);

// u = relu(W1 v + b1) of both cell-0 paths over tiles of samples (dia_step_forward.cu), K = C
// in reduced_linear_splits(C) chunks (then a second launch adds the chunks in order); the
// backward recomputes u with it.
cudaError_t launch_reduced_linear(int n, int channels, int hidden,
                                  const float* pooled,  // (N, C)
                                  const float* h0,      // (N, C)
                                  const Cell0Weights& weights,
                                  float* hidden_out,    // (2, N, R)
                                  float* partials,      // (reduced_linear_splits(C), 2, N, R);
                                                        // unused when that is 1
                                  cudaStream_t stream);

}  // namespace detail
}  // namespace dia_fused
