//! Parity with HF transformers' DeepseekV3ForCausalLM (plus an MTP module built from HF blocks):
//! logits, main/MTP/total loss and the gradient of every parameter, for the fixtures written by
//! `scripts/make_reference.py`.
//!
//! Tolerances: both sides compute in f32 with different summation orders (gemm blocking, attention
//! tiling, f64 accumulators here), so elements agree to a few f32 ulps of the largest terms they
//! sum: 1e-5 absolute + 1e-4 relative for values of order 1, the same for gradients.

mod common;

use common::{assert_close, fixture, shifted_targets};
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
