// The csrc/ kernels and launchers compiled for the CPU (cuda_host_emulation.h), behind a C API
// that python_tests/cuda_emulation.py calls through ctypes with CPU tensors. Each entry point
// builds the kernels' views of its maps and picks the layout exactly as dia_step_bindings.cpp
// does for the same call; returns 0, or 1 when a launch failed / the emulation recorded an error.
#include "cuda_host_emulation.h"

#include "dia_step_forward.cu"
#include "dia_step_backward.cu"

namespace {

using namespace dia_fused;

FeatureMap map_of(void* data, const int64_t* sizes, const int64_t* strides) {
  FeatureMap m{nullptr, 0, 0, 0};
  if (data != nullptr && !make_feature_map(data, sizes, strides, &m)) {
    emu::record_error("map with H and W not collapsible");
  }
  return m;
}

int element_size(int kind) { return kind == 0 ? 4 : 2; }

Cell0Weights weights_of(const float* const* w) {
  return Cell0Weights{w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]};
}

Cell0WeightGrads grads_of(float* const* g) {
  return Cell0WeightGrads{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]};
}

// As the bindings allocate it (split_sums_workspace), filled with NaN: a partial sum the second
// pass reads but no block wrote shows up in the results.
std::vector<float> split_sums_workspace(const MapLayout& layout) {
  const int splits = map_reduce_splits(layout);
  const size_t size = splits > 1 ? static_cast<size_t>(splits) * layout.n * layout.channels : 1;
  return std::vector<float>(size, std::numeric_limits<float>::quiet_NaN());
}

int status(cudaError_t err) {
  const bool failed = err != cudaSuccess || emu::g_errors.load() != 0;
  if (failed && emu::g_errors.load() == 0) emu::record_error("launch error " + std::to_string(err));
  return failed ? 1 : 0;
}

}  // namespace

