"""One fused DIA step forward + backward per available fused backend, small enough for
compute-sanitizer (memcheck, racecheck): bench/gpu_session.sh runs it under each tool."""

import torch

from dia_fused import ops
from dia_fused.testing import random_step_inputs


def main() -> None:
    for backend in ("triton", "cuda"):
        reason = ops.backend_unavailable_reason(backend, "cuda")
        if reason is not None:
            print(f"{backend}: skipped ({reason})")
            continue
        for n, c, hw, cells in ((5, 70, (3, 5), 1), (33, 64, (8, 8), 1), (4, 24, (2, 2), 2)):
            for channels_last in (False, True):
                inputs = random_step_inputs(
                    n,
                    c,
                    *hw,
                    num_cells=cells,
                    dropout_p=0.2 if cells > 1 else 0,
                    device="cuda",
                    channels_last=channels_last,
                ).requires_grad_()
                out, h, c_new = ops.dia_step(
                    *inputs.args(), inputs.identity, True, "sigmoid", inputs.dropout_masks, backend
                )
                (out.square().sum() + h.sum() + c_new.sum()).backward()
        torch.cuda.synchronize()
        print(f"{backend}: ran")


if __name__ == "__main__":
    main()
