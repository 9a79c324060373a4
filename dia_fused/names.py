"""Names shared by the dispatch (backends.py), the measured table (backend_table.py) and the kernel
modules, in a leaf module that imports nothing of dia_fused (so none of them imports another
just for a constant). Activation codes and other numbers shared with the C++ sources live in
kernels/cuda_build.py, their one source for Python, C++ and CMake."""

BACKENDS = ("reference", "triton", "cuda")
BACKEND_CHOICES = ("auto",) + BACKENDS
# auto's order where nothing was measured (docs/design.md §3)
AUTO_ORDER = ("cuda", "triton", "reference")
