//! The dense students against HF transformers' Qwen2ForCausalLM and LlamaForCausalLM (fixtures
//! written by `scripts/make_dense_reference.py`): logits, loss, every parameter's gradient and a
//! greedy continuation. Tolerances as in `reference.rs` (f32 on both sides, different summation
//! orders).

mod common;

use std::path::Path;

use common::{assert_close, fixture, shifted_targets};
use whale_model::checkpoint::{load_file, SaveDType};
use whale_model::dense::DenseRopeScaling;
use whale_model::generate::{CacheMode, SamplingConfig};
use whale_model::{load_pretrained, CausalLm, DenseConfig, DenseModel};
use whale_tensor::{Device, Rng, Tensor};

fn check(name: &str) {
    let dir = fixture(name);
    let model = DenseModel::from_pretrained(&dir).unwrap();
    let reference = load_file(&dir.join("reference.safetensors")).unwrap();
    let ids = &reference["input_ids"];
    let targets = shifted_targets(&reference["labels"]);

    assert_close("logits", &model.logits(ids).unwrap(), &reference["logits"], 1e-5, 1e-4);
    let (batch, seq) = (ids.dims()[0], ids.dims()[1]);
    let loss = model.train_loss(ids, &targets, &vec![seq; batch]).unwrap();
    assert_close("loss", &loss.reshape(&[1]).unwrap(), &reference["loss"], 1e-5, 1e-5);
    loss.backward().unwrap();
    for (pname, p) in model.params.iter() {
        let want =
            reference.get(&format!("grad.{pname}")).unwrap_or_else(|| panic!("no reference gradient for {pname}"));
        assert_close(&format!("grad {pname}"), &p.grad().unwrap(), want, 1e-5, 1e-4);
    }
    assert_eq!(
        model.params.len(),
        reference.keys().filter(|k| k.starts_with("grad.")).count(),
        "every HF parameter is one of ours"
    );

    // Greedy continuation, through the KV cache.
    let prompt: Vec<u32> = reference["greedy_prompt"].to_vec_i64().unwrap().iter().map(|&t| t as u32).collect();
    let want: Vec<u32> = reference["greedy"].to_vec_i64().unwrap().iter().map(|&t| t as u32).collect();
    let cfg = SamplingConfig { cache: CacheMode::Naive, ..SamplingConfig::greedy(want.len(), vec![]) };
    let got = model.generate(&[prompt], &cfg, &mut Rng::new(0)).unwrap().remove(0);
    assert_eq!(got.tokens, want, "{name}: greedy continuation");
}

#[test]
fn qwen2_with_biases_and_a_tied_head_matches_transformers() {
    check("qwen2_tied");
}

#[test]
fn llama_with_an_untied_head_matches_transformers() {
    check("llama_untied");
}

#[test]
fn llama_with_attention_bias_biases_o_proj_too_as_transformers_does() {
    check("llama_biased");
    let model = DenseModel::from_pretrained(&fixture("llama_biased")).unwrap();
    assert!(model.params.get("model.layers.1.self_attn.o_proj.bias").is_ok());
    assert_eq!(model.params.iter().map(|(_, p)| p.elem_count()).sum::<usize>(), model.config.param_count());
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check("llama3_scaled");
    let cfg = DenseConfig::from_file(&fixture("llama3_scaled").join("config.json")).unwrap();
    let want = DenseRopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    };
    assert_eq!(cfg.rope_scaling, Some(want));
    // Written back as HF spells it, and read back the same.
    let dir = whale_tensor::testing::TempDir::new("llama3-roundtrip");
    std::fs::write(dir.join("config.json"), cfg.to_json_string()).unwrap();
    assert_eq!(DenseConfig::from_file(&dir.join("config.json")).unwrap(), cfg);
}

