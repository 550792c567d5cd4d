//! Parity with HF transformers' DeepseekV3ForCausalLM (plus an MTP module built from HF blocks):
//! logits, main/MTP/total loss and the gradient of every parameter, for the fixtures written by
//! `scripts/make_reference.py`; and with DeepSeek's own inference code (`official_v3`, written by
//! `scripts/make_official_reference.py`): logits through both of its MLA caches.
//!
//! Tolerances: both sides compute in f32 with different summation orders (gemm blocking, attention
//! tiling, f64 accumulators here), so elements agree to a few f32 ulps of the largest terms they
//! sum: 1e-5 absolute + 1e-4 relative for values of order 1, the same for gradients.

mod common;

use common::{assert_close, cached_logits, fixture, shifted_targets};
use whale_model::checkpoint::load_file;
use whale_model::DeepSeekV3;

fn check(name: &str) {
    let dir = fixture(name);
    let model = DeepSeekV3::from_pretrained(&dir).unwrap();
    let reference = load_file(&dir.join("reference.safetensors")).unwrap();
    let ids = &reference["input_ids"];
    let targets = shifted_targets(&reference["labels"]);

    let out = model.forward(ids, Some(&targets)).unwrap();
    assert_close("logits", &out.logits, &reference["logits"], 1e-5, 1e-4);
    assert_close("main loss", out.main_loss.as_ref().unwrap(), &reference["main_loss"], 1e-5, 1e-5);
    if model.config.num_nextn_predict_layers > 0 {
        assert_close("mtp loss", out.mtp_loss.as_ref().unwrap(), &reference["mtp_loss"], 1e-5, 1e-5);
    }
    assert!(out.aux_loss.is_none(), "the fixture has no balance loss");
    let loss = out.loss.unwrap();
    assert_close("total loss", &loss, &reference["total_loss"], 1e-5, 1e-5);

    loss.backward().unwrap();
    let mut checked = 0;
    for (pname, p) in model.params.iter() {
        let want =
            reference.get(&format!("grad.{pname}")).unwrap_or_else(|| panic!("no reference gradient for {pname}"));
        // An expert no token was routed to gets no gradient; the reference then holds zeros.
        let got = p.grad().unwrap_or_else(|| p.zeros_like().unwrap());
        assert_close(&format!("grad of {pname}"), &got, want, 1e-5, 1e-4);
        checked += 1;
    }
    let expected = reference.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(checked, expected, "every reference gradient has a parameter");
}

#[test]
fn matches_hf_with_yarn_qlora_moe_groups_and_mtp() {
    check("yarn_qlora_mtp");
}

#[test]
fn matches_hf_with_two_chained_mtp_modules() {
    check("mtp2");
}

#[test]
fn matches_hf_without_query_compression() {
    check("no_qlora");
}

/// The cached decode (prefill 3 tokens, then one at a time) against HF's logits on both MLA
/// caches: the per-head K/V cache and the absorbed latent one (W_UK into the query, W_UV into
/// the output, spec 1.5), so each is checked against an independent implementation, not only
/// against this crate's training forward.
fn check_cached_decode(name: &str) {
    use whale_model::generate::CacheMode;
    let dir = fixture(name);
    let model = DeepSeekV3::from_pretrained(&dir).unwrap();
    let reference = load_file(&dir.join("reference.safetensors")).unwrap();
    let (ids, want) = (&reference["input_ids"], &reference["logits"]);
    let (b, s) = (ids.dims()[0], ids.dims()[1]);
    for mode in [CacheMode::Naive, CacheMode::Absorb] {
        let (got, _) = cached_logits(&model, ids, 3, mode);
        assert_eq!(got.dims(), &[b, s, model.config.vocab_size][..]);
        assert_close(&format!("{name}: {mode:?} cached logits"), &got, want, 1e-5, 1e-4);
    }
}

#[test]
fn cached_decode_matches_hf_on_both_mla_caches() {
    check_cached_decode("yarn_qlora_mtp");
    check_cached_decode("mtp2");
    check_cached_decode("no_qlora");
}

/// DeepSeek's own inference code (deepseek-ai/DeepSeek-V3 `inference/model.py`, in f32 on the CPU,
/// written by `scripts/make_official_reference.py`): every position's logits as its naive and its
/// absorbed MLA cache give them token by token, and its prefill of the whole sequence. Whale's
/// training forward, its two caches (prefill 3, then one token at a time) and its prefill of the
/// whole sequence match them: YaRN, q_lora, groups, the correction bias, a dense first layer and
/// a shared expert, read from the HF-style config.json and HF checkpoint names.
#[test]
fn matches_deepseeks_own_inference_code_on_both_of_its_caches() {
    use whale_model::generate::CacheMode;
    let dir = fixture("official_v3");
    let model = DeepSeekV3::from_pretrained(&dir).unwrap();
    let reference = load_file(&dir.join("reference.safetensors")).unwrap();
    let ids = &reference["input_ids"];
    let (b, s) = (ids.dims()[0], ids.dims()[1]);
    let out = model.forward(ids, None).unwrap();
    for want in ["logits", "logits_absorb"] {
        assert_close(&format!("training forward vs the reference's {want}"), &out.logits, &reference[want], 1e-5, 1e-4);
    }
    for (mode, want) in [(CacheMode::Naive, "logits"), (CacheMode::Absorb, "logits_absorb")] {
        let (got, _) = cached_logits(&model, ids, 3, mode);
        assert_close(&format!("{mode:?} cache vs the reference's {want}"), &got, &reference[want], 1e-5, 1e-4);
    }
    let (whole, _) = cached_logits(&model, ids, s, CacheMode::Absorb);
    let last = whole.narrow(1, s - 1, 1).unwrap().reshape(&[b, model.config.vocab_size]).unwrap();
    assert_close("prefill's last position", &last, &reference["last_prefill"], 1e-5, 1e-4);
}

/// DeepSeek-V2's router against HF's native DeepseekV2ForCausalLM: softmax scores, groups ranked
/// by their best expert (group-limited greedy), weights scaled but not renormalised, no
/// correction bias; read from the config.json transformers writes for it (`model_type`
/// deepseek_v2, no `scoring_func`: HF's V2 is always softmax).
#[test]
fn matches_hf_deepseek_v2_with_group_limited_greedy_routing() {
    check("v2_group_limited");
    check_cached_decode("v2_group_limited");
}
