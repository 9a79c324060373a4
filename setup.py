"""Build script: pure Python + Triton everywhere; the CUDA extension `dia_fused._C` from csrc/ ahead
of time when torch with CUDA and a CUDA toolkit are present at build time (docs/design.md §5):

    pip install --no-build-isolation .        # uses the torch already installed

DIA_FUSED_BUILD_CUDA=0|1|auto (default auto): 0 never builds it, 1 fails the install if it cannot be
built, auto builds it when it can and otherwise leaves it to the build on first CUDA use
(dia_fused.kernels.cuda_dia_step, torch.utils.cpp_extension.load). Targets sm_80 and sm_90 unless
TORCH_CUDA_ARCH_LIST says otherwise. A plain `pip install .` (isolated build: no torch) builds
nothing and works without a GPU or toolkit.

The csrc/ sources ship inside the package as dia_fused/csrc for the build on first use.
"""

import importlib.util
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def load_build_settings():
    """dia_fused/kernels/cuda_build.py by path: no torch and no dia_fused import at build time."""
    path = os.path.join(ROOT, "dia_fused", "kernels", "cuda_build.py")
    spec = importlib.util.spec_from_file_location("dia_fused_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extensions():
    mode = os.environ.get("DIA_FUSED_BUILD_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise ValueError(f"DIA_FUSED_BUILD_CUDA: expected 0, 1 or auto, got {mode!r}")
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as err:
        if mode == "1":
            raise RuntimeError(
                "DIA_FUSED_BUILD_CUDA=1 needs torch importable at build time: "
                "pip install --no-build-isolation ."
            ) from err
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if mode == "1":
            raise RuntimeError(
                f"DIA_FUSED_BUILD_CUDA=1 needs a CUDA build of torch and a CUDA "
                f"toolkit (torch {torch.__version__}: torch.version.cuda="
                f"{torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
            )
        return [], {}

    build = load_build_settings()
    csrc = os.path.join("csrc")
    ext = CUDAExtension(
        build.EXTENSION_NAME,
        [os.path.join(csrc, f) for f in build.SOURCES],
        include_dirs=[os.path.join(ROOT, csrc)],
        extra_compile_args={
            "cxx": list(build.CXX_FLAGS),
            "nvcc": build.NVCC_FLAGS + build.default_arch_flags(),
        },
    )

    class BuildCudaExtension(BuildExtension.with_options(use_ninja=True)):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as err:  # auto: the install goes on, the build on first use reports
                if mode == "1":
                    raise
                # pip shows this only with -v: `python -m dia_fused` names the state afterwards
                # (its "CUDA extension" line) and the cuda backend's reason (README, Install)
                self.warn(
                    f"dia_fused: building {extension.name} failed ({err}); the cuda backend "
                    f"will try again on first CUDA use and report why it cannot "
                    f"(python -m dia_fused shows it)"
                )

    return [ext], {"build_ext": BuildCudaExtension}


ext_modules, cmdclass = cuda_extensions()
setup(
    packages=find_packages(include=["dia_fused", "dia_fused.*"]) + ["dia_fused.csrc"],
    package_dir={"dia_fused.csrc": "csrc"},
    # auto_backend.json: the measured table behind backend="auto" (bench/make_auto_table.py)
    package_data={
        "dia_fused.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp"],
        "dia_fused": ["auto_backend.json"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
