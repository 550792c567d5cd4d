#!/usr/bin/env python3
"""Writes the RL fixtures crates/rl/tests/grpo.rs compares whale_rl against.

crates/rl/tests/fixtures/trl_grpo_loss/expected.json: the GRPO objective as TRL computes it, for
whale_rl's grpo_loss and aggregation_weights.

Independent implementation: TRL's own GRPOTrainer._compute_loss, called unbound on a stand-in
trainer that holds only the settings the loss reads, with the policy's per-token log-probs
handed in as a float64 leaf (so torch's autograd gives the gradient, and nothing of a model
runs). It covers the four aggregations whale names as TRL does (grpo, bnpo, dr_grpo, dapo),
clip-higher bounds (epsilon_low 0.2, epsilon_high 0.28), the k3 KL term at beta 0 and 0.04, and
the step taken in one micro-batch or in two with gradient accumulation (TRL divides each micro-
batch's loss by the accumulation steps, and dapo by the whole generation batch's tokens). Each
case records the summed loss, d loss / d log-prob at every completion token, and for the one-
micro-batch cases TRL's logged clip_ratio/low_mean, clip_ratio/high_mean and kl.

crates/rl/tests/fixtures/verl_ppo/expected.json: verl's own functions (verl.trainer.ppo.core_algos)
on the same kind of inputs, for the rest of PPO and GRPO's arithmetic: compute_gae_advantage_return
(GAE per completion, then the advantages whitened over the batch's tokens) against
whale_rl::ppo::ppo_advantages; compute_value_loss (clipped, token-mean) and its gradient against
value_loss; kl_penalty's low_var_kl (k3, with verl's log-ratio clamp and k3's upper clamp made to
bind) and its gradient
against grpo_loss's KL term; compute_grpo_outcome_advantage at TRL's epsilon 1e-4, groups of four
and of one, against group_advantages.

Run once from the repo root (CI never does):
  python3 -m venv .venv && .venv/bin/pip install torch trl
  .venv/bin/pip install --no-deps verl && .venv/bin/pip install ray tensordict orjson codetiming omegaconf
  .venv/bin/python scripts/make_rl_reference.py
"""

import json
import os
from collections import defaultdict
from types import SimpleNamespace

import torch
from trl import GRPOTrainer
from verl.trainer.ppo import core_algos

from provenance import stamp

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "crates", "rl", "tests", "fixtures")
# Four completions of one group, of different lengths, padded to the longest (TRL's layout); the
# sampler's limit above the longest, so dr_grpo's divisor is told apart from the longest length.
LENGTHS = [6, 3, 5, 2]
WIDTH = max(LENGTHS)
MAX_COMPLETION_LENGTH = 8
EPSILON_LOW, EPSILON_HIGH = 0.2, 0.28


def f32(t):
    """Values that f32 holds exactly, so the Rust side reads the very inputs used here."""
    return t.to(torch.float32).to(torch.float64)


def data():
    g = torch.Generator().manual_seed(0)
    b, t = len(LENGTHS), WIDTH
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
        "completion_ids": torch.zeros(n, WIDTH, dtype=torch.long),
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
                    "grad": rows_of(grad, LENGTHS),
                }
                if len(micro_batches) == 1:
                    case["clip_ratio_low"] = metrics["clip_ratio/low_mean"][0]
                    case["clip_ratio_high"] = metrics["clip_ratio/high_mean"][0]
                    if beta > 0:
                        case["kl"] = metrics["kl"][0]
                cases.append(case)
    expected = {
        "provenance": stamp(__file__, ["torch", "trl", "verl"]),
        "epsilon_low": EPSILON_LOW,
        "epsilon_high": EPSILON_HIGH,
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "logprobs": rows_of(logprobs, LENGTHS),
        "old": rows_of(old, LENGTHS),
        "reference": rows_of(reference, LENGTHS),
        "advantages": advantages.tolist(),
        "cases": cases,
    }
    write("trl_grpo_loss", expected)
    write("verl_ppo", verl_ppo())


def write(name, expected):
    out = os.path.join(FIXTURES, name)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(out)}/expected.json")


def rows_of(t, lengths):
    return [t[i, :n].tolist() for i, n in enumerate(lengths)]


