"""The CUDA backend without a GPU: its kernels compiled for the CPU (python_tests/emulation) under
its unchanged host wrapper (dia_fused/kernels/cuda_dia_step.py), against the float64 reference with
the tolerance rule of docs/design.md §4, over outputs, state and every gradient.

Shapes are small (every emulated thread is an OS thread) but chosen for the edges of the kernels:
C not a multiple of the GEMM tiles or of the vector width, N over one 32-sample tile, H*W = 1,
batch 1, C = R, C past the one-block-per-sample limit, vectorized and scalar walks, contiguous,
channels_last and mixed layouts. The same cases run on the GPU in test_cuda_backend.py.
"""

from __future__ import annotations

import pytest
import torch

from dia_fused import reference
from dia_fused.kernels import cuda_dia_step
from dia_fused.testing import backend_step, compare_backend, random_step_inputs

import cuda_emulation

pytestmark = pytest.mark.skipif(
    cuda_emulation.unavailable_reason() is not None,
    reason=f"kernel emulation: {cuda_emulation.unavailable_reason()}",
)


# (N, C, H, W, reduction): what each one exercises
SHAPES = [
    pytest.param(3, 20, 5, 3, 4, id="odd-hw"),  # HW=15: scalar planes, channels_last rows of 20
    pytest.param(2, 16, 4, 4, 4, id="vec-planes"),  # HW=16, C=16: 16-byte accesses both layouts
    pytest.param(1, 8, 1, 1, 2, id="batch1-hw1"),  # H*W = 1, one sample
    pytest.param(5, 3, 2, 3, 1, id="c3-r1"),  # C < vector width, R = C
    pytest.param(33, 36, 2, 2, 4, id="tiles"),  # N > 32 samples, 4C=144 and R=9 cut GEMM tiles
]


ops_step = backend_step("cuda")


def forced(path):
    """Steps (forward and backward) inside run the cuda kernels of `path`."""
    return cuda_dia_step.use_settings(cuda_dia_step.KernelSettings(path=path))


def run(emu, inputs, dtype, path, **kwargs):
    with forced(path):
        errors = compare_backend(ops_step, inputs, dtype, **kwargs)
    assert errors, "nothing was compared"
    return errors


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("n,c,h,w,r", SHAPES)
def test_fp32_shapes_layouts_paths(cuda_on_cpu, n, c, h, w, r, path, channels_last):
    inputs = random_step_inputs(n, c, h, w, reduction=r, channels_last=channels_last, seed=n + c)
    run(cuda_on_cpu, inputs, torch.float32, path, relu=True)
    expected = "forward_fused" if path == "fused" else "pool"
    assert cuda_on_cpu.launches[0] == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize(
    "n,c,h,w,r",
    [
        pytest.param(2, 16, 4, 4, 4, id="vec8-planes"),  # HW=16: 8 halves per access along H*W
        pytest.param(3, 24, 3, 3, 4, id="vec8-rows"),  # C=24: 8 halves per access along C only
    ],
)
def test_half_dtypes(cuda_on_cpu, n, c, h, w, r, path, channels_last, dtype):
    inputs = random_step_inputs(n, c, h, w, reduction=r, channels_last=channels_last, seed=7)
    run(cuda_on_cpu, inputs, dtype, path, relu=True)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_cell_activations(cuda_on_cpu, activation, path):
    inputs = random_step_inputs(4, 12, 3, 2, reduction=3, seed=11)
    run(cuda_on_cpu, inputs, torch.float32, path, relu=True, activation=activation)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("identity,relu", [(False, False), (True, False), (False, True)])
