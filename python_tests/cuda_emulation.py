"""The csrc/ kernels run on the CPU, for tests without a GPU.

python_tests/emulation/ compiles the real kernels and launchers as host C++ (g++, threads of a block
as std::threads, __syncthreads as a barrier) behind a C API; `EmulatedExtension` wraps it with the
functions of the compiled extension (dia_fused._C, csrc/dia_step_bindings.cpp) for CPU tensors,
allocating outputs as the bindings do. The CUDA backend's host wrapper runs on it unchanged, so
its kernels' indexing, masking, layouts and the wrapper's composition are checked against the
reference here. Not covered: anything specific to the GPU (occupancy, shared-memory limits, the
memory model between warps, speed). Built on first use, cached in the temp directory.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import List, Optional

import torch

from dia_fused.kernels import cuda_build

HERE = os.path.dirname(os.path.abspath(__file__))
EMULATION_DIR = os.path.join(HERE, "emulation")
SCALAR_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
FLAGS = [
    "-std=c++20",
    "-O1",
    "-g",
    "-fPIC",
    "-shared",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-unknown-pragmas",
]
# "address" or "thread": build with that sanitizer (the process must preload its runtime, see
# test_cuda_emulation_sanitizers.py): out-of-bounds accesses / data races between the emulated
# threads of a block, the CPU-side counterparts of compute-sanitizer memcheck / racecheck.
SANITIZER_ENV = "DIA_FUSED_EMULATION_SANITIZER"


def _cuda_include_dir() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    return None


def unavailable_reason() -> Optional[str]:
    if shutil.which("g++") is None:
        return "g++ not found (the kernel emulation compiles csrc/ as host C++)"
    if _cuda_include_dir() is None:
        return "CUDA toolkit headers not found (set CUDA_HOME): the emulation needs cuda_runtime.h"
    if cuda_build.csrc_dir() is None:
        return "csrc/ sources not found"
    return None


def build(sanitizer: Optional[str] = None) -> str:
    """Path of the emulation library, compiled if its sources or flags changed."""
    sanitizer = sanitizer or os.environ.get(SANITIZER_ENV) or None
    flags = FLAGS + ([f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer"] if sanitizer else [])
    csrc = cuda_build.csrc_dir()
    sources = [os.path.join(csrc, f) for f in cuda_build.SOURCES + cuda_build.HEADERS]
    sources += [os.path.join(EMULATION_DIR, f) for f in sorted(os.listdir(EMULATION_DIR))]
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in sources:
        with open(path, "rb") as f:
            digest.update(f.read())
    lib = os.path.join(tempfile.gettempdir(), f"dia_fused_emulation_{digest.hexdigest()[:16]}.so")
    if not os.path.isfile(lib):
        tmp = f"{lib}.{os.getpid()}.tmp"
        cmd = [
            "g++",
            *flags,
            "-I",
            csrc,
            "-I",
            _cuda_include_dir(),
            os.path.join(EMULATION_DIR, "emulated_kernels.cpp"),
            "-o",
            tmp,
            "-lpthread",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the kernel emulation failed:\n{proc.stderr}")
        os.replace(tmp, lib)
    return lib


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _int64s(values) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def _ptrs(tensors: List[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _check_small(t: torch.Tensor, name: str, shape) -> None:
    """What the bindings require of state, pooled and weights (the host wrapper must provide it)."""
    assert t.dtype == torch.float32, f"{name}: dtype {t.dtype}"
    assert tuple(t.shape) == tuple(shape), f"{name}: shape {tuple(t.shape)} != {tuple(shape)}"
    assert t.is_contiguous(), f"{name}: not contiguous"


def cell0_workspace(n: int, channels: int, hidden: int) -> List[torch.Tensor]:
    """The cell-0 backward's fp32 workspace as the bindings allocate it (Cell0WorkspaceTensors)."""
    return [
        torch.empty(2, n, hidden),
        torch.empty(n, 4 * channels),
        torch.full((max(1, cuda_build.cell0_partials_floats(n, channels, hidden)),), float("nan")),
    ]


MAX_LOGGED_LAUNCHES = 16  # kernel launches one entry point makes, at most (grids recorded)


