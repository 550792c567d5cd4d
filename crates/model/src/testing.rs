//! Models for tests and benchmarks that need trained behaviour without a training run.

use whale_tensor::optim::{clip_grad_norm, AdamW, AdamWConfig};
use whale_tensor::{Device, Rng, Tensor};

use crate::{CausalLm, DeepSeekV3, DeepSeekV3Config, IGNORE_INDEX};

/// The `tiny` preset trained for 60 clipped steps on a periodic token pattern (10, 11, ..., 14, 10, ...),
/// so its main head and its MTP module both predict the pattern (speculative decoding accepts
/// nearly every draft).
pub fn periodic_pattern_model(seed: u64) -> DeepSeekV3 {
    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), seed).expect("tiny preset");
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() }).expect("adamw");
    let mut rng = Rng::new(3);
    let (b, s, period) = (8, 20, 5u64);
    for _ in 0..60 {
        let (mut x, mut y): (Vec<i64>, Vec<i64>) = (Vec::new(), Vec::new());
        for _ in 0..b {
            let phase = rng.below(period);
            let row: Vec<i64> = (0..s as u64 + 1).map(|i| 10 + ((i + phase) % period) as i64).collect();
            x.extend_from_slice(&row[..s]);
            y.extend_from_slice(&row[1..]);
        }
        *y.last_mut().expect("non-empty") = IGNORE_INDEX;
        let x = Tensor::from_vec(x, &[b, s], &Device::Cpu).expect("ids");
        let y = Tensor::from_vec(y, &[b, s], &Device::Cpu).expect("targets");
        model.forward(&x, Some(&y)).and_then(|o| Ok(o.loss.expect("targets").backward()?)).expect("a training step");
        // Clipped, as the trainer does: unclipped at this rate the loss spikes, and where it ends
        // depends on the last bits of every step (one ulp in the loss's mean left the main loss
        // at 0.73 instead of 0.16); clipped, it is below 0.01 either way.
        clip_grad_norm(&model.params, 1.0).expect("gradient norm");
        opt.step(&model.params, 1e-2).expect("adamw step");
        model.params.zero_grad();
    }
    model
}

/// Asserts that each token of `generated` (decoded greedily on a GPU after `prompt`) is the CPU's
/// greedy choice given the same prefix: its CPU logit within `tol` x the row's largest |logit| of
/// the row's maximum. Where the CPU's top two are further apart than that, only the argmax passes;
/// where they are closer, the devices' summation orders may rightly pick either. Each position is
/// judged on the GPU's own prefix, so one such near-tie does not cascade.
pub fn assert_greedy_agrees(cpu: &dyn CausalLm, prompt: &[u32], generated: &[u32], tol: f32, what: &str) {
    assert!(!generated.is_empty(), "{what}: nothing generated");
    let seq: Vec<i64> = prompt.iter().chain(&generated[..generated.len() - 1]).map(|&t| t as i64).collect();
    let n = seq.len();
    let ids = Tensor::from_vec(seq, &[1, n], &Device::Cpu).unwrap();
    let logits = cpu.logits(&ids).unwrap().to_vec_f32().unwrap();
    let vocab = cpu.vocab_size();
    for (i, &token) in generated.iter().enumerate() {
        let row = &logits[(prompt.len() - 1 + i) * vocab..][..vocab];
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let scale = row.iter().fold(0f32, |a, &x| a.max(x.abs()));
        let got = row[token as usize];
        assert!(
            got >= max - tol * scale,
            "{what}, new token {i}: the GPU chose {token} (CPU logit {got}), the CPU's best is {max} (scale {scale})"
        );
    }
}
