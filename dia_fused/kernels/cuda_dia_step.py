"""CUDA backend of the DIA-LSTM step: the loader of the extension compiled from csrc/ and its host
wrapper, `forward` and `backward` of the kernel-module contract (docs/design.md §2), shared with
the Triton backend so that step_op.py defines one custom op for both.

Loading: `dia_fused._C` when it was built ahead of time (`pip install --no-build-isolation .` with
a CUDA build of torch), else a JIT build with torch.utils.cpp_extension.load (ninja), compiled on
first CUDA use and cached in torch's extensions directory. Nothing is compiled or loaded at import:
on a machine without CUDA this module imports fine and `unavailable_reason` says what is missing.
torch.utils.cpp_extension is imported only for a build (importing it on a CUDA build of torch
without a GPU prints a warning). A failed build is remembered for the process, with its reason;
`reset_build()` forgets it so that the next CUDA use tries again (after installing ninja, say).

Paths (chosen per call by shape, see `_fused_path`, unless the kernel settings force one):
  fused: one cell and C <= FUSED_MAX_CHANNELS: the forward is 1 kernel (one block per sample:
         pool -> cell 0 -> scale), the backward 2 (one block per sample, then the weight grads).
  split: pool, cell-0 reduced linears, expansion + pointwise, scale (4 kernels); the backward:
         grad attention, pointwise, d hidden, d inputs, weight grads, grad input.
         Stacked cells (num_cells > 1) run between cell 0 and the scale as fp32 ATen matmuls
         (stacked_cells_forward / stacked_cells_backward below).
Both paths save what the backward reads of cell 0 in one fp32 buffer (`saved_shape`): the pooled
mean, u and the gate pre-activations, so that the backward does not read every weight a second
time to recompute them.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from dataclasses import dataclass
from typing import ContextManager, List, Optional, Sequence, Tuple

import torch

from .. import reference
from .. import settings as env
from . import SUPPORTED_DTYPES, SettingsOverride, availability_changed, cuda_build, layouts
from .cuda_build import ACTIVATION_CODES, FUSED_MAX_CHANNELS, FUSED_THREADS

Tensor = torch.Tensor

PATHS = ("auto", "fused", "split")
# One block per sample streams this many elements of a map in about a launch's time; past it the
# fused path needs enough samples to fill the GPU (see _fused_path).
FUSED_SMALL_MAP = 1 << 14

INSTALL_HINT = (
    "install a CUDA build of torch and a CUDA toolkit, then run "
    "`pip install --no-build-isolation .` in the dia_fused source tree (builds the "
    "extension ahead of time), or keep a CUDA toolkit and ninja around for the "
    "build on first use"
)


@dataclass(frozen=True)
class KernelSettings:
    """What a step's launches depend on besides the tensors. `path`: "auto" chooses the kernels by
    shape (_fused_path); "fused" and "split" force them (tests, benchmarks), and a forced fused
    path raises for a step it cannot take. Default: DIA_FUSED_CUDA_PATH, else "auto"."""

    path: str = "auto"

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"path: expected one of {PATHS}, got {self.path!r}")


_override = SettingsOverride(KernelSettings)


def current_settings() -> KernelSettings:
    """The settings a call without `settings=` runs with: those of the innermost use_settings(),
    else the defaults with DIA_FUSED_CUDA_PATH applied (ValueError naming it when malformed)."""
    override = _override.value
    return override if override is not None else _from_environment(env.raw(env.ENV_CUDA_PATH))


def use_settings(settings: KernelSettings) -> ContextManager[KernelSettings]:
    """Steps inside run with `settings` (for callers that reach the kernels through ops.dia_step,
    such as the tests, where no `settings=` argument can travel); see SettingsOverride."""
    return _override.use(settings)


@functools.lru_cache(maxsize=8)  # keyed on the variable's text: a new value is parsed once
def _from_environment(path: Optional[str]) -> KernelSettings:
    return KernelSettings(path=env.parse_choice(env.ENV_CUDA_PATH, path, PATHS, "auto"))


_lock = threading.Lock()
_extension = None
_load_error: Optional[str] = None
_ready_devices = set()  # devices whose unavailable_reason was None (checked once each)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def _jit_blocker() -> Optional[str]:
    """Why a JIT build cannot run here, or None."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build: {INSTALL_HINT}"
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    if CUDA_HOME is None:
        return (
            "dia_fused._C was not built ahead of time and no CUDA toolkit was found for the "
            f"build on first use (set CUDA_HOME or put nvcc on PATH): {INSTALL_HINT}"
        )
    if not is_ninja_available():
        return (
            "dia_fused._C was not built ahead of time and the build on first use needs ninja: "
            "pip install ninja"
        )
    if cuda_build.csrc_dir() is None:
        return (
            "dia_fused._C was not built ahead of time and the csrc/ sources are not installed "
            f"with this package: {INSTALL_HINT}"
        )
    return None


