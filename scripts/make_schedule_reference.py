#!/usr/bin/env python3
"""Writes crates/parallel/tests/fixtures/dualpipe/expected.json: the order in which DeepSeek's
reference DualPipe and DualPipeV (deepseek-ai/DualPipe, `dualpipe/dualpipe.py` and
`dualpipe/dualpipev.py`) run each rank's chunks, for many pipeline shapes, which
crates/parallel/tests/schedule.rs compares whale's schedules against.

Independent implementation: the reference's own `step`, run rank by rank on an instance whose
chunk methods record what they were asked to run instead of computing and communicating (no GPU,
no process group: `step`'s control flow alone decides the order). Each rank's list is written in
whale's notation: `F0.3` the forward of direction 0's micro-batch 3, `B` a full backward, `b` an
input-gradient-only backward (zero bubble) whose weight gradient a later `W` computes (first in,
first out), `[F0.3&B1.1]` a forward and a backward overlapped. A direction is the reference's
phase on DualPipe's first half of ranks and on every DualPipeV rank, and the other phase on
DualPipe's second half (whose phase 0 runs the reverse direction).

Run once from the repo root (CI never does), with a checkout of deepseek-ai/DualPipe:
  python3 -m venv .venv && .venv/bin/pip install torch
  git clone https://github.com/deepseek-ai/DualPipe /tmp/DualPipe
  .venv/bin/python scripts/make_schedule_reference.py /tmp/DualPipe
"""

import json
import os
import subprocess
import sys

import torch

from provenance import stamp

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "parallel", "tests", "fixtures", "dualpipe")
# (ranks, micro-batches): DualPipe needs an even count of ranks and an even count of at least
# twice the ranks; DualPipeV any count of ranks and at least twice as many micro-batches.
DUALPIPE_SHAPES = [(p, m) for p in [2, 4, 6, 8, 16] for m in sorted({2 * p, 2 * p + 2, 2 * p + 6, 3 * p + 3 * p % 2, 4 * p})]
DUALPIPEV_SHAPES = [(p, m) for p in [1, 2, 3, 4, 5, 8] for m in sorted({2 * p, 2 * p + 1, 2 * p + 5, 3 * p + 2, 4 * p})]


def record(cls, ranks, micro, rank, second_half_flips):
    """The ops `cls.step` runs on `rank` of `ranks` for `micro` micro-batches."""
    pipe = cls.__new__(cls)
    torch.nn.Module.__init__(pipe)
    pipe.rank, pipe.num_ranks, pipe.batch_dim = rank, ranks, 0
    pipe.is_first_rank, pipe.is_last_rank = rank == 0, rank == ranks - 1
    pipe.is_in_second_half = rank >= ranks // 2
    pipe.is_middle_rank = rank in (ranks // 2 - 1, ranks // 2)
    ops = []
    counts = {"F": [0, 0], "B": [0, 0]}

    def direction(phase):
        return 1 - phase if second_half_flips and pipe.is_in_second_half else phase

    def forward(phase):
        name = f"F{direction(phase)}.{counts['F'][phase]}"
        counts["F"][phase] += 1
        return name

    def backward(phase, zero_bubble):
        name = f"{'b' if zero_bubble else 'B'}{direction(phase)}.{counts['B'][phase]}"
        counts["B"][phase] += 1
        return name

    def reset():
        counts["F"], counts["B"] = [0, 0], [0, 0]
        pipe.loss_chunks = [torch.zeros(())]
        pipe.output_chunks = ([], [])

    pipe._reset_states = reset
    pipe._forward_chunk = lambda phase, recv=True, send=True: ops.append(forward(phase))
    pipe._backward_chunk = lambda phase, enable_zb=False, recv=True, send=True: ops.append(backward(phase, enable_zb))
    pipe._forward_backward_chunk = lambda p0, p1, recv0=True: ops.append(f"[{forward(p0)}&{backward(p1, False)}]")
    pipe._weight_chunk = lambda: ops.append("W")
    for name in ["_recv_forward", "_send_forward", "_recv_backward", "_send_backward"]:
        setattr(pipe, name, lambda phase: None)
    pipe._commit_and_wait_comm = lambda: None
    pipe.step(num_chunks=micro, criterion=lambda *a: None)
    return " ".join(ops)


def main():
    checkout = sys.argv[1] if len(sys.argv) > 1 else "/tmp/DualPipe"
    sys.path.insert(0, checkout)
    import dualpipe.comm as comm
    from dualpipe import DualPipe, DualPipeV

    comm.TENSOR_SHAPES, comm.TENSOR_DTYPE = [(1,)], torch.float32
    commit = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    expected = {
        "provenance": stamp(__file__, ["torch"]) | {"dualpipe_commit": commit or "unknown"},
        "dualpipe": [
            {"ranks": p, "micro": m, "order": [record(DualPipe, p, m, r, True) for r in range(p)]}
            for p, m in DUALPIPE_SHAPES
        ],
        "dualpipev": [
            {"ranks": p, "micro": m, "order": [record(DualPipeV, p, m, r, False) for r in range(p)]}
            for p, m in DUALPIPEV_SHAPES
        ],
    }
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print(f"wrote {len(DUALPIPE_SHAPES)} DualPipe and {len(DUALPIPEV_SHAPES)} DualPipeV shapes to {os.path.relpath(OUT)}")


if __name__ == "__main__":
    main()
