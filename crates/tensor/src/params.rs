//! A named parameter store. Names are the HF checkpoint names the model crate gives them
//! (`model.layers.0.self_attn.q_a_proj.weight`), so saving and loading is a walk over this map.

use std::collections::BTreeMap;

use crate::rng::Rng;
use crate::{DType, Error, Result, Tensor};

/// Trainable weights by name, in a stable (sorted) order.
#[derive(Debug, Default, Clone)]
pub struct ParamStore {
    params: BTreeMap<String, Tensor>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `value` as a trainable weight under `name` and returns the variable. Re-using a
    /// name is an error (two layers would silently share a weight).
    pub fn insert(&mut self, name: impl Into<String>, value: &Tensor) -> Result<Tensor> {
        let name = name.into();
        if self.params.contains_key(&name) {
            return Err(Error::Params(format!("parameter `{name}` is registered twice")));
        }
        let var = if value.is_variable() { value.clone() } else { value.variable() };
        self.params.insert(name, var.clone());
        Ok(var)
    }

    /// A new f32 weight drawn from Normal(0, std).
    pub fn normal(&mut self, name: impl Into<String>, shape: &[usize], std: f32, rng: &mut Rng) -> Result<Tensor> {
        self.insert(name, &Tensor::randn(shape, 0.0, std, DType::F32, rng)?)
    }

    /// A new f32 weight filled with `value` (norm weights start at 1, biases at 0).
    pub fn constant(&mut self, name: impl Into<String>, shape: &[usize], value: f32) -> Result<Tensor> {
        self.insert(name, &Tensor::full(value, shape, DType::F32, &crate::Device::Cpu)?)
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.params.get(name).ok_or_else(|| Error::Params(format!("no parameter named `{name}`")))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.params.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Total number of scalar weights.
    pub fn num_elements(&self) -> usize {
        self.params.values().map(Tensor::elem_count).sum()
    }

    pub fn zero_grad(&self) {
        self.params.values().for_each(Tensor::zero_grad);
    }
}
