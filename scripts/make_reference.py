#!/usr/bin/env python3
"""Writes the DeepSeek-V3 reference fixtures that crates/model/tests/reference.rs checks against.

Independent implementation: HF transformers' DeepseekV3ForCausalLM (eager attention, float32),
plus a Multi-Token Prediction module assembled here from HF's own blocks following
../shared/spec/deepseek-v3.md section 3 (HF does not implement MTP), and HF's native
DeepseekV2ForCausalLM for DeepSeek-V2's router (v2_group_limited). For each config it writes:

  crates/model/tests/fixtures/<name>/config.json          the HF config
  crates/model/tests/fixtures/<name>/model.safetensors    weights under HF checkpoint names
                                                          (per-expert names; MTP as layer L)
  crates/model/tests/fixtures/<name>/reference.safetensors
      input_ids, labels (HF convention: unshifted, -100 ignored), logits, main_loss, mtp_loss,
      total_loss = main_loss + mtp_loss_weight / D * sum(mtp_loss_k), and grad.<name> for every
      parameter (the gradient of total_loss).

Run once from the repo root (CI never does):
  python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
(the fixtures record the versions that wrote them, torch 2.15 and transformers 5.24 at the
last run, and a hash of this script: crates/model/tests/fixtures.rs fails once it changes)
  .venv/bin/python scripts/make_reference.py
"""

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from provenance import stamp
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3DecoderLayer,
    DeepseekV3RMSNorm,
    DeepseekV3RotaryEmbedding,
)

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "model", "tests", "fixtures")
MTP_WEIGHT = 0.3


