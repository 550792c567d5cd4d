#!/usr/bin/env python3
"""Writes the dense-student reference fixtures that crates/model/tests/dense.rs checks against.

Independent implementation: HF transformers' Qwen2ForCausalLM and LlamaForCausalLM (eager
attention, float32) — the architectures of DeepSeek-R1-Distill-Qwen and -Llama. For each config:

  crates/model/tests/fixtures/<name>/config.json           the HF config
  crates/model/tests/fixtures/<name>/model.safetensors     the weights (HF names)
  crates/model/tests/fixtures/<name>/reference.safetensors
      input_ids [2, 12], labels (input_ids with -100 in places), logits, loss (HF's shifted
      cross-entropy), grad.<name> for every parameter, greedy_prompt [1, 5] and greedy [1, 8]
      (HF generate, do_sample=False: the 8 new tokens).

Weights are drawn larger than HF's init (and biases and norm weights are non-trivial) so every
term of the forward matters.

Run once from the repo root (CI never does); name configs to write only those:
  python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
  .venv/bin/python scripts/make_dense_reference.py [NAME ...]
"""

import os
import sys

import torch
from safetensors.torch import save_file
from provenance import stamp
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "model", "tests", "fixtures")

COMMON = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    attn_implementation="eager",
)

CONFIGS = {
    # Qwen2: q/k/v biases, tied embedding and head (as the small Qwen2.5 models).
    "qwen2_tied": (Qwen2Config, Qwen2ForCausalLM, dict(rope_theta=1_000_000.0, tie_word_embeddings=True)),
    # Llama: no biases, untied head (as DeepSeek-R1-Distill-Llama).
    "llama_untied": (LlamaConfig, LlamaForCausalLM, dict(rope_theta=500_000.0, tie_word_embeddings=False)),
    # Llama's attention_bias: biases on q/k/v and on o_proj too.
    "llama_biased": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(rope_theta=500_000.0, tie_word_embeddings=False, attention_bias=True),
    ),
    # Llama 3.1's RoPE scaling (DeepSeek-R1-Distill-Llama's config.json has factor 8, 1, 4 over
    # 8192 positions); over 64 here, so the 8 rotary pairs of a 16-wide head fall in all three
    # bands: the first kept, the second blended, the rest divided by the factor.
    "llama3_scaled": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500_000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
}


def randomise(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def main():
    names = sys.argv[1:] or list(CONFIGS)
    for name in names:
        config_cls, model_cls, extra = CONFIGS[name]
        gen = torch.Generator().manual_seed(7)
        config = config_cls(**COMMON, **extra)
        model = model_cls(config).float()
        randomise(model, gen)
        model.eval()
        out = os.path.join(OUT, name)
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)

        input_ids = torch.randint(3, config.vocab_size, (2, 12), generator=gen)
        labels = input_ids.clone()
        labels[0, 3] = -100
        labels[1, 7:9] = -100
        result = model(input_ids=input_ids, labels=labels)
        result.loss.backward()
        tensors = {
            "input_ids": input_ids,
            "labels": labels,
            "logits": result.logits.detach().contiguous(),
            "loss": result.loss.detach().reshape(1),
        }
        for pname, p in model.named_parameters():
            tensors[f"grad.{pname}"] = p.grad.detach().contiguous()
        prompt = input_ids[:1, :5].clone()
        with torch.no_grad():
            greedy = model.generate(
                prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=8
            )
        tensors["greedy_prompt"] = prompt.contiguous()
        tensors["greedy"] = greedy[:, 5:].contiguous()
        meta = stamp(__file__, ["torch", "transformers"])
        save_file(tensors, os.path.join(out, "reference.safetensors"), metadata=meta)
        print(name, "loss", result.loss.item(), "greedy", greedy[0, 5:].tolist())


if __name__ == "__main__":
    main()