def _load():
    """The extension module (cached), or None with the reason in _load_error."""
    global _extension, _load_error
    with _lock:
        if _extension is not None or _load_error is not None:
            return _extension
        aot_note = ""
        try:
            _extension = importlib.import_module(cuda_build.EXTENSION_NAME)
        except ModuleNotFoundError as err:
            if err.name != cuda_build.EXTENSION_NAME:
                aot_note = f" (dia_fused._C failed to import: {err})"
        except ImportError as err:  # built, but against another torch / CUDA
            aot_note = f" (dia_fused._C failed to import: {err})"
        if _extension is None:
            blocker = _jit_blocker()
            if blocker is not None:
                _load_error = blocker + aot_note
                return None
            from torch.utils.cpp_extension import load

            src = cuda_build.csrc_dir()
            try:
                _extension = load(
                    name=cuda_build.JIT_NAME,
                    sources=[os.path.join(src, f) for f in cuda_build.SOURCES],
                    extra_cflags=list(cuda_build.CXX_FLAGS),
                    extra_include_paths=[src],
                    extra_cuda_cflags=cuda_build.NVCC_FLAGS
                    + cuda_build.default_arch_flags(env.cuda_arch_list()),
                    verbose=env.verbose_build(),
                )
            except Exception as err:  # compiler errors: keep the message as the reason
                _load_error = (
                    f"building the CUDA extension on first use failed{aot_note}: "
                    f"{type(err).__name__}: {err}"
                )
                return None
        if (_extension.FUSED_MAX_CHANNELS, _extension.FUSED_THREADS) != (
            FUSED_MAX_CHANNELS,
            FUSED_THREADS,
        ):
            _load_error = (
                "the loaded CUDA extension does not match this dia_fused (rebuild it: "
                "pip install --no-build-isolation .)"
            )
            _extension = None
        return _extension


def reset_build() -> Optional[str]:
    """Forgets a failed load or build (the reason it gave is returned) so that the next CUDA use
    tries again; a loaded extension stays loaded (a module cannot be unloaded)."""
    global _load_error
    with _lock:
        reason, _load_error = _load_error, None
        _ready_devices.clear()
    availability_changed()  # step plans that chose another backend choose again
    return reason


