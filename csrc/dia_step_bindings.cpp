// Torch bindings of the fused DIA-LSTM step kernels: argument checks (TORCH_CHECK naming the
// argument), output allocation, the current CUDA stream, the walk order and vector width of the
// feature maps. Called by dia_fused/kernels/cuda_dia_step.py, which composes the forward and
// backward of the contract in docs/design.md §2 from these pieces.
//
// No host synchronization anywhere (no .item(), no device-to-host copies): every function only
// enqueues kernels on the current stream, so the step can be captured in a CUDA graph.
// Feature maps are never copied: their strides go to the kernels as they are.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <vector>

#include "dia_step.h"

namespace dia_fused {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr int kGemmRows = 32;                    // GemmTile::kM: samples per GEMM block
constexpr int64_t kMaxGridY = 65535;             // CUDA's limit on gridDim.y

ScalarKind scalar_kind(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kHalf: return ScalarKind::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "x: expected dtype float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return ScalarKind::kFloat32;  // unreachable
}

CellActivation cell_activation(int64_t activation) {
  TORCH_CHECK_VALUE(activation >= 0 && activation <= 2,
              "activation: expected 0 (sigmoid), 1 (tanh) or 2 (relu), got ", activation);
  return static_cast<CellActivation>(activation);
}

void check_on_device_of_x(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(),
              " (the device of x), got ", t.device());
}

// x itself: a 4-D CUDA map of a supported dtype with H * W >= 1.
void check_x(const Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got device ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 4, "x: expected a 4-D tensor (N, C, H, W), got shape ", x.sizes());
  scalar_kind(x);
  TORCH_CHECK_VALUE(x.size(0) >= 1 && x.size(1) >= 1 && x.size(2) * x.size(3) >= 1,
              "x: expected N, C, H * W >= 1, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) <= INT32_MAX && x.size(2) * x.size(3) <= INT32_MAX &&
                  x.size(0) <= kMaxGridY * kGemmRows,
              "x: shape ", x.sizes(), " is too large for the cuda backend");
}

// Another map of the step: like x in device, dtype and shape.
void check_like_x(const Tensor& t, const char* name, const Tensor& x) {
  check_on_device_of_x(t, name, x);
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(),
              " (the dtype of x), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, ": expected the shape of x ", x.sizes(), ", got ",
              t.sizes());
}

// A small fp32 (N, C) or weight tensor read as contiguous memory.
void check_f32_contiguous(const Tensor& t, const char* name, const Tensor& x,
                          at::IntArrayRef shape) {
  check_on_device_of_x(t, name, x);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, ": expected dtype float32, got ",
              t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor");
}

const float* optional_f32(const OptTensor& t, const char* name, const Tensor& x,
                          at::IntArrayRef shape) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_f32_contiguous(*t, name, x, shape);
  return t->data_ptr<float>();
}

// The kernels' view of a map; H and W must collapse into one axis (no hidden copy).
FeatureMap feature_map(const Tensor& t, const char* name) {
  FeatureMap map;
  TORCH_CHECK_VALUE(make_feature_map(t.data_ptr(), t.sizes().data(), t.strides().data(), &map), name,
                    ": expected H and W to be collapsible into one axis (stride(2) == W * stride(3), "
                    "as in contiguous and channels_last tensors), got strides ", t.strides());
  return map;
}

const FeatureMap kNoMap{nullptr, 0, 0, 0};

MapLayout map_layout(const Tensor& x, std::initializer_list<FeatureMap> maps) {
  return choose_map_layout(x.sizes().data(), feature_map(x, "x"), maps.begin(),
                           static_cast<int>(maps.size()), static_cast<int>(x.element_size()));
}

struct Cell0 {
  Cell0Weights weights;
  int hidden;
};

