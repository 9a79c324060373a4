"""Shared pieces of the microbenchmarks: the device, synchronised timing and bandwidth figures."""

import torch

# Peak HBM bandwidth (bytes/s) by device name, for the "% of peak" figure; None if unknown.
PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
)

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def peak_bandwidth():
    if not ON_GPU:
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


def synchronize():
    if ON_GPU:
        torch.cuda.synchronize()


def run_timed(benchmark, fn, *, inner: int, bytes_moved: int, rounds: int):
    """Times `inner` back-to-back calls of fn per round (one sync per round, so GPU launch queues
    stay full), and records per-call time, GB/s and % of peak bandwidth in extra_info."""

    def batch():
        for _ in range(inner):
            fn()
        synchronize()

    batch()  # warm-up: compilation, autotuning, allocator
    benchmark.pedantic(batch, rounds=rounds, iterations=1, warmup_rounds=1)
    per_call = benchmark.stats.stats.median / inner
    info = benchmark.extra_info
    info["per_call_ms"] = per_call * 1e3
    info["GB_per_s"] = bytes_moved / per_call / 1e9
    peak = peak_bandwidth()
    if peak:
        info["pct_peak_bandwidth"] = 100.0 * bytes_moved / per_call / peak
    info["device"] = torch.cuda.get_device_name() if ON_GPU else "cpu"
    info["torch"] = torch.__version__