class MtpModule(nn.Module):
    """Spec 3.1: h' = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i)]) (embedding first, as the released
    checkpoint is consumed), one decoder block, then shared_head.norm and the shared head."""

    def __init__(self, config, layer_idx):
        super().__init__()
        d = config.hidden_size
        self.enorm = DeepseekV3RMSNorm(d, eps=config.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(d, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = DeepseekV3DecoderLayer(config, layer_idx)
        self.shared_head_norm = DeepseekV3RMSNorm(d, eps=config.rms_norm_eps)

    def forward(self, h_prev, emb, rotary):
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        s = x.shape[1]
        pos = torch.arange(s)[None]
        mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
        y = self.block(x, attention_mask=mask, position_ids=pos, position_embeddings=rotary(x, pos))
        return y, self.shared_head_norm(y)


def hf_names(model, mtp, n_layers):
    """name -> parameter, in checkpoint naming: fused expert tensors split per expert, MTP as layer L."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            inter = p.shape[1] // 2
            for e in range(p.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = (p, lambda t, e=e: t[e, :inter])
                out[f"{base}{e}.up_proj.weight"] = (p, lambda t, e=e: t[e, inter:])
        elif name.endswith("experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(p.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = (p, lambda t, e=e: t[e])
        else:
            out[name] = (p, lambda t: t)
    for k, m in enumerate(mtp):
        prefix = f"model.layers.{n_layers + k}."
        for name, p in m.named_parameters():
            name = name.replace("shared_head_norm", "shared_head.norm").replace("block.", "")
            sub = hf_names_block(name, p)
            for n, v in sub.items():
                out[prefix + n] = v
    return out


def hf_names_block(name, p):
    if name.endswith("experts.gate_up_proj"):
        base = name[: -len("gate_up_proj")]
        inter = p.shape[1] // 2
        res = {}
        for e in range(p.shape[0]):
            res[f"{base}{e}.gate_proj.weight"] = (p, lambda t, e=e: t[e, :inter])
            res[f"{base}{e}.up_proj.weight"] = (p, lambda t, e=e: t[e, inter:])
        return res
    if name.endswith("experts.down_proj"):
        base = name[: -len("down_proj")]
        return {f"{base}{e}.down_proj.weight": (p, lambda t, e=e: t[e]) for e in range(p.shape[0])}
    return {name: (p, lambda t: t)}


def make(name, config, batch, seq, seed, write_config, model_class=DeepseekV3ForCausalLM):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = model_class(config).float().eval()
    n_layers = config.num_hidden_layers
    depth = getattr(config, "num_nextn_predict_layers", 0)
    mtp = nn.ModuleList([MtpModule(config, n_layers + k) for k in range(depth)]).float()
    rotary = DeepseekV3RotaryEmbedding(config)

    # Norm scales and balancing biases away from their trivial starting values, so the test
    # notices if either is ignored.
    with torch.no_grad():
        for mod in list(model.modules()) + list(mtp.modules()):
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.add_(0.1 * torch.randn_like(mod.weight))
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.copy_(0.05 * torch.randn_like(mod.e_score_correction_bias))
        for m in mtp.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, config.initializer_range)
        for n, p in mtp.named_parameters():
            if "experts" in n or "gate.weight" in n:
                p.normal_(0.0, config.initializer_range)

    input_ids = torch.randint(0, config.vocab_size, (batch, seq))
    labels = input_ids.clone()
    labels[0, 2] = -100
    labels[-1, -3] = -100

    captured = {}
    model.model.norm.register_forward_hook(lambda mod, inp, out: captured.__setitem__("h", inp[0]))
    out = model(input_ids=input_ids, labels=labels)
    logits, main_loss = out.logits, out.loss

    # Targets aligned with positions: target[i] = labels[i + 1].
    targets = torch.cat([labels[:, 1:], torch.full((batch, 1), -100)], dim=1)
    n_main = (targets != -100).sum()
    h = captured["h"]
    embed, head = model.model.embed_tokens, model.lm_head
    mtp_losses = []
    for k in range(1, depth + 1):
        s = seq - k
        h, normed = mtp[k - 1](h[:, :s], embed(input_ids[:, k:]), rotary)
        t = targets[:, k:]
        lg = head(normed)
        ce = nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), t.reshape(-1), ignore_index=-100)
        # Spec 3.2: normalised by T (the main loss's token count), not T - k.
        mtp_losses.append(ce * (t != -100).sum() / n_main)
    mtp_loss = torch.stack(mtp_losses).sum() if mtp_losses else torch.zeros(())
    total = main_loss + (MTP_WEIGHT / depth if depth else 0.0) * mtp_loss
    total.backward()

    named = hf_names(model, mtp, n_layers)
    weights, grads = {}, {}
    for n, (p, view) in named.items():
        weights[n] = view(p.detach()).contiguous().clone()
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        grads["grad." + n] = view(g).contiguous().clone()
    for i, layer in enumerate(model.model.layers):
        if hasattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias"):
            weights[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] = layer.mlp.gate.e_score_correction_bias.clone()
    for k, m in enumerate(mtp):
        weights[f"model.layers.{n_layers + k}.mlp.gate.e_score_correction_bias"] = (
            m.block.mlp.gate.e_score_correction_bias.clone()
        )
        # The checkpoint stores its own copies of the shared embedding and head (spec 3.4).
        weights[f"model.layers.{n_layers + k}.embed_tokens.weight"] = embed.weight.detach().clone()
        weights[f"model.layers.{n_layers + k}.shared_head.head.weight"] = head.weight.detach().clone()

    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    write_config(config, d)
    save_file(weights, os.path.join(d, "model.safetensors"))
    ref = {
        "input_ids": input_ids,
        "labels": labels,
        "logits": logits.detach().contiguous(),
        "main_loss": main_loss.detach().reshape(()),
        "mtp_loss": mtp_loss.detach().reshape(()),
        "total_loss": total.detach().reshape(()),
    }
    ref.update(grads)
    save_file(ref, os.path.join(d, "reference.safetensors"), metadata=stamp(__file__, ["torch", "transformers"]))
    print(f"{name}: main {main_loss.item():.6f} mtp {mtp_loss.item():.6f} total {total.item():.6f}, {len(grads)} grads")


def write_hf_config(config, d):
    """transformers' own serialisation (the newer `rope_parameters` spelling; for DeepSeek-V2
    without `scoring_func`, which HF's native DeepseekV2 does not have: always softmax)."""
    config.save_pretrained(d)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["mtp_loss_weight"] = MTP_WEIGHT
    cfg["seq_aux_alpha"] = 0.0
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def write_legacy_config(config, d):
    """The hub's older spelling: `rope_theta` + `rope_scaling` with `type`."""
    cfg = config.to_dict()
    rp = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    cfg["rope_scaling"] = rp
    cfg["num_nextn_predict_layers"] = config.num_nextn_predict_layers
    cfg["mtp_loss_weight"] = MTP_WEIGHT
    cfg["seq_aux_alpha"] = 0.0
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def small_args(**kw):
    """The shape every fixture shares (dense layer 1, then MoE layers of 8 routed experts in 4
    groups, top-3 of 2 groups, MLA), with `kw` set on top."""
    args = dict(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=12,
        max_position_embeddings=64,
        initializer_range=0.1,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    args.update(kw)
    return args


def base_config(**kw):
    args = small_args(
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=24,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=4.0,
            original_max_position_embeddings=16,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
    )
    args.update(kw)
    cfg = DeepseekV3Config(**args)
    cfg.num_nextn_predict_layers = kw.get("num_nextn_predict_layers", 1)
    return cfg


def v2_config():
    """A DeepSeek-V2-style router: softmax scores, group-limited greedy top-k (groups ranked by
    their best expert), weights not renormalised but scaled; no query compression, plain RoPE."""
    return DeepseekV2Config(
        **small_args(
            n_shared_experts=2,
            topk_method="group_limited_greedy",
            norm_topk_prob=False,
            routed_scaling_factor=1.5,
            q_lora_rank=None,
            head_dim=8,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        )
    )


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    # DeepSeek-V2's router (HF's native DeepseekV2ForCausalLM): softmax, group-limited greedy.
    make("v2_group_limited", v2_config(), batch=2, seq=9, seed=3, write_config=write_hf_config,
         model_class=DeepseekV2ForCausalLM)
    # Dense + MoE layers, n_group > 1, YaRN, q_lora, one MTP module.
    make("yarn_qlora_mtp", base_config(), batch=2, seq=11, seed=0, write_config=write_hf_config)
    # Two chained MTP modules (depth 2: each reads the previous module's hidden states, the
    # embedding k ahead, targets k ahead; the weight divided by D).
    make(
        "mtp2",
        base_config(num_hidden_layers=2, num_nextn_predict_layers=2),
        batch=2,
        seq=10,
        seed=2,
        write_config=write_hf_config,
    )
    # No query compression, YaRN with mscale != mscale_all_dim (cos/sin scaled), no MTP.
    make(
        "no_qlora",
        base_config(
            q_lora_rank=None,
            num_hidden_layers=2,
            max_position_embeddings=128,
            num_nextn_predict_layers=0,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=8.0,
                original_max_position_embeddings=16,
                beta_fast=32.0,
                beta_slow=1.0,
                mscale=0.707,
                mscale_all_dim=1.0,
            ),
        ),
        batch=2,
        seq=9,
        seed=1,
        write_config=write_legacy_config,
    )
