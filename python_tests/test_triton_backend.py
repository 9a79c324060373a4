"""The triton backend against the reference (tolerance rule of docs/design.md §4: out, h, c and
every gradient). On CPU under the Triton interpreter with tiny shapes; the same file runs on a
GPU."""

import pytest
import torch

from dia_fused import DIALSTM, ops, reference
from dia_fused.testing import backend_step, compare_backend, max_abs_error, random_step_inputs

import layout_cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    ops.backend_unavailable_reason("triton", DEVICE) is not None,
    reason=f"{ops.backend_unavailable_reason('triton', DEVICE)}",
)


triton_step = backend_step("triton")


@pytest.mark.parametrize(
    "n, c, h, w, r",
    [(2, 12, 3, 5, 4), (1, 8, 1, 1, 2), (3, 20, 4, 4, 5), (2, 70, 2, 3, 7), (3, 72, 9, 9, 6)],
    ids=[
        "odd-c-hw15",
        "batch1-hw1",
        "c20",
        "c70-two-channel-tiles",
        "c72-hw81-2x2-map-tiles-per-sample",
    ],
)  # the elementwise kernels' reversed order
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_shapes_dtypes_layouts(n, c, h, w, r, dtype, channels_last):
    inputs = random_step_inputs(
        n, c, h, w, reduction=r, device=DEVICE, channels_last=channels_last, seed=n + c
    )
    compare_backend(triton_step, inputs, dtype, relu=True)


@pytest.mark.parametrize(
    "identity, relu", [(False, False), (False, True), (True, False), (True, True)]
)
@pytest.mark.parametrize("activation", reference.CELL_ACTIVATIONS)
def test_epilogue_options_and_activations(identity, relu, activation):
    inputs = random_step_inputs(2, 12, 3, 3, reduction=3, device=DEVICE, identity=identity, seed=4)
    compare_backend(triton_step, inputs, torch.float32, relu=relu, activation=activation)


@pytest.mark.parametrize("num_cells", [2, 3])
def test_stacked_cells_with_dropout_masks(num_cells):
    inputs = random_step_inputs(
        2, 8, 2, 2, reduction=2, num_cells=num_cells, dropout_p=0.5, device=DEVICE, seed=9
    )
    compare_backend(triton_step, inputs, torch.float32, relu=True)


def test_stacked_weights_are_packed_once_per_step_and_follow_changes(monkeypatch):
    """The forward packs the stacked cells' weights once and its backward reuses that pack (one
    pack per step, not two); the next step packs again, so weights changed outside autograd in
    between (through .data: no version bump) are seen."""
    from dia_fused.kernels.triton import host

    packs = []
    pack = host.StackedPacks._pack
    monkeypatch.setattr(
        host.StackedPacks, "_pack", staticmethod(lambda stacked: packs.append(1) or pack(stacked))
    )
    torch.manual_seed(0)
    fused = DIALSTM(8, reduction=2, num_cells=2, dropout=0.0, backend="triton").to(DEVICE)
    ref = DIALSTM(8, reduction=2, num_cells=2, dropout=0.0, backend="reference").to(DEVICE)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 8, 2, 2, device=DEVICE)
    for step in range(2):
        results = []
        for unit in (fused, ref):
            unit.zero_grad()
            out, state = unit(x, None, identity=x, relu=True)
            (out.square().sum() + state[0].sum() + state[1].sum()).backward()
            results.append([out.detach()] + [p.grad.clone() for p in unit.parameters()])
        assert len(packs) == step + 1
        for a, b in zip(*results):
            assert max_abs_error(a, b) <= 1e-4 * max(1.0, b.abs().max().item())
        with torch.no_grad():
            for unit in (fused, ref):
                for p in unit.parameters():
                    p.data.mul_(-1.5)  # outside autograd: p._version stays


