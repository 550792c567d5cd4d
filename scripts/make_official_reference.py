#!/usr/bin/env python3
"""Writes crates/model/tests/fixtures/official_v3/: a small DeepSeek-V3 as DeepSeek's own inference
code runs it (deepseek-ai/DeepSeek-V3 `inference/model.py`), which crates/model/tests/reference.rs
compares whale's model and both of its MLA caches against.

Independent implementation: the reference's `Transformer`, built from `ModelArgs` in float32 on
the CPU (its `Linear.dtype` and weights cast to f32; the FP8 and Triton paths are not taken with
f32 weights), run with both of its attention implementations: `naive` (per-head K and V cached)
and `absorb` (the latent cache, W_UK folded into the query and W_UV into the output). The
reference's `forward` returns the last position's logits, so each position's come from decoding
the sequence one token at a time through its cache; a prefill of the whole sequence gives the
last position's once more. Its gate only has the correction bias at V3's full width (dim 7168),
so one is set here. YaRN is on (max_seq_len above original_seq_len), with groups, q_lora, a
dense first layer and a shared expert.

  config.json          the same model in HF's config keys (what whale reads)
  model.safetensors    the weights under HF's checkpoint names (convert.py's mapping, inverted)
  reference.safetensors
      input_ids [2, 8], logits [2, 8, vocab] (naive cache, token by token), logits_absorb (absorb
      cache), last_prefill [2, vocab] (naive, the whole sequence at once)

Run once from the repo root (CI never does), with a checkout of deepseek-ai/DeepSeek-V3:
  python3 -m venv .venv && .venv/bin/pip install torch safetensors triton
  git clone https://github.com/deepseek-ai/DeepSeek-V3 /tmp/DeepSeek-V3
  .venv/bin/python scripts/make_official_reference.py /tmp/DeepSeek-V3
"""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

from provenance import stamp

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "model", "tests", "fixtures", "official_v3")
ARGS = dict(
    max_batch_size=2,
    max_seq_len=64,
    vocab_size=96,
    dim=48,
    inter_dim=80,
    moe_inter_dim=24,
    n_layers=3,
    n_dense_layers=1,
    n_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    n_activated_experts=3,
    n_expert_groups=4,
    n_limited_groups=2,
    score_func="sigmoid",
    route_scale=2.5,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=12,
    original_seq_len=16,
    rope_theta=10000.0,
    rope_factor=4.0,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
)
# The reference's names (inference/convert.py's mapping) to HF's, per path component.
NAMES = {
    "embed": "model.embed_tokens",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn": "self_attn",
    "wq": "q_proj",
    "wq_a": "q_a_proj",
    "q_norm": "q_a_layernorm",
    "wq_b": "q_b_proj",
    "wkv_a": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm",
    "wkv_b": "kv_b_proj",
    "wo": "o_proj",
    "ffn": "mlp",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
    "norm": "model.norm",
    "head": "lm_head",
    "bias": "e_score_correction_bias",
}


def hf_name(name):
    parts = name.split(".")
    if parts[0] == "layers":
        parts = ["model", "layers", parts[1]] + [NAMES.get(p, p) for p in parts[2:]]
    else:
        parts = [NAMES.get(parts[0], parts[0])] + parts[1:]
    return ".".join(parts)


def hf_config(a):
    # HF applies the rope_scaling written below always; the reference only past original_seq_len.
    assert a["max_seq_len"] > a["original_seq_len"], "YaRN must be on in the reference too"
    return {
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": a["vocab_size"],
        "hidden_size": a["dim"],
        "intermediate_size": a["inter_dim"],
        "moe_intermediate_size": a["moe_inter_dim"],
        "num_hidden_layers": a["n_layers"],
        "first_k_dense_replace": a["n_dense_layers"],
        "num_attention_heads": a["n_heads"],
        "num_key_value_heads": a["n_heads"],
        "n_routed_experts": a["n_routed_experts"],
        "n_shared_experts": a["n_shared_experts"],
        "num_experts_per_tok": a["n_activated_experts"],
        "n_group": a["n_expert_groups"],
        "topk_group": a["n_limited_groups"],
        "scoring_func": a["score_func"],
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": a["route_scale"],
        "q_lora_rank": a["q_lora_rank"],
        "kv_lora_rank": a["kv_lora_rank"],
        "qk_nope_head_dim": a["qk_nope_head_dim"],
        "qk_rope_head_dim": a["qk_rope_head_dim"],
        "v_head_dim": a["v_head_dim"],
        "max_position_embeddings": a["max_seq_len"],
        "rope_theta": a["rope_theta"],
        "rope_scaling": {
            "type": "yarn",
            "factor": a["rope_factor"],
            "original_max_position_embeddings": a["original_seq_len"],
            "beta_fast": a["beta_fast"],
            "beta_slow": a["beta_slow"],
            "mscale": a["mscale"],
            "mscale_all_dim": a["mscale"],
        },
        "rms_norm_eps": 1e-6,
        "num_nextn_predict_layers": 0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }


def logits_through_cache(model, tokens):
    """Each position's logits, the sequence fed one token at a time."""
    return torch.stack([model(tokens[:, t : t + 1], start_pos=t) for t in range(tokens.size(1))], dim=1)


def main():
    checkout = sys.argv[1] if len(sys.argv) > 1 else "/tmp/DeepSeek-V3"
    sys.path.insert(0, os.path.join(checkout, "inference"))
    import model as reference

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)
    args = reference.ModelArgs(**ARGS)
    tokens = torch.randint(2, args.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    weights = None
    outputs = {}
    for impl in ["naive", "absorb"]:
        reference.attn_impl = impl
        net = reference.Transformer(args).float()
        for layer in net.layers[args.n_dense_layers :]:
            layer.ffn.gate.bias = torch.nn.Parameter(torch.empty(args.n_routed_experts))
        if weights is None:
            # Larger than an init, so every term matters; norms away from 1.
            weights = {}
            for name, p in net.state_dict().items():
                if name.endswith("norm.weight"):
                    weights[name] = 1.0 + 0.2 * torch.randn(p.shape)
                elif name.endswith("gate.bias"):
                    weights[name] = 0.1 * torch.randn(p.shape)
                else:
                    weights[name] = torch.randn(p.shape) / max(p.shape[-1], 1) ** 0.5
        net.load_state_dict(weights)
        net.eval()
        with torch.no_grad():
            outputs[impl] = logits_through_cache(net, tokens)
            if impl == "naive":
                outputs["last_prefill"] = net(tokens, start_pos=0)
    assert torch.allclose(outputs["naive"], outputs["absorb"], atol=1e-5), "the reference's two caches agree"

    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(hf_config(ARGS), f, indent=2)
        f.write("\n")
    save_file({hf_name(k): v.contiguous() for k, v in weights.items()}, os.path.join(OUT, "model.safetensors"))
    commit = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = stamp(__file__, ["torch"]) | {"deepseek_v3_commit": commit or "unknown"}
    reference_tensors = {
        "input_ids": tokens.to(torch.int64),
        "logits": outputs["naive"].contiguous(),
        "logits_absorb": outputs["absorb"].contiguous(),
        "last_prefill": outputs["last_prefill"].contiguous(),
    }
    save_file(reference_tensors, os.path.join(OUT, "reference.safetensors"), metadata=meta)
    print(f"wrote {os.path.relpath(OUT)} (DeepSeek-V3 {commit[:7]})")


if __name__ == "__main__":
    main()
