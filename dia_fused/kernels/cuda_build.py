"""Build settings of the CUDA extension, in one place for its three builders: setup.py (ahead of
time), cuda_dia_step.py (JIT with torch.utils.cpp_extension.load) and the CI compile check
(python_tests/test_csrc_compile.py); CMakeLists.txt mirrors SOURCES and the default arches.

Plain Python with no imports beyond the standard library: setup.py loads this file by path,
without importing torch or the dia_fused package.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional

EXTENSION_NAME = "dia_fused._C"  # ahead-of-time build (setup.py)
JIT_NAME = "dia_fused_cuda"  # torch.utils.cpp_extension.load, cached in the torch extensions dir

# csrc/ files compiled into the extension, and the headers they include (shipped with them).
SOURCES = ("dia_step_bindings.cpp", "dia_step_forward.cu", "dia_step_backward.cu")
HEADERS = ("dia_step.h", "dia_step_common.cuh")

# sm_80 and sm_90 machine code, plus compute_90 PTX so that newer GPUs can JIT it.
# TORCH_CUDA_ARCH_LIST, when set, replaces this (torch's own syntax, read by torch).
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
ARCH_ENV = "TORCH_CUDA_ARCH_LIST"

# Numbers shared with the C++ sources: csrc/dia_step_constants.h is generated from these
# (python dia_fused/kernels/cuda_build.py --header; python_tests/test_csrc_compile.py checks it)
ACTIVATION_CODES = {"sigmoid": 0, "tanh": 1, "relu": 2}  # CellActivation
FUSED_MAX_CHANNELS = 256  # the one-block-per-sample kernels hold a sample's C channels
FUSED_THREADS = 512  # threads of those blocks

CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]

# What torch's extension builder adds to every nvcc call (torch.utils.cpp_extension
# COMMON_NVCC_FLAGS, C++ standard): the CI compile check uses the same so that it sees what the
# real build sees.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                      "--expt-relaxed-constexpr"]
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


def arch_flags(arch_list: str = DEFAULT_ARCH_LIST) -> List[str]:
    """nvcc -gencode flags for a list like "8.0;9.0+PTX" or "9.0a" (';' or ' ' separated)."""
    flags = []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)(a?)(\+PTX)?", entry)
        if match is None:
            raise ValueError(f"arch list {arch_list!r}: expected entries like 8.0, 9.0a or 9.0+PTX, "
                             f"got {entry!r}")
        arch = f"{match.group(1)}{match.group(2)}{match.group(3)}"
        codes = f"sm_{arch}" + (f",compute_{arch}" if match.group(4) else "")
        flags.append(f"-gencode=arch=compute_{arch},code=[{codes}]")
    return flags


def default_arch_flags(arch_list_env=...) -> List[str]:
    """-gencode flags of DEFAULT_ARCH_LIST when TORCH_CUDA_ARCH_LIST is unset, else [] (torch
    reads the variable itself and adds its flags; explicit flags would switch that off). The
    package passes the value it read through dia_fused.settings; setup.py, which cannot import
    the package, lets this read the environment."""
    if arch_list_env is ...:
        arch_list_env = os.environ.get(ARCH_ENV)
    return [] if arch_list_env else arch_flags(DEFAULT_ARCH_LIST)
