//! Creates a model's parameters by their HF names, either freshly initialised or taken from a
//! checkpoint, so the model code is written once for both.

use std::collections::BTreeMap;

use whale_tensor::{DType, ParamStore, Rng, Tensor};

use crate::checkpoint::TensorFiles;
use crate::Result;

/// Where parameter values come from.
#[derive(Debug)]
pub enum WeightSource {
    /// Normal(0, std) weights; norms at 1, biases at 0.
    Random { rng: Rng, std: f32 },
    /// Tensors read from a checkpoint (`files` says which file to name in errors). Each is
    /// taken once; what is left afterwards was unexpected.
    Loaded { files: TensorFiles, tensors: BTreeMap<String, Tensor> },
}

impl WeightSource {
    /// After building: an error naming a checkpoint tensor no parameter took.
    pub fn check_all_used(&self) -> Result<()> {
        if let WeightSource::Loaded { files, tensors } = self {
            if let Some(name) = tensors.keys().next() {
                let more = tensors.len() - 1;
                return Err(files.error(name, format!("unexpected tensor (and {more} more) for this config")));
            }
        }
        Ok(())
    }
}

/// Hands out parameters under a name prefix (`model.layers.3.self_attn.`).
#[derive(Debug)]
pub struct ParamBuilder<'a> {
    pub params: &'a mut ParamStore,
    /// Non-trained state saved with the model (the MoE balancing biases).
    pub buffers: &'a mut BTreeMap<String, Tensor>,
    pub source: &'a mut WeightSource,
    prefix: String,
}

impl<'a> ParamBuilder<'a> {
    pub fn new(
        params: &'a mut ParamStore,
        buffers: &'a mut BTreeMap<String, Tensor>,
        source: &'a mut WeightSource,
    ) -> Self {
        ParamBuilder { params, buffers, source, prefix: String::new() }
    }

    /// A builder for the names under `name.`.
    pub fn sub(&mut self, name: &str) -> ParamBuilder<'_> {
        let prefix = format!("{}{name}.", self.prefix);
        ParamBuilder { params: self.params, buffers: self.buffers, source: self.source, prefix }
    }

    fn full_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn take(
        &mut self,
        name: &str,
        shape: &[usize],
        init: impl FnOnce(&mut Rng, f32) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let full = self.full_name(name);
        match self.source {
            WeightSource::Random { rng, std } => init(rng, *std),
            WeightSource::Loaded { files, tensors } => {
                let t = tensors
                    .remove(&full)
                    .ok_or_else(|| files.error(&full, format!("missing (expected shape {shape:?})")))?;
                if t.dims() != shape {
                    return Err(files.error(&full, format!("has shape {:?}, the config expects {shape:?}", t.dims())));
                }
                if !t.dtype().is_float() {
                    return Err(files.error(&full, format!("has dtype {:?}; a weight is a float", t.dtype())));
                }
                // Master weights are f32 whatever the file stores, and finite: a NaN would only
                // surface steps later (or panic-free but arbitrary expert choices, for a bias).
                let w = t.to_dtype(DType::F32)?.contiguous()?.deep_clone()?;
                if let Some(why) = w.with_f32_mut(|w| not_finite(w))? {
                    return Err(files.error(&full, why));
                }
                Ok(w)
            }
        }
    }

    /// A trainable weight, Normal(0, std) when fresh.
    pub fn weight(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.take(name, shape, |rng, std| Ok(Tensor::randn(shape, 0.0, std, DType::F32, rng)?))?;
        Ok(self.params.insert(self.full_name(name), &t)?)
    }

    /// A linear layer's weight: trainable (as [`Self::weight`]), or, when the checkpoint holds it
    /// in FP8 and was loaded with FP8 weights kept, its codes and `weight_scale_inv`, registered
    /// as buffers (saved with the model, not trained).
    pub fn linear_weight(&mut self, name: &str, shape: &[usize]) -> Result<(Tensor, Option<Tensor>)> {
        let full = self.full_name(name);
        if let WeightSource::Loaded { files, tensors } = &mut *self.source {
            if tensors.get(&full).is_some_and(|t| t.dtype().fp8_format().is_some()) {
                let codes = tensors.remove(&full).expect("present");
                let scale_name = format!("{full}_scale_inv");
                let err = |name: &str, msg: String| files.error(name, msg);
                if codes.dims() != shape {
                    return Err(err(&full, format!("has shape {:?}, the config expects {shape:?}", codes.dims())));
                }
                let scale = tensors
                    .remove(&scale_name)
                    .ok_or_else(|| err(&full, format!("is FP8 but `{scale_name}` is missing")))?
                    .to_dtype(DType::F32)?;
                // Kept FP8 weights run in 128x128 blocks (checkpoint loading checks this too; a
                // model built from tensors gets here without it).
                let grid = [shape[0].div_ceil(128), shape[1].div_ceil(128)];
                if scale.dims() != grid {
                    return Err(err(
                        &scale_name,
                        format!("has shape {:?}; a {shape:?} weight in 128x128 blocks needs {grid:?}", scale.dims()),
                    ));
                }
                // The codes (E4M3 has NaN codes) and their scales, finite as every weight is.
                for (name, t) in [(&full, &codes), (&scale_name, &scale)] {
                    if let Some(why) = not_finite(&t.to_vec_f32()?) {
                        return Err(err(name, why));
                    }
                }
                self.buffers.insert(full, codes.clone());
                self.buffers.insert(scale_name, scale.clone());
                return Ok((codes, Some(scale)));
            }
        }
        Ok((self.weight(name, shape)?, None))
    }

    /// A trainable weight that starts at 1 (norm scales).
    pub fn ones(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.take(name, shape, |_, _| Ok(Tensor::ones(shape, DType::F32, &whale_tensor::Device::Cpu)?))?;
        Ok(self.params.insert(self.full_name(name), &t)?)
    }

    /// A trainable weight that starts at 0 (biases).
    pub fn zeros(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.take(name, shape, |_, _| Ok(Tensor::zeros(shape, DType::F32, &whale_tensor::Device::Cpu)?))?;
        Ok(self.params.insert(self.full_name(name), &t)?)
    }

    /// Saved, not trained state that starts at 0 (the expert-balancing bias).
    pub fn buffer_zeros(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.take(name, shape, |_, _| Ok(Tensor::zeros(shape, DType::F32, &whale_tensor::Device::Cpu)?))?;
        self.buffers.insert(self.full_name(name), t.clone());
        Ok(t)
    }
}

/// Why `values` (a loaded weight) cannot be a weight: its first element that is not finite.
fn not_finite(values: &[f32]) -> Option<String> {
    let (i, x) = values.iter().enumerate().find(|(_, x)| !x.is_finite())?;
    Some(format!("element {i} is {x}; weights must be finite"))
}