def test_identity_and_relu_options(cuda_on_cpu, identity, relu, path):
    inputs = random_step_inputs(3, 10, 3, 3, reduction=2, identity=identity, seed=5)
    run(cuda_on_cpu, inputs, torch.float32, path, relu=relu)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_mixed_layouts_identity_contiguous_x_channels_last(cuda_on_cpu, path):
    inputs = random_step_inputs(2, 16, 4, 4, reduction=4, seed=3)
    inputs.x = inputs.x.contiguous(memory_format=torch.channels_last)
    run(cuda_on_cpu, inputs, torch.float32, path, relu=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_channels_split_only(cuda_on_cpu, channels_last):
    """C=260 > FUSED_MAX_CHANNELS: auto takes the split path, whose C tiles then run (channels_last:
    two row tiles of 256 channels per sample, which the apply passes walk mirrored)."""
    inputs = random_step_inputs(3, 260, 1, 2, reduction=20, seed=9, channels_last=channels_last)
    run(cuda_on_cpu, inputs, torch.float32, "auto", relu=True)
    assert cuda_on_cpu.launches[0] == "pool"
    with pytest.raises(ValueError, match="path='fused' needs"):
        cuda_dia_step.forward(
            *inputs.args(),
            inputs.identity,
            True,
            "sigmoid",
            None,
            cuda_dia_step.KernelSettings(path="fused"),
        )


def test_fused_limit_channels(cuda_on_cpu):
    """C = FUSED_MAX_CHANNELS = 256 with R = 128: the largest one-block-per-sample case."""
    inputs = random_step_inputs(2, 256, 2, 1, reduction=2, channels_last=True, seed=2)
    run(cuda_on_cpu, inputs, torch.float32, "fused", relu=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_cells,dropout_p", [(2, 0.0), (3, 0.5)])
def test_stacked_cells(cuda_on_cpu, num_cells, dropout_p, dtype):
    inputs = random_step_inputs(
        3,
        12,
        2,
        3,
        reduction=4,
        num_cells=num_cells,
        dropout_p=dropout_p,
        seed=num_cells,
        channels_last=True,
    )
    assert (inputs.dropout_masks is not None) == (dropout_p > 0)
    run(cuda_on_cpu, inputs, dtype, "auto", relu=True)
    assert cuda_on_cpu.launches[:3] == ["pool", "cell0_forward", "scale_residual"]


def test_auto_path_by_shape(cuda_on_cpu):
    small = random_step_inputs(2, 16, 4, 4, seed=1)  # C*HW = 256: one block per sample pays
    cuda_dia_step.forward(*small.args(), None, False, "sigmoid", None)
    assert cuda_on_cpu.launches == ["forward_fused"]
    cuda_on_cpu.launches.clear()
    big = random_step_inputs(2, 16, 40, 30, seed=1)  # 2 samples of 19200 elements: split
    cuda_dia_step.forward(*big.args(), None, False, "sigmoid", None)
    assert cuda_on_cpu.launches == ["pool", "cell0_forward", "scale_residual"]


@pytest.mark.parametrize("path", ["fused", "split"])
def test_backward_with_broadcast_and_noncollapsible_grad_out(cuda_on_cpu, path):
    """grad_out as autograd may hand it over: an expanded scalar (all strides 0), and a map whose
    H and W do not collapse; both must give the gradients of the same dense grad_out (up to the
    summation order: the dense one takes the vectorized walk, the broadcast one cannot)."""
    inputs = random_step_inputs(2, 8, 4, 4, reduction=2, seed=4)
    x, h, c, w = inputs.args()
    settings = cuda_dia_step.KernelSettings(path=path)
    out, _, _, saved = cuda_dia_step.forward(
        x, h, c, w, inputs.identity, True, "sigmoid", None, settings
    )

    def grads(grad_out):
        return cuda_dia_step.backward(
            grad_out, None, None, x, out, saved, h, c, w, True, True, "sigmoid", None, settings
        )

    dense = grads(torch.full_like(out, 0.5))
    broadcast = grads(torch.tensor(0.5).expand(out.shape))
    strided = torch.full((2, 8, 8, 4), 0.5)[:, :, ::2]  # stride(2) = 8 != W * stride(3) = 4
    assert strided.stride(2) != strided.shape[3] * strided.stride(3)
    noncollapsible = grads(strided)
    for other in (broadcast, noncollapsible):
        for a, b in zip([*dense[:4], *dense[4]], [*other[:4], *other[4]]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_backward_reads_the_saved_u_and_gates(cuda_on_cpu, path):
    """Both paths save the pooled mean, u and the gate pre-activations (Cell0Saved), each within
    tolerance of float64, and the backward starts from them instead of recomputing cell 0 from
    the weights: gates changed in the saved buffer change the gradients."""
    n, c, r = 3, 20, 5
    inputs = random_step_inputs(n, c, 3, 3, reduction=c // r, seed=41)
    x, h, c_state, w = inputs.args()
    settings = cuda_dia_step.KernelSettings(path=path)
    out, _, _, saved = cuda_dia_step.forward(
        x, h, c_state, w, inputs.identity, True, "sigmoid", None, settings
    )
    assert saved.shape == cuda_dia_step.saved_shape(x.shape, w)
    w64 = [t.double() for t in w]
    pooled = x.double().mean((2, 3))
    u = torch.stack(
        [
            torch.relu(pooled @ w64[0].T + w64[1]),
            torch.relu(h[0].double() @ w64[4].T + w64[5]),
        ]
    )
    gates = u[0] @ w64[2].T + w64[3] + u[1] @ w64[6].T + w64[7]
    pieces = saved.split([n * c, 2 * n * r, 4 * n * c])
    for got, want in zip(pieces, (pooled, u, gates)):
        torch.testing.assert_close(got.double(), want.flatten(), rtol=1e-5, atol=1e-5)

    grad_out = torch.randn_like(out)
    args = (x, out, saved, h, c_state, w, True, True, "sigmoid", None, settings)
    grad_c = cuda_dia_step.backward(grad_out, None, None, *args)[3]
    changed = saved.clone()
    changed[n * (c + 2 * r) :] += 0.5
    args = (x, out, changed, h, c_state, w, True, True, "sigmoid", None, settings)
    assert not torch.allclose(cuda_dia_step.backward(grad_out, None, None, *args)[3], grad_c)


def test_none_state_gradients_are_zero(cuda_on_cpu):
    """backward with grad_h_new = grad_c_new = None equals backward with zero tensors."""
    inputs = random_step_inputs(3, 10, 2, 2, reduction=2, seed=8)
    x, h, c, w = inputs.args()
    for path in ("fused", "split"):
        settings = cuda_dia_step.KernelSettings(path=path)
        out, h_new, c_new, saved = cuda_dia_step.forward(
            x, h, c, w, None, False, "sigmoid", None, settings
        )
        grad_out = torch.randn_like(out)
        args = (x, out, saved, h, c, w, False, False, "sigmoid", None, settings)
        none = cuda_dia_step.backward(grad_out, None, None, *args)
        zero = cuda_dia_step.backward(
            grad_out, torch.zeros_like(h_new), torch.zeros_like(c_new), *args
        )
        assert none[1] is None and zero[1] is None
        for a, b in zip([*none[:1], *none[2:4], *none[4]], [*zero[:1], *zero[2:4], *zero[4]]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_deterministic(cuda_on_cpu):
    inputs = random_step_inputs(33, 12, 2, 2, reduction=4, seed=12)
    first = compare_backend_outputs(inputs)
    second = compare_backend_outputs(inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_deterministic_split_k_hidden_gradient(cuda_on_cpu):
    """C = 260: the hidden-gradient GEMM's K = 4C = 1040 splits into 5 chunks of 256 and the
    reduced linears' K = C into 3 of 128 (the last short), whose partial sums are added in chunk
    order: the same bits on every run."""
    from dia_fused.kernels import cuda_build

    assert cuda_build.hidden_grad_splits(260) == 5
    assert cuda_build.reduced_linear_splits(260) == 3
    inputs = random_step_inputs(33, 260, 1, 1, reduction=20, seed=13)
    first = compare_backend_outputs(inputs)
    second = compare_backend_outputs(inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def compare_backend_outputs(inputs):
    from dia_fused.testing import step_outputs_and_grads

    with forced("split"):
        result = step_outputs_and_grads(ops_step, inputs.to(torch.float32), relu=True)
    return [v for v in result.values() if v is not None]


def test_paths_agree_with_each_other(cuda_on_cpu):
    """fused and split take different summation orders; both within tolerance is tested above,
    here they must also agree closely with each other."""
    from dia_fused.testing import step_outputs_and_grads

    inputs = random_step_inputs(4, 32, 4, 4, reduction=4, seed=13)
    with forced("fused"):
        fused = step_outputs_and_grads(ops_step, inputs.to(torch.float32), relu=True)
    with forced("split"):
        split = step_outputs_and_grads(ops_step, inputs.to(torch.float32), relu=True)
    for key in fused:
        torch.testing.assert_close(fused[key], split[key], rtol=1e-5, atol=1e-5, msg=key)


def test_weights_in_half_precision_get_grads_in_their_dtype(cuda_on_cpu):
    inputs = random_step_inputs(2, 8, 2, 2, reduction=2, seed=6)
    weights16 = [w.to(torch.float16).requires_grad_() for w in inputs.weights]
    with forced("fused"):
        out, h, c = ops_step(inputs.x, inputs.h, inputs.c, weights16, relu=False)
        (out.sum() + h.sum()).backward()
    assert all(w.grad is not None and w.grad.dtype == torch.float16 for w in weights16)
    ref_out, _, _ = reference.dia_lstm_step(inputs.x, inputs.h, inputs.c, weights16)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


def _map_reductions(emu, x, grad_out, out):
    """pool and grad attention (relu, identity) of the emulated kernels, with the kernel grids
    each made."""
    pooled = torch.empty(x.shape[:2])
    emu.pool(x, pooled)
    pool_grids = emu.grids[-1][1]
    da, grad_identity = emu.grad_attention(grad_out, x, out, True, True)
    return (pooled, da, grad_identity), (pool_grids, emu.grids[-1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_reductions_split_hw_deterministically(emu, dtype):
    """channels_last with few (sample, channel tile) blocks: pool and grad attention spread H*W
    over blocks along grid axis z, each writing partial sums, then a second launch adds them in
    split order. Against float64, and the same bits on a second run."""
    gen = torch.Generator().manual_seed(21)
    shape = (2, 16, 16, 16)  # small enough that torch's own ops stay single-threaded (TSan)
    x, grad_out, out = (
        torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
        for _ in range(3)
    )
    first, grids = _map_reductions(emu, x, grad_out, out)
    for launches in grids:
        assert len(launches) == 2 and launches[0][2] >= 2, launches  # split H*W, then the sum
    z = grad_out.double() * (out.double() > 0)
    expected = (x.double().mean((2, 3)), (z * x.double()).sum((2, 3)))
    for got, want in zip(first[:2], expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first[2].double(), z.to(dtype).double(), rtol=0, atol=0)
    second, _ = _map_reductions(emu, x, grad_out, out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,hw", [(torch.float32, (5, 5)), (torch.bfloat16, (7, 7))])
def test_small_nchw_planes_share_warps(emu, dtype, hw):
    """Small unvectorized NCHW planes: a lane group smaller than a warp per plane, several planes
    per warp, so the grid has fewer blocks than one warp per plane needs (8 planes per 256-thread
    block). The results stay within tolerance of float64."""
    gen = torch.Generator().manual_seed(22)
    n, c = 3, 37  # 111 planes: the last warp is only partly filled
    x, grad_out, out = (torch.randn(n, c, *hw, generator=gen).to(dtype) for _ in range(3))
    (pooled, da, _), grids = _map_reductions(emu, x, grad_out, out)
    one_warp_per_plane = -(-n * c // 8)
    for launches in grids:
        assert len(launches) == 1 and launches[0][0] < one_warp_per_plane, launches
    z = grad_out.double() * (out.double() > 0)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(pooled.double(), x.double().mean((2, 3)), rtol=tol, atol=tol)
    torch.testing.assert_close(da.double(), (z * x.double()).sum((2, 3)), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,hw", [(torch.float32, (8, 8)), (torch.bfloat16, (7, 7))])
def test_fused_nchw_planes_take_the_streaming_lane_groups(emu, dtype, hw):
    """The one-block-per-sample forward walks small NCHW planes with the lane groups of the
    streaming passes (block_planes_reduce: 4 and 2 lanes per plane here, all of the block's
    threads in flight), not one warp per plane: its pooled vector has the bits of pool_kernel's,
    whose summation order is the same. C = 37 leaves the last round of planes partly filled."""
    gen = torch.Generator().manual_seed(24)
    n, c, r = 2, 37, 5
    x, identity = (torch.randn(n, c, *hw, generator=gen).to(dtype) for _ in range(2))
    h0, c0 = (torch.randn(n, c, generator=gen) for _ in range(2))
    weights = [
        torch.randn(shape, generator=gen) * 0.1
        for shape in [(r, c), (r,), (4 * c, r), (4 * c,)] * 2
    ]
    pooled = emu.forward_fused(x, h0, c0, weights, identity, True, 1)[3][: n * c].view(n, c)
    pooled_by_pool_kernel = torch.empty(n, c)
    emu.pool(x, pooled_by_pool_kernel)
    assert torch.equal(pooled, pooled_by_pool_kernel)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(pooled.double(), x.double().mean((2, 3)), rtol=tol, atol=tol)


def test_cell0_forward_splits_k_over_blocks(emu):
    """C = R = 260: the reduced linears' K = C runs in 3 chunks (x 2 paths along grid axis z),
    then a launch adds them; the gate GEMMs' K = R in 3 chunks per path (6 partial sums along z),
    then the pointwise launch adds them in order. h', c' and the saved u and gate
    pre-activations match the float64 cell."""
    from dia_fused.kernels import cuda_build

    gen = torch.Generator().manual_seed(23)
    n, c, r = 3, 260, 260
    assert cuda_build.reduced_linear_splits(c) == 3 and cuda_build.gate_splits(r) == 6
    pooled, h0, c0 = (torch.randn(n, c, generator=gen) for _ in range(3))
    weights = [
        torch.randn(shape, generator=gen) * 0.1
        for shape in [(r, c), (r,), (4 * c, r), (4 * c,)] * 2
    ]
    saved = torch.full((cuda_build.cell0_saved_floats(n, c, r),), float("nan"))
    saved[: n * c] = pooled.flatten()
    h_new, c_new = emu.cell0_forward(saved, h0, c0, weights, 1)  # act(c) = tanh
    grids = emu.grids[-1][1]
    # reduced linears, their chunk sum, gate GEMMs, pointwise
    assert len(grids) == 4 and grids[0][2] == 6 and grids[2][2] == 6, grids
    w = [t.double() for t in weights]
    u_ih = torch.relu(pooled.double() @ w[0].T + w[1])
    u_hh = torch.relu(h0.double() @ w[4].T + w[5])
    gates = u_ih @ w[2].T + w[3] + u_hh @ w[6].T + w[7]
    saved_u = saved[n * c : n * (c + 2 * r)].view(2, n, r)
    torch.testing.assert_close(saved_u.double(), torch.stack([u_ih, u_hh]), rtol=1e-5, atol=1e-5)
    saved_gates = saved[n * (c + 2 * r) :].view(n, 4 * c)
    torch.testing.assert_close(saved_gates.double(), gates, rtol=1e-5, atol=1e-5)
    i, f, g, o = gates.chunk(4, 1)
    c_want = f.sigmoid() * c0.double() + i.sigmoid() * g.tanh()
    torch.testing.assert_close(c_new.double(), c_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_new.double(), o.sigmoid() * c_want.tanh(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # about 5 s: the emulated weight-grad GEMMs at C = R = 130
def test_split_path_backward_splits_k_of_every_lstm_phase(cuda_on_cpu):
    """C = R = 130 on the split path: the forward's reduced linears (K = C) and gate GEMMs
    (K = R), the backward's input gradients (K = R) and hidden gradient (K = 4C) all split K over
    blocks along grid axis z, each followed by an in-order sum. Outputs, state and every gradient
    within tolerance of float64, and the same bits on a second run."""
    from dia_fused.kernels import cuda_build

    assert cuda_build.input_grad_splits(130) == 2 and cuda_build.gate_splits(130) == 4
    inputs = random_step_inputs(1, 130, 1, 1, reduction=1, seed=24)
    run(cuda_on_cpu, inputs, torch.float32, "split", relu=True)
    grids = dict(cuda_on_cpu.grids)
    # reduced linears + sum, gate GEMMs + pointwise
    assert [g[2] for g in grids["cell0_forward"]] == [4, 1, 4, 1], grids["cell0_forward"]
    # pointwise (from the saved gates), du + sum, d pooled / d h0 + sum, weight grads
    assert [g[2] for g in grids["cell0_backward"]] == [1, 6, 1, 4, 1, 1], grids["cell0_backward"]
    first = compare_backend_outputs(inputs)
    second = compare_backend_outputs(inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