class EmulatedExtension:
    """The functions of dia_fused._C, on CPU tensors, through the emulated kernels."""

    def __init__(self, lib_path: Optional[str] = None):
        self.lib = ctypes.CDLL(lib_path or build())
        self.lib.emu_first_error.restype = ctypes.c_char_p
        constants = (ctypes.c_int * 2)()
        self.lib.emu_constants(constants)
        self.FUSED_MAX_CHANNELS, self.FUSED_THREADS = constants[0], constants[1]
        self.launches = []  # names of the entry points called, in order
        self.grids = []  # (entry point, [(x, y, z) of each kernel launch it made]), in order

    def _call(self, name: str, *args) -> None:
        self.launches.append(name)
        self.lib.emu_reset_errors()
        self.lib.emu_take_launch_grids(None, 0)
        if getattr(self.lib, "emu_" + name)(*args) != 0:
            raise RuntimeError(f"emulated {name} failed: {self.lib.emu_first_error().decode()}")
        buffer = (ctypes.c_int * (3 * MAX_LOGGED_LAUNCHES))()
        count = self.lib.emu_take_launch_grids(buffer, MAX_LOGGED_LAUNCHES)
        grids = [tuple(buffer[3 * i : 3 * i + 3]) for i in range(min(count, MAX_LOGGED_LAUNCHES))]
        self.grids.append((name, grids))

    @staticmethod
    def _map(t: Optional[torch.Tensor]):
        """(data, strides) of a map; None for an absent one."""
        if t is None:
            return None, None
        return _ptr(t), _int64s(t.stride())

    @staticmethod
    def _weights(weights, channels):
        assert len(weights) == 8
        hidden = weights[0].shape[0]
        for i, w in enumerate(weights):
            _check_small(
                w,
                f"weights[{i}]",
                [(hidden, channels), (hidden,), (4 * channels, hidden), (4 * channels,)][i % 4],
            )
        return _ptrs(weights), hidden

    # forward pieces ---------------------------------------------------------------------------

    def forward_fused(self, x, h0, c0, weights, identity, relu, activation):
        n, channels = x.shape[:2]
        _check_small(h0, "h0", (n, channels))
        _check_small(c0, "c0", (n, channels))
        w, hidden = self._weights(weights, channels)
        assert channels <= self.FUSED_MAX_CHANNELS and 2 * hidden <= self.FUSED_THREADS
        out = torch.empty_like(x)
        h_new, c_new = torch.empty(n, channels), torch.empty(n, channels)
        saved = torch.full((cuda_build.cell0_saved_floats(n, channels, hidden),), float("nan"))
        self._call(
            "forward_fused",
            SCALAR_KIND[x.dtype],
            _int64s(x.shape),
            *self._map(x),
            *self._map(identity),
            *self._map(out),
            hidden,
            _ptr(h0),
            _ptr(c0),
            w,
            int(relu),
            activation,
            _ptr(h_new),
            _ptr(c_new),
            _ptr(saved),
        )
        return [out, h_new, c_new, saved]

    def pool(self, x, pooled):
        _check_small(pooled, "pooled", x.shape[:2])
        self._call("pool", SCALAR_KIND[x.dtype], _int64s(x.shape), *self._map(x), _ptr(pooled))

    def cell0_forward(self, saved, h0, c0, weights, activation):
        n, channels = h0.shape
        for name, t in (("h0", h0), ("c0", c0)):
            _check_small(t, name, (n, channels))
        w, hidden = self._weights(weights, channels)
        _check_small(saved, "saved", (cuda_build.cell0_saved_floats(n, channels, hidden),))
        partials = torch.full(
            (cuda_build.cell0_partials_floats(n, channels, hidden),), float("nan")
        )
        h_new, c_new = torch.empty(n, channels), torch.empty(n, channels)
        self._call(
            "cell0_forward",
            n,
            channels,
            hidden,
            _ptr(saved),
            _ptr(h0),
            _ptr(c0),
            w,
            activation,
            _ptr(partials),
            _ptr(h_new),
            _ptr(c_new),
        )
        return [h_new, c_new]

    def scale_residual(self, x, attention, identity, relu):
        _check_small(attention, "attention", x.shape[:2])
        out = torch.empty_like(x)
        self._call(
            "scale_residual",
            SCALAR_KIND[x.dtype],
            _int64s(x.shape),
            *self._map(x),
            _ptr(attention),
            *self._map(identity),
            *self._map(out),
            int(relu),
        )
        return out

    # backward pieces --------------------------------------------------------------------------

    def backward_fused(
        self,
        grad_out,
        grad_h_new,
        grad_c_new,
        x,
        out,
        saved,
        h0,
        c0,
        weights,
        identity_given,
        relu,
        activation,
    ):
        n, channels = x.shape[:2]
        for name, t in (
            ("h0", h0),
            ("c0", c0),
            ("grad_h_new", grad_h_new),
            ("grad_c_new", grad_c_new),
        ):
            if t is not None:
                _check_small(t, name, (n, channels))
        w, hidden = self._weights(weights, channels)
        _check_small(saved, "saved", (cuda_build.cell0_saved_floats(n, channels, hidden),))
        grad_x = torch.empty_like(x)
        grad_identity = torch.empty_like(x) if identity_given else None
        grad_h0, grad_c0 = torch.empty(n, channels), torch.empty(n, channels)
        grads = [torch.empty_like(t) for t in weights]
        ws = cell0_workspace(n, channels, hidden)
        self._call(
            "backward_fused",
            SCALAR_KIND[x.dtype],
            _int64s(x.shape),
            *self._map(grad_out),
            *self._map(x),
            *self._map(out),
            *self._map(grad_x),
            *self._map(grad_identity),
            _ptr(grad_h_new),
            _ptr(grad_c_new),
            _ptr(saved),
            _ptr(h0),
            _ptr(c0),
            w,
            hidden,
            int(relu),
            activation,
            _ptr(grad_h0),
            _ptr(grad_c0),
            _ptrs(grads),
            *[_ptr(t) for t in ws],
        )
        return [grad_x, grad_identity, grad_h0, grad_c0, *grads]

    def grad_attention(self, grad_out, x, out, relu, identity_given):
        da = torch.empty(x.shape[0], x.shape[1])
        grad_identity = torch.empty_like(x) if identity_given else None
        self._call(
            "grad_attention",
            SCALAR_KIND[x.dtype],
            _int64s(x.shape),
            *self._map(grad_out),
            *self._map(x),
            *self._map(out),
            *self._map(grad_identity),
            int(relu),
            _ptr(da),
        )
        return [da, grad_identity]

    def cell0_backward(
        self, saved, h0, c0, weights, grad_h_new, grad_h_extra, grad_c_new, activation, hw
    ):
        n, channels = h0.shape
        for name, t in (
            ("h0", h0),
            ("c0", c0),
            ("grad_h_new", grad_h_new),
            ("grad_h_extra", grad_h_extra),
            ("grad_c_new", grad_c_new),
        ):
            if t is not None:
                _check_small(t, name, (n, channels))
        w, hidden = self._weights(weights, channels)
        _check_small(saved, "saved", (cuda_build.cell0_saved_floats(n, channels, hidden),))
        grad_pooled, grad_h0, grad_c0, h_new = (torch.empty(n, channels) for _ in range(4))
        grads = [torch.empty_like(t) for t in weights]
        ws = cell0_workspace(n, channels, hidden)
        self._call(
            "cell0_backward",
            n,
            channels,
            hidden,
            hw,
            _ptr(saved),
            _ptr(h0),
            _ptr(c0),
            w,
            activation,
            _ptr(grad_h_new),
            _ptr(grad_h_extra),
            _ptr(grad_c_new),
            _ptr(grad_pooled),
            _ptr(grad_h0),
            _ptr(grad_c0),
            _ptr(h_new),
            _ptrs(grads),
            *[_ptr(t) for t in ws],
        )
        return [grad_pooled, grad_h0, grad_c0, h_new, *grads]

    def grad_input(self, grad_out, out, attention, grad_pooled_over_hw, relu):
        _check_small(attention, "attention", out.shape[:2])
        _check_small(grad_pooled_over_hw, "grad_pooled_over_hw", out.shape[:2])
        grad_x = torch.empty_like(out)
        self._call(
            "grad_input",
            SCALAR_KIND[out.dtype],
            _int64s(out.shape),
            *self._map(grad_out),
            *self._map(out),
            _ptr(attention),
            _ptr(grad_pooled_over_hw),
            *self._map(grad_x),
            int(relu),
        )
        return grad_x
