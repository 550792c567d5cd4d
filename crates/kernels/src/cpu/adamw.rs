//! Fused AdamW step (decoupled weight decay, bias correction), PyTorch's `torch.optim.AdamW` numerics.

use rayon::prelude::*;

use super::wide_fn;

/// Hyper-parameters of one step. `step` is 1-based (the count after this update).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
}

/// Elements per rayon task: a fixed size, so the partition depends only on the length.
const CHUNK: usize = 1 << 14;

/// The scalars of one step, computed as torch does: `_single_tensor_adamw` computes them as
/// Python floats (f64), each rounded to f32 where it meets an f32 tensor op. The CUDA kernel takes
/// the same values. Our hyper-parameters are f32, widened here; torch's Python floats hold the
/// decimal value itself, so the two agree to the bit for values f32 holds exactly (0.5, 0.75, a
/// power of two) and otherwise differ by a few ulp in a scalar (beta1 = 0.9: the lerp weight is
/// 0.10000002 here, 0.10000000 in torch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    pub decay: f32,
    pub neg_step_size: f32,
    pub bias_correction2_sqrt: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    /// `m.lerp_(g, w)` with w = 1 - beta1: ATen's vectorised CPU lerp is `fma(w, g - m, m)` for
    /// |w| < 0.5 and `fma(w - 1, g - m, g)` otherwise.
    pub lerp_from_m: bool,
    pub lerp_coeff: f32,
}

impl AdamWScalars {
    pub fn new(hp: &AdamWStep) -> Self {
        let (lr, beta1, beta2) = (hp.lr as f64, hp.beta1 as f64, hp.beta2 as f64);
        let step = hp.step as f64; // torch keeps `step` as a float tensor and calls `.item()`
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2 = 1.0 - beta2.powf(step);
        let lerp_weight = (1.0 - beta1) as f32;
        let lerp_from_m = lerp_weight.abs() < 0.5;
        AdamWScalars {
            decay: (1.0 - lr * hp.weight_decay as f64) as f32,
            neg_step_size: (-(lr / bias_correction1)) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            beta2: hp.beta2,
            one_minus_beta2: (1.0 - beta2) as f32,
            eps: hp.eps,
            lerp_from_m,
            lerp_coeff: if lerp_from_m { lerp_weight } else { lerp_weight - 1.0 },
        }
    }
}

/// Updates `param`, `m`, `v` in place from `grad`. On an x86-64 CPU with FMA the loop is built
/// for it (AVX2 lanes and a fused instruction for the lerp's `mul_add`, which the portable build
/// calls `fmaf` for, element by element); the numbers are the same bits either way.
pub fn adamw_step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamWStep) {
    step_with(param, grad, m, v, hp, update_wide);
}

/// [`adamw_step`] in the portable build only: the benchmarks' baseline and the FMA build's twin
/// in the tests.
pub fn adamw_step_portable(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamWStep) {
    step_with(param, grad, m, v, hp, update);
}

type Update = fn(&mut [f32], &[f32], &mut [f32], &mut [f32], &AdamWScalars);

fn step_with(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamWStep, update: Update) {
    let n = param.len();
    assert!(grad.len() == n && m.len() == n && v.len() == n, "adamw_step: buffers differ in length");
    assert!(hp.step >= 1, "adamw_step: step is 1-based");
    let s = AdamWScalars::new(hp);
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| update(p, g, m, v, &s));
}

wide_fn!(fn update_wide => update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWScalars));

