"""Which backend runs a DIA step: availability and `auto` (docs/design.md §3.1).

Backends: `reference` (plain PyTorch, autograd by PyTorch), `triton` and `cuda` (fused kernels, in
the kernel modules kernels/triton/ and kernels/cuda_dia_step.py). One question decides:
`step_unavailable_reason(name, device, dtype)`: each kernel module answers for the device
(`unavailable_reason`) and declares the dtypes it takes (`SUPPORTED_DTYPES`); the reference takes
every step. `auto` runs the first backend that can take the step, in the order measured for its
shape on this GPU (backend_table.py), else cuda > triton > reference: a float64 step on a GPU runs
on the reference. A backend named explicitly that cannot take the step raises
BackendUnavailableError with the reason before any kernel runs; there is no silent fallback.
DIA_FUSED_BACKEND sets what `auto` stands for; an explicit name wins over it.

The triton package is imported the first time a question needs the Triton kernel module (never at
`import dia_fused`); whether it is installed is answered without importing it.
"""

from __future__ import annotations

import functools
import importlib.util
import operator
from typing import Optional, Sequence, Tuple

import torch

from . import backend_table, settings
from ._checks import check_choice
from .kernels import SUPPORTED_DTYPES, cuda_dia_step
from .names import AUTO_ORDER, BACKEND_CHOICES, BACKENDS

Tensor = torch.Tensor
StepKey = Tuple[int, int, str, bool]  # (channels, H*W, dtype name, training)

TRITON_MISSING = (
    "the triton backend needs the triton package, which is not installed: "
    "pip install triton (or pip install 'dia_fused[triton]')"
)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name for a step it cannot run; the message says why."""


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


_triton_host = None


def triton_host():
    """The Triton kernel module (kernels/triton/host.py), imported on first use; None without the
    triton package."""
    global _triton_host
    if _triton_host is None and triton_installed():
        try:
            from .kernels.triton import host
        except ModuleNotFoundError as err:  # triton is optional; any other missing module is a bug
            if err.name != "triton":
                raise
            return None
        _triton_host = host
    return _triton_host


def kernel_module(name: str):
    """The kernel module of fused backend `name`: forward, backward, unavailable_reason,
    current_settings, SUPPORTED_DTYPES (docs/design.md §2)."""
    return triton_host() if name == "triton" else cuda_dia_step


def backend_unavailable_reason(name: str, device) -> Optional[str]:
    """None if backend `name` can run on `device`, else a sentence saying why not."""
    check_choice("backend", name, BACKENDS)
    if name == "reference":
        return None
    module = kernel_module(name)
    if module is None:
        return TRITON_MISSING
    return module.unavailable_reason(torch.device(device))


def dtype_unavailable_reason(name: str, dtype: Optional[torch.dtype]) -> Optional[str]:
    if name == "reference" or dtype is None:
        return None
    module = kernel_module(name)
    supported = SUPPORTED_DTYPES if module is None else module.SUPPORTED_DTYPES
    if dtype in supported:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in supported)
    return (
        f"the {name} backend takes {names} inputs, got {str(dtype).replace('torch.', '')} "
        f"(backend='reference' runs every dtype)"
    )


def step_unavailable_reason(
    name: str, device, dtype: Optional[torch.dtype] = None
) -> Optional[str]:
    """The dispatch's one question: None if backend `name` can run a step on `device` with inputs
    of `dtype` (any layout: the fused host wrappers take every stride), else why not."""
    return backend_unavailable_reason(name, device) or dtype_unavailable_reason(name, dtype)


def available_backends(device, dtype: Optional[torch.dtype] = None) -> Tuple[str, ...]:
    return tuple(b for b in BACKENDS if step_unavailable_reason(b, device, dtype) is None)


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def auto_order(
    device, step: Optional[StepKey] = None, table_path: Optional[str] = None
) -> Tuple[str, ...]:
    """The order in which `auto` tries the backends on `device`: fastest first as measured for
    `step` where the table (at `table_path`, default backend_table.table_path()) has this GPU,
    else cuda > triton > reference."""
    device = torch.device(device)
    measured = None
    if step is not None and device.type == "cuda":
        path = table_path or backend_table.table_path()
        measured = backend_table.measured_order(_device_name(device), *step, path=path)
    if measured is None:
        return AUTO_ORDER
    return measured + tuple(name for name in AUTO_ORDER if name not in measured)


def step_key(x: Tensor, weights: Sequence[Tensor]) -> Optional[StepKey]:
    """(channels, H*W, dtype name, training) of a step on `x`: what auto's measured choice depends
    on (on a GPU only: None elsewhere)."""
    return shape_key(x, weights) if x.is_cuda else None


def shape_key(x: Tensor, weights: Sequence[Tensor]) -> StepKey:
    # operator.index makes torch.compile specialise symbolic C and H*W (with guards) into the plain
    # ints assume_constant_result needs; int() would keep them symbolic and break the graph
    return (
        operator.index(x.shape[1]),
        operator.index(x.shape[2] * x.shape[3]),
        dtype_name(x.dtype),
        needs_grad((x, *weights)),
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def needs_grad(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether autograd will record a step on `tensors` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_backend(
    requested: str, device, step: Optional[StepKey] = None, dtype: Optional[torch.dtype] = None
) -> str:
    """The backend that runs for `requested` on `device`: for `auto` (or what DIA_FUSED_BACKEND
    sets it to), `step` = (channels, H*W, dtype name, training) selects by the measured table.
    The step's dtype (`dtype`, else the one in `step`) rules out backends that cannot take it."""
    if isinstance(requested, str) and requested == "auto":
        requested = settings.backend_for_auto()
    check_choice("backend", requested, BACKEND_CHOICES)
    name_of_dtype = dtype_name(dtype) if dtype is not None else (step[2] if step else None)
    table = None
    if requested == "auto" and step is not None and torch.device(device).type == "cuda":
        table = backend_table.table_path()
    return _resolve(requested, device, step, name_of_dtype, table)


def _resolve(
    requested: str,
    device,
    step: Optional[StepKey],
    name_of_dtype: Optional[str],
    table_path: Optional[str],
) -> str:
    device = torch.device(device)
    dtype = getattr(torch, name_of_dtype) if name_of_dtype else None
    if requested == "auto":
        for name in auto_order(device, step, table_path):
            # Triton on CPU tensors is the interpreter: a correctness tool, never an automatic
            # choice
            if name == "triton" and device.type == "cpu":
                continue
            if (
                backend_unavailable_reason(name, device) is None
                and dtype_unavailable_reason(name, dtype) is None
            ):
                return name
        raise AssertionError("the reference backend takes every step")
    reason = backend_unavailable_reason(requested, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend={requested!r} cannot run on {device}: {reason}")
    reason = dtype_unavailable_reason(requested, dtype)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend={requested!r} cannot run a {name_of_dtype} step: {reason}"
        )
    return requested


# The environment was read by the caller: _resolve is pure in its arguments (and the table file,
# fixed for the process), so torch.compile resolves it once at trace time. This is all that
# torch.compiler.assume_constant_result does, without its import of torch._dynamo (and with it of
# triton) at `import dia_fused`.
_resolve._dynamo_marked_constant = True
