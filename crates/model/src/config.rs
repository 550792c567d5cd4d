//! `DeepSeekV3Config`: the HF `config.json` of DeepseekV3ForCausalLM (spec section 7.2), its
//! validation, presets, and parameter counts (spec section 6).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// YaRN context extension (spec section 1.4). `rope_type` accepts HF's `type` spelling too. A key
/// not listed here is refused by name: HF reads every one it knows, so one dropped here could
/// change the frequencies silently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    #[serde(default = "default_beta_fast")]
    pub beta_fast: f64,
    #[serde(default = "default_beta_slow")]
    pub beta_slow: f64,
    /// `None` when the config has no `mscale` (HF then scales cos/sin by `m(factor, 1)`, not by
    /// the ratio below); a 0 counts as absent too, as HF's truthiness test has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale: Option<f64>,
    #[serde(default)]
    pub mscale_all_dim: f64,
    /// Overrides the cos/sin scale computed from `mscale` and `mscale_all_dim` (HF's
    /// `_compute_yarn_parameters`); the softmax scale does not read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    /// Whether the correction range's ends are rounded to whole dimensions (floor / ceil);
    /// `None` as HF's default, true (`_compute_yarn_parameters`' `truncate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
}

fn default_beta_fast() -> f64 {
    32.0
}
fn default_beta_slow() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}
fn default_sigmoid() -> String {
    "sigmoid".into()
}
fn default_gamma() -> f64 {
    0.001
}
fn default_mtp_weight() -> f64 {
    0.3
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeepSeekV3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense SwiGLU MLP of the first `first_k_dense_replace` layers.
    pub intermediate_size: usize,
    /// Width of each routed (and, times `n_shared_experts`, the shared) expert.
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub n_shared_experts: usize,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    /// Router groups and how many a token may use; missing keys take HF's `DeepseekV3Config`
    /// defaults (8 and 4, V3's own values), or for a `deepseek_v2` config its DeepseekV2Config's
    /// (none: 1 and 1).
    #[serde(default = "default_n_group")]
    pub n_group: usize,
    #[serde(default = "default_topk_group")]
    pub topk_group: usize,
    pub routed_scaling_factor: f64,
    #[serde(default = "default_true")]
    pub norm_topk_prob: bool,
    #[serde(default = "default_sigmoid")]
    pub scoring_func: String,
    #[serde(default)]
    pub topk_method: Option<String>,
    pub first_k_dense_replace: usize,
    #[serde(default = "one_usize")]
    pub moe_layer_freq: usize,
    /// `None` (JSON null) means no query compression: one `q_proj`. A missing key takes HF's
    /// default, 1536 (V3's).
    #[serde(default = "default_q_lora_rank")]
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Interleaved RoPE pairs (the reference's convention); false for weights already permuted
    /// for NeoX rotate-half.
    #[serde(default = "default_true")]
    pub rope_interleave: bool,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    #[serde(default, alias = "num_mtp_layers")]
    pub num_nextn_predict_layers: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,

    // Training-side keys (Whale's; HF ignores them).
    /// gamma of the auxiliary-loss-free bias update (spec 2.3); 0 disables it.
    #[serde(default = "default_gamma")]
    pub bias_update_speed: f64,
    /// alpha of the complementary sequence-wise balance loss (spec 2.4); 0 disables it.
    #[serde(default)]
    pub seq_aux_alpha: f64,
    /// alpha of a classic batch-level auxiliary balance loss, for comparison; 0 disables it.
    /// Written with `"seq_aux": false`, HF's DeepSeek-V2 spelling of "batch-level"; a config
    /// with `"seq_aux": true` (the hub's V2 and V3 files) means `aux_loss_alpha` as the
    /// sequence-wise weight, and is read into `seq_aux_alpha`.
    #[serde(default)]
    pub aux_loss_alpha: f64,
    /// lambda of the MTP loss (spec 3.2).
    #[serde(default = "default_mtp_weight")]
    pub mtp_loss_weight: f64,
}

fn one_usize() -> usize {
    1
}
fn default_n_group() -> usize {
    8
}
fn default_topk_group() -> usize {
    4
}
fn default_q_lora_rank() -> Option<usize> {
    Some(1536)
}
fn default_init() -> f64 {
    0.006
}

/// Parameter counts (spec section 6): total and activated per token, main model and MTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    pub total: u64,
    pub activated: u64,
    /// MTP modules' own parameters (their embedding and head are shared, not counted).
    pub mtp: u64,
}