// The 8 cell-0 weights, fp32 contiguous on x's device, in reference.weight_names order.
Cell0 cell0_weights(const std::vector<Tensor>& w, const Tensor& x) {
  TORCH_CHECK_VALUE(w.size() == 8, "weights: expected the 8 cell-0 tensors, got ", w.size());
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(w[0].dim() == 2 && w[0].size(0) >= 1, "weights[0] (w_ih.0.seq.0.weight): expected "
              "shape (R, C) with R >= 1, got ", w[0].sizes());
  const int64_t R = w[0].size(0);
  static const char* names[8] = {"w_ih.0.seq.0.weight", "w_ih.0.seq.0.bias",
                                 "w_ih.0.seq.2.weight", "w_ih.0.seq.2.bias",
                                 "w_hh.0.seq.0.weight", "w_hh.0.seq.0.bias",
                                 "w_hh.0.seq.2.weight", "w_hh.0.seq.2.bias"};
  const std::vector<int64_t> shapes[4] = {{R, C}, {R}, {4 * C, R}, {4 * C}};
  for (int i = 0; i < 8; ++i) check_f32_contiguous(w[i], names[i], x, shapes[i % 4]);
  Cell0 cell;
  cell.hidden = static_cast<int>(R);
  cell.weights = Cell0Weights{w[0].data_ptr<float>(), w[1].data_ptr<float>(),
                              w[2].data_ptr<float>(), w[3].data_ptr<float>(),
                              w[4].data_ptr<float>(), w[5].data_ptr<float>(),
                              w[6].data_ptr<float>(), w[7].data_ptr<float>()};
  return cell;
}

std::vector<Tensor> empty_weight_grads(const std::vector<Tensor>& w) {
  std::vector<Tensor> grads;
  for (const Tensor& t : w) grads.push_back(at::empty_like(t, at::MemoryFormat::Contiguous));
  return grads;
}

// The (map_reduce_splits(layout), N, C) partial sums of a pool / grad-attention reduction split
// over H*W (one element when it is not split), fp32 beside `sums` (N, C).
Tensor split_sums_workspace(const MapLayout& layout, const Tensor& sums) {
  const int splits = map_reduce_splits(layout);
  return at::empty({splits > 1 ? splits * sums.numel() : 1}, sums.options());
}

// The (2, N, R), (N, 4C), (cell0_partials_floats) fp32 workspace of the cell-0 backward, owned by
// tensors (u comes from the forward's saved buffer).
struct Cell0WorkspaceTensors {
  Tensor grad_hidden, grad_gates, hidden_partials;

  // split: the split path's phases use hidden_partials; the fused path does not (one element)
  Cell0WorkspaceTensors(int64_t n, int64_t channels, int64_t hidden_size, const at::TensorOptions& f32,
                        bool split)
      : grad_hidden(at::empty({2, n, hidden_size}, f32)),
        grad_gates(at::empty({n, 4 * channels}, f32)),
        hidden_partials(at::empty(
            {split ? cell0_partials_floats(n, static_cast<int>(channels), static_cast<int>(hidden_size))
                   : 1},
            f32)) {}

  Cell0Workspace pointers() {
    return Cell0Workspace{grad_hidden.data_ptr<float>(), grad_gates.data_ptr<float>(),
                          hidden_partials.data_ptr<float>()};
  }
};

Cell0WeightGrads weight_grad_ptrs(std::vector<Tensor>& g) {
  return Cell0WeightGrads{g[0].data_ptr<float>(), g[1].data_ptr<float>(),
                          g[2].data_ptr<float>(), g[3].data_ptr<float>(),
                          g[4].data_ptr<float>(), g[5].data_ptr<float>(),
                          g[6].data_ptr<float>(), g[7].data_ptr<float>()};
}

cudaStream_t current_stream(const Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "dia_fused cuda backend: launching ", what, " failed: ",
              cudaGetErrorString(err));
}

at::TensorOptions f32_like(const Tensor& x) { return x.options().dtype(at::kFloat); }

bool fused_fits(int64_t channels, int64_t hidden) {
  return channels <= kFusedMaxChannels && 2 * hidden <= kFusedThreads;
}

// A Cell0Saved buffer: flat fp32 of cell0_saved_floats(N, C, R) on x's device.
Cell0Saved cell0_saved_of(const Tensor& saved, const Tensor& x, int64_t hidden) {
  const int64_t N = x.size(0), C = x.size(1);
  check_f32_contiguous(saved, "saved", x, {cell0_saved_floats(N, C, hidden)});
  return cell0_saved(saved.data_ptr<float>(), N, C, hidden);
}

