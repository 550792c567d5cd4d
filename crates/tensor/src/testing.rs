//! Finite-difference gradient checking, shared by every crate's tests (and [`TempDir`], their
//! scratch directories).
//!
//! The checked function's output is projected onto fixed random weights `r`, so the scalar
//! `L(x) = sum(r * f(x))` exercises every output element's gradient. Autograd's `dL/dx` is
//! compared with the central difference `(L(x + eps) - L(x - eps)) / (2 eps)` for every element.
//!
//! Tolerances: tensors are f32. With inputs of order 1 and `eps = 1e-2`, the central difference's
//! truncation error is `eps^2 / 6 * |L'''|` (about 2e-5 for smooth ops) and the f32 rounding of
//! `L` contributes about `1e-7 * |L| / eps`; `L` is summed in f64 to keep that small. An absolute
//! 2e-3 plus a relative 1e-2 covers both with a margin while a wrong gradient (a missing factor, a
//! swapped index, a dropped term) is off by order 1.

use crate::{DType, Device, Result, Rng, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct GradCheck {
    pub eps: f32,
    pub atol: f64,
    pub rtol: f64,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck { eps: 1e-2, atol: 2e-3, rtol: 1e-2 }
    }
}

/// Random f32 inputs with entries drawn from Normal(0, 1).
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, DType::F32, &mut Rng::new(seed)).expect("randn")
}

fn project(out: &Tensor, r: &[f32]) -> Result<f64> {
    Ok(out.to_vec_f32()?.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum())
}

impl GradCheck {
    /// Checks autograd's gradients of `f` with respect to every input against finite differences.
    /// Returns an error message naming the first input and element that disagree.
    pub fn run(&self, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> std::result::Result<(), String> {
        let e = |err: crate::Error| err.to_string();
        let vars: Vec<Tensor> =
            inputs.iter().map(|t| t.deep_clone().map(|c| c.variable())).collect::<Result<_>>().map_err(e)?;
        let out = f(&vars).map_err(e)?;
        let r: Vec<f32> = {
            let mut rng = Rng::new(0x5eed);
            (0..out.elem_count()).map(|_| rng.normal()).collect()
        };
        let r_t = Tensor::from_vec(r.clone(), out.dims(), &Device::Cpu).map_err(e)?.to_dtype(out.dtype()).map_err(e)?;
        out.mul(&r_t).and_then(|t| t.sum_all()).and_then(|l| l.backward()).map_err(e)?;

        for (i, var) in vars.iter().enumerate() {
            let analytic = match var.grad() {
                Some(g) => g.to_vec_f32().map_err(e)?,
                None => vec![0.0; var.elem_count()],
            };
            let base = inputs[i].to_vec_f32().map_err(e)?;
            for j in 0..base.len() {
                let eval = |delta: f32| -> std::result::Result<f64, String> {
                    let mut x = base.clone();
                    x[j] += delta;
                    let xi = Tensor::from_vec(x, inputs[i].dims(), &Device::Cpu).map_err(e)?;
                    let mut args: Vec<Tensor> = inputs.to_vec();
                    args[i] = xi;
                    crate::no_grad(|| f(&args).and_then(|o| project(&o, &r))).map_err(e)
                };
                let numeric = (eval(self.eps)? - eval(-self.eps)?) / (2.0 * self.eps as f64);
                let a = analytic[j] as f64;
                if (a - numeric).abs() > self.atol + self.rtol * a.abs().max(numeric.abs()) {
                    return Err(format!("input {i} element {j}: autograd {a:.6} vs finite difference {numeric:.6}"));
                }
            }
        }
        Ok(())
    }
}

/// [`GradCheck::run`] with the default tolerances, panicking with the mismatch.
pub fn assert_gradients(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    if let Err(msg) = GradCheck::default().run(inputs, f) {
        panic!("gradient check failed: {msg}");
    }
}

/// Asserts two tensors have the same shape and values within `atol + rtol * |b|`.
pub fn assert_close(a: &Tensor, b: &Tensor, atol: f32, rtol: f32) {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (va, vb) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    for (i, (x, y)) in va.iter().zip(&vb).enumerate() {
        assert!((x - y).abs() <= atol + rtol * y.abs(), "element {i}: {x} vs {y}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backprop::backward_fn;

    /// `y = x^2` with the derivative deliberately off by a factor: the check must catch it.
    fn square_with_wrong_grad(x: &Tensor) -> Result<Tensor> {
        let v: Vec<f32> = x.to_vec_f32()?.iter().map(|a| a * a).collect();
        let back = backward_fn("wrong", |inputs: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| {
            Ok(vec![Some(g.mul(&inputs[0])?.mul_scalar(1.9)?)])
        });
        Ok(Tensor::from_op(v, x.dims(), x.dtype(), &[x], back))
    }

    #[test]
    fn detects_a_wrong_gradient() {
        let err = GradCheck::default().run(&[randn(&[3], 1)], |x| square_with_wrong_grad(&x[0])).unwrap_err();
        assert!(err.contains("input 0"), "{err}");
        GradCheck::default().run(&[randn(&[3], 1)], |x| x[0].sqr()).unwrap();
    }
}

/// A fresh directory for one test (`whale-{name}-{pid}` under the system's temp dir), removed
/// when dropped. A failing test keeps it and prints where, for a look at what it wrote.
#[derive(Debug)]
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("whale-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
