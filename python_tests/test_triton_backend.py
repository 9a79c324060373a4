"""The triton backend against the reference (tolerance rule of DESIGN section 4: out, h, c and every
gradient). On CPU under the Triton interpreter with tiny shapes; the same file runs on a GPU."""
import pytest
import torch

from dia_fused import DIALSTM, ops, reference
from dia_fused.testing import compare_backend, max_abs_error, random_step_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(ops.backend_unavailable_reason("triton", DEVICE) is not None,
                                reason=f"{ops.backend_unavailable_reason('triton', DEVICE)}")


def triton_step(x, h, c, w, identity=None, relu=False, activation="sigmoid", dropout_masks=None):
    return ops.dia_step(x, h, c, w, identity, relu, activation, dropout_masks, "triton")


@pytest.mark.parametrize("n, c, h, w, r", [(2, 12, 3, 5, 4), (1, 8, 1, 1, 2), (3, 20, 4, 4, 5), (2, 70, 2, 3, 7)],
                         ids=["odd-c-hw15", "batch1-hw1", "c20", "c70-two-channel-tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_shapes_dtypes_layouts(n, c, h, w, r, dtype, channels_last):
    inputs = random_step_inputs(n, c, h, w, reduction=r, device=DEVICE, channels_last=channels_last, seed=n + c)
    compare_backend(triton_step, inputs, dtype, relu=True)


@pytest.mark.parametrize("identity, relu", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("activation", reference.CELL_ACTIVATIONS)
def test_epilogue_options_and_activations(identity, relu, activation):
    inputs = random_step_inputs(2, 12, 3, 3, reduction=3, device=DEVICE, identity=identity, seed=4)
    compare_backend(triton_step, inputs, torch.float32, relu=relu, activation=activation)


@pytest.mark.parametrize("num_cells", [2, 3])
def test_stacked_cells_with_dropout_masks(num_cells):
    inputs = random_step_inputs(2, 8, 2, 2, reduction=2, num_cells=num_cells, dropout_p=0.5, device=DEVICE, seed=9)
    compare_backend(triton_step, inputs, torch.float32, relu=True)


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
        results.append((out.detach(), [s.detach() for s in state], [p.grad.clone() for p in unit.parameters()],
                        [x.grad.clone() for x in xs]))
        for x in xs:
            x.grad = None
    (out_f, st_f, pg_f, xg_f), (out_r, st_r, pg_r, xg_r) = results
    assert max_abs_error(out_f, out_r) < 1e-5
    for a, b in zip(st_f + pg_f + xg_f, st_r + pg_r + xg_r):
        assert max_abs_error(a, b) <= 1e-4 * max(1.0, b.abs().max().item())


def test_opcheck_forward_op():
    inputs = random_step_inputs(2, 8, 2, 2, reduction=2, device=DEVICE, seed=3).requires_grad_()
    args = (inputs.x, inputs.h, inputs.c, list(inputs.weights), inputs.identity, True, "sigmoid", None, "triton")
    torch.library.opcheck(torch.ops.dia_fused.step_forward.default, args)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    unit = DIALSTM(8, reduction=2, backend="triton").to(DEVICE)

    def two_steps(x):
        out, state = unit(x, identity=x)
        out, state = unit(out, state, identity=x, relu=False)
        return out, state[1]

    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    compiled = torch.compile(two_steps, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    for g, e in zip(compiled(x), two_steps(x)):
        assert max_abs_error(g, e) < 1e-6
