"""Build settings of the CUDA extension, in one place for its builders: setup.py (ahead of time),
cuda_dia_step.py (JIT with torch.utils.cpp_extension.load), the CI compile check
(python_tests/test_csrc_compile.py) and CMakeLists.txt, which runs this file as a script
(`--cmake`, below) at configure time and includes the sources, arches and flags it prints.

Plain Python with no imports beyond the standard library: setup.py loads this file by path and
CMake runs it, neither importing torch or the dia_fused package.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple

EXTENSION_NAME = "dia_fused._C"  # ahead-of-time build (setup.py)
JIT_NAME = "dia_fused_cuda"  # torch.utils.cpp_extension.load, cached in the torch extensions dir

# csrc/ files compiled into the extension, and the headers they include (shipped with them).
SOURCES = ("dia_step_bindings.cpp", "dia_step_forward.cu", "dia_step_backward.cu")
HEADERS = ("dia_step.h", "dia_step_common.cuh", "dia_step_constants.h")
CONSTANTS_HEADER = "dia_step_constants.h"  # generated from this file: constants_header()

# sm_80 and sm_90 machine code, plus compute_90 PTX so that newer GPUs can JIT it.
# TORCH_CUDA_ARCH_LIST, when set, replaces this (torch's own syntax, read by torch).
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
ARCH_ENV = "TORCH_CUDA_ARCH_LIST"

# Numbers shared with the C++ sources: csrc/dia_step_constants.h is generated from these
# (python dia_fused/kernels/cuda_build.py --header; python_tests/test_csrc_compile.py checks it)
ACTIVATION_CODES = {"sigmoid": 0, "tanh": 1, "relu": 2}  # CellActivation
FUSED_MAX_CHANNELS = 256  # the one-block-per-sample kernels hold a sample's C channels
FUSED_THREADS = 512  # threads of those blocks
# the cell-0 backward's du = dgates @ W2 (K = 4C) splits K into chunks of this many, one block per
# chunk, the partial sums added in chunk order by a second kernel (bench/roofline.py)
HIDDEN_GRAD_SPLIT_K = 256
# the cell-0 reduced linears u = relu(W1 v + b1) (K = C) split K the same way, in chunks of this
# many (all split phases share one scratch buffer: cell0_partials_floats)
REDUCED_LINEAR_SPLIT_K = 128
# the cell-0 gate GEMMs (K = R per path) split each path's K into chunks of this many
GATE_SPLIT_K = 128
# the cell-0 input gradients d pooled, d h0 = du @ W1 (K = R) split K into chunks of this many
INPUT_GRAD_SPLIT_K = 128
# the channels_last streaming passes split H*W until about this many blocks stream (the pool and
# grad-attention partial sums added in order by a second launch): 8 blocks of 256 threads on each
# of an H100's 132 SMs (bench/roofline.py)
MAP_REDUCE_MIN_BLOCKS = 1056


def hidden_grad_splits(channels: int) -> int:
    """Chunks of the cell-0 backward's K = 4C reduction (csrc hidden_grad_splits)."""
    return -(-4 * channels // HIDDEN_GRAD_SPLIT_K)


def reduced_linear_splits(channels: int) -> int:
    """Chunks of the cell-0 reduced linears' K = C reduction (csrc reduced_linear_splits)."""
    return -(-channels // REDUCED_LINEAR_SPLIT_K)


def gate_splits(hidden: int) -> int:
    """Partial sums of the cell-0 gate GEMMs: 2 paths x chunks of K = R (csrc gate_splits)."""
    return 2 * -(-hidden // GATE_SPLIT_K)


def input_grad_splits(hidden: int) -> int:
    """Chunks of the cell-0 input gradients' K = R reduction (csrc input_grad_splits)."""
    return -(-hidden // INPUT_GRAD_SPLIT_K)


def cell0_partials_floats(n: int, channels: int, hidden: int) -> int:
    """Floats of the split-K scratch of the cell-0 phases, one phase at a time (csrc
    cell0_partials_floats)."""
    rows = 2 * n * hidden
    splits = max(hidden_grad_splits(channels), reduced_linear_splits(channels))
    return max(
        splits * rows if splits > 1 else 0,
        gate_splits(hidden) * n * 4 * channels,
        input_grad_splits(hidden) * 2 * n * channels if input_grad_splits(hidden) > 1 else 0,
    )


def cell0_saved_floats(n: int, channels: int, hidden: int) -> int:
    """Floats of what the forward saves of cell 0 for the backward (csrc Cell0Saved): pooled
    (N, C), u (2, N, R), gate pre-activations (N, 4C), in that order, one flat fp32 buffer."""
    return n * (5 * channels + 2 * hidden)


CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]

# What torch's extension builder adds to every nvcc call (torch.utils.cpp_extension
# COMMON_NVCC_FLAGS, C++ standard): the CI compile check uses the same so that it sees what the
# real build sees.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
CXX_STD = "-std=c++20"


def package_dir() -> str:
    """dia_fused/ (this file is dia_fused/kernels/cuda_build.py)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def csrc_dir() -> Optional[str]:
    """The csrc/ sources: dia_fused/csrc in an installed package (setup.py ships them there), or
    csrc/ beside the package in a source checkout. None when neither holds them."""
    pkg = package_dir()
    for candidate in (os.path.join(pkg, "csrc"), os.path.join(os.path.dirname(pkg), "csrc")):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in SOURCES + HEADERS):
            return candidate
    return None


def _parse_arch_list(arch_list: str) -> List[Tuple[str, bool]]:
    """(arch like "90a", with PTX) per entry of a list like "8.0;9.0+PTX" (';' or ' ' separated)."""
    entries = []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)(a?)(\+PTX)?", entry)
        if match is None:
            raise ValueError(
                f"arch list {arch_list!r}: expected entries like 8.0, 9.0a or 9.0+PTX, "
                f"got {entry!r}"
            )
        entries.append((f"{match.group(1)}{match.group(2)}{match.group(3)}", bool(match.group(4))))
    return entries


def arch_flags(arch_list: str = DEFAULT_ARCH_LIST) -> List[str]:
    """nvcc -gencode flags for a list like "8.0;9.0+PTX" or "9.0a" (';' or ' ' separated)."""
    flags = []
    for arch, ptx in _parse_arch_list(arch_list):
        codes = f"sm_{arch}" + (f",compute_{arch}" if ptx else "")
        flags.append(f"-gencode=arch=compute_{arch},code=[{codes}]")
    return flags


def cmake_architectures(arch_list: str = DEFAULT_ARCH_LIST) -> List[str]:
    """CMake's CUDA_ARCHITECTURES for the same list: "80-real" is machine code only, "90" machine
    code and PTX (CMake's meaning of a bare number)."""
    return [arch if ptx else f"{arch}-real" for arch, ptx in _parse_arch_list(arch_list)]


def cmake_settings() -> str:
    """The CMake commands CMakeLists.txt includes: the sources (relative to the source tree),
    the default arches and the compile flags of the real build, as CMake lists."""

    def cmake_set(name: str, values: List[str]) -> str:
        for value in values:  # unquoted CMake arguments: keep to characters that need no escape
            if not re.fullmatch(r"[\w.+\-=/,]+", value):
                raise ValueError(f"{name}: {value!r} cannot be written as a plain CMake argument")
        return f"set({name} {' '.join(values)})\n"

    return (
        "# Generated by dia_fused/kernels/cuda_build.py --cmake: edit that file, not this.\n"
        + cmake_set("DIA_FUSED_SOURCES", [f"csrc/{name}" for name in SOURCES])
        + cmake_set("DIA_FUSED_HEADERS", [f"csrc/{name}" for name in HEADERS])
        + cmake_set("DIA_FUSED_CUDA_ARCHITECTURES", cmake_architectures(DEFAULT_ARCH_LIST))
        + cmake_set("DIA_FUSED_NVCC_FLAGS", [CXX_STD, *TORCH_NVCC_DEFINES, *NVCC_FLAGS])
        + cmake_set("DIA_FUSED_CXX_FLAGS", [CXX_STD, *CXX_FLAGS])
    )


def default_arch_flags(arch_list_env=...) -> List[str]:
    """-gencode flags of DEFAULT_ARCH_LIST when TORCH_CUDA_ARCH_LIST is unset, else [] (torch
    reads the variable itself and adds its flags; explicit flags would switch that off). The
    package passes the value it read through dia_fused.settings; setup.py, which cannot import
    the package, lets this read the environment."""
    if arch_list_env is ...:
        arch_list_env = os.environ.get(ARCH_ENV)
    return [] if arch_list_env else arch_flags(DEFAULT_ARCH_LIST)


def constants_header() -> str:
    """The text of csrc/dia_step_constants.h: the numbers above as C++ (its one source)."""
    names = {"sigmoid": "kSigmoid", "tanh": "kTanh", "relu": "kRelu"}
    codes = ", ".join(f"{names[name]} = {code}" for name, code in ACTIVATION_CODES.items())
    return (
        f"// Generated by `python dia_fused/kernels/cuda_build.py --header` from "
        f"dia_fused/kernels/cuda_build.py:\n"
        f"// edit the numbers there, then regenerate (python_tests/test_cuda_backend_host.py "
        f"checks it).\n"
        f"#pragma once\n\nnamespace dia_fused {{\n\n"
        f"// act of h = sigmoid(o) * act(c); the codes of the Python activation names.\n"
        f"enum class CellActivation : int {{ {codes} }};\n\n"
        f"// Threads per block of the one-block-per-sample kernels; their LSTM part needs "
        f"2R <= this.\n"
        f"constexpr int kFusedThreads = {FUSED_THREADS};\n"
        f"// Largest C the one-block-per-sample kernels take (all per-sample vectors live in "
        f"shared memory).\n"
        f"constexpr int kFusedMaxChannels = {FUSED_MAX_CHANNELS};\n"
        f"// K per block of the split cell-0 hidden-gradient GEMM (K = 4C).\n"
        f"constexpr int kHiddenGradSplitK = {HIDDEN_GRAD_SPLIT_K};\n"
        f"// K per block of the split cell-0 reduced linears (K = C).\n"
        f"constexpr int kReducedLinearSplitK = {REDUCED_LINEAR_SPLIT_K};\n"
        f"// K per block of each path of the split cell-0 gate GEMMs (K = R).\n"
        f"constexpr int kGateSplitK = {GATE_SPLIT_K};\n"
        f"// K per block of the split cell-0 input gradients (K = R).\n"
        f"constexpr int kInputGradSplitK = {INPUT_GRAD_SPLIT_K};\n"
        f"// Blocks the channels_last streaming passes aim for when they split H*W.\n"
        f"constexpr int kMapReduceMinBlocks = {MAP_REDUCE_MIN_BLOCKS};\n\n"
        f"}}  // namespace dia_fused\n"
    )


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--header"]:
        target = os.path.join(os.path.dirname(package_dir()), "csrc", CONSTANTS_HEADER)
        with open(target, "w") as f:
            f.write(constants_header())
        print(f"wrote {target}")
    elif sys.argv[1:] == ["--cmake"]:
        sys.stdout.write(cmake_settings())
    else:
        sys.exit(
            "usage: python dia_fused/kernels/cuda_build.py --header | --cmake\n"
            "  --header  regenerates csrc/dia_step_constants.h\n"
            "  --cmake   prints the sources, arches and flags as CMake set() commands"
        )
