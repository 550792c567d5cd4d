//! Training DeepSeek-V3 on a GPU beside the same model on the CPU: the helpers of the GPU model
//! tests (tests/cuda_model.rs, tests/cuda_opt_in.rs).

use whale_model::{DeepSeekV3, DeepSeekV3Config};
use whale_tensor::optim::{AdamW, AdamWConfig};
use whale_tensor::{Device, Rng, Tensor};

/// `[batch, seq]` random token ids.
pub fn tokens(cfg: &DeepSeekV3Config, batch: usize, seq: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<i64> = (0..batch * seq).map(|_| rng.below(cfg.vocab_size as u64) as i64).collect();
    Tensor::from_vec(v, &[batch, seq], &Device::Cpu).unwrap()
}

/// GPU 0, or `None` after saying why the test is skipped; the emulated one under
/// `WHALE_EMULATED_GPU` (whale-kernels' tests/common/emulator.rs).
pub fn gpu(test: &str) -> Option<Device> {
    if super::emulator::on_the_emulated_driver() {
        super::emulator::emulated_gpu(test)?;
    }
    if !Device::cuda_is_available(0) {
        eprintln!("{test}: skipped, no CUDA driver or GPU on this machine");
        return None;
    }
    Some(Device::cuda(0).unwrap())
}

/// One training step: loss, backward, AdamW, the balancing-bias update; returns the loss.
pub fn step(m: &DeepSeekV3, opt: &mut AdamW, ids: &Tensor, targets: &Tensor) -> f32 {
    let out = m.forward(ids, Some(targets)).unwrap();
    let loss = out.loss.unwrap();
    loss.backward().unwrap();
    opt.step(&m.params, 1e-3).unwrap();
    for (_, p) in m.params.iter() {
        p.zero_grad();
    }
    m.update_balancing_biases(&out.expert_load).unwrap();
    loss.to_scalar().unwrap()
}

/// The loss and every parameter gradient of one forward and backward of `cpu` and `gpu` (the
/// same model) agree to f32 rounding of each tensor's scale (sums run in other orders on the
/// GPU); the gradients are cleared after.
pub fn gradients_agree(cpu: &DeepSeekV3, gpu: &DeepSeekV3, ids: &Tensor, targets: &Tensor) {
    for m in [cpu, gpu] {
        m.forward(ids, Some(targets)).unwrap().loss.unwrap().backward().unwrap();
    }
    for ((name, c), (_, g)) in cpu.params.iter().zip(gpu.params.iter()) {
        let (c, g) = match (c.grad(), g.grad()) {
            (None, None) => continue,
            (Some(c), Some(g)) => (c.to_vec_f32().unwrap(), g.to_vec_f32().unwrap()),
            _ => panic!("{name}: a gradient on one device only"),
        };
        let scale = c.iter().fold(1e-12f32, |a, x| a.max(x.abs()));
        for (i, (a, b)) in g.iter().zip(&c).enumerate() {
            assert!((a - b).abs() <= 1e-4 * scale, "grad of {name}[{i}]: GPU {a} vs CPU {b} (scale {scale})");
        }
    }
    for m in [cpu, gpu] {
        m.params.iter().for_each(|(_, p)| p.zero_grad());
    }
}

/// Three training steps of `cpu` and `gpu` (the same model) on 2 x 12 tokens, their losses within
/// `tol` of each other.
pub fn losses_agree(cpu: &DeepSeekV3, gpu: &DeepSeekV3, seed: u64, tol: f32, what: &str) {
    losses_agree_on(cpu, gpu, (2, 12), seed, tol, what);
}

/// [`losses_agree`] on batches of `(batch, seq)` tokens.
pub fn losses_agree_on(
    cpu: &DeepSeekV3,
    gpu: &DeepSeekV3,
    (batch, seq): (usize, usize),
    seed: u64,
    tol: f32,
    what: &str,
) {
    let cfg = &cpu.config;
    let (mut opt_cpu, mut opt_gpu) =
        (AdamW::new(AdamWConfig::default()).unwrap(), AdamW::new(AdamWConfig::default()).unwrap());
    for s in 0..3 {
        let (ids, targets) = (tokens(cfg, batch, seq, seed + s), tokens(cfg, batch, seq, seed + 100 + s));
        let (lc, lg) = (step(cpu, &mut opt_cpu, &ids, &targets), step(gpu, &mut opt_gpu, &ids, &targets));
        assert!((lc - lg).abs() <= tol * lc.abs(), "{what}, step {s}: loss {lg} on the GPU vs {lc} on the CPU");
    }
}
