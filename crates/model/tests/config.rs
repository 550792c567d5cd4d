//! config.json parsing (both RoPE spellings), validation errors that name the key, presets, and
//! parameter counts against the spec's figures.

use whale_model::{DeepSeekV3Config, Error};

/// The hub's DeepSeek-V3 config.json (spec section 7.2), older `rope_scaling` spelling.
const HUB_V3: &str = r#"{
  "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
  "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
  "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
  "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
  "n_shared_experts": 1, "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
  "routed_scaling_factor": 2.5, "norm_topk_prob": true, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
  "first_k_dense_replace": 3, "moe_layer_freq": 1, "ep_size": 1,
  "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
  "rope_theta": 10000,
  "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                   "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
  "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "hidden_act": "silu",
  "num_nextn_predict_layers": 1, "tie_word_embeddings": false, "attention_bias": false,
  "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1, "initializer_range": 0.02,
  "torch_dtype": "bfloat16", "use_cache": true,
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
}"#;

#[test]
fn reads_the_hub_config_and_equals_the_preset_architecture() {
    let cfg = DeepSeekV3Config::from_json_str(HUB_V3).unwrap();
    let preset = DeepSeekV3Config::v3_671b();
    assert_eq!(cfg.rope_scaling, preset.rope_scaling);
    assert_eq!(cfg.param_counts(), preset.param_counts());
    assert_eq!(cfg.q_lora_rank, Some(1536));
}

