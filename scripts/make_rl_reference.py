#!/usr/bin/env python3
"""Writes crates/rl/tests/fixtures/trl_grpo_loss/expected.json: the GRPO objective as TRL computes
it, which crates/rl/tests/grpo.rs compares whale_rl's grpo_loss and aggregation_weights against.

Independent implementation: TRL's own GRPOTrainer._compute_loss, called unbound on a stand-in
trainer that holds only the settings the loss reads, with the policy's per-token log-probs
handed in as a float64 leaf (so torch's autograd gives the gradient, and nothing of a model
runs). It covers the four aggregations whale names as TRL does (grpo, bnpo, dr_grpo, dapo),
clip-higher bounds (epsilon_low 0.2, epsilon_high 0.28), the k3 KL term at beta 0 and 0.04, and
the step taken in one micro-batch or in two with gradient accumulation (TRL divides each micro-
batch's loss by the accumulation steps, and dapo by the whole generation batch's tokens). Each
case records the summed loss, d loss / d log-prob at every completion token, and for the one-
micro-batch cases TRL's logged clip_ratio/low_mean, clip_ratio/high_mean and kl.

Run once from the repo root (CI never does):
  python3 -m venv .venv && .venv/bin/pip install torch trl
  .venv/bin/python scripts/make_rl_reference.py
"""

import json
import os
from collections import defaultdict
from types import SimpleNamespace

import torch
from trl import GRPOTrainer

from provenance import stamp

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "rl", "tests", "fixtures", "trl_grpo_loss")
# Four completions of one group, of different lengths, padded to the longest (TRL's layout).
LENGTHS = [6, 3, 5, 2]
MAX_COMPLETION_LENGTH = 6
EPSILON_LOW, EPSILON_HIGH = 0.2, 0.28


def f32(t):
    """Values that f32 holds exactly, so the Rust side reads the very inputs used here."""
    return t.to(torch.float32).to(torch.float64)


def data():
    g = torch.Generator().manual_seed(0)
    b, t = len(LENGTHS), MAX_COMPLETION_LENGTH
    mask = torch.tensor([[1.0 if j < n else 0.0 for j in range(t)] for n in LENGTHS], dtype=torch.float64)
    logprobs = f32(-2.0 * torch.rand(b, t, generator=g, dtype=torch.float64) - 0.05)
    # The sampling policy 0.05-0.45 away, either side: both clips bind on some tokens.
    shift = (0.05 + 0.4 * torch.rand(b, t, generator=g, dtype=torch.float64)) * torch.where(
        torch.rand(b, t, generator=g) < 0.5, 1.0, -1.0
    )
    old = f32(logprobs - shift)
    reference = f32(logprobs + 0.6 * (torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5))
    # A centred group's advantages (TRL's are one per completion).
    advantages = f32(torch.tensor([1.1, -0.7, 0.4, -0.8], dtype=torch.float64))
    return mask, logprobs, old, reference, advantages


def trl_loss(rows, loss_type, beta, accumulation, everything):
    """TRL's loss of the micro-batch `rows`, and the leaf its gradient lands on."""
    mask, logprobs, old, reference, advantages = everything
    leaf = logprobs[rows].clone().requires_grad_(True)
    accelerator = SimpleNamespace(
        num_processes=1,
        sync_gradients=True,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction: x,
    )
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (leaf, torch.zeros_like(leaf), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=EPSILON_LOW,
        epsilon_high=EPSILON_HIGH,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=accumulation),
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation,
        max_completion_length=MAX_COMPLETION_LENGTH,
        accelerator=accelerator,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    n = len(rows)
    inputs = {
        "prompt_ids": torch.zeros(n, 2, dtype=torch.long),
        "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.zeros(n, MAX_COMPLETION_LENGTH, dtype=torch.long),
        "completion_mask": mask[rows],
        "advantages": advantages[rows],
        "old_per_token_logps": old[rows],
        "ref_per_token_logps": reference[rows],
        # The whole generation batch's completion tokens (dapo's normaliser).
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, leaf, trainer._metrics["train"]


def main():
    everything = data()
    mask, logprobs, old, reference, advantages = everything
    cases = []
    for loss_type in ["grpo", "bnpo", "dr_grpo", "dapo"]:
        for beta in [0.0, 0.04]:
            for micro_batches in [[[0, 1, 2, 3]], [[0, 1], [2, 3]]]:
                total, grad, metrics = 0.0, torch.zeros_like(logprobs), None
                for rows in micro_batches:
                    loss, leaf, metrics = trl_loss(rows, loss_type, beta, len(micro_batches), everything)
                    loss.backward()
                    total += loss.item()
                    grad[rows] = leaf.grad
                case = {
                    "loss_type": loss_type,
                    "beta": beta,
                    "micro_batches": micro_batches,
                    "loss": total,
                    "grad": [grad[i, :n].tolist() for i, n in enumerate(LENGTHS)],
                }
                if len(micro_batches) == 1:
                    case["clip_ratio_low"] = metrics["clip_ratio/low_mean"][0]
                    case["clip_ratio_high"] = metrics["clip_ratio/high_mean"][0]
                    if beta > 0:
                        case["kl"] = metrics["kl"][0]
                cases.append(case)
    expected = {
        "provenance": stamp(__file__, ["torch", "trl"]),
        "epsilon_low": EPSILON_LOW,
        "epsilon_high": EPSILON_HIGH,
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "logprobs": [logprobs[i, :n].tolist() for i, n in enumerate(LENGTHS)],
        "old": [old[i, :n].tolist() for i, n in enumerate(LENGTHS)],
        "reference": [reference[i, :n].tolist() for i, n in enumerate(LENGTHS)],
        "advantages": advantages.tolist(),
        "cases": cases,
    }
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {os.path.relpath(OUT)}/expected.json")


if __name__ == "__main__":
    main()
