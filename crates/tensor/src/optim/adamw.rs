//! AdamW (decoupled weight decay, bias correction) over a [`ParamStore`], on the fused kernel.
//! Its moments are kept in f32 or, as in DeepSeek-V3's recipe, in bf16 (half the memory; each
//! step widens them, updates in f32 and rounds back to nearest even).

use std::collections::BTreeMap;

use half::bf16;

use whale_kernels::cpu::adamw::{adamw_step, AdamWStep};

use crate::dtype::to_bf16;
use crate::{DType, Device, Error, ParamStore, Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Decay 1-D parameters (norm weights, biases) too. Off by default, the common practice.
    pub decay_1d: bool,
    /// Storage of the first and second moments: F32 or BF16.
    pub moment_dtype: DType,
}

impl Default for AdamWConfig {
    /// DeepSeek-V3's values (spec section 6.2): betas (0.9, 0.95), weight decay 0.1.
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, decay_1d: false, moment_dtype: DType::F32 }
    }
}

/// One moment buffer in its storage dtype: on the host, or on the parameter's GPU (f32 or bf16
/// there too).
#[derive(Debug, Clone)]
enum Moment {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    Cuda(Tensor),
}

impl Moment {
    fn zeros(n: usize, dtype: DType) -> Moment {
        match dtype {
            DType::BF16 => Moment::BF16(vec![bf16::ZERO; n]),
            _ => Moment::F32(vec![0.0; n]),
        }
    }

    fn from_tensor(t: &Tensor, dtype: DType) -> Result<Moment> {
        let v = t.to_vec_f32()?;
        Ok(match dtype {
            DType::BF16 => Moment::BF16(v.iter().map(|&x| to_bf16(x)).collect()),
            _ => Moment::F32(v),
        })
    }

    fn to_tensor(&self) -> Result<Tensor> {
        match self {
            Moment::F32(v) => Tensor::from_vec(v.clone(), &[v.len()], &Device::Cpu),
            Moment::BF16(v) => Tensor::from_vec(v.clone(), &[v.len()], &Device::Cpu),
            Moment::Cuda(t) => t.to_device(&Device::Cpu),
        }
    }

    /// This moment on `device`, in its dtype (moments follow their parameter to a GPU).
    fn on(&mut self, device: Device) -> Result<Tensor> {
        if let Moment::Cuda(t) = self {
            if t.device() == device {
                return Ok(t.clone());
            }
            // The parameter moved to another GPU: its moments follow.
            let moved = t.to_device(&device)?;
            *self = Moment::Cuda(moved.clone());
            return Ok(moved);
        }
        let t = self.to_tensor()?.to_device(&device)?;
        *self = Moment::Cuda(t.clone());
        Ok(t)
    }

    /// Runs `f` on the values as f32 in place: widened and rounded back for bf16 storage. A GPU
    /// moment (its parameter moved back to the CPU) comes to the host first, in its dtype.
    fn with_f32<R>(&mut self, f: impl FnOnce(&mut [f32]) -> R) -> Result<R> {
        match self {
            Moment::F32(v) => Ok(f(v)),
            Moment::Cuda(t) => {
                *self = Moment::from_tensor(t, t.dtype())?;
                self.with_f32(f)
            }
            Moment::BF16(v) => {
                let mut wide: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
                let r = f(&mut wide);
                v.iter_mut().zip(&wide).for_each(|(x, &w)| *x = to_bf16(w));
                Ok(r)
            }
        }
    }
}

/// First and second moments of one parameter, and the updates it has had.
#[derive(Debug, Clone)]
struct Moments {
    m: Moment,
    v: Moment,
    /// The bias corrections' t: this parameter's own count, as PyTorch keeps `state["step"]`
    /// per parameter. A parameter without a gradient in some steps (an FP8 expert that got no
    /// token, an MTP module with too short a sequence) is corrected for the updates it had.
    step: u64,
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken (a parameter's own count can be lower).
    step: u64,
    state: BTreeMap<String, Moments>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Result<Self> {
        let ok = (0.0..1.0).contains(&config.beta1)
            && (0.0..1.0).contains(&config.beta2)
            && config.eps >= 0.0
            && config.weight_decay >= 0.0
            && matches!(config.moment_dtype, DType::F32 | DType::BF16);
        if !ok {
            return Err(Error::invalid("AdamW", format!("hyper-parameters out of range: {config:?}")));
        }
        Ok(AdamW { config, step: 0, state: BTreeMap::new() })
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update of every parameter that has a gradient, at learning rate `lr` (finite, not
    /// negative, as PyTorch requires). Every parameter is checked before any is updated, so a
    /// refused step changes nothing: no weight, moment or count.
    pub fn step(&mut self, params: &ParamStore, lr: f32) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::invalid("AdamW", format!("learning rate {lr} (it must be finite and not negative)")));
        }
        for (name, p) in params.iter() {
            let Some(g) = p.grad() else { continue };
            let why = if g.dims() != p.dims() {
                format!("a {:?} gradient", g.dims())
            } else if p.dtype() != DType::F32 || !p.is_contiguous() {
                format!("{:?} storage that is not contiguous f32 (master weights are)", p.dtype())
            } else if g.device() != p.device() {
                format!("a gradient on {:?}, the parameter on {:?}", g.device(), p.device())
            } else if p.device().is_cuda() && g.dtype() != DType::F32 {
                format!("a {:?} gradient on the GPU (the fused step reads f32)", g.dtype())
            } else {
                continue;
            };
            return Err(Error::Params(format!("AdamW cannot update `{name}` {:?}: {why}", p.dims())));
        }
        self.step += 1;
        for (name, p) in params.iter() {
            let Some(g) = p.grad() else { continue };
            let n = p.elem_count();
            let dtype = self.config.moment_dtype;
            let moments = self.state.entry(name.to_string()).or_insert_with(|| Moments {
                m: Moment::zeros(n, dtype),
                v: Moment::zeros(n, dtype),
                step: 0,
            });
            // Counted once the update has been made (a failed one leaves the count as it was).
            let step = moments.step + 1;
            let decay = if p.rank() >= 2 || self.config.decay_1d { self.config.weight_decay } else { 0.0 };
            let hp = AdamWStep {
                lr,
                beta1: self.config.beta1,
                beta2: self.config.beta2,
                eps: self.config.eps,
                weight_decay: decay,
                step,
            };
            let Moments { m, v, step: count } = moments;
            if p.device().is_cuda() {
                let (m, v) = (m.on(p.device())?, v.on(p.device())?);
                crate::cuda::adamw_step(p, &g, &m, &v, &hp)
                    .map_err(|e| Error::Params(format!("AdamW cannot update `{name}`: {e}")))?;
            } else {
                let grad = g.to_vec_f32()?;
                p.with_f32_mut(|w| m.with_f32(|m| v.with_f32(|v| adamw_step(w, &grad, m, v, &hp))))
                    .and_then(|r| r)
                    .and_then(|r| r)
                    .map_err(|e| Error::Params(format!("AdamW cannot update `{name}`: {e}")))?;
            }
            *count = step;
        }
        Ok(())
    }

