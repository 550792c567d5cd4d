#!/usr/bin/env python3
"""Writes crates/tensor/tests/fixtures/torch_adamw/expected.json: what torch.optim.AdamW (its
single-tensor loop in f32 on the CPU, as it runs without foreach or fused kernels) does to a
matrix and a vector over three steps, which crates/tensor/tests/optim.rs compares whale's AdamW
against bit for bit.

Independent implementation: torch itself. Three settings: hyper-parameters f32 holds exactly,
with beta1 = 0.75 and with beta1 = 0.25 (ATen's lerp computes from the moment below a weight of
0.5 and from the gradient above it), and DeepSeek-V3's decimal ones (lr 1e-3, betas 0.9/0.95, eps
1e-8, weight decay 0.1), which torch holds as doubles and whale as f32, so a few results may
differ in their last bit. The matrix is decayed and the vector not (whale's default). Values are
f32 bit patterns, so nothing is lost in the JSON.

Run once from the repo root (CI never does):
  python3 -m venv .venv && .venv/bin/pip install torch
  .venv/bin/python scripts/make_adamw_reference.py
"""

import json
import os

import torch

from provenance import stamp

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "tensor", "tests", "fixtures", "torch_adamw")
SETTINGS = [
    {"name": "exact, beta1 0.75", "lr": 2**-7, "beta1": 0.75, "beta2": 0.875, "eps": 2**-20, "weight_decay": 0.5},
    {"name": "exact, beta1 0.25", "lr": 2**-7, "beta1": 0.25, "beta2": 0.875, "eps": 2**-20, "weight_decay": 0.5},
    {"name": "DeepSeek-V3's", "lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1},
]
SHAPES = {"w": [5, 7], "b": [7]}
STEPS = 3


def bits(t):
    return t.detach().contiguous().view(torch.int32).flatten().tolist()


def main():
    g = torch.Generator().manual_seed(0)
    start = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    # Gradients of order 1 and a few far smaller, where eps matters in the denominator.
    grads = [
        {name: torch.randn(shape, generator=g) * torch.where(torch.rand(shape, generator=g) < 0.2, 1e-7, 1.0) for name, shape in SHAPES.items()}
        for _ in range(STEPS)
    ]
    cases = []
    for s in SETTINGS:
        params = {name: t.clone().requires_grad_(True) for name, t in start.items()}
        opt = torch.optim.AdamW(
            [{"params": [params["w"]], "weight_decay": s["weight_decay"]}, {"params": [params["b"]], "weight_decay": 0.0}],
            lr=s["lr"],
            betas=(s["beta1"], s["beta2"]),
            eps=s["eps"],
            foreach=False,
            fused=False,
        )
        steps = []
        for grad in grads:
            for name, p in params.items():
                p.grad = grad[name].clone()
            opt.step()
            steps.append(
                {
                    name: {
                        "param": bits(p),
                        "exp_avg": bits(opt.state[p]["exp_avg"]),
                        "exp_avg_sq": bits(opt.state[p]["exp_avg_sq"]),
                    }
                    for name, p in params.items()
                }
            )
        cases.append(s | {"steps": steps})
    expected = {
        "provenance": stamp(__file__, ["torch"]),
        "shapes": SHAPES,
        "start": {name: bits(t) for name, t in start.items()},
        "grads": [{name: bits(t) for name, t in grad.items()} for grad in grads],
        "cases": cases,
    }
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f)
        f.write("\n")
    print(f"wrote {os.path.relpath(OUT)}/expected.json")


if __name__ == "__main__":
    main()