// ------------------------------------------------------------------------------------------
// Forward pieces
// ------------------------------------------------------------------------------------------

// Whole step (one cell) in one kernel: returns [out, h_new (N, C), c_new (N, C), saved (the
// Cell0Saved buffer)].
std::vector<Tensor> forward_fused(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                  const std::vector<Tensor>& weights, const OptTensor& identity,
                                  bool relu, int64_t activation) {
  check_x(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  check_f32_contiguous(h0, "h0", x, {N, C});
  check_f32_contiguous(c0, "c0", x, {N, C});
  const Cell0 cell = cell0_weights(weights, x);
  TORCH_CHECK_VALUE(fused_fits(C, cell.hidden), "forward_fused: needs C <= ", kFusedMaxChannels,
              " and 2R <= ", kFusedThreads, ", got C=", C, ", R=", cell.hidden);
  FeatureMap id_map = kNoMap;
  if (identity.has_value() && identity->defined()) {
    check_like_x(*identity, "identity", x);
    id_map = feature_map(*identity, "identity");
  }
  Tensor out = at::empty_like(x);
  Tensor h_new = at::empty({N, C}, f32_like(x));
  Tensor c_new = at::empty({N, C}, f32_like(x));
  Tensor saved = at::empty({cell0_saved_floats(N, C, cell.hidden)}, f32_like(x));
  const FeatureMap x_map = feature_map(x, "x"), out_map = feature_map(out, "out");
  const MapLayout layout = map_layout(x, {x_map, id_map, out_map});
  check_launch(launch_fused_forward(scalar_kind(x), layout, cell.hidden, x_map, id_map, out_map,
                                    h0.data_ptr<float>(), c0.data_ptr<float>(), cell.weights, relu,
                                    cell_activation(activation), h_new.data_ptr<float>(),
                                    c_new.data_ptr<float>(),
                                    cell0_saved(saved.data_ptr<float>(), N, C, cell.hidden),
                                    current_stream(x)),
               "fused_forward_kernel");
  return {out, h_new, c_new, saved};
}

// pooled (N, C, written) = mean over H, W of x: the head of a Cell0Saved buffer.
void pool(const Tensor& x, const Tensor& pooled) {
  check_x(x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_f32_contiguous(pooled, "pooled", x, {x.size(0), x.size(1)});
  const FeatureMap x_map = feature_map(x, "x");
  const MapLayout layout = map_layout(x, {x_map});
  Tensor partials = split_sums_workspace(layout, pooled);
  check_launch(launch_pool(scalar_kind(x), layout, x_map, pooled.data_ptr<float>(),
                           partials.data_ptr<float>(), current_stream(x)),
               "pool_kernel");
}

// The (N, C) state h0 standing in for x (N, C, 1, 1) in the checks of the cell-0 pieces, which
// have no feature map.
Tensor state_as_map(const Tensor& h0) {
  TORCH_CHECK_VALUE(h0.is_cuda() && h0.dim() == 2, "h0: expected a 2-D CUDA tensor (N, C), got ",
              h0.sizes(), " on ", h0.device());
  TORCH_CHECK_VALUE(h0.size(0) >= 1 && h0.size(0) <= kMaxGridY * kGemmRows && h0.size(1) >= 1,
              "h0: unsupported shape ", h0.sizes());
  return h0.unsqueeze(2).unsqueeze(3);
}

// Cell 0 over tiles of samples, from the pooled head of `saved` (a Cell0Saved buffer), whose u
// and gates it writes: returns [h_new (N, C), c_new (N, C)].
std::vector<Tensor> cell0_forward(const Tensor& saved, const Tensor& h0, const Tensor& c0,
                                  const std::vector<Tensor>& weights, int64_t activation) {
  const Tensor x_like = state_as_map(h0);
  const c10::cuda::CUDAGuard guard(h0.device());
  const int64_t N = h0.size(0), C = h0.size(1);
  check_f32_contiguous(h0, "h0", x_like, {N, C});
  check_f32_contiguous(c0, "c0", x_like, {N, C});
  const Cell0 cell = cell0_weights(weights, x_like);
  const Cell0Saved pieces = cell0_saved_of(saved, x_like, cell.hidden);
  Tensor partials =
      at::empty({cell0_partials_floats(N, static_cast<int>(C), cell.hidden)}, h0.options());
  Tensor h_new = at::empty({N, C}, h0.options());
  Tensor c_new = at::empty({N, C}, h0.options());
  check_launch(launch_cell0_forward(static_cast<int>(N), static_cast<int>(C), cell.hidden, pieces,
                                    h0.data_ptr<float>(), c0.data_ptr<float>(), cell.weights,
                                    cell_activation(activation), partials.data_ptr<float>(),
                                    h_new.data_ptr<float>(), c_new.data_ptr<float>(),
                                    current_stream(h0)),
               "cell-0 forward kernels");
  return {h_new, c_new};
}

// out = relu?(x * attention + identity), laid out like x.
Tensor scale_residual(const Tensor& x, const Tensor& attention, const OptTensor& identity,
                      bool relu) {
  check_x(x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_f32_contiguous(attention, "attention", x, {x.size(0), x.size(1)});
  FeatureMap id_map = kNoMap;
  if (identity.has_value() && identity->defined()) {
    check_like_x(*identity, "identity", x);
    id_map = feature_map(*identity, "identity");
  }
  Tensor out = at::empty_like(x);
  const FeatureMap x_map = feature_map(x, "x"), out_map = feature_map(out, "out");
  check_launch(launch_scale_residual(scalar_kind(x), map_layout(x, {x_map, id_map, out_map}),
                                     x_map, attention.data_ptr<float>(), id_map, out_map, relu,
                                     current_stream(x)),
               "scale_residual_kernel");
  return out;
}

// ------------------------------------------------------------------------------------------
// Backward pieces
// ------------------------------------------------------------------------------------------

// One cell, C <= kFusedMaxChannels: returns
// [grad_x, grad_identity or None, grad_h0 (N, C), grad_c0 (N, C), 8 cell-0 weight grads].
std::vector<Tensor> backward_fused(const Tensor& grad_out, const OptTensor& grad_h_new,
                                   const OptTensor& grad_c_new, const Tensor& x, const Tensor& out,
                                   const Tensor& saved, const Tensor& h0, const Tensor& c0,
                                   const std::vector<Tensor>& weights, bool identity_given,
                                   bool relu, int64_t activation) {
  check_x(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  check_like_x(grad_out, "grad_out", x);
  check_like_x(out, "out", x);
  check_f32_contiguous(h0, "h0", x, {N, C});
  check_f32_contiguous(c0, "c0", x, {N, C});
  const float* gh = optional_f32(grad_h_new, "grad_h_new", x, {N, C});
  const float* gc = optional_f32(grad_c_new, "grad_c_new", x, {N, C});
  const Cell0 cell = cell0_weights(weights, x);
  TORCH_CHECK_VALUE(fused_fits(C, cell.hidden), "backward_fused: needs C <= ", kFusedMaxChannels,
              " and 2R <= ", kFusedThreads, ", got C=", C, ", R=", cell.hidden);
  const int64_t R = cell.hidden;
  const Cell0Saved pieces = cell0_saved_of(saved, x, R);

  Tensor grad_x = at::empty_like(x);
  Tensor grad_identity = identity_given ? at::empty_like(x) : Tensor();
  Tensor grad_h0 = at::empty({N, C}, f32_like(x));
  Tensor grad_c0 = at::empty({N, C}, f32_like(x));
  std::vector<Tensor> wgrads = empty_weight_grads(weights);
  Cell0WorkspaceTensors workspace(N, C, R, f32_like(x), /*split=*/false);

  const FeatureMap go_map = feature_map(grad_out, "grad_out"), x_map = feature_map(x, "x");
  const FeatureMap out_map = relu ? feature_map(out, "out") : kNoMap;
  const FeatureMap gx_map = feature_map(grad_x, "grad_x");
  const FeatureMap gi_map = identity_given ? feature_map(grad_identity, "grad_identity") : kNoMap;
  const MapLayout layout = map_layout(x, {go_map, x_map, out_map, gx_map, gi_map});
  check_launch(
      launch_fused_backward(scalar_kind(x), layout, cell.hidden, go_map, x_map, out_map, gx_map,
                            gi_map, gh, gc, pieces, h0.data_ptr<float>(),
                            c0.data_ptr<float>(), cell.weights, relu, cell_activation(activation),
                            grad_h0.data_ptr<float>(), grad_c0.data_ptr<float>(),
                            weight_grad_ptrs(wgrads), workspace.pointers(), current_stream(x)),
      "fused backward kernels");
  std::vector<Tensor> result{grad_x, grad_identity, grad_h0, grad_c0};
  result.insert(result.end(), wgrads.begin(), wgrads.end());
  return result;
}

// Returns [grad_attention (N, C) = sum_HW z * x, grad_identity = z or None].
std::vector<Tensor> grad_attention(const Tensor& grad_out, const Tensor& x, const Tensor& out,
                                   bool relu, bool identity_given) {
  check_x(x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_like_x(grad_out, "grad_out", x);
  check_like_x(out, "out", x);
  Tensor da = at::empty({x.size(0), x.size(1)}, f32_like(x));
  Tensor grad_identity = identity_given ? at::empty_like(x) : Tensor();
  const FeatureMap go_map = feature_map(grad_out, "grad_out"), x_map = feature_map(x, "x");
  const FeatureMap out_map = relu ? feature_map(out, "out") : kNoMap;
  const FeatureMap gi_map = identity_given ? feature_map(grad_identity, "grad_identity") : kNoMap;
  const MapLayout layout = map_layout(x, {go_map, x_map, out_map, gi_map});
  Tensor partials = split_sums_workspace(layout, da);
  check_launch(launch_grad_attention(scalar_kind(x), layout, go_map, x_map, out_map, gi_map, relu,
                                     da.data_ptr<float>(), partials.data_ptr<float>(),
                                     current_stream(x)),
               "grad_attention_kernel");
  return {da, grad_identity};
}

// Cell-0 backward over tiles of samples from `saved` (the forward's Cell0Saved buffer); the
// gradient reaching h_new of cell 0 is grad_h_new + grad_h_extra. Returns [grad_pooled / HW
// (N, C), grad_h0 (N, C), grad_c0 (N, C), h_new (N, C), 8 cell-0 weight grads].
std::vector<Tensor> cell0_backward(const Tensor& saved, const Tensor& h0, const Tensor& c0,
                                   const std::vector<Tensor>& weights, const OptTensor& grad_h_new,
                                   const OptTensor& grad_h_extra, const OptTensor& grad_c_new,
                                   int64_t activation, int64_t hw) {
  const Tensor x_like = state_as_map(h0);
  const c10::cuda::CUDAGuard guard(h0.device());
  const int64_t N = h0.size(0), C = h0.size(1);
  TORCH_CHECK_VALUE(hw >= 1 && hw <= INT32_MAX, "hw: expected 1 <= H * W < 2^31, got ", hw);
  check_f32_contiguous(h0, "h0", x_like, {N, C});
  check_f32_contiguous(c0, "c0", x_like, {N, C});
  const float* gh = optional_f32(grad_h_new, "grad_h_new", x_like, {N, C});
  const float* ghx = optional_f32(grad_h_extra, "grad_h_extra", x_like, {N, C});
  const float* gc = optional_f32(grad_c_new, "grad_c_new", x_like, {N, C});
  const Cell0 cell = cell0_weights(weights, x_like);
  const int64_t R = cell.hidden;
  const Cell0Saved pieces = cell0_saved_of(saved, x_like, R);

  const auto opts = h0.options();
  Tensor grad_pooled = at::empty({N, C}, opts);
  Tensor grad_h0 = at::empty({N, C}, opts);
  Tensor grad_c0 = at::empty({N, C}, opts);
  Tensor h_new = at::empty({N, C}, opts);
  std::vector<Tensor> wgrads = empty_weight_grads(weights);
  Cell0WorkspaceTensors workspace(N, C, R, opts, /*split=*/true);
  check_launch(launch_cell0_backward(static_cast<int>(N), static_cast<int>(C), cell.hidden,
                                     static_cast<int>(hw), pieces,
                                     h0.data_ptr<float>(), c0.data_ptr<float>(), cell.weights,
                                     cell_activation(activation), gh, ghx, gc,
                                     grad_pooled.data_ptr<float>(), grad_h0.data_ptr<float>(),
                                     grad_c0.data_ptr<float>(), h_new.data_ptr<float>(),
                                     weight_grad_ptrs(wgrads), workspace.pointers(),
                                     current_stream(h0)),
               "cell-0 backward kernels");
  std::vector<Tensor> result{grad_pooled, grad_h0, grad_c0, h_new};
  result.insert(result.end(), wgrads.begin(), wgrads.end());
  return result;
}

// grad_x = z * attention + grad_pooled_over_hw, laid out like x (out gives the shape and dtype).
Tensor grad_input(const Tensor& grad_out, const Tensor& out, const Tensor& attention,
                  const Tensor& grad_pooled_over_hw, bool relu) {
  check_x(out);
  const c10::cuda::CUDAGuard guard(out.device());
  check_like_x(grad_out, "grad_out", out);
  const int64_t N = out.size(0), C = out.size(1);
  check_f32_contiguous(attention, "attention", out, {N, C});
  check_f32_contiguous(grad_pooled_over_hw, "grad_pooled_over_hw", out, {N, C});
  Tensor grad_x = at::empty_like(out);
  const FeatureMap go_map = feature_map(grad_out, "grad_out");
  const FeatureMap out_map = relu ? feature_map(out, "out") : kNoMap;
  const FeatureMap gx_map = feature_map(grad_x, "grad_x");
  // the walk order follows grad_x, which is laid out like out (and x)
  check_launch(launch_grad_input(scalar_kind(out), map_layout(grad_x, {go_map, out_map, gx_map}),
                                 go_map, out_map, attention.data_ptr<float>(),
                                 grad_pooled_over_hw.data_ptr<float>(), gx_map, relu,
                                 current_stream(out)),
               "grad_input_kernel");
  return grad_x;
}

}  // namespace
}  // namespace dia_fused

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace dia_fused;
  m.doc() = "dia_fused CUDA kernels of the DIA-LSTM step (called by dia_fused.kernels.cuda_dia_step)";
  m.attr("FUSED_MAX_CHANNELS") = kFusedMaxChannels;
  m.attr("FUSED_THREADS") = kFusedThreads;
  m.def("forward_fused", &forward_fused, "whole step of one cell in one kernel", py::arg("x"),
        py::arg("h0"), py::arg("c0"), py::arg("weights"), py::arg("identity"), py::arg("relu"),
        py::arg("activation"));
  m.def("pool", &pool, "mean of x over H, W into pooled (N, C) fp32", py::arg("x"),
        py::arg("pooled"));
  m.def("cell0_forward", &cell0_forward, "cell 0 of the LSTM over tiles of samples",
        py::arg("saved"), py::arg("h0"), py::arg("c0"), py::arg("weights"), py::arg("activation"));
  m.def("scale_residual", &scale_residual, "relu?(x * attention + identity)", py::arg("x"),
        py::arg("attention"), py::arg("identity"), py::arg("relu"));
  m.def("backward_fused", &backward_fused, "backward of one cell, one block per sample",
        py::arg("grad_out"), py::arg("grad_h_new"), py::arg("grad_c_new"), py::arg("x"),
        py::arg("out"), py::arg("saved"), py::arg("h0"), py::arg("c0"), py::arg("weights"),
        py::arg("identity_given"), py::arg("relu"), py::arg("activation"));
  m.def("grad_attention", &grad_attention, "sum over H, W of z * x; grad_identity = z",
        py::arg("grad_out"), py::arg("x"), py::arg("out"), py::arg("relu"),
        py::arg("identity_given"));
  m.def("cell0_backward", &cell0_backward, "cell-0 backward over tiles of samples",
        py::arg("saved"), py::arg("h0"), py::arg("c0"), py::arg("weights"),
        py::arg("grad_h_new"), py::arg("grad_h_extra"), py::arg("grad_c_new"),
        py::arg("activation"), py::arg("hw"));
  m.def("grad_input", &grad_input, "z * attention + grad_pooled_over_hw", py::arg("grad_out"),
        py::arg("out"), py::arg("attention"), py::arg("grad_pooled_over_hw"), py::arg("relu"));
}