def unavailable_reason(device) -> Optional[str]:
    """None when the cuda backend can run on `device`, else a sentence saying why not and how to
    get it. May build the extension (first CUDA use); never raises for a missing toolkit."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA devices only, got device {device}"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build: {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8 and not env.cuda_arch_list():
        return (
            f"the GPU has compute capability {major}.{minor}; the cuda backend is built for "
            f"sm_80 and sm_90 by default: set TORCH_CUDA_ARCH_LIST={major}.{minor} and rebuild"
        )
    if _load() is None:
        return _load_error
    try:
        current_settings()
    except ValueError as err:
        return f"its launch settings are malformed: {err}"
    return None


def _extension_for(x: Tensor):
    if x.device not in _ready_devices:  # checked once per device: no per-call overhead
        reason = unavailable_reason(x.device)
        if reason is not None:
            raise RuntimeError(f"the cuda backend cannot run on {x.device}: {reason}")
        _ready_devices.add(x.device)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"x: the cuda backend supports dtypes {SUPPORTED_DTYPES}, got {x.dtype} "
            f"(use backend='reference' for it)"
        )
    return _extension


# ------------------------------------------------------------------------------------------------
# Stacked cells (num_cells > 1): plain fp32 ATen, any device
# ------------------------------------------------------------------------------------------------


@dataclass
class StackedCells:
    """Forward values of cells 1..L-1 kept for their backward."""

    inputs: List[Tensor]  # (N, C) input of cell l: h of cell l-1, times its dropout mask
    gates: List[Tensor]  # (N, 4C) pre-activations
    h: List[Tensor]  # (N, C) new hidden states
    c: List[Tensor]  # (N, C) new cell states


def stacked_cells_forward(
    h_cell0: Tensor,  # (N, C) new h of cell 0
    h: Tensor,  # (L, N, C) previous hidden states
    c: Tensor,  # (L, N, C) previous cell states
    stacked_weights: Sequence[Tensor],  # 4 * (L - 1): wih (4C, C), bih, whh (4C, C), bhh per cell
    activation: str,
    dropout_masks: Optional[Tensor],  # (L-1, N, C) or None
) -> StackedCells:
    out = StackedCells([], [], [], [])
    inp = h_cell0
    for cell in range(1, h.shape[0]):
        wih, bih, whh, bhh = stacked_weights[4 * (cell - 1) : 4 * cell]
        if dropout_masks is not None:
            inp = inp * dropout_masks[cell - 1]
        gates = torch.addmm(bih, inp, wih.t()) + torch.addmm(bhh, h[cell], whh.t())
        h_cell, c_cell = reference.lstm_pointwise(gates, c[cell], activation)
        out.inputs.append(inp)
        out.gates.append(gates)
        out.h.append(h_cell)
        out.c.append(c_cell)
        inp = h_cell
    return out


def _activation_and_grad(c: Tensor, activation: str) -> Tuple[Tensor, Tensor]:
    act = reference.cell_activation(c, activation)
    if activation == "sigmoid":
        return act, act * (1 - act)
    if activation == "tanh":
        return act, 1 - act * act
    return act, (c > 0).to(c.dtype)


def stacked_cells_backward(
    fwd: StackedCells,
    h: Tensor,  # (L, N, C) previous hidden states
    c: Tensor,  # (L, N, C) previous cell states
    stacked_weights: Sequence[Tensor],
    activation: str,
    dropout_masks: Optional[Tensor],  # (L-1, N, C) or None
    grad_h_new: Optional[Tensor],  # (L, N, C) or None
    grad_c_new: Optional[Tensor],  # (L, N, C) or None
    grad_attention: Tensor,  # (N, C) gradient into h of the last cell from the feature map
) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor]]:
    """Returns (gradient into h of cell 0, [d h_prev of cells 1..L-1], [d c_prev of cells 1..L-1],
    stacked weight grads in weight order)."""
    num_cells = h.shape[0]
    grad_h = grad_attention if grad_h_new is None else grad_h_new[-1] + grad_attention
    grad_h_prev: List[Tensor] = [None] * (num_cells - 1)
    grad_c_prev: List[Tensor] = [None] * (num_cells - 1)
    grad_weights: List[Tensor] = [None] * (4 * (num_cells - 1))
    for cell in range(num_cells - 1, 0, -1):
        k = cell - 1
        wih, _, whh, _ = stacked_weights[4 * k : 4 * k + 4]
        gi, gf, gg, go = fwd.gates[k].chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(gi), torch.sigmoid(gf), torch.tanh(gg), torch.sigmoid(go)
        act_c, act_grad = _activation_and_grad(fwd.c[k], activation)
        grad_c = grad_h * o * act_grad
        if grad_c_new is not None:
            grad_c = grad_c + grad_c_new[cell]
        grad_gates = torch.cat(
            [
                grad_c * g * i * (1 - i),
                grad_c * c[cell] * f * (1 - f),
                grad_c * i * (1 - g * g),
                grad_h * act_c * o * (1 - o),
            ],
            dim=1,
        )
        grad_c_prev[k] = grad_c * f
        grad_h_prev[k] = grad_gates @ whh
        grad_bias = grad_gates.sum(dim=0)
        grad_weights[4 * k : 4 * k + 4] = [
            grad_gates.t() @ fwd.inputs[k],
            grad_bias,
            grad_gates.t() @ h[cell],
            grad_bias,
        ]
        grad_h = grad_gates @ wih
        if dropout_masks is not None:
            grad_h = grad_h * dropout_masks[k]
        if grad_h_new is not None:
            grad_h = grad_h + grad_h_new[cell - 1]
    return grad_h, grad_h_prev, grad_c_prev, grad_weights


# ------------------------------------------------------------------------------------------------
# Host wrapper (contract in docs/design.md §2)
# ------------------------------------------------------------------------------------------------


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    """fp32 contiguous (no copy when already so); for state, weights and (N, C) gradients only,
    never for a feature map."""
    return None if t is None else t.to(torch.float32).contiguous()


def _collapsible(t: Tensor) -> bool:
    """H and W of t form one strided axis (contiguous, channels_last, broadcast, ...)."""
    return t.shape[2] == 1 or t.shape[3] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


def _grad_out_for_kernels(grad_out: Tensor, x: Tensor) -> Tensor:
    """grad_out as autograd hands it over, except with strides whose H and W do not collapse (the
    kernels walk H * W as one axis): then the one copy of a map, laid out like x."""
    if _collapsible(grad_out):
        return grad_out
    return grad_out.contiguous(memory_format=layouts.memory_format(x))


_sm_counts = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def _fused_path(path: str, x: Tensor, num_cells: int, hidden: int) -> bool:
    """Whether this call takes the one-block-per-sample kernels (`path` of KernelSettings)."""
    n, channels, hw = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
    fits = num_cells == 1 and channels <= FUSED_MAX_CHANNELS and 2 * hidden <= FUSED_THREADS
    if path == "fused":
        if not fits:
            raise ValueError(
                f"path='fused' needs num_cells == 1, C <= {FUSED_MAX_CHANNELS} and "
                f"2R <= {FUSED_THREADS}; got num_cells={num_cells}, C={channels}, "
                f"R={hidden}"
            )
        return True
    if path == "split":
        return False
    # one block per sample: fine when the samples fill the GPU or each sample's map is small
    return fits and (n >= _sm_count(x.device) // 2 or channels * hw <= FUSED_SMALL_MAP)


def saved_shape(x_shape: Sequence[int], weights: Sequence[Tensor]) -> Tuple[int]:
    """Shape of what forward saves for backward (fp32, flat): csrc Cell0Saved, pooled (N, C),
    u (2, N, R), gate pre-activations (N, 4C)."""
    return (cuda_build.cell0_saved_floats(x_shape[0], x_shape[1], weights[0].shape[0]),)


def _saved_pieces(saved: Tensor, n: int, channels: int, hidden: int) -> Tuple[Tensor, Tensor]:
    """(pooled (N, C), gate pre-activations (N, 4C)) views of a Cell0Saved buffer."""
    pooled = saved[: n * channels].view(n, channels)
    gates = saved[n * (channels + 2 * hidden) :].view(n, 4 * channels)
    return pooled, gates


def forward(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weights: Sequence[Tensor],
    identity: Optional[Tensor],
    relu: bool,
    activation: str,
    dropout_masks: Optional[Tensor],
    settings: Optional[KernelSettings] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, h_new, c_new, saved) of one DIA step; out laid out like x, saved of `saved_shape`.
    `settings` default: current_settings()."""
    path = (settings or current_settings()).path
    ext = _extension_for(x)
    # maps the kernels cannot walk as (N, C, H*W) with out laid like x: a view or one copy
    x = layouts.canonical(x)
    identity = None if identity is None else layouts.canonical(identity)
    num_cells = reference.num_cells_of(weights)
    w32 = [_f32(w) for w in weights]
    code = ACTIVATION_CODES[activation]
    h0, c0 = _f32(h[0]), _f32(c[0])
    hidden = weights[0].shape[0]
    if _fused_path(path, x, num_cells, hidden):
        out, h_new, c_new, saved = ext.forward_fused(x, h0, c0, w32[:8], identity, relu, code)
        return out, h_new.unsqueeze(0), c_new.unsqueeze(0), saved
    saved = h0.new_empty(saved_shape(x.shape, weights))
    ext.pool(x, _saved_pieces(saved, x.shape[0], x.shape[1], hidden)[0])
    h_cell0, c_cell0 = ext.cell0_forward(saved, h0, c0, w32[:8], code)
    hs, cs = [h_cell0], [c_cell0]
    if num_cells > 1:
        stacked = stacked_cells_forward(
            h_cell0, _f32(h), _f32(c), w32[8:], activation, _f32(dropout_masks)
        )
        hs += stacked.h
        cs += stacked.c
    out = ext.scale_residual(x, hs[-1], identity, relu)
    return out, torch.stack(hs), torch.stack(cs), saved