extern "C" {

int emu_constants(int* out) {
  out[0] = kFusedMaxChannels;
  out[1] = kFusedThreads;
  return 0;
}

const char* emu_first_error() { return emu::g_first_error.c_str(); }

// Writes the grids of up to `max` launches since the last call (x, y, z each) to out and forgets
// them; returns how many launches there were.
int emu_take_launch_grids(int* out, int max) {
  const int count = static_cast<int>(emu::g_launch_grids.size());
  for (int i = 0; i < count && i < max; ++i) {
    out[3 * i] = static_cast<int>(emu::g_launch_grids[i].x);
    out[3 * i + 1] = static_cast<int>(emu::g_launch_grids[i].y);
    out[3 * i + 2] = static_cast<int>(emu::g_launch_grids[i].z);
  }
  emu::g_launch_grids.clear();
  return count;
}

void emu_reset_errors() {
  emu::g_errors = 0;
  emu::g_first_error.clear();
}

int emu_forward_fused(int kind, const int64_t* sizes, void* x, const int64_t* x_strides,
                      void* identity, const int64_t* identity_strides, void* out,
                      const int64_t* out_strides, int hidden, const float* h0, const float* c0,
                      const float* const* w, int relu, int activation, float* h_new, float* c_new,
                      float* saved) {
  const FeatureMap xm = map_of(x, sizes, x_strides), im = map_of(identity, sizes, identity_strides);
  const FeatureMap om = map_of(out, sizes, out_strides);
  const FeatureMap maps[] = {xm, im, om};
  const MapLayout layout = choose_map_layout(sizes, xm, maps, 3, element_size(kind));
  return status(launch_fused_forward(static_cast<ScalarKind>(kind), layout, hidden, xm, im, om, h0,
                                     c0, weights_of(w), relu != 0,
                                     static_cast<CellActivation>(activation), h_new, c_new,
                                     cell0_saved(saved, sizes[0], sizes[1], hidden), nullptr));
}

int emu_pool(int kind, const int64_t* sizes, void* x, const int64_t* x_strides, float* pooled) {
  const FeatureMap xm = map_of(x, sizes, x_strides);
  const FeatureMap maps[] = {xm};
  const MapLayout layout = choose_map_layout(sizes, xm, maps, 1, element_size(kind));
  std::vector<float> partials = split_sums_workspace(layout);
  return status(launch_pool(static_cast<ScalarKind>(kind), layout, xm, pooled, partials.data(),
                            nullptr));
}

int emu_cell0_forward(int n, int channels, int hidden, float* saved, const float* h0,
                      const float* c0, const float* const* w, int activation, float* partials,
                      float* h_new, float* c_new) {
  return status(launch_cell0_forward(n, channels, hidden, cell0_saved(saved, n, channels, hidden),
                                     h0, c0, weights_of(w), static_cast<CellActivation>(activation),
                                     partials, h_new, c_new, nullptr));
}

int emu_scale_residual(int kind, const int64_t* sizes, void* x, const int64_t* x_strides,
                       const float* attention, void* identity, const int64_t* identity_strides,
                       void* out, const int64_t* out_strides, int relu) {
  const FeatureMap xm = map_of(x, sizes, x_strides), im = map_of(identity, sizes, identity_strides);
  const FeatureMap om = map_of(out, sizes, out_strides);
  const FeatureMap maps[] = {xm, im, om};
  const MapLayout layout = choose_map_layout(sizes, xm, maps, 3, element_size(kind));
  return status(launch_scale_residual(static_cast<ScalarKind>(kind), layout, xm, attention, im, om,
                                      relu != 0, nullptr));
}

int emu_backward_fused(int kind, const int64_t* sizes, void* grad_out, const int64_t* go_strides,
                       void* x, const int64_t* x_strides, void* out, const int64_t* out_strides,
                       void* grad_x, const int64_t* gx_strides, void* grad_identity,
                       const int64_t* gi_strides, const float* grad_h_new, const float* grad_c_new,
                       float* saved, const float* h0, const float* c0,
                       const float* const* w, int hidden, int relu, int activation,
                       float* grad_h0, float* grad_c0, float* const* grads,
                       float* ws_grad_hidden, float* ws_grad_gates, float* ws_hidden_partials) {
  const FeatureMap gom = map_of(grad_out, sizes, go_strides), xm = map_of(x, sizes, x_strides);
  const FeatureMap om = relu ? map_of(out, sizes, out_strides) : FeatureMap{nullptr, 0, 0, 0};
  const FeatureMap gxm = map_of(grad_x, sizes, gx_strides);
  const FeatureMap gim = map_of(grad_identity, sizes, gi_strides);
  const FeatureMap maps[] = {gom, xm, om, gxm, gim};
  const MapLayout layout = choose_map_layout(sizes, xm, maps, 5, element_size(kind));
  return status(launch_fused_backward(
      static_cast<ScalarKind>(kind), layout, hidden, gom, xm, om, gxm, gim, grad_h_new, grad_c_new,
      cell0_saved(saved, sizes[0], sizes[1], hidden), h0, c0, weights_of(w), relu != 0,
      static_cast<CellActivation>(activation), grad_h0, grad_c0, grads_of(grads),
      Cell0Workspace{ws_grad_hidden, ws_grad_gates, ws_hidden_partials}, nullptr));
}

int emu_grad_attention(int kind, const int64_t* sizes, void* grad_out, const int64_t* go_strides,
                       void* x, const int64_t* x_strides, void* out, const int64_t* out_strides,
                       void* grad_identity, const int64_t* gi_strides, int relu,
                       float* grad_attention) {
  const FeatureMap gom = map_of(grad_out, sizes, go_strides), xm = map_of(x, sizes, x_strides);
  const FeatureMap om = relu ? map_of(out, sizes, out_strides) : FeatureMap{nullptr, 0, 0, 0};
  const FeatureMap gim = map_of(grad_identity, sizes, gi_strides);
  const FeatureMap maps[] = {gom, xm, om, gim};
  const MapLayout layout = choose_map_layout(sizes, xm, maps, 4, element_size(kind));
  std::vector<float> partials = split_sums_workspace(layout);
  return status(launch_grad_attention(static_cast<ScalarKind>(kind), layout, gom, xm, om, gim,
                                      relu != 0, grad_attention, partials.data(), nullptr));
}

int emu_cell0_backward(int n, int channels, int hidden, int hw, float* saved,
                       const float* h0, const float* c0, const float* const* w, int activation,
                       const float* grad_h_new, const float* grad_h_extra,
                       const float* grad_c_new, float* grad_pooled_over_hw, float* grad_h0,
                       float* grad_c0, float* h_new, float* const* grads,
                       float* ws_grad_hidden, float* ws_grad_gates, float* ws_hidden_partials) {
  return status(launch_cell0_backward(
      n, channels, hidden, hw, cell0_saved(saved, n, channels, hidden), h0, c0, weights_of(w),
      static_cast<CellActivation>(activation), grad_h_new, grad_h_extra, grad_c_new,
      grad_pooled_over_hw, grad_h0, grad_c0, h_new, grads_of(grads),
      Cell0Workspace{ws_grad_hidden, ws_grad_gates, ws_hidden_partials}, nullptr));
}

int emu_grad_input(int kind, const int64_t* sizes, void* grad_out, const int64_t* go_strides,
                   void* out, const int64_t* out_strides, const float* attention,
                   const float* grad_pooled_over_hw, void* grad_x, const int64_t* gx_strides,
                   int relu) {
  const FeatureMap gom = map_of(grad_out, sizes, go_strides);
  const FeatureMap om = relu ? map_of(out, sizes, out_strides) : FeatureMap{nullptr, 0, 0, 0};
  const FeatureMap gxm = map_of(grad_x, sizes, gx_strides);
  const FeatureMap maps[] = {gom, om, gxm};
  const MapLayout layout = choose_map_layout(sizes, gxm, maps, 3, element_size(kind));
  return status(launch_grad_input(static_cast<ScalarKind>(kind), layout, gom, om, attention,
                                  grad_pooled_over_hw, gxm, relu != 0, nullptr));
}

}  // extern "C"