#[test]
fn reads_the_newer_rope_parameters_spelling() {
    let newer = HUB_V3.replace(
        r#""rope_theta": 10000,
  "rope_scaling": {"type": "yarn","#,
        r#""rope_parameters": {"rope_type": "yarn", "rope_theta": 10000,"#,
    );
    assert!(newer.contains("rope_parameters"));
    let cfg = DeepSeekV3Config::from_json_str(&newer).unwrap();
    assert_eq!(cfg.rope_theta, 10000.0);
    assert_eq!(cfg.rope_scaling.unwrap().factor, 40.0);
    // rope_parameters' theta wins over a stale top-level one, as in transformers 5.
    let both = newer.replacen('{', r#"{"rope_theta": 5000, "#, 1);
    assert_eq!(DeepSeekV3Config::from_json_str(&both).unwrap().rope_theta, 10000.0);
    // A null rope_scaling beside it defers to it, as HF's `rope_scaling or rope_parameters` does.
    let null_beside = newer.replacen('{', r#"{"rope_scaling": null, "#, 1);
    assert_eq!(DeepSeekV3Config::from_json_str(&null_beside).unwrap().rope_scaling.unwrap().factor, 40.0);
    // Not an object, or a type that is no name: refused, naming the key, not read as no scaling.
    let not_object = HUB_V3.replacen('{', r#"{"rope_parameters": "yarn", "#, 1);
    let err = DeepSeekV3Config::from_json_str(&not_object).unwrap_err().to_string();
    assert!(err.contains("rope_parameters") && err.contains("object"), "{err}");
    let numbered = newer.replace(r#""rope_type": "yarn""#, r#""rope_type": 3"#);
    let err = DeepSeekV3Config::from_json_str(&numbered).unwrap_err().to_string();
    assert!(err.contains("rope_parameters.rope_type"), "{err}");
    let null = HUB_V3.replacen('{', r#"{"rope_parameters": null, "#, 1);
    assert_eq!(DeepSeekV3Config::from_json_str(&null).unwrap(), DeepSeekV3Config::from_json_str(HUB_V3).unwrap());
}

#[test]
fn v3_parameter_counts_match_the_paper() {
    // Spec section 6.1: 671.03B total, 37.55B activated (with embedding and head), MTP 11.61B.
    let c = DeepSeekV3Config::v3_671b().param_counts();
    assert!((c.total as f64 / 1e9 - 671.03).abs() < 0.01, "total {}", c.total);
    assert!((c.activated as f64 / 1e9 - 37.55).abs() < 0.01, "activated {}", c.activated);
    assert!((c.mtp as f64 / 1e9 - 11.61).abs() < 0.01, "mtp {}", c.mtp);
    // V2-Lite: 15.7B total / 2.66B activated.
    let l = DeepSeekV3Config::v2_lite().param_counts();
    assert!((l.total as f64 / 1e9 - 15.7).abs() < 0.05, "v2-lite total {}", l.total);
    assert!((l.activated as f64 / 1e9 - 2.66).abs() < 0.01, "v2-lite activated {}", l.activated);
}

#[test]
fn round_trips_through_json() {
    for name in ["tiny", "small", "v2-lite", "v3-671b"] {
        let cfg = DeepSeekV3Config::preset(name).unwrap();
        let back = DeepSeekV3Config::from_json_str(&cfg.to_json_string().unwrap()).unwrap();
        assert_eq!(cfg, back, "{name}");
    }
    assert!(DeepSeekV3Config::preset("huge").is_err());
}

fn key_of(err: Error) -> String {
    match err {
        Error::Config { key, .. } => key,
        other => panic!("expected a config error, got {other}"),
    }
}

#[test]
fn out_of_range_keys_are_named() {
    let tiny = DeepSeekV3Config::tiny();
    let bad = |f: &dyn Fn(&mut DeepSeekV3Config)| {
        let mut c = tiny.clone();
        f(&mut c);
        key_of(c.validate().unwrap_err())
    };
    assert_eq!(bad(&|c| c.num_experts_per_tok = 9), "num_experts_per_tok");
    assert_eq!(bad(&|c| c.n_group = 3), "n_group");
    assert_eq!(bad(&|c| c.topk_group = 3), "topk_group");
    assert_eq!(bad(&|c| c.qk_rope_head_dim = 7), "qk_rope_head_dim");
    assert_eq!(bad(&|c| c.hidden_size = 0), "hidden_size");
    assert_eq!(bad(&|c| c.scoring_func = "relu".into()), "scoring_func");
    assert_eq!(bad(&|c| c.rms_norm_eps = -1.0), "rms_norm_eps");
    assert_eq!(bad(&|c| c.q_lora_rank = Some(0)), "q_lora_rank");
    assert_eq!(bad(&|c| c.bias_update_speed = f64::NAN), "bias_update_speed");
    // Settings the model would otherwise run as something else.
    assert_eq!(bad(&|c| c.topk_method = Some("greedy".into())), "topk_method", "greedy with groups");
    assert_eq!(bad(&|c| c.topk_method = Some("top1".into())), "topk_method");
    let yarn = |f: &dyn Fn(&mut whale_model::RopeScaling)| {
        bad(&|c| {
            c.rope_scaling = DeepSeekV3Config::v3_671b().rope_scaling;
            f(c.rope_scaling.as_mut().unwrap());
        })
    };
    assert_eq!(yarn(&|r| r.beta_slow = 0.0), "rope_scaling.beta_slow");
    assert_eq!(yarn(&|r| r.beta_fast = f64::NAN), "rope_scaling.beta_fast");
    // A topk_method naming the other router rule than scoring_func's.
    assert_eq!(bad(&|c| c.topk_method = Some("group_limited_greedy".into())), "topk_method", "V2's rule, sigmoid");
    assert_eq!(
        bad(&|c| (c.topk_method, c.scoring_func) = (Some("noaux_tc".into()), "softmax".into())),
        "topk_method",
        "V3's rule, softmax"
    );
    assert_eq!(yarn(&|r| r.mscale = Some(f64::INFINITY)), "rope_scaling.mscale");
    assert_eq!(yarn(&|r| r.factor = f64::INFINITY), "rope_scaling.factor");
    assert_eq!(yarn(&|r| r.attention_factor = Some(-1.0)), "rope_scaling.attention_factor");
    // V2's default rule for softmax scoring is greedy, which has no groups to limit to.
    let mut softmax = tiny.clone();
    (softmax.scoring_func, softmax.topk_method) = ("softmax".into(), None);
    let msg = softmax.validate().unwrap_err().to_string();
    assert!(msg.contains("topk_method") && msg.contains("default with softmax"), "{msg}");
    (softmax.n_group, softmax.topk_group) = (1, 1);
    softmax.validate().unwrap();
    assert_eq!(bad(&|c| c.num_key_value_heads = Some(1)), "num_key_value_heads");
    // Keys HF reads that would change the numbers here if dropped.
    let dropout = HUB_V3.replace(r#""attention_dropout": 0.0"#, r#""attention_dropout": 0.1"#);
    assert_eq!(key_of(DeepSeekV3Config::from_json_str(&dropout).unwrap_err()), "attention_dropout");
    let llama3 = HUB_V3.replace(r#""beta_slow": 1,"#, r#""beta_slow": 1, "low_freq_factor": 1,"#);
    let err = DeepSeekV3Config::from_json_str(&llama3).unwrap_err().to_string();
    assert!(err.contains("low_freq_factor"), "{err}");
    let gelu = HUB_V3.replace(r#""hidden_act": "silu""#, r#""hidden_act": "gelu""#);
    assert_eq!(key_of(DeepSeekV3Config::from_json_str(&gelu).unwrap_err()), "hidden_act");
    let missing = HUB_V3.replace(r#""kv_lora_rank": 512, "#, "");
    assert_eq!(key_of(DeepSeekV3Config::from_json_str(&missing).unwrap_err()), "kv_lora_rank");
    let wrong_type = HUB_V3.replace(r#""n_group": 8"#, r#""n_group": "eight""#);
    let err = DeepSeekV3Config::from_json_str(&wrong_type).unwrap_err();
    assert!(err.to_string().contains("eight"), "{err}");
    assert_eq!(key_of(err), "n_group");
    // A value of the wrong sign or kind is named by its key, not by the value.
    let negative = HUB_V3.replace(r#""num_hidden_layers": 61"#, r#""num_hidden_layers": -1"#);
    assert_eq!(key_of(DeepSeekV3Config::from_json_str(&negative).unwrap_err()), "num_hidden_layers");
    let nested = HUB_V3.replace(r#""factor": 40"#, r#""factor": "forty""#);
    assert_eq!(key_of(DeepSeekV3Config::from_json_str(&nested).unwrap_err()), "rope_scaling.factor");
    // The MTP module's layer routes too: its top-k is checked when every main layer is dense.
    let mut c = tiny.clone();
    (c.first_k_dense_replace, c.num_experts_per_tok) = (c.num_hidden_layers, c.n_routed_experts + 1);
    assert_eq!(key_of(c.validate().unwrap_err()), "num_experts_per_tok");
    // Sizes beyond any model, whose products (parameter counts, shapes) would overflow.
    let huge = HUB_V3.replace(r#""vocab_size": 129280"#, r#""vocab_size": 1099511627776"#);
    assert_eq!(key_of(DeepSeekV3Config::from_json_str(&huge).unwrap_err()), "vocab_size");
    assert_eq!(bad(&|c| c.moe_intermediate_size = 1 << 30), "moe_intermediate_size");
    assert_eq!(bad(&|c| c.n_routed_experts = 1 << 20), "n_routed_experts");
    let mut dense = whale_model::DenseConfig::student(353);
    dense.hidden_size = 1 << 30;
    assert_eq!(key_of(dense.validate().unwrap_err()), "hidden_size");
    // The largest config allowed still counts without overflow.
    let mut max = tiny.clone();
    (max.hidden_size, max.moe_intermediate_size, max.num_hidden_layers) = (1 << 17, 1 << 17, 1 << 10);
    (max.n_routed_experts, max.n_group, max.topk_group) = (1 << 12, 1, 1);
    max.validate().unwrap();
    assert!(max.param_counts().total > 1 << 57);
}

/// What HF's `DeepseekV3Config` reads differently from a bare parse: missing router and query
/// keys take its defaults, YaRN betas may be equal (Kimi-K2 ships 1 and 1), and a saved config
/// carries `type` beside `rope_type` (the hub's modeling_deepseek.py reads `type`).
#[test]
fn configs_read_and_write_as_hf_does() {
    let hub = DeepSeekV3Config::from_json_str(HUB_V3).unwrap();
    let mut bare = HUB_V3.to_string();
    for key in [r#""n_group": 8, "#, r#""topk_group": 4,"#, r#""q_lora_rank": 1536, "#] {
        assert!(bare.contains(key), "{key}");
        bare = bare.replace(key, "");
    }
    assert_eq!(DeepSeekV3Config::from_json_str(&bare).unwrap(), hub, "HF's defaults are V3's values");
    let lite = DeepSeekV3Config::v2_lite();
    assert_eq!(lite.q_lora_rank, None);
    assert_eq!(DeepSeekV3Config::from_json_str(&lite.to_json_string().unwrap()).unwrap(), lite, "an explicit null");
    let mut kimi = hub.clone();
    let r = kimi.rope_scaling.as_mut().unwrap();
    (r.beta_fast, r.beta_slow) = (1.0, 1.0);
    kimi.validate().unwrap();
    let saved: serde_json::Value = serde_json::from_str(&hub.to_json_string().unwrap()).unwrap();
    assert_eq!(
        (saved["rope_scaling"]["type"].as_str(), saved["rope_scaling"]["rope_type"].as_str()),
        (Some("yarn"), Some("yarn"))
    );
}

#[test]
fn a_config_saved_by_transformers_4_with_both_rope_type_spellings_loads() {
    let both = HUB_V3.replace(r#""rope_scaling": {"#, r#""rope_scaling": {"rope_type": "yarn", "#);
    assert!(both.contains(r#""type": "yarn""#) && both.contains(r#""rope_type""#), "{both}");
    let a = DeepSeekV3Config::from_json_str(&both).unwrap();
    assert_eq!(a, DeepSeekV3Config::from_json_str(HUB_V3).unwrap());
}

#[test]
fn the_latent_norms_keep_their_own_epsilon() {
    use whale_model::mla::QueryProj;
    use whale_model::DeepSeekV3;
    // DeepSeek's code and HF fix q_a_layernorm's and kv_a_layernorm's epsilon at 1e-6; the
    // config's rms_norm_eps is every other norm's.
    let cfg = DeepSeekV3Config { rms_norm_eps: 1e-3, ..DeepSeekV3Config::tiny() };
    let model = DeepSeekV3::new(cfg, 1).unwrap();
    let layer = &model.layers[0];
    assert_eq!(layer.input_layernorm.eps, 1e-3);
    assert_eq!(layer.self_attn.kv_a_layernorm.eps, 1e-6);
    match &layer.self_attn.q {
        QueryProj::LowRank { q_a_layernorm, .. } => assert_eq!(q_a_layernorm.eps, 1e-6),
        QueryProj::Full { .. } => panic!("the tiny preset compresses queries"),
    }
}

#[test]
fn hf_aux_loss_alpha_is_sequence_wise_when_seq_aux_is_set() {
    // The hub's V3 config.json carries V2's gate keys: with seq_aux true, aux_loss_alpha weighs
    // the sequence-wise balance loss, not a batch-level one.
    let hub = HUB_V3.replacen('{', r#"{"aux_loss_alpha": 0.001, "seq_aux": true, "#, 1);
    let cfg = DeepSeekV3Config::from_json_str(&hub).unwrap();
    assert_eq!((cfg.seq_aux_alpha, cfg.aux_loss_alpha), (0.001, 0.0));
    // Without seq_aux, its default (true): sequence-wise.
    let default = HUB_V3.replacen('{', r#"{"aux_loss_alpha": 0.001, "#, 1);
    let cfg = DeepSeekV3Config::from_json_str(&default).unwrap();
    assert_eq!((cfg.seq_aux_alpha, cfg.aux_loss_alpha), (0.001, 0.0));
    // seq_aux false: the batch-level loss.
    let batch = HUB_V3.replacen('{', r#"{"aux_loss_alpha": 0.001, "seq_aux": false, "#, 1);
    let cfg = DeepSeekV3Config::from_json_str(&batch).unwrap();
    assert_eq!((cfg.seq_aux_alpha, cfg.aux_loss_alpha), (0.0, 0.001));
    // Our own files say which they mean, and round-trip.
    let text = cfg.to_json_string().unwrap();
    assert!(text.contains(r#""seq_aux": false"#), "{text}");
    assert_eq!(DeepSeekV3Config::from_json_str(&text).unwrap(), cfg);
}

#[test]
fn parameter_counts_equal_the_built_models_with_dense_and_moe_mtp_blocks() {
    // Every other layer MoE: the MTP block (index 3) is dense, index 4's would be MoE.
    for (layers, freq) in [(3, 2), (4, 2), (2, 1)] {
        let mut cfg = DeepSeekV3Config::tiny();
        (cfg.num_hidden_layers, cfg.moe_layer_freq, cfg.first_k_dense_replace) = (layers, freq, 0);
        let model = whale_model::DeepSeekV3::new(cfg.clone(), 1).unwrap();
        let mtp_prefix = format!("model.layers.{layers}.");
        let (mut main, mut mtp) = (0u64, 0u64);
        let tensors = model.params.iter().map(|(n, t)| (n.to_string(), t.elem_count()));
        for (name, n) in tensors.chain(model.buffers.iter().map(|(n, t)| (n.clone(), t.elem_count()))) {
            *(if name.starts_with(&mtp_prefix) { &mut mtp } else { &mut main }) += n as u64;
        }
        let counts = cfg.param_counts();
        assert_eq!((counts.total, counts.mtp), (main, mtp), "{layers} layers, moe_layer_freq {freq}");
    }
}

#[test]
fn a_deepseek_v2_config_takes_v2_defaults_not_v3_ones() {
    // What transformers' native DeepseekV2Config writes by default: no scoring_func (HF's V2 is
    // always softmax), null groups, greedy top-k, weights not renormalised. Read with V3's
    // defaults it was refused (group-less greedy under sigmoid scoring's 8 groups).
    let text = r#"{"model_type": "deepseek_v2", "vocab_size": 96, "hidden_size": 48, "intermediate_size": 80,
      "moe_intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
      "n_shared_experts": 2, "n_routed_experts": 8, "num_experts_per_tok": 3, "n_group": null, "topk_group": null,
      "topk_method": "greedy", "routed_scaling_factor": 1.0, "first_k_dense_replace": 0, "q_lora_rank": null,
      "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12,
      "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "max_position_embeddings": 64,
      "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_dropout": 0.0, "tie_word_embeddings": false}"#;
    let cfg = DeepSeekV3Config::from_json_str(text).unwrap();
    assert_eq!(cfg.scoring_func, "softmax");
    assert_eq!((cfg.n_group, cfg.topk_group, cfg.norm_topk_prob), (1, 1, false));
    // Given explicitly (the hub's V2 files do), the file's values stand; a V3 config keeps V3's
    // defaults.
    let explicit = text.replace(r#""topk_method": "greedy","#, r#""topk_method": "greedy", "norm_topk_prob": true,"#);
    assert!(DeepSeekV3Config::from_json_str(&explicit).unwrap().norm_topk_prob);
    // Renormalised and scaled weights, which neither transformers' V2 (neither) nor the Hub's
    // V2 code (renormalised, unscaled) computes, are refused; with a scale of 1 they agree.
    let scaled = explicit.replace(r#""routed_scaling_factor": 1.0"#, r#""routed_scaling_factor": 2.0"#);
    let err = DeepSeekV3Config::from_json_str(&scaled).unwrap_err();
    assert_eq!(key_of(err), "norm_topk_prob");
    // Written back as transformers reads it: a softmax router is its DeepseekV2 (its
    // DeepseekV3 routes with sigmoid whatever scoring_func says), and it reads back the same.
    let json = cfg.to_json_string().unwrap();
    assert!(json.contains(r#""model_type": "deepseek_v2""#) && json.contains("DeepseekV2ForCausalLM"), "{json}");
    assert_eq!(DeepSeekV3Config::from_json_str(&json).unwrap(), cfg);
    let lite = DeepSeekV3Config::v2_lite().to_json_string().unwrap();
    assert!(lite.contains(r#""model_type": "deepseek_v2""#), "{lite}");
    let v3 = HUB_V3.replace(r#""norm_topk_prob": true, "scoring_func": "sigmoid", "#, "");
    let v3 = DeepSeekV3Config::from_json_str(&v3).unwrap();
    assert_eq!((v3.scoring_func.as_str(), v3.norm_topk_prob), ("sigmoid", true));
}
