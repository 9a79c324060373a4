"""dia_fused.testing.capture_cuda_graph, the capture idiom of the GPU tests and the graphed step
benchmarks, checked on CPU with torch.cuda's stream and graph objects replaced by recorders."""

import contextlib

import torch

from dia_fused import testing


def test_capture_warms_up_on_a_side_stream_then_captures_once(monkeypatch):
    log = []

    class Stream:
        def wait_stream(self, other):
            log.append(("wait", self is side[0]))

    side = []

    def make_stream():
        side.append(Stream())
        return side[-1]

    @contextlib.contextmanager
    def on(stream):
        log.append(("stream", stream is side[0]))
        yield

    @contextlib.contextmanager
    def capturing(graph):
        log.append("capture begins")
        yield
        log.append("capture ends")

    current = Stream()
    monkeypatch.setattr(torch.cuda, "Stream", make_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: "graph")
    monkeypatch.setattr(torch.cuda, "graph", capturing)
    calls = []
    graph, outputs = testing.capture_cuda_graph(
        lambda: calls.append(len(log)) or f"out{len(calls)}", warmup=2
    )
    assert (graph, outputs) == ("graph", "out3")
    assert log == [
        ("wait", True),
        ("stream", True),
        ("wait", False),
        "capture begins",
        "capture ends",
    ]
    assert calls == [2, 2, 4]  # two warm-up runs inside the side stream, one inside the capture
