//! The two model families behind [`CausalLm`], and loading either from a checkpoint directory by
//! its config's `model_type`.

use std::path::Path;

use whale_tensor::{Device, ParamStore, Tensor};

use crate::checkpoint::{SaveDType, TensorFiles};
use crate::deepseek_v3::{DeepSeekV3, IGNORE_INDEX};
use crate::dense::{DenseConfig, DenseModel};
use crate::generate::{CausalLm, KvCache};
use crate::moe::RealTokens;
use crate::{DeepSeekV3Config, Error, Result};

/// The methods both families answer from their fields and inherent methods.
macro_rules! causal_lm_common {
    ($t:ty) => {
        fn vocab_size(&self) -> usize {
            self.config.vocab_size
        }
        fn hidden_size(&self) -> usize {
            self.config.hidden_size
        }
        fn num_layers(&self) -> usize {
            self.layers.len()
        }
        fn max_positions(&self) -> usize {
            self.config.max_position_embeddings
        }
        fn params(&self) -> &ParamStore {
            &self.params
        }
        fn logits(&self, ids: &Tensor) -> Result<Tensor> {
            <$t>::logits(self, ids)
        }
        fn hidden_states(&self, ids: &Tensor) -> Result<Tensor> {
            <$t>::hidden_states(self, ids)
        }
        fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
            <$t>::forward_cached(self, ids, cache)
        }
        fn forward_cached_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
            <$t>::forward_cached_last(self, ids, cache)
        }
        fn save_pretrained(&self, dir: &Path, dtype: SaveDType) -> Result<()> {
            <$t>::save_pretrained(self, dir, dtype)
        }
        fn set_recompute(&mut self, recompute: crate::nn::Recompute) {
            <$t>::set_recompute(self, recompute)
        }
        fn set_compute_dtype(&mut self, dtype: whale_tensor::DType) {
            self.compute_dtype = dtype;
        }
        fn compute_dtype(&self) -> whale_tensor::DType {
            self.compute_dtype
        }
    };
}

impl CausalLm for DeepSeekV3 {
    causal_lm_common!(DeepSeekV3);
    fn train_loss(&self, ids: &Tensor, targets: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let [batch, seq] = ids.dims()[..] else {
            return Err(Error::Model(format!("input_ids must be [batch, seq], got {:?}", ids.dims())));
        };
        let real = RealTokens::from_lengths(batch, seq, lengths)?;
        Ok(self.forward_counting(ids, Some(targets), Some(&real))?.loss.expect("targets were given"))
    }
    fn duplicate(&self) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(DeepSeekV3::duplicate(self)?))
    }
    fn to_device(&self, device: &Device) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(DeepSeekV3::to_device(self, device)?))
    }
    fn as_deepseek(&self) -> Option<&DeepSeekV3> {
        Some(self)
    }
}

impl CausalLm for DenseModel {
    causal_lm_common!(DenseModel);
    fn train_loss(&self, ids: &Tensor, targets: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        // No layer counts tokens; the lengths are checked all the same.
        RealTokens::from_lengths(ids.dims()[0], ids.dims().get(1).copied().unwrap_or(0), lengths)?;
        if targets.dims() != ids.dims() {
            return Err(Error::Model(format!("targets {:?} do not match input_ids {:?}", targets.dims(), ids.dims())));
        }
        let n = ids.elem_count();
        let logits = DenseModel::logits(self, ids)?;
        Ok(logits.reshape(&[n, self.config.vocab_size])?.cross_entropy(&targets.reshape(&[n])?, IGNORE_INDEX)?)
    }
    fn duplicate(&self) -> Result<Box<dyn CausalLm>> {
        CausalLm::to_device(self, &CausalLm::device(self))
    }
    fn to_device(&self, device: &Device) -> Result<Box<dyn CausalLm>> {
        let tensors = self
            .params
            .iter()
            // The builder copies every tensor into a buffer of its own.
            .map(|(n, t)| Ok((n.to_string(), t.to_device(device)?.detach())))
            .collect::<whale_tensor::Result<_>>()?;
        let mut copy = DenseModel::from_tensors(self.config.clone(), tensors, TensorFiles::copy_on(device))?;
        copy.compute_dtype = self.compute_dtype;
        copy.set_recompute(self.recompute());
        Ok(Box::new(copy))
    }
}

/// The `model_type` of a checkpoint directory's config.json.
pub fn model_type(dir: &Path) -> Result<String> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::file(&path, e))?;
    v["model_type"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::file(&path, format!("no `model_type` (expected one of {MODEL_TYPES})")))
}

/// The `model_type`s [`load_pretrained`] loads.
pub const MODEL_TYPES: &str = "deepseek_v3, deepseek_v2, qwen2, llama";

/// The two families a checkpoint's `model_type` names.
enum Family {
    /// DeepSeek-V3 or V2 (MLA, MoE).
    DeepSeek,
    /// Qwen2 or Llama.
    Dense,
}

/// The family of the checkpoint at `dir`, by its config's `model_type`.
fn family(dir: &Path) -> Result<Family> {
    match model_type(dir)?.as_str() {
        "deepseek_v3" | "deepseek_v2" => Ok(Family::DeepSeek),
        "qwen2" | "llama" => Ok(Family::Dense),
        other => {
            Err(Error::file(dir.join("config.json"), format!("model_type `{other}` is not supported ({MODEL_TYPES})")))
        }
    }
}

/// A DeepSeek-V3 (or V2), Qwen2 or Llama checkpoint directory, by its config's `model_type`.
pub fn load_pretrained(dir: &Path) -> Result<Box<dyn CausalLm>> {
    Ok(match family(dir)? {
        Family::DeepSeek => Box::new(DeepSeekV3::from_pretrained(dir)?),
        Family::Dense => Box::new(DenseModel::from_pretrained(dir)?),
    })
}

/// The positions the checkpoint at `dir` holds (the `max_position_embeddings` its config gives
/// or its family's default), read from its config.json without loading its weights.
pub fn checkpoint_max_positions(dir: &Path) -> Result<usize> {
    let path = dir.join("config.json");
    Ok(match family(dir)? {
        Family::DeepSeek => DeepSeekV3Config::from_file(&path)?.max_position_embeddings,
        Family::Dense => DenseConfig::from_file(&path)?.max_position_embeddings,
    })
}

/// `model` on `device`: itself when it is there already, else a copy moved there.
pub fn moved_to(model: Box<dyn CausalLm>, device: &Device) -> Result<Box<dyn CausalLm>> {
    if model.device() == *device {
        Ok(model)
    } else {
        model.to_device(device)
    }
}