def test_backward_repacks_stacked_weights_changed_in_place_since_the_forward():
    """A backward whose stacked weights changed in place after the forward (a version bump)
    packs them again instead of reusing the forward's pack."""
    from dia_fused.kernels.triton import host

    inputs = random_step_inputs(
        2, 8, 2, 2, reduction=2, num_cells=2, dropout_p=0.5, device=DEVICE, seed=4
    )
    args = (inputs.h, inputs.c, inputs.weights)
    out, h_new, _, saved = host.forward(
        inputs.x, *args, inputs.identity, True, "sigmoid", inputs.dropout_masks
    )

    def weight_grads():
        grad_out = torch.ones_like(out)
        ones = torch.ones_like(h_new)
        grads = host.backward(
            grad_out, ones, ones, inputs.x, out, saved, *args, True, True, "sigmoid",
            inputs.dropout_masks,
        )  # fmt: skip
        return grads[-1]

    with torch.no_grad():
        inputs.weights[-1].mul_(3.0)  # a stacked cell's bias
    reused = weight_grads()
    host.stacked_packs._packs.clear()
    assert torch.equal(reused, weight_grads())


def test_channels_last_output_keeps_the_layout():
    inputs = random_step_inputs(2, 8, 3, 3, reduction=2, device=DEVICE, channels_last=True)
    out, _, _ = triton_step(*inputs.args(), inputs.identity, True)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_four_chained_module_steps_match_the_reference_module():
    torch.manual_seed(0)
    fused = DIALSTM(12, reduction=4, num_cells=2, dropout=0.0, backend="triton").to(DEVICE)
    ref = DIALSTM(12, reduction=4, num_cells=2, dropout=0.0, backend="reference").to(DEVICE)
    ref.load_state_dict(fused.state_dict())
    xs = [torch.randn(2, 12, 3, 3, device=DEVICE, requires_grad=True) for _ in range(4)]
    results = []
    for unit in (fused, ref):
        state, loss = None, 0
        for t, x in enumerate(xs):
            out, state = unit(x, state, identity=x, relu=t % 2 == 0)
            loss = loss + out.square().sum()
        (loss + state[0].sum() + state[1].sum()).backward()
        results.append(
            (
                out.detach(),
                [s.detach() for s in state],
                [p.grad.clone() for p in unit.parameters()],
                [x.grad.clone() for x in xs],
            )
        )
        for x in xs:
            x.grad = None
    (out_f, st_f, pg_f, xg_f), (out_r, st_r, pg_r, xg_r) = results
    assert max_abs_error(out_f, out_r) < 1e-5
    for a, b in zip(st_f + pg_f + xg_f, st_r + pg_r + xg_r):
        assert max_abs_error(a, b) <= 1e-4 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("num_cells", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_opcheck_forward_and_backward_ops(num_cells):
    inputs = random_step_inputs(
        2, 8, 2, 2, reduction=2, num_cells=num_cells, dropout_p=0.5, device=DEVICE, seed=3
    ).requires_grad_()
    masks = inputs.dropout_masks
    args = (
        inputs.x,
        inputs.h,
        inputs.c,
        list(inputs.weights),
        inputs.identity,
        True,
        "sigmoid",
        masks,
        "triton",
    )
    torch.library.opcheck(torch.ops.dia_fused.step_forward.default, args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    detached[3] = [w.detach() for w in inputs.weights]
    out, h, c, saved = ops.step_forward(*detached)
    for grad_h, grad_c in ((torch.randn_like(h), torch.randn_like(c)), (None, None)):
        bwd_args = (
            torch.randn_like(out),
            grad_h,
            grad_c,
            detached[0],
            out,
            saved,
            detached[1],
            detached[2],
            detached[3],
            True,
            True,
            "sigmoid",
            masks,
            "triton",
        )
        torch.library.opcheck(torch.ops.dia_fused.step_backward.default, bwd_args)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    unit = DIALSTM(8, reduction=2, backend="triton").to(DEVICE)

    def two_steps(x):
        out, state = unit(x, identity=x)
        out, state = unit(out, state, identity=x, relu=False)
        return out, state[1]

    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    compiled = torch.compile(
        two_steps, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor"
    )
    for g, e in zip(compiled(x), two_steps(x)):
        assert max_abs_error(g, e) < 1e-6


@pytest.mark.slow  # interpreter, many tiles
def test_multi_tile_batch_and_reduced_width_over_one_tile():
    # 33 samples = 3 LSTM programs (16 each); C/r = 80 > the 64-wide reduced-width tile
    inputs = random_step_inputs(33, 160, 1, 2, reduction=2, device=DEVICE, seed=5)
    compare_backend(triton_step, inputs, torch.float32, relu=True)


# --- launches per step: the host wrappers issue the Triton kernels and nothing else but allocations
# and views (the kernels are stubbed out, so this checks the host side in milliseconds) ------------

FORWARD_KERNELS = ["_pool_kernel", "_lstm_forward_kernel", "_scale_kernel"]
BACKWARD_KERNELS = [
    "_grad_attention_kernel",
    "_lstm_backward_kernel",
    "_weight_grad_kernel",
    "_grad_input_kernel",
]
NO_KERNEL_OPS = {
    "aten.empty.memory_format",
    "aten.empty_like.default",
    "aten.select.int",
    "aten.view.default",
    "aten.split_with_sizes.default",
    "aten.split.Tensor",
    "aten._to_copy.default",
}


class _LaunchLog:
    def __init__(self):
        self.kernels, self.aten = [], set()

    def stub(self, name):
        log = self

        class Stub:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: log.kernels.append(name)

        return Stub()


@pytest.fixture
def launch_log(monkeypatch):
    """Every Triton kernel of the backend replaced by a stub that logs its launch."""
    from dia_fused.kernels.triton import host as triton_dia_step

    log = _LaunchLog()
    for name in FORWARD_KERNELS + BACKWARD_KERNELS:
        monkeypatch.setattr(triton_dia_step, name, log.stub(name))
    return log


def _recording_aten(log):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            log.aten.add(str(func))
            return func(*args, **(kwargs or {}))

    return Mode()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_one_step_is_three_launches_forward_and_four_backward(
    monkeypatch, launch_log, channels_last
):
    from dia_fused.kernels.triton import host as triton_dia_step

    # the fused path (one program per sample tile), which one-cell steps take below spread_min
    settings = triton_dia_step.KernelSettings(
        lstm=triton_dia_step.LSTMConfig(split_min=1 << 30, spread_min=1 << 30),
        map=triton_dia_step.current_settings().map,
    )
    inputs = random_step_inputs(
        4, 24, 3, 3, reduction=4, device=DEVICE, channels_last=channels_last
    )
    with _recording_aten(launch_log):
        out, h_new, c_new, saved = triton_dia_step.forward(
            *inputs.args(), inputs.identity, True, "sigmoid", None, settings
        )
    assert launch_log.kernels == FORWARD_KERNELS
    grad_out = torch.empty_like(out)
    launch_log.kernels.clear()
    with _recording_aten(launch_log):
        grads = triton_dia_step.backward(
            grad_out,
            None,
            None,
            inputs.x,
            out,
            saved,
            inputs.h,
            inputs.c,
            inputs.weights,
            True,
            True,
            "sigmoid",
            None,
            settings,
        )
    assert launch_log.kernels == BACKWARD_KERNELS
    assert launch_log.aten <= NO_KERNEL_OPS, (
        f"compute ops outside the kernels: {sorted(launch_log.aten - NO_KERNEL_OPS)}"
    )
    assert grads[-1].shape == (sum(w.numel() for w in inputs.weights),)


def test_custom_op_backward_adds_no_zero_fills_for_unused_outputs(monkeypatch):
    # saved never gets a gradient and the state often does not: they must reach the kernels as None
    from dia_fused.kernels.triton import host as triton_dia_step

    seen = {}
    real_backward = triton_dia_step.backward

    def spy(grad_out, grad_h_new, grad_c_new, *rest):
        seen.update(grad_h_new=grad_h_new, grad_c_new=grad_c_new)
        return real_backward(grad_out, grad_h_new, grad_c_new, *rest)

    monkeypatch.setattr(triton_dia_step, "backward", spy)
    inputs = random_step_inputs(2, 8, 2, 2, reduction=2, device=DEVICE).requires_grad_()
    out, h_new, c_new = triton_step(*inputs.args(), inputs.identity, True)
    out.sum().backward()
    assert seen == {"grad_h_new": None, "grad_c_new": None}
    assert all(w.grad is not None and w.grad.shape == w.shape for w in inputs.weights)


@pytest.mark.slow  # interpreter sweep
@pytest.mark.parametrize(
    "config",
    [
        "block_n=32,forward_groups=1",
        "block_c=16,block_r=16,forward_groups=3",
        "block_k=16,num_warps=4,forward_groups=8",
        "split_min=0",
        "split_min=0,block_c=16,block_r=16,block_n=32",
        "split_min=0,split_k=16,split_ctas=20,block_c=16,block_r=16",
    ],
)
def test_lstm_launch_configurations_give_the_same_results(monkeypatch, config):
    from dia_fused.kernels.triton import host as triton_dia_step

    settings = triton_dia_step.KernelSettings(
        lstm=triton_dia_step.LSTMConfig.from_env(config), map=triton_dia_step.current_settings().map
    )
    inputs = random_step_inputs(
        35, 72, 2, 1, reduction=3, device=DEVICE, seed=7
    )  # 3 tiles of 16, 2 of 32
    with triton_dia_step.use_settings(settings):
        compare_backend(triton_step, inputs, torch.float32, relu=True)


def test_weight_gradients_take_small_tiles_under_one_wave():
    """32x32 output tiles where 64x64 ones would leave the grid under weight_grad_ctas (128x128:
    20 tiles of 64x64, 40 of 32x32), 64x64 where they fill it (C = 2048: 2560 tiles)."""
    from dia_fused.kernels.triton import host

    settings = host.KernelSettings()

    def weight_grads(channels):
        plan = host.launch_plan(
            torch.empty(32, channels, 4, 4, device="meta"), 1, channels // 4, settings
        )
        return plan.weight_grad_blocks[:2], plan.weight_grad_tiles

    assert weight_grads(128) == ((32, 32), 40)
    assert weight_grads(2048) == ((64, 64), 2560)


@pytest.mark.parametrize("weight_grad_ctas", [0, 1 << 30], ids=["64x64", "32x32"])
def test_both_weight_gradient_tiles_match_the_reference(weight_grad_ctas):
    from dia_fused.kernels.triton import host

    settings = host.KernelSettings(
        lstm=host.LSTMConfig(weight_grad_ctas=weight_grad_ctas), map=host.current_settings().map
    )
    inputs = random_step_inputs(5, 40, 1, 2, reduction=1, device=DEVICE, seed=3)  # R = 40
    with host.use_settings(settings):
        compare_backend(triton_step, inputs, torch.float32, relu=True)


def test_lstm_configuration_takes_k_steps_and_any_split_ctas():
    from dia_fused.kernels.triton import host

    config = host.LSTMConfig.from_env("gate_block_k=16,fused_gate_block_k=32,split_ctas=264")
    assert (config.gate_block_k, config.fused_gate_block_k, config.split_ctas) == (16, 32, 264)


@pytest.mark.parametrize(
    "text, words",
    [
        ("block_n=8", "power of 2 >= 16"),
        ("gate_block_k=24", "power of 2 >= 16"),
        ("warps=8", "names"),
        ("block_c=x", "name=int"),
    ],
)
def test_bad_lstm_configuration_is_named(text, words):
    from dia_fused.kernels.triton import host as triton_dia_step

    with pytest.raises(ValueError, match="DIA_FUSED_TRITON_LSTM") as info:
        triton_dia_step.LSTMConfig.from_env(text)
    assert words in str(info.value)


@pytest.mark.slow  # interpreter sweep
@pytest.mark.parametrize(
    "config", ["tile=256,num_warps=2", "hw_block=16,c_block=8", "tile=16,c_block=16,num_warps=1"]
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_map_tile_configurations_give_the_same_results(monkeypatch, config, channels_last):
    """The map kernels' tiles (DIA_FUSED_TRITON_MAP) change how a map is cut, never the result:
    here several channel and H*W tiles per sample, down to 16-element tiles."""
    from dia_fused.kernels.triton import host as triton_dia_step

    settings = triton_dia_step.KernelSettings(
        map=triton_dia_step.MapConfig.from_env(config, triton_dia_step.current_settings().map)
    )
    inputs = random_step_inputs(
        3, 40, 5, 7, reduction=4, device=DEVICE, channels_last=channels_last, seed=3
    )
    block_c, block_hw = triton_dia_step._map_blocks(40, 35, channels_last, settings.map)
    assert block_c < 40 or block_hw < 35  # more than one tile per sample
    with triton_dia_step.use_settings(settings):
        compare_backend(triton_step, inputs, torch.float32, relu=True)


@pytest.mark.parametrize(
    "text, words",
    [
        ("tile=8", "tile must be a power of 2 >= 16"),
        ("num_warps=3", "num_warps must be a power of 2"),
        ("block=4", "names"),
    ],
)
def test_bad_map_configuration_is_named(text, words):
    from dia_fused.kernels.triton import host as triton_dia_step

    with pytest.raises(ValueError, match="DIA_FUSED_TRITON_MAP") as info:
        triton_dia_step.MapConfig.from_env(text)
    assert words in str(info.value)


def test_default_map_tiles():
    """The defaults: NCHW tiles wide along H*W (256 positions, 64 in the interpreter), channels_last
    tiles of 64 channels, 4096 elements at most."""
    from dia_fused.kernels.triton import host as triton_dia_step

    config = triton_dia_step.MapConfig(hw_block=256)
    assert triton_dia_step._map_blocks(64, 1024, False, config) == (16, 256)
    assert triton_dia_step._map_blocks(256, 49, False, config) == (64, 64)
    assert triton_dia_step._map_blocks(64, 1024, True, config) == (64, 64)
    assert triton_dia_step._map_blocks(2048, 49, True, config) == (64, 64)


def test_split_path_launches(monkeypatch, launch_log):
    # large one-cell steps: relu(u), then the gates, each spread over its chunks (forward 4
    # launches); backward the gates' gradients from the saved gates, du, ds and dh0, then weights
    # and input (6 launches)
    from dia_fused.kernels.triton import host as triton_dia_step

    settings = triton_dia_step.KernelSettings(
        lstm=triton_dia_step.LSTMConfig(split_min=0), map=triton_dia_step.current_settings().map
    )
    inputs = random_step_inputs(4, 16, 3, 3, reduction=4, device=DEVICE)  # K <= split_k
    out, h_new, c_new, saved = triton_dia_step.forward(
        *inputs.args(), inputs.identity, True, "sigmoid", None, settings
    )
    assert launch_log.kernels == [
        "_pool_kernel",
        "_lstm_forward_kernel",
        "_lstm_forward_kernel",
        "_scale_kernel",
    ]
    launch_log.kernels.clear()
    triton_dia_step.backward(
        torch.empty_like(out),
        None,
        None,
        inputs.x,
        out,
        saved,
        inputs.h,
        inputs.c,
        inputs.weights,
        True,
        True,
        "sigmoid",
        None,
        settings,
    )
    assert launch_log.kernels == ["_grad_attention_kernel"] + ["_lstm_backward_kernel"] * 3 + [
        "_weight_grad_kernel",
        "_grad_input_kernel",
    ]


@pytest.mark.parametrize("activation", reference.CELL_ACTIVATIONS)
def test_split_path_matches_the_reference(monkeypatch, activation):
    from dia_fused.kernels.triton import host as triton_dia_step

    settings = triton_dia_step.KernelSettings(
        lstm=triton_dia_step.LSTMConfig(split_min=0, block_c=16),
        map=triton_dia_step.current_settings().map,
    )
    inputs = random_step_inputs(
        18, 40, 2, 3, reduction=2, device=DEVICE, seed=11
    )  # 3 column, 2 R parts
    stacked = random_step_inputs(
        3, 16, 2, 2, reduction=2, num_cells=2, dropout_p=0.5, device=DEVICE, seed=12
    )
    with triton_dia_step.use_settings(settings):
        compare_backend(triton_step, inputs, torch.float32, relu=True, activation=activation)
        compare_backend(
            triton_step, stacked, torch.float32, relu=True, activation=activation
        )  # stays fused


@pytest.mark.parametrize("grad_layout", ["like-out", "nhwc"])
@pytest.mark.parametrize("case", layout_cases.CASES)
def test_non_dense_and_mixed_layouts_match_the_reference(case, grad_layout):
    layout_cases.check_against_reference("triton", case, grad_layout, DEVICE)


def test_map_larger_than_the_grid_covers_is_a_clear_error():
    from dia_fused.kernels.triton import host as triton_dia_step

    x = torch.zeros(1, 4, 1, 1, device=DEVICE).expand(
        1, 4, 2**20, 2**20
    )  # 2^40 positions, no memory
    inputs = random_step_inputs(1, 4, 1, 1, reduction=2, device=DEVICE)
    with pytest.raises(
        ValueError,
        match=r"x: \d+ tiles of 4 channels x \d+ positions are more than the triton "
        r"backend's map kernels cover \(2147483647\), got shape \(1, 4, 1048576",
    ):
        triton_dia_step.forward(x, inputs.h, inputs.c, inputs.weights, None, False, "sigmoid", None)


def test_bad_setting_makes_the_backend_unavailable_with_the_reason(monkeypatch, capsys):
    """A malformed DIA_FUSED_TRITON_* value is read when used: available_backends() and
    `python -m dia_fused` report the triton backend unavailable, naming the variable; a step
    asking for triton by name raises with that reason before any kernel runs."""
    from dia_fused import BackendUnavailableError, ops
    from dia_fused.__main__ import main

    for name, value, words in [
        (
            "DIA_FUSED_TRITON_DOT_PRECISION",
            "fp64",
            "DIA_FUSED_TRITON_DOT_PRECISION: expected one of ('ieee', 'tf32x3', 'tf32'), "
            "got 'fp64'",
        ),
        (
            "DIA_FUSED_TRITON_LSTM",
            "block_n=8",
            "DIA_FUSED_TRITON_LSTM: block_n must be a power of 2",
        ),
        ("DIA_FUSED_TRITON_MAP", "tile=x", "DIA_FUSED_TRITON_MAP: expected comma-separated"),
    ]:
        monkeypatch.setenv(name, value)
        assert "triton" not in ops.available_backends(DEVICE)
        assert words in ops.backend_unavailable_reason("triton", DEVICE)
        assert main(["--no-check"]) == 0
        assert words in capsys.readouterr().out
        inputs = random_step_inputs(1, 8, 2, 2, reduction=2, device=DEVICE)
        with pytest.raises(BackendUnavailableError, match=name):
            triton_step(*inputs.args())
        monkeypatch.delenv(name)
    assert "triton" in ops.available_backends(DEVICE)