impl DeepSeekV3Config {
    /// Parses and validates a `config.json`. Accepts HF's newer `rope_parameters` (with
    /// `rope_theta` inside) as well as `rope_scaling` + `rope_theta`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let mut v: Value = serde_json::from_str(text).map_err(|e| Error::config("<json>", e.to_string()))?;
        if let Some(obj) = v.as_object_mut() {
            if let Some(mut rp) = obj.remove("rope_parameters").filter(|rp| !rp.is_null()) {
                // Anything but an object, or a type that is no name, would read as no scaling.
                if !rp.is_object() {
                    return Err(Error::config("rope_parameters", "must be an object (or null)"));
                }
                let kind = match rp.get("rope_type").or_else(|| rp.get("type")) {
                    None | Some(Value::Null) => "default".to_string(),
                    Some(Value::String(t)) => t.clone(),
                    Some(_) => return Err(Error::config("rope_parameters.rope_type", "must be a string")),
                };
                // Its rope_theta wins over a top-level one (HF 5's convert_rope_params_to_dict),
                // unless a rope_scaling is given: HF reads `rope_scaling or rope_parameters`.
                let scaling_given = obj.get("rope_scaling").is_some_and(|r| !r.is_null());
                if let Some(theta) = rp.as_object_mut().and_then(|r| r.remove("rope_theta")) {
                    if !scaling_given || !obj.contains_key("rope_theta") {
                        obj.insert("rope_theta".into(), theta);
                    }
                }
                // HF reads `rope_scaling or rope_parameters`: a null rope_scaling defers to it.
                if kind != "default" && obj.get("rope_scaling").is_none_or(Value::is_null) {
                    obj.insert("rope_scaling".into(), rp);
                }
            }
            // A DeepSeek-V2 config (`model_type` deepseek_v2) takes HF's DeepseekV2Config defaults
            // where a key is missing or null, not V3's: softmax scores (HF's native V2 writes no
            // `scoring_func`: it is always softmax), no router groups, weights not renormalised.
            if obj.get("model_type").and_then(Value::as_str) == Some("deepseek_v2") {
                // Renormalised top-k weights: transformers' V2 ignores the key (scaled, never
                // renormalised), the Hub's V2 code renormalises and then does not scale; this
                // router would do both, which matches neither unless the scale is 1.
                let scale = obj.get("routed_scaling_factor").and_then(Value::as_f64).unwrap_or(1.0);
                if obj.get("norm_topk_prob") == Some(&Value::Bool(true)) && scale != 1.0 {
                    return Err(Error::config(
                        "norm_topk_prob",
                        format!(
                            "true with routed_scaling_factor {scale} in a deepseek_v2 config: transformers' \
                             DeepseekV2 ignores it and the Hub's code skips the scaling, so its routing is ambiguous"
                        ),
                    ));
                }
                let defaults = [
                    ("scoring_func", Value::from("softmax")),
                    ("norm_topk_prob", Value::from(false)),
                    ("n_group", Value::from(1)),
                    ("topk_group", Value::from(1)),
                ];
                for (key, default) in defaults {
                    if obj.get(key).is_none_or(Value::is_null) {
                        obj.insert(key.into(), default);
                    }
                }
            }
            // The experts and dense MLPs are SwiGLU (HF's `hidden_act` "silu"); another activation
            // would run as SiLU, so it is refused.
            // Dropout in attention (HF's `attention_dropout`, applied while training) is not
            // implemented: a config asking for it would train without it.
            if let Some(p) = obj.get("attention_dropout").filter(|p| !p.is_null() && p.as_f64() != Some(0.0)) {
                return Err(Error::config(
                    "attention_dropout",
                    format!("{p}: attention dropout is not supported (0 only)"),
                ));
            }
            match obj.get("hidden_act") {
                None | Some(Value::Null) => {}
                Some(Value::String(a)) if a == "silu" || a == "swish" => {}
                Some(other) => return Err(Error::config("hidden_act", format!("{other}: only silu is supported"))),
            }
            // HF's DeepSeek-V2 gate (the hub's modeling_deepseek.py): `aux_loss_alpha` weighs a
            // sequence-wise loss when `seq_aux` is true, a batch-level one when it is false;
            // without the key, its default, true (the hub's configuration_deepseek.py).
            if obj.remove("seq_aux").map_or(Some(true), |v| v.as_bool()) == Some(true) {
                if let Some(alpha) = obj.remove("aux_loss_alpha") {
                    obj.entry("seq_aux_alpha").or_insert(alpha);
                }
            }
            // transformers 4 saves `type` beside `rope_type` (a copy kept for old readers).
            if let Some(Value::Object(r)) = obj.get_mut("rope_scaling") {
                if r.contains_key("rope_type") {
                    r.remove("type");
                }
            }
            if obj.get("rope_scaling").is_some_and(|r| {
                r.get("rope_type").or_else(|| r.get("type")).and_then(Value::as_str) == Some("default")
            }) {
                obj.insert("rope_scaling".into(), Value::Null);
            }
        }
        let cfg: DeepSeekV3Config = serde_path_to_error::deserialize(v).map_err(|e| {
            let msg = e.inner().to_string();
            // The path of a bad value (`rope_scaling.factor`); a missing or unknown key is named
            // only in the message, in backquotes.
            let key = match e.path().to_string() {
                p if p != "." => p,
                _ => msg.split('`').nth(1).unwrap_or("<config>").to_string(),
            };
            Error::Config { key, msg }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        Self::from_json_str(&text).map_err(|e| Error::file(path, e))
    }

    /// HF-style JSON (with `architectures` and `model_type`, so transformers can load it).
    pub fn to_json_string(&self) -> Result<String> {
        let mut v = serde_json::to_value(self).map_err(|e| Error::Model(e.to_string()))?;
        let obj = v.as_object_mut().expect("a struct serialises to an object");
        // transformers' DeepseekV3 routes with sigmoid whatever `scoring_func` says; a softmax
        // router is its DeepseekV2 (which has no groups rule of V3's and no correction bias).
        let (architecture, model_type) = match self.scoring_func.as_str() {
            "softmax" => ("DeepseekV2ForCausalLM", "deepseek_v2"),
            _ => ("DeepseekV3ForCausalLM", "deepseek_v3"),
        };
        obj.insert("architectures".into(), serde_json::json!([architecture]));
        obj.insert("model_type".into(), serde_json::json!(model_type));
        obj.insert("hidden_act".into(), serde_json::json!("silu"));
        obj.insert("seq_aux".into(), serde_json::json!(false));
        // transformers 4's copy of `rope_type`, which the hub's modeling_deepseek.py reads.
        if let Some(Value::Object(r)) = obj.get_mut("rope_scaling") {
            let t = r.get("rope_type").cloned().unwrap_or(Value::Null);
            r.insert("type".into(), t);
        }
        serde_json::to_string_pretty(&v).map_err(|e| Error::Model(e.to_string()))
    }

    /// Checks every field's range and the relations between fields; errors name the key.
    pub fn validate(&self) -> Result<()> {
        check_bounds([
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH),
            ("moe_intermediate_size", self.moe_intermediate_size, MAX_WIDTH),
            ("num_attention_heads", self.num_attention_heads, MAX_WIDTH),
            ("kv_lora_rank", self.kv_lora_rank, MAX_WIDTH),
            ("q_lora_rank", self.q_lora_rank.unwrap_or(0), MAX_WIDTH),
            ("qk_nope_head_dim", self.qk_nope_head_dim, MAX_WIDTH),
            ("qk_rope_head_dim", self.qk_rope_head_dim, MAX_WIDTH),
            ("v_head_dim", self.v_head_dim, MAX_WIDTH),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_nextn_predict_layers", self.num_nextn_predict_layers, MAX_LAYERS),
            ("n_routed_experts", self.n_routed_experts, MAX_EXPERTS),
            ("n_shared_experts", self.n_shared_experts, MAX_EXPERTS),
        ])?;
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("n_group", self.n_group),
            ("topk_group", self.topk_group),
            ("moe_layer_freq", self.moe_layer_freq),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(Error::config(key, "must be at least 1"));
            }
        }
        if self.q_lora_rank == Some(0) {
            return Err(Error::config("q_lora_rank", "must be null (no query compression) or at least 1"));
        }
        if self.qk_rope_head_dim % 2 != 0 {
            return Err(Error::config(
                "qk_rope_head_dim",
                format!("{} is odd; RoPE rotates pairs", self.qk_rope_head_dim),
            ));
        }
        if self.has_moe() {
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.n_routed_experts {
                return Err(Error::config(
                    "num_experts_per_tok",
                    format!("{} is not in 1..={} (n_routed_experts)", self.num_experts_per_tok, self.n_routed_experts),
                ));
            }
            if self.n_routed_experts % self.n_group != 0 {
                return Err(Error::config(
                    "n_group",
                    format!("{} groups do not divide {} experts", self.n_group, self.n_routed_experts),
                ));
            }
            if self.topk_group > self.n_group {
                return Err(Error::config(
                    "topk_group",
                    format!("{} exceeds n_group {}", self.topk_group, self.n_group),
                ));
            }
            let per_group = self.n_routed_experts / self.n_group;
            if self.n_group > 1 && per_group < 2 && self.scoring_func == "sigmoid" {
                return Err(Error::config("n_group", "group scores sum each group's top-2, so groups need 2+ experts"));
            }
            if self.topk_group * per_group < self.num_experts_per_tok {
                return Err(Error::config(
                    "topk_group",
                    format!(
                        "{} groups of {per_group} experts cannot hold num_experts_per_tok = {}",
                        self.topk_group, self.num_experts_per_tok
                    ),
                ));
            }
        }
        // The selection rules: V3's `noaux_tc` and V2's `group_limited_greedy` limit the groups
        // (as `n_group`/`topk_group` say); V2's `greedy` has no groups.
        // The router takes its rule from `scoring_func`: V3's (a correction bias, groups scored
        // by their top-2 sum) with sigmoid, V2's (groups scored by their max, no bias) with
        // softmax; a `topk_method` naming the other rule is refused, not routed differently.
        match (self.topk_method.as_deref(), self.scoring_func.as_str()) {
            (Some(method @ "noaux_tc"), scoring @ "softmax")
            | (Some(method @ "group_limited_greedy"), scoring @ "sigmoid") => {
                return Err(Error::config(
                    "topk_method",
                    format!(
                        "`{method}` with scoring_func `{scoring}` is not supported: noaux_tc goes with sigmoid \
                         (V3), group_limited_greedy with softmax (V2)"
                    ),
                ))
            }
            _ => {}
        }
        // A missing topk_method is the default of the family `scoring_func` names: V3's noaux_tc
        // with sigmoid, V2's greedy with softmax (HF's DeepseekV2Config).
        let method = match (self.topk_method.as_deref(), self.scoring_func.as_str()) {
            (None, "softmax") => Some("greedy"),
            (m, _) => m,
        };
        match method {
            None | Some("noaux_tc" | "group_limited_greedy") => {}
            Some("greedy") if self.topk_group == self.n_group => {}
            Some("greedy") => {
                let named = if self.topk_method.is_some() { "" } else { " (the default with softmax scoring)" };
                return Err(Error::config(
                    "topk_method",
                    format!(
                        "`greedy`{named} selects without groups, but topk_group {} < n_group {}; set both to 1, \
                         or topk_method to group_limited_greedy",
                        self.topk_group, self.n_group
                    ),
                ));
            }
            Some(other) => {
                return Err(Error::config(
                    "topk_method",
                    format!("`{other}` is not supported (noaux_tc, group_limited_greedy, greedy)"),
                ))
            }
        }
        if !matches!(self.scoring_func.as_str(), "sigmoid" | "softmax") {
            return Err(Error::config(
                "scoring_func",
                format!("`{}` is not `sigmoid` or `softmax`", self.scoring_func),
            ));
        }
        let finite_pos = [
            ("rope_theta", self.rope_theta),
            ("routed_scaling_factor", self.routed_scaling_factor),
            ("rms_norm_eps", self.rms_norm_eps),
            ("initializer_range", self.initializer_range),
        ];
        for (key, v) in finite_pos {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::config(key, format!("{v} is not a positive finite number")));
            }
        }
        for (key, v) in [
            ("bias_update_speed", self.bias_update_speed),
            ("seq_aux_alpha", self.seq_aux_alpha),
            ("aux_loss_alpha", self.aux_loss_alpha),
            ("mtp_loss_weight", self.mtp_loss_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(key, format!("{v} must be finite and >= 0")));
            }
        }
        if let Some(r) = &self.rope_scaling {
            if r.rope_type != "yarn" {
                return Err(Error::config(
                    "rope_scaling.rope_type",
                    format!("`{}` is not supported (only yarn)", r.rope_type),
                ));
            }
            if !r.factor.is_finite() || r.factor < 1.0 {
                return Err(Error::config("rope_scaling.factor", format!("{} must be >= 1", r.factor)));
            }
            if r.original_max_position_embeddings == 0 {
                return Err(Error::config("rope_scaling.original_max_position_embeddings", "must be at least 1"));
            }
            // Any order, as HF: equal ones (Kimi-K2's 1 and 1) leave a band one dimension wide.
            for (key, v) in [("rope_scaling.beta_fast", r.beta_fast), ("rope_scaling.beta_slow", r.beta_slow)] {
                if !(v > 0.0 && v.is_finite()) {
                    return Err(Error::config(key, format!("{v} must be positive")));
                }
            }
            let mscale = r.mscale.unwrap_or(0.0);
            for (key, v) in [("rope_scaling.mscale", mscale), ("rope_scaling.mscale_all_dim", r.mscale_all_dim)] {
                if !v.is_finite() {
                    return Err(Error::config(key, format!("{v} is not a finite number")));
                }
            }
            if r.attention_factor.is_some_and(|a| !(a.is_finite() && a > 0.0)) {
                return Err(Error::config("rope_scaling.attention_factor", "must be a positive finite number"));
            }
        }
        if self.attention_bias {
            return Err(Error::config("attention_bias", "DeepSeek-V3 attention has no biases"));
        }
        // MLA gives every head its own keys and values from the shared latent; HF's attention
        // would repeat them per group of heads and fail on such a config.
        if let Some(kv) = self.num_key_value_heads.filter(|&kv| kv != self.num_attention_heads) {
            return Err(Error::config(
                "num_key_value_heads",
                format!(
                    "{kv} differs from num_attention_heads {}: MLA has one key and value per head",
                    self.num_attention_heads
                ),
            ));
        }
        Ok(())
    }

    /// Whether any decoder layer routes tokens to experts, the MTP modules' layers included.
    pub fn has_moe(&self) -> bool {
        // The first layer `is_moe_layer` accepts, if the model has that many.
        let freq = self.moe_layer_freq.max(1);
        let first = self.first_k_dense_replace.div_ceil(freq).saturating_mul(freq);
        self.n_routed_experts > 0 && first < self.num_hidden_layers.saturating_add(self.num_nextn_predict_layers)
    }

    /// Whether decoder layer `i` (including MTP layers, numbered after the main ones) is MoE.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed_experts > 0 && i >= self.first_k_dense_replace && i % self.moe_layer_freq == 0
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Parameter counts (spec section 6): embedding and head included in both totals.
    pub fn param_counts(&self) -> ParamCounts {
        let (d, h) = (self.hidden_size as u64, self.num_attention_heads as u64);
        let (qk, v) = (self.qk_head_dim() as u64, self.v_head_dim as u64);
        let (kvl, rope, nope) = (self.kv_lora_rank as u64, self.qk_rope_head_dim as u64, self.qk_nope_head_dim as u64);
        let q = match self.q_lora_rank {
            Some(r) => d * r as u64 + r as u64 + r as u64 * h * qk,
            None => d * h * qk,
        };
        let attn = q + d * (kvl + rope) + kvl + kvl * h * (nope + v) + h * v * d;
        let norms = 2 * d;
        let expert = 3 * d * self.moe_intermediate_size as u64;
        let e = self.n_routed_experts as u64;
        let moe_fixed = e * d + e + self.n_shared_experts as u64 * expert; // gate, bias, shared
        let dense = 3 * d * self.intermediate_size as u64;
        let (mut total, mut active) = (0u64, 0u64);
        for i in 0..self.num_hidden_layers {
            let base = attn + norms;
            if self.is_moe_layer(i) {
                total += base + moe_fixed + e * expert;
                active += base + moe_fixed + self.num_experts_per_tok as u64 * expert;
            } else {
                total += base + dense;
                active += base + dense;
            }
        }
        let vocab = self.vocab_size as u64 * d;
        let embed_and_head = if self.tie_word_embeddings { vocab } else { 2 * vocab };
        total += embed_and_head + d;
        active += embed_and_head + d;
        // Each MTP module's block is numbered after the main layers, and is MoE or dense by the
        // same rule; its own norms (enorm, hnorm, the head's) and eh_proj come on top.
        let mtp = (0..self.num_nextn_predict_layers)
            .map(|k| {
                let ffn = if self.is_moe_layer(self.num_hidden_layers + k) { moe_fixed + e * expert } else { dense };
                attn + norms + ffn + 2 * d + 2 * d * d + d
            })
            .sum();
        ParamCounts { total, activated: active, mtp }
    }

    /// The softmax scale: `qk_head_dim^-0.5`, times `m(factor, mscale_all_dim)^2` under YaRN
    /// (HF's convention; spec section 1.4).
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.rope_scaling {
            Some(r) if r.mscale_all_dim != 0.0 => {
                let m = yarn_mscale(r.factor, r.mscale_all_dim);
                base * m * m
            }
            _ => base,
        }
    }

    // ------------------------------------------------------------------ presets

    /// Trains in seconds on a CPU: 4 layers (1 dense), 8 experts top-2 in 2 groups, 1 MTP module.
    pub fn tiny() -> Self {
        DeepSeekV3Config {
            vocab_size: 64,
            hidden_size: 128,
            intermediate_size: 256,
            moe_intermediate_size: 64,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: None,
            n_shared_experts: 1,
            n_routed_experts: 8,
            num_experts_per_tok: 2,
            n_group: 2,
            topk_group: 1,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
            scoring_func: "sigmoid".into(),
            topk_method: Some("noaux_tc".into()),
            first_k_dense_replace: 1,
            moe_layer_freq: 1,
            q_lora_rank: Some(64),
            kv_lora_rank: 64,
            qk_nope_head_dim: 16,
            qk_rope_head_dim: 16,
            v_head_dim: 32,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rope_interleave: true,
            max_position_embeddings: 256,
            rms_norm_eps: 1e-6,
            num_nextn_predict_layers: 1,
            tie_word_embeddings: false,
            attention_bias: false,
            initializer_range: 0.02,
            bos_token_id: Some(0),
            eos_token_id: Some(1),
            bias_update_speed: 0.001,
            seq_aux_alpha: 0.0001,
            aux_loss_alpha: 0.0,
            mtp_loss_weight: 0.3,
        }
    }

    /// Spec section 6.1's suggested test shape: dim 256, 4 layers, 16 routed + 1 shared experts
    /// top-4 in 4 groups (2 kept), YaRN (factor 4 over 64 positions), 1 MTP module.
    pub fn small() -> Self {
        DeepSeekV3Config {
            vocab_size: 1024,
            hidden_size: 256,
            intermediate_size: 512,
            moe_intermediate_size: 128,
            num_attention_heads: 4,
            n_routed_experts: 16,
            num_experts_per_tok: 4,
            n_group: 4,
            topk_group: 2,
            q_lora_rank: Some(128),
            kv_lora_rank: 128,
            qk_nope_head_dim: 32,
            qk_rope_head_dim: 16,
            v_head_dim: 32,
            rope_scaling: Some(RopeScaling {
                rope_type: "yarn".into(),
                factor: 4.0,
                original_max_position_embeddings: 64,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: Some(1.0),
                mscale_all_dim: 1.0,
                attention_factor: None,
                truncate: None,
            }),
            max_position_embeddings: 256,
            ..Self::tiny()
        }
    }

    /// DeepSeek-V2-Lite (spec 6.1, 16B): no query compression, softmax gating, 64 experts top-6.
    pub fn v2_lite() -> Self {
        DeepSeekV3Config {
            vocab_size: 102_400,
            hidden_size: 2048,
            intermediate_size: 10_944,
            moe_intermediate_size: 1408,
            num_hidden_layers: 27,
            num_attention_heads: 16,
            num_key_value_heads: Some(16),
            n_shared_experts: 2,
            n_routed_experts: 64,
            num_experts_per_tok: 6,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
            norm_topk_prob: false,
            scoring_func: "softmax".into(),
            topk_method: Some("greedy".into()),
            first_k_dense_replace: 1,
            moe_layer_freq: 1,
            q_lora_rank: None,
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            rope_theta: 10_000.0,
            rope_scaling: Some(RopeScaling {
                rope_type: "yarn".into(),
                factor: 40.0,
                original_max_position_embeddings: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: Some(0.707),
                mscale_all_dim: 0.707,
                attention_factor: None,
                truncate: None,
            }),
            rope_interleave: true,
            max_position_embeddings: 163_840,
            rms_norm_eps: 1e-6,
            num_nextn_predict_layers: 0,
            tie_word_embeddings: false,
            attention_bias: false,
            initializer_range: 0.006,
            bos_token_id: Some(100_000),
            eos_token_id: Some(100_001),
            bias_update_speed: 0.0,
            // The hub's V2-Lite config.json: aux_loss_alpha 0.001 with seq_aux true.
            seq_aux_alpha: 0.001,
            aux_loss_alpha: 0.0,
            mtp_loss_weight: 0.0,
        }
    }

    /// DeepSeek-V3 671B (the hub's config.json; spec 6.1 and 7.2).
    pub fn v3_671b() -> Self {
        DeepSeekV3Config {
            vocab_size: 129_280,
            hidden_size: 7168,
            intermediate_size: 18_432,
            moe_intermediate_size: 2048,
            num_hidden_layers: 61,
            num_attention_heads: 128,
            num_key_value_heads: Some(128),
            n_shared_experts: 1,
            n_routed_experts: 256,
            num_experts_per_tok: 8,
            n_group: 8,
            topk_group: 4,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
            scoring_func: "sigmoid".into(),
            topk_method: Some("noaux_tc".into()),
            first_k_dense_replace: 3,
            moe_layer_freq: 1,
            q_lora_rank: Some(1536),
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            rope_theta: 10_000.0,
            rope_scaling: Some(RopeScaling {
                rope_type: "yarn".into(),
                factor: 40.0,
                original_max_position_embeddings: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: Some(1.0),
                mscale_all_dim: 1.0,
                attention_factor: None,
                truncate: None,
            }),
            rope_interleave: true,
            max_position_embeddings: 163_840,
            rms_norm_eps: 1e-6,
            num_nextn_predict_layers: 1,
            tie_word_embeddings: false,
            attention_bias: false,
            initializer_range: 0.006,
            bos_token_id: Some(0),
            eos_token_id: Some(1),
            bias_update_speed: 0.001,
            seq_aux_alpha: 0.0001,
            aux_loss_alpha: 0.0,
            mtp_loss_weight: 0.3,
        }
    }

    /// A preset by name: `tiny`, `small`, `v2-lite`, `v3-671b`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "small" => Ok(Self::small()),
            "v2-lite" => Ok(Self::v2_lite()),
            "v3-671b" => Ok(Self::v3_671b()),
            other => Err(Error::config("preset", format!("unknown preset `{other}` (tiny, small, v2-lite, v3-671b)"))),
        }
    }
}

/// YaRN's attention factor m(s, a) = 0.1 a ln(s) + 1 for s > 1 (spec section 1.4).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// The largest sizes a config may declare, far beyond any model trained (DeepSeek-V3: hidden
/// 7168, vocabulary 129280, 61 layers, 256 experts): their products (parameter counts, shapes)
/// stay within 64 bits, so a bogus config.json is an error naming its key, not an overflow.
pub const MAX_WIDTH: usize = 1 << 17;
pub const MAX_VOCAB: usize = 1 << 24;
pub const MAX_LAYERS: usize = 1 << 10;
pub const MAX_EXPERTS: usize = 1 << 12;

/// Each `(key, value, max)` with `value <= max`, else an error naming the key.
pub(crate) fn check_bounds<'a>(sizes: impl IntoIterator<Item = (&'a str, usize, usize)>) -> Result<()> {
    for (key, v, max) in sizes {
        if v > max {
            return Err(Error::config(key, format!("{v} is beyond {max}, the most this code takes")));
        }
    }
    Ok(())
}