#[test]
fn every_eos_id_a_config_lists_is_written_back() {
    let dir = whale_tensor::testing::TempDir::new("dense-eos-list");
    for (eos, written) in [("[128001, 128008, 128009]", "[128001,128008,128009]"), ("7", "7"), ("null", "null")] {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(fixture("llama3_scaled").join("config.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["eos_token_id"] = serde_json::from_str(eos).unwrap();
        std::fs::write(&path, v.to_string()).unwrap();
        let cfg = DenseConfig::from_file(&path).unwrap();
        let back: serde_json::Value = serde_json::from_str(&cfg.to_json_string()).unwrap();
        assert_eq!(back["eos_token_id"].to_string(), written);
        std::fs::write(&path, cfg.to_json_string()).unwrap();
        assert_eq!(DenseConfig::from_file(&path).unwrap(), cfg);
    }
    // An id that is no u32 would wrap to another token: refused, naming the key.
    for (key, bad) in [("eos_token_id", "[128001, 4294967297]"), ("bos_token_id", "-1")] {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(fixture("llama3_scaled").join("config.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v[key] = serde_json::from_str(bad).unwrap();
        std::fs::write(&path, v.to_string()).unwrap();
        let err = DenseConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("config.json"), "{key} = {bad}: {err}");
    }
}

#[test]
fn a_student_saves_loads_and_duplicates_exactly() {
    let model = DenseModel::new(DenseConfig::student(64), 3).unwrap();
    assert_eq!(model.params.num_elements(), model.config.param_count());
    let dir = std::env::temp_dir().join(format!("whale-dense-{}", std::process::id()));
    model.save_pretrained(&dir, SaveDType::F32).unwrap();
    let loaded = load_pretrained(&dir).unwrap();
    let ids =
        Tensor::from_vec((0..14).map(|i| (i * 5 % 64) as i64).collect::<Vec<_>>(), &[2, 7], &Device::Cpu).unwrap();
    let a = model.logits(&ids).unwrap().to_vec_f32().unwrap();
    assert_eq!(a, loaded.logits(&ids).unwrap().to_vec_f32().unwrap());
    assert_eq!(a, model.duplicate().unwrap().logits(&ids).unwrap().to_vec_f32().unwrap());
    // The cached path gives the full forward's logits token by token.
    let mut cache = whale_model::generate::KvCache::new(0);
    let mut got = Vec::new();
    for t in 0..7 {
        let tok = Tensor::from_vec(vec![(t * 5 % 64) as i64], &[1, 1], &Device::Cpu).unwrap();
        got.extend(whale_tensor::no_grad(|| model.forward_cached(&tok, &mut cache)).unwrap().to_vec_f32().unwrap());
    }
    // Decoding only: with gradients recorded, the cache's past keys and values would stop them.
    let err = model.forward_cached(&ids, &mut whale_model::generate::KvCache::new(0)).unwrap_err().to_string();
    assert!(err.contains("no_grad"), "{err}");
    for (i, (x, y)) in got.iter().zip(&a[..7 * 64]).enumerate() {
        assert!((x - y).abs() < 1e-5 + 1e-4 * y.abs(), "position {}: {x} vs {y}", i / 64);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_dense_configs_name_the_key() {
    let p = Path::new("config.json");
    let err = DenseConfig::from_json(r#"{"model_type": "gpt2"}"#, p).unwrap_err().to_string();
    assert!(err.contains("model_type") && err.contains("gpt2"), "{err}");
    let base = r#""model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2"#;
    let err = DenseConfig::from_json(&format!("{{{base}, \"num_key_value_heads\": 3}}"), p).unwrap_err().to_string();
    assert!(err.contains("num_key_value_heads"), "{err}");
    let err = |extra: &str| DenseConfig::from_json(&format!("{{{base}, {extra}}}"), p).unwrap_err().to_string();
    // A llama3 scaling without its parameters, one the code does not implement, in either key.
    let e = err(r#""rope_scaling": {"rope_type": "llama3"}"#);
    assert!(e.contains("rope_scaling.low_freq_factor"), "{e}");
    let e = err(r#""rope_parameters": {"rope_type": "dynamic", "factor": 2.0}"#);
    assert!(e.contains("rope_parameters") && e.contains("`dynamic`"), "{e}");
    let e = err(r#""rope_scaling": {"type": "linear", "factor": -2.0}"#);
    assert!(e.contains("rope_scaling.factor"), "{e}");
    let linear =
        DenseConfig::from_json(&format!("{{{base}, \"rope_scaling\": {{\"type\": \"linear\", \"factor\": 4}}}}"), p);
    assert_eq!(linear.unwrap().rope_scaling, Some(DenseRopeScaling::Linear { factor: 4.0 }));
    assert!(DenseConfig::from_json(&format!("{{{base}}}"), p).is_ok());
    // An optional key of the wrong type is an error, not its default; out of range too.
    for (extra, words) in [
        (r#""rope_theta": "1000000""#, "rope_theta"),
        (r#""rms_norm_eps": "1e-6""#, "rms_norm_eps"),
        (r#""max_position_embeddings": 4096.5"#, "max_position_embeddings"),
        (r#""tie_word_embeddings": "yes""#, "tie_word_embeddings"),
        (r#""rope_parameters": {"rope_theta": "1e6"}"#, "rope_parameters.rope_theta"),
        (r#""rms_norm_eps": -1e-6"#, "rms_norm_eps"),
        // Not an object, or a type that is no name: neither reads as "no scaling".
        (r#""rope_scaling": 2.0"#, "`rope_scaling`: must be an object"),
        (r#""rope_parameters": "linear""#, "`rope_parameters`: must be an object"),
        (r#""rope_scaling": {"rope_type": 3, "factor": 2}"#, "rope_scaling.rope_type"),
    ] {
        let e = err(extra);
        assert!(e.contains(words), "{extra}: {e}");
    }
    let nulls = format!("{{{base}, \"rope_theta\": null, \"rms_norm_eps\": null}}");
    assert_eq!(DenseConfig::from_json(&nulls, p).unwrap().rope_theta, 10_000.0);
    // Both spellings of RoPE (transformers 4's and 5's): the same values are one setting, other
    // values are refused rather than one silently preferred.
    let both = r#""rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2},
        "rope_parameters": {"rope_type": "linear", "factor": 2, "rope_theta": 1e6}"#;
    let agreed = DenseConfig::from_json(&format!("{{{base}, {both}}}"), p).unwrap();
    assert_eq!((agreed.rope_theta, agreed.rope_scaling), (1e6, Some(DenseRopeScaling::Linear { factor: 2.0 })));
    let e = err(r#""rope_theta": 10000, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}"#);
    assert!(e.contains("rope_theta") && e.contains("disagrees"), "{e}");
    let e = err(
        r#""rope_scaling": {"type": "linear", "factor": 2}, "rope_parameters": {"rope_type": "linear", "factor": 4}"#,
    );
    assert!(e.contains("rope_scaling") && e.contains("disagrees"), "{e}");
    // rope_theta inside rope_scaling (transformers 5's rope_scaling getter, written back): read,
    // and against a top-level value that differs, refused.
    let llama3 = r#""type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
        "original_max_position_embeddings": 8192, "rope_theta": 500000"#;
    let inside = DenseConfig::from_json(&format!("{{{base}, \"rope_scaling\": {{{llama3}}}}}"), p).unwrap();
    assert_eq!(inside.rope_theta, 500_000.0);
    let e = err(&format!("\"rope_theta\": 10000, \"rope_scaling\": {{{llama3}}}"));
    assert!(e.contains("rope_scaling.rope_theta") && e.contains("disagrees"), "{e}");
    // Without max_position_embeddings: transformers' defaults, Llama's 2048 and Qwen2's 32768.
    assert_eq!(DenseConfig::from_json(&format!("{{{base}}}"), p).unwrap().max_position_embeddings, 2048);
    let qwen2 = base.replace("\"llama\"", "\"qwen2\"");
    assert_eq!(DenseConfig::from_json(&format!("{{{qwen2}}}"), p).unwrap().max_position_embeddings, 32_768);
}
