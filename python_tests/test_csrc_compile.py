"""CI compile check of csrc/ (docs/design.md §5): every source of the CUDA extension compiles with
`nvcc -c` against torch's headers, for sm_80 and sm_90, with warnings as errors, on a machine
without a GPU (and with a CPU-only torch, whose extension builder refuses CUDA).

One nvcc call per source with both -gencode targets, the calls run in parallel. The flags are those
of the real build (dia_fused/kernels/cuda_build.py, plus what torch's builder adds), with ptxas -v
on the .cu sources: no kernel may spill registers to local memory on either arch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch.utils.cpp_extension as cpp_extension

from dia_fused.kernels import cuda_build


def find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None,
    reason="nvcc not found (put it on PATH or set CUDA_HOME): the csrc compile check "
    "needs a CUDA toolkit, no GPU",
)

CSRC = cuda_build.csrc_dir()
# torch's CPU wheels ship c10/cuda headers without the CMake-generated cuda_cmake_macros.h; it only
# sets export macros, which an object-only compile does not need.
TORCH_INCLUDES = cpp_extension.include_paths()
NEEDS_CMAKE_MACROS_SHIM = not any(
    os.path.isfile(os.path.join(d, "c10", "cuda", "impl", "cuda_cmake_macros.h"))
    for d in TORCH_INCLUDES
)


def compile_command(source: str, obj: str):
    cmd = [
        NVCC,
        "-c",
        os.path.join(CSRC, source),
        "-o",
        obj,
        cuda_build.CXX_STD,
        *cuda_build.arch_flags(cuda_build.DEFAULT_ARCH_LIST),
        "-Werror",
        "all-warnings",
        "-Xcompiler",
        "-Wall,-Wextra,-Werror",
        "-I",
        CSRC,
    ]
    # torch's headers are system headers here: their own warnings are not ours to fix
    for include in TORCH_INCLUDES + [sysconfig.get_paths()["include"]]:
        cmd += ["-isystem", include]
    if source.endswith(".cu"):
        cmd += cuda_build.TORCH_NVCC_DEFINES + cuda_build.NVCC_FLAGS + ["-Xptxas", "-v"]
    else:
        cmd += cuda_build.CXX_FLAGS + [
            "-Xcompiler",
            "-fPIC",
            "-DTORCH_API_INCLUDE_EXTENSION_H",
            "-DTORCH_EXTENSION_NAME=_C",
        ]
        if NEEDS_CMAKE_MACROS_SHIM:
            cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return cmd


PTXAS_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '(\S+)' for '(sm_\d+)'")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(stderr: str):
    """(ptxas -v's per-kernel lines as {(kernel, arch): spill bytes stored + loaded}, the other
    stderr lines: compiler warnings)."""
    spills, other, entry = {}, [], None
    for line in stderr.splitlines():
        found = PTXAS_ENTRY.search(line)
        if found:
            entry = found.groups()
            continue
        counts = PTXAS_SPILLS.search(line)
        if counts and entry is not None:
            spills[entry] = int(counts.group(1)) + int(counts.group(2))
        elif not line.lstrip().startswith("ptxas info") and line.strip():
            other.append(line)
    return spills, other


@pytest.mark.slow  # nvcc over every source, two arches
@needs_nvcc
def test_every_csrc_source_compiles_for_sm80_and_sm90(tmp_path):
    assert CSRC is not None, "csrc/ sources not found beside or inside the package"
    listed = set(cuda_build.SOURCES + cuda_build.HEADERS)
    on_disk = {f for f in os.listdir(CSRC) if f.endswith((".cu", ".cpp", ".cuh", ".h"))}
    assert on_disk == listed, f"csrc/ and cuda_build.SOURCES/HEADERS differ: {on_disk ^ listed}"

    def run(source):
        start = time.perf_counter()
        proc = subprocess.run(
            compile_command(source, str(tmp_path / (source + ".o"))), capture_output=True, text=True
        )
        return source, proc, time.perf_counter() - start

    with ThreadPoolExecutor(
        max_workers=max(1, min(len(cuda_build.SOURCES), os.cpu_count() or 1))
    ) as pool:
        results = list(pool.map(run, cuda_build.SOURCES))
    failures = [
        f"{src} (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
        for src, proc, _ in results
        if proc.returncode != 0 or ptxas_report(proc.stderr)[1]
    ]
    assert not failures, "csrc compile errors or warnings:\n" + "\n".join(failures)
    spills = {}
    for src, proc, _ in results:
        if src.endswith(".cu"):
            spills.update(ptxas_report(proc.stderr)[0])
    assert {arch for _, arch in spills} == {"sm_80", "sm_90"}, "ptxas -v reported no kernels"
    spilling = {entry: n for entry, n in spills.items() if n}
    assert not spilling, f"kernels spilling registers (bytes stored + loaded): {spilling}"
    for src, _, seconds in results:
        print(f"{src}: {seconds:.1f} s")
        assert os.path.getsize(tmp_path / (src + ".o")) > 0


def test_ptxas_report_counts_spills_per_kernel_and_arch():
    stderr = (
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z1kv\n"
        "    24 bytes stack frame, 20 bytes spill stores, 20 bytes spill loads\n"
        "ptxas info    : Used 64 registers, used 1 barriers\n"
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "x.cu(3): warning #177-D: variable unused\n"
    )
    spills, other = ptxas_report(stderr)
    assert spills == {("_Z1kv", "sm_80"): 40, ("_Z1kv", "sm_90"): 0}
    assert other == ["x.cu(3): warning #177-D: variable unused"]


def test_arch_flags_default_to_sm80_and_sm90():
    flags = cuda_build.arch_flags(cuda_build.DEFAULT_ARCH_LIST)
    assert flags == [
        "-gencode=arch=compute_80,code=[sm_80]",
        "-gencode=arch=compute_90,code=[sm_90,compute_90]",
    ]
    assert cuda_build.arch_flags("9.0a") == ["-gencode=arch=compute_90a,code=[sm_90a]"]
    # the same arches as CMake spells them (CMakeLists.txt reads them through --cmake)
    assert cuda_build.cmake_architectures() == ["80-real", "90"]
    assert cuda_build.cmake_architectures("9.0a;10.0+PTX") == ["90a-real", "100"]
    with pytest.raises(ValueError, match="sm_90"):
        cuda_build.arch_flags("sm_90")
