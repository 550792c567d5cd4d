//! AdamW (decoupled weight decay, bias correction) over a [`ParamStore`], on the fused kernel.

use std::collections::BTreeMap;

use whale_kernels::cpu::adamw::{adamw_step, AdamWStep};

use crate::{DType, Device, Error, ParamStore, Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Decay 1-D parameters (norm weights, biases) too. Off by default, the common practice.
    pub decay_1d: bool,
}

impl Default for AdamWConfig {
    /// DeepSeek-V3's values (spec section 6.2): betas (0.9, 0.95), weight decay 0.1.
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, decay_1d: false }
    }
}

/// First and second moments of one parameter.
#[derive(Debug, Clone)]
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    step: u64,
    state: BTreeMap<String, Moments>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Result<Self> {
        let ok = (0.0..1.0).contains(&config.beta1)
            && (0.0..1.0).contains(&config.beta2)
            && config.eps >= 0.0
            && config.weight_decay >= 0.0;
        if !ok {
            return Err(Error::invalid("AdamW", format!("hyper-parameters out of range: {config:?}")));
        }
        Ok(AdamW { config, step: 0, state: BTreeMap::new() })
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`.
    pub fn step(&mut self, params: &ParamStore, lr: f32) -> Result<()> {
        self.step += 1;
        for (name, p) in params.iter() {
            let Some(g) = p.grad() else { continue };
            let grad = g.to_vec_f32()?;
            let n = p.elem_count();
            let moments =
                self.state.entry(name.to_string()).or_insert_with(|| Moments { m: vec![0.0; n], v: vec![0.0; n] });
            let decay = if p.rank() >= 2 || self.config.decay_1d { self.config.weight_decay } else { 0.0 };
            let hp = AdamWStep {
                lr,
                beta1: self.config.beta1,
                beta2: self.config.beta2,
                eps: self.config.eps,
                weight_decay: decay,
                step: self.step,
            };
            p.with_f32_mut(|w| adamw_step(w, &grad, &mut moments.m, &mut moments.v, &hp))
                .map_err(|e| Error::Params(format!("AdamW cannot update `{name}`: {e}")))?;
        }
        Ok(())
    }

    /// The state as named f32 tensors (`{name}.exp_avg`, `{name}.exp_avg_sq`), for checkpoints.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, mo) in &self.state {
            let n = mo.m.len();
            out.push((format!("{name}.exp_avg"), Tensor::from_vec(mo.m.clone(), &[n], &Device::Cpu)?));
            out.push((format!("{name}.exp_avg_sq"), Tensor::from_vec(mo.v.clone(), &[n], &Device::Cpu)?));
        }
        Ok(out)
    }

    /// Restores what [`AdamW::state_tensors`] saved, after `steps` optimizer steps.
    pub fn load_state(&mut self, steps: u64, tensors: &BTreeMap<String, Tensor>, params: &ParamStore) -> Result<()> {
        let mut state = BTreeMap::new();
        for (name, p) in params.iter() {
            let fetch = |suffix: &str| -> Result<Option<Vec<f32>>> {
                let key = format!("{name}.{suffix}");
                match tensors.get(&key) {
                    None => Ok(None),
                    Some(t) if t.elem_count() == p.elem_count() && t.dtype() == DType::F32 => Ok(Some(t.to_vec_f32()?)),
                    Some(t) => Err(Error::Params(format!(
                        "optimizer state `{key}` has {} elements, parameter has {}",
                        t.elem_count(),
                        p.elem_count()
                    ))),
                }
            };
            match (fetch("exp_avg")?, fetch("exp_avg_sq")?) {
                (Some(m), Some(v)) => {
                    state.insert(name.to_string(), Moments { m, v });
                }
                (None, None) => {}
                _ => {
                    return Err(Error::Params(format!("optimizer state for `{name}` has only one of its two moments")))
                }
            }
        }
        self.state = state;
        self.step = steps;
        Ok(())
    }
}
