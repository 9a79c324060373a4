"""Build script: pure Python + Triton everywhere; the CUDA extension from csrc/ ahead of time when
torch with CUDA is importable at build time (DESIGN section 3).

DIA_FUSED_BUILD_CUDA=0|1|auto (default auto): 1 fails the build if the extension cannot be built,
auto builds it only when torch.cuda and a CUDA toolkit are present. Otherwise the extension is
compiled on first CUDA use (dia_fused.kernels.cuda_dia_step, torch.utils.cpp_extension.load).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_extensions():
    mode = os.environ.get("DIA_FUSED_BUILD_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise ValueError(f"DIA_FUSED_BUILD_CUDA: expected 0, 1 or auto, got {mode!r}")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if mode == "0" or not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as err:
        if mode == "1":
            raise RuntimeError("DIA_FUSED_BUILD_CUDA=1 needs torch importable at build time: "
                               "pip install --no-build-isolation .") from err
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if mode == "1":
            raise RuntimeError(f"DIA_FUSED_BUILD_CUDA=1 needs a CUDA build of torch and a CUDA "
                               f"toolkit (torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension("dia_fused._C", sources,
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