def backward(
    grad_out: Tensor,
    grad_h_new: Optional[Tensor],
    grad_c_new: Optional[Tensor],
    x: Tensor,
    out: Tensor,
    saved: Tensor,
    h: Tensor,
    c: Tensor,
    weights: Sequence[Tensor],
    identity_given: bool,
    relu: bool,
    activation: str,
    dropout_masks: Optional[Tensor],
    settings: Optional[KernelSettings] = None,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, List[Tensor]]:
    """(grad_x, grad_identity or None, grad_h, grad_c, fp32 grad_weights in weight order: the
    caller casts each to its weight's dtype, once).
    grad_h_new / grad_c_new may be None (zero). Cell 0 starts from the forward's `saved`; stacked
    cells are recomputed from its new h. `settings` default: current_settings()."""
    path = (settings or current_settings()).path
    ext = _extension_for(x)
    x = layouts.canonical(x)  # as the forward saw it
    grad_out = _grad_out_for_kernels(grad_out, x)
    num_cells = reference.num_cells_of(weights)
    w32 = [_f32(w) for w in weights]
    code = ACTIVATION_CODES[activation]
    hw = x.shape[2] * x.shape[3]
    h0, c0 = _f32(h[0]), _f32(c[0])
    grad_h_new, grad_c_new = _f32(grad_h_new), _f32(grad_c_new)
    gh0 = None if grad_h_new is None else grad_h_new[0]
    gc0 = None if grad_c_new is None else grad_c_new[0]
    if _fused_path(path, x, num_cells, weights[0].shape[0]):
        grad_x, grad_identity, grad_h0, grad_c0, *grads = ext.backward_fused(
            grad_out, gh0, gc0, x, out, saved, h0, c0, w32[:8], identity_given, relu, code
        )
        grad_h, grad_c = grad_h0.unsqueeze(0), grad_c0.unsqueeze(0)
    else:
        grad_attention, grad_identity = ext.grad_attention(grad_out, x, out, relu, identity_given)
        if num_cells == 1:
            grad_pooled, grad_h0, grad_c0, attention, *grads = ext.cell0_backward(
                saved, h0, c0, w32[:8], gh0, grad_attention, gc0, code, hw
            )
            grad_h, grad_c = grad_h0.unsqueeze(0), grad_c0.unsqueeze(0)
        else:
            h32, c32, masks = _f32(h), _f32(c), _f32(dropout_masks)
            gates = _saved_pieces(saved, x.shape[0], x.shape[1], weights[0].shape[0])[1]
            h_cell0, _ = reference.lstm_pointwise(gates, c0, activation)
            stacked = stacked_cells_forward(h_cell0, h32, c32, w32[8:], activation, masks)
            attention = stacked.h[-1]
            grad_h_cell0, grad_h_rest, grad_c_rest, stacked_grads = stacked_cells_backward(
                stacked,
                h32,
                c32,
                w32[8:],
                activation,
                masks,
                grad_h_new,
                grad_c_new,
                grad_attention,
            )
            grad_pooled, grad_h0, grad_c0, _, *grads = ext.cell0_backward(
                saved, h0, c0, w32[:8], grad_h_cell0.contiguous(), None, gc0, code, hw
            )
            grad_h = torch.stack([grad_h0] + grad_h_rest)
            grad_c = torch.stack([grad_c0] + grad_c_rest)
            grads = grads + stacked_grads
        grad_x = ext.grad_input(grad_out, out, attention, grad_pooled, relu)
    return grad_x, grad_identity, grad_h, grad_c, list(grads)