/// One chunk's update: the element-wise sequence mirrors torch's tensor ops, one by one, in the
/// same order.
#[inline(always)]
fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWScalars) {
    let AdamWScalars {
        decay,
        neg_step_size,
        bias_correction2_sqrt,
        beta2,
        one_minus_beta2,
        eps,
        lerp_from_m,
        lerp_coeff,
    } = *s;
    let n = p.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let g = g[i];
        // param.mul_(1 - lr * weight_decay)
        let mut pi = p[i] * decay;
        // exp_avg.lerp_(grad, 1 - beta1)
        let base = if lerp_from_m { m[i] } else { g };
        let mi = lerp_coeff.mul_add(g - m[i], base);
        // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): ATen's CPU addcmul is
        // built with FMA contraction, so `self + value * t1 * t2` rounds as fma(value * t1, t2,
        // self) (torch's bits, a fixture test)
        let vi = (one_minus_beta2 * g).mul_add(g, v[i] * beta2);
        // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        let denom = vi.sqrt() / bias_correction2_sqrt + eps;
        // param.addcdiv_(exp_avg, denom, value=-step_size)
        pi += neg_step_size * mi / denom;
        (p[i], m[i], v[i]) = (pi, mi, vi);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{bits, Rng};

    fn hp(step: u64) -> AdamWStep {
        AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step }
    }

    /// The textbook update in f64: (param, m, v) after one step.
    fn reference_step(p: f64, g: f64, m: f64, v: f64, hp: &AdamWStep) -> (f64, f64, f64) {
        let (lr, b1, b2, eps, wd) =
            (hp.lr as f64, hp.beta1 as f64, hp.beta2 as f64, hp.eps as f64, hp.weight_decay as f64);
        let t = hp.step as i32;
        let m = b1 * m + (1.0 - b1) * g;
        let v = b2 * v + (1.0 - b2) * g * g;
        let m_hat = m / (1.0 - b1.powi(t));
        let v_hat = v / (1.0 - b2.powi(t));
        (p * (1.0 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps), m, v)
    }

    #[test]
    fn several_steps_match_f64_reference() {
        let n = 2 * CHUNK + 77;
        let mut rng = Rng::new(21);
        let mut p = rng.vec(n, 1.0);
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        let (mut rp, mut rm, mut rv): (Vec<f64>, Vec<f64>, Vec<f64>) =
            (p.iter().map(|&x| x as f64).collect(), vec![0.0; n], vec![0.0; n]);
        let mut m_scale = vec![0.0f64; n];
        for step in 1..=5 {
            let g = rng.vec(n, 0.5);
            let hp = hp(step);
            adamw_step(&mut p, &g, &mut m, &mut v, &hp);
            for i in 0..n {
                // m mixes terms that may cancel, and carries rounding from earlier steps: measure its
                // error against the largest terms seen so far.
                m_scale[i] = m_scale[i].max(rm[i].abs() + g[i].abs() as f64);
                (rp[i], rm[i], rv[i]) = reference_step(rp[i], g[i] as f64, rm[i], rv[i], &hp);
                assert!((m[i] as f64 - rm[i]).abs() <= 1e-6 * m_scale[i], "m[{i}] step {step}");
                assert!((v[i] as f64 - rv[i]).abs() <= 1e-5 * rv[i] + 1e-12, "v[{i}] step {step}");
                // Each step rounds the f32 param twice (decay, update): up to one ulp per step, plus
                // a small relative error in the update itself (size lr).
                let tol = step as f64 * f32::EPSILON as f64 * rp[i].abs() + 1e-4 * hp.lr as f64;
                assert!((p[i] as f64 - rp[i]).abs() <= tol, "p[{i}] step {step}: {} vs {}", p[i], rp[i]);
            }
        }
    }

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        let mut p = vec![1.0f32, -2.0, 0.5];
        let g = [0.3f32, -4.0, 1e-3];
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        let hp = hp(1);
        let before = p.clone();
        adamw_step(&mut p, &g, &mut m, &mut v, &hp);
        for i in 0..3 {
            let want = before[i] * (1.0 - hp.lr * hp.weight_decay) - hp.lr * g[i].signum();
            assert!((p[i] - want).abs() < 1e-6, "{} vs {want}", p[i]);
        }
    }

    /// torch's op sequence transcribed one element at a time, each tensor op rounding to f32
    /// (addcmul once, as ATen's FMA-contracted kernel does: whale-tensor's tests/optim.rs holds
    /// the AdamW to torch's own bits).
    fn torch_transcription(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, hp: &AdamWStep) {
        let (lr, b1, b2) = (hp.lr as f64, hp.beta1 as f64, hp.beta2 as f64);
        *p *= (1.0 - lr * hp.weight_decay as f64) as f32;
        let w = (1.0 - b1) as f32;
        *m = if w.abs() < 0.5 { w.mul_add(g - *m, *m) } else { (w - 1.0).mul_add(g - *m, g) };
        *v *= hp.beta2;
        *v = ((1.0 - b2) as f32 * g).mul_add(g, *v);
        let bc1 = 1.0 - b1.powf(hp.step as f64);
        let bc2 = 1.0 - b2.powf(hp.step as f64);
        let denom = v.sqrt() / (bc2.sqrt() as f32) + hp.eps;
        *p += (-(lr / bc1)) as f32 * *m / denom;
    }

    #[test]
    fn bit_identical_to_torch_op_sequence_for_both_lerp_branches() {
        let n = CHUNK + 3;
        let mut rng = Rng::new(5);
        for beta1 in [0.9f32, 0.3] {
            let hp = AdamWStep { beta1, step: 7, ..hp(7) };
            let (p0, g, m0, v0) = (rng.vec(n, 1.0), rng.vec(n, 1.0), rng.vec(n, 0.1), rng.vec(n, 0.01));
            let v0: Vec<f32> = v0.iter().map(|x| x.abs()).collect();
            // Both builds of the loop (on this CPU, the FMA one and the portable one).
            for step in [adamw_step, adamw_step_portable] {
                let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
                step(&mut p, &g, &mut m, &mut v, &hp);
                for i in 0..n {
                    let (mut pi, mut mi, mut vi) = (p0[i], m0[i], v0[i]);
                    torch_transcription(&mut pi, g[i], &mut mi, &mut vi, &hp);
                    assert_eq!(
                        (p[i].to_bits(), m[i].to_bits(), v[i].to_bits()),
                        (pi.to_bits(), mi.to_bits(), vi.to_bits())
                    );
                }
            }
        }
    }

    #[test]
    fn empty_is_a_no_op_and_deterministic() {
        adamw_step(&mut [], &[], &mut [], &mut [], &hp(1));
        let n = 3 * CHUNK + 1;
        let mut rng = Rng::new(9);
        let (p0, g) = (rng.vec(n, 1.0), rng.vec(n, 1.0));
        let run = || {
            let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
            adamw_step(&mut p, &g, &mut m, &mut v, &hp(1));
            adamw_step(&mut p, &g, &mut m, &mut v, &hp(2));
            [p, m, v].map(|x| bits(&x))
        };
        assert_eq!(run(), run());
    }
}
