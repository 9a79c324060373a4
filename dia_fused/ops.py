"""Backend dispatch for the DIA step: the one entry point the modules call (DESIGN section 2).

Backends: `reference` (plain PyTorch, autograd by PyTorch), `triton` and `cuda` (fused kernels
registered as torch.library custom ops by their own modules). `auto` picks cuda > triton >
reference among those available for the tensor's device; the environment variable
DIA_FUSED_BACKEND overrides the requested name. A backend named explicitly that is unavailable
raises with the reason: there is no silent fallback.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from . import reference
from ._checks import check_choice, check_step_args

Tensor = torch.Tensor
StepFn = Callable[..., Tuple[Tensor, Tensor, Tensor]]

BACKENDS = ("reference", "triton", "cuda")
BACKEND_CHOICES = ("auto",) + BACKENDS
AUTO_ORDER = ("cuda", "triton", "reference")
ENV_BACKEND = "DIA_FUSED_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name on a device where it cannot run; the message says why."""


@dataclass(frozen=True)
class Backend:
    name: str
    # device -> None when usable there, else the reason it is not
    unavailable_reason: Callable[[torch.device], Optional[str]]
    # (x, h, c, weights, identity, relu, activation, dropout_masks) -> (out, h, c)
    step: StepFn


_REGISTRY: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    check_choice("backend.name", backend.name, BACKENDS)
    _REGISTRY[backend.name] = backend


def _module_missing(name: str, module: str) -> Callable[[torch.device], Optional[str]]:
    def reason(device: torch.device) -> Optional[str]:
        return f"the {name} backend is not part of this build (no module {module})"
    return reason


def _lookup(name: str) -> Backend:
    if name not in _REGISTRY:
        _load_backend(name)
    return _REGISTRY[name]


def _load_backend(name: str) -> None:
    """Imports the module that registers `name`; records the import error as the reason if any."""
    module = {"triton": "dia_fused.kernels.triton_dia_step",
              "cuda": "dia_fused.kernels.cuda_dia_step"}[name]
    try:
        __import__(module)
    except ModuleNotFoundError as err:
        if err.name not in (module, "triton"):
            raise
        missing = "the triton package" if err.name == "triton" else f"module {module}"
        _REGISTRY[name] = Backend(
            name, lambda device, m=missing: f"the {name} backend needs {m}, which is not installed",
            _unavailable_step(name))
    if name not in _REGISTRY:  # the module imported but registered nothing
        _REGISTRY[name] = Backend(name, _module_missing(name, module), _unavailable_step(name))


def _unavailable_step(name: str) -> StepFn:
    def step(*args, **kwargs):
        raise BackendUnavailableError(f"the {name} backend is unavailable")
    return step


def backend_unavailable_reason(name: str, device) -> Optional[str]:
    """None if backend `name` can run on `device`, else a sentence saying why not."""
    check_choice("backend", name, BACKENDS)
    return _lookup(name).unavailable_reason(torch.device(device))


def available_backends(device) -> Tuple[str, ...]:
    return tuple(b for b in BACKENDS if backend_unavailable_reason(b, device) is None)


def resolve_backend(requested: str, device) -> str:
    """The backend that runs for `requested` on `device` (DIA_FUSED_BACKEND overrides)."""
    requested = os.environ.get(ENV_BACKEND) or requested
    check_choice("backend", requested, BACKEND_CHOICES)
    device = torch.device(device)
    if requested == "auto":
        for name in AUTO_ORDER:
            if backend_unavailable_reason(name, device) is None:
                return name
        raise AssertionError("the reference backend is always available")
    reason = backend_unavailable_reason(requested, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend={requested!r} cannot run on {device}: {reason}")
    return requested


def dia_step(
    x: Tensor,  # (N, C, H, W)
    h: Tensor,  # (L, N, C), reference.state_dtype(x.dtype)
    c: Tensor,  # (L, N, C)
    weights: Sequence[Tensor],  # flat, reference.weight_names(L) order
    identity: Optional[Tensor] = None,  # (N, C, H, W) or None
    relu: bool = False,
    activation: str = "sigmoid",
    dropout_masks: Optional[Tensor] = None,  # (L-1, N, C) scaled keep-masks or None
    backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """One DIA-LSTM step on the chosen backend: (out, h_new, c_new). See reference.dia_lstm_step."""
    check_step_args(x, h, c, weights, identity, activation, dropout_masks)
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"x: expected H*W >= 1 (the attention pools over H, W), got shape "
                         f"{tuple(x.shape)}")
    name = resolve_backend(backend, x.device)
    if reference.num_cells_of(weights) == 1:
        dropout_masks = None
    return _lookup(name).step(x, h, c, tuple(weights), identity, bool(relu), activation,
                              dropout_masks)


register_backend(Backend(
    "reference",
    lambda device: None,
    lambda x, h, c, w, identity, relu, activation, masks: reference.dia_lstm_step(
        x, h, c, w, identity=identity, relu=relu, activation=activation, dropout_masks=masks),
))