def verl_ppo():
    g = torch.Generator().manual_seed(1)
    lengths = [6, 3, 5, 2]
    b, t = len(lengths), max(lengths)
    mask = torch.tensor([[1.0 if j < n else 0.0 for j in range(t)] for n in lengths], dtype=torch.float64)

    def uniform(lo, hi):
        return f32(lo + (hi - lo) * torch.rand(b, t, generator=g, dtype=torch.float64)) * mask

    # GAE: per-token rewards as PPO builds them (a small KL penalty on every token, the score on
    # the last) and value estimates; verl whitens the advantages over the batch's tokens.
    token_rewards = uniform(-0.05, 0.05)
    scores = [1.0, 0.0, 1.5, -0.5]
    for i, n in enumerate(lengths):
        token_rewards[i, n - 1] += scores[i]
    token_rewards = f32(token_rewards)
    values = uniform(-0.5, 1.0)
    gae = []
    for gamma, lam in [(1.0, 0.95), (0.99, 1.0)]:
        advantages, returns = core_algos.compute_gae_advantage_return(token_rewards, values, mask, gamma, lam)
        gae.append(
            {
                "gamma": gamma,
                "lam": lam,
                "advantages": rows_of(advantages, lengths),
                "returns": rows_of(returns, lengths),
            }
        )

    # The clipped value loss: predictions past the clip either side of the old values.
    old_values = values
    vpreds = f32(old_values + uniform(-0.5, 0.5)).requires_grad_(True)
    returns = f32(returns)
    vf_loss, _ = core_algos.compute_value_loss(vpreds, returns, old_values, mask, cliprange_value=0.2)
    vf_loss.backward()
    value = {
        "cliprange_value": 0.2,
        "vpreds": rows_of(vpreds.detach(), lengths),
        "old_values": rows_of(old_values, lengths),
        "returns": rows_of(returns, lengths),
        "loss": vf_loss.item(),
        "grad": rows_of(vpreds.grad, lengths),
    }

    # k3 with verl's clamps: log-ratios past +-20 and k3 past 10 among ordinary ones.
    logprob = uniform(-2.5, -0.1)
    ref = f32(logprob + uniform(-0.6, 0.6))
    ref[0, 1] = logprob[0, 1] + 3.0  # k3 = e^3 - 4 > 10: clamped
    ref[1, 0] = logprob[1, 0] - 12.0  # k3 = e^-12 + 11 > 10: clamped
    # The log-ratio clamped to 20, then k3 too: unclamped, exp(100) overflows f32 and the
    # gradient (0 from k3's clamp times an infinite derivative) is NaN.
    ref[2, 3] = logprob[2, 3] + 100.0
    ref = f32(ref)
    leaf = logprob.clone().requires_grad_(True)
    kl = core_algos.kl_penalty(leaf, ref, "low_var_kl")
    (kl * mask).sum().backward()
    k3 = {
        "logprob": rows_of(logprob, lengths),
        "reference": rows_of(ref, lengths),
        "k3": rows_of(kl.detach(), lengths),
        "grad": rows_of(leaf.grad, lengths),
    }

    # GRPO's outcome advantages: two groups of four (one with equal rewards) and two of one.
    rewards = [1.0, 0.0, 0.5, 1.0, 0.5, 0.5, 0.5, 0.5, 0.7, -0.3]
    index = ["a"] * 4 + ["b"] * 4 + ["c", "d"]
    outcome_rewards = torch.tensor(rewards, dtype=torch.float64).unsqueeze(-1)
    outcome, _ = core_algos.compute_grpo_outcome_advantage(
        outcome_rewards, torch.ones_like(outcome_rewards), index, epsilon=1e-4
    )
    grpo = {"rewards": rewards, "groups": [4, 4, 1, 1], "epsilon": 1e-4, "advantages": outcome[:, 0].tolist()}
    return {
        "provenance": stamp(__file__, ["torch", "trl", "verl"]),
        "gae": {"rewards": rows_of(token_rewards, lengths), "values": rows_of(values, lengths), "cases": gae},
        "value_loss": value,
        "k3": k3,
        "grpo_advantages": grpo,
    }


if __name__ == "__main__":
    main()