    /// The state as named tensors, for checkpoints: `{name}.exp_avg` and `{name}.exp_avg_sq` in
    /// the moments' dtype, and `{name}.step`, the parameter's own update count (one i64).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, mo) in &self.state {
            out.push((format!("{name}.exp_avg"), mo.m.to_tensor()?));
            out.push((format!("{name}.exp_avg_sq"), mo.v.to_tensor()?));
            out.push((format!("{name}.step"), step_tensor(mo.step)?));
        }
        Ok(out)
    }

    /// Restores what [`AdamW::state_tensors`] saved, after `steps` optimizer steps. A parameter
    /// saved without its `{name}.step` (checkpoints from before per-parameter counts) takes
    /// `steps`, the count every parameter was corrected with then.
    pub fn load_state(&mut self, steps: u64, tensors: &BTreeMap<String, Tensor>, params: &ParamStore) -> Result<()> {
        let mut state = BTreeMap::new();
        for (name, p) in params.iter() {
            let fetch = |suffix: &str| -> Result<Option<Moment>> {
                let key = format!("{name}.{suffix}");
                match tensors.get(&key) {
                    None => Ok(None),
                    Some(t) if !matches!(t.dtype(), DType::F32 | DType::BF16) => Err(Error::Params(format!(
                        "optimizer state `{key}` has dtype {:?}; moments are f32 or bf16",
                        t.dtype()
                    ))),
                    Some(t) if t.elem_count() != p.elem_count() => Err(Error::Params(format!(
                        "optimizer state `{key}` has {} elements, parameter has {}",
                        t.elem_count(),
                        p.elem_count()
                    ))),
                    Some(t) => Ok(Some(Moment::from_tensor(t, self.config.moment_dtype)?)),
                }
            };
            match (fetch("exp_avg")?, fetch("exp_avg_sq")?) {
                (Some(m), Some(v)) => {
                    let step = match tensors.get(&format!("{name}.step")) {
                        None => steps,
                        Some(t) => read_step(t, steps).ok_or_else(|| {
                            Error::Params(format!(
                                "optimizer state `{name}.step` must be one count from 1 to the {steps} steps taken"
                            ))
                        })?,
                    };
                    state.insert(name.to_string(), Moments { m, v, step });
                }
                (None, None) => {}
                _ => {
                    return Err(Error::Params(format!("optimizer state for `{name}` has only one of its two moments")))
                }
            }
        }
        // State of a parameter the model does not have: another model's optimizer file.
        let orphan = tensors.keys().find(|key| {
            let name = [".exp_avg_sq", ".exp_avg", ".step"].iter().find_map(|suffix| key.strip_suffix(suffix));
            name.is_some_and(|name| params.get(name).is_err())
        });
        if let Some(key) = orphan {
            return Err(Error::Params(format!("optimizer state `{key}` belongs to no parameter of the model")));
        }
        self.state = state;
        self.step = steps;
        Ok(())
    }
}

/// A parameter's update count as a checkpoint tensor.
pub fn step_tensor(step: u64) -> Result<Tensor> {
    Tensor::from_vec(vec![step as i64], &[1], &Device::Cpu)
}

/// The count a `{name}.step` tensor holds, if it is one count in `1..=steps`.
pub fn read_step(t: &Tensor, steps: u64) -> Option<u64> {
    match t.to_vec_i64().ok()?.as_slice() {
        &[n] if n >= 1 && n as u64 <= steps => Some(n as u64),
        _ => None,
    }
}
