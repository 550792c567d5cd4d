//! The DeepSeek-V3 causal language model: embedding, decoder layers (dense then MoE), final norm,
//! output head, and the MTP modules; its training forward returns the main and MTP losses apart.

use std::collections::BTreeMap;
use std::path::Path;

use whale_tensor::fp8::{Fp8Recipe, ScaleFormat};
use whale_tensor::{DType, Device, ParamStore, Rng, Tensor};

use crate::block::DecoderLayer;
use crate::checkpoint::{self, Fp8Weights, SaveDType, TensorFiles};
use crate::config::DeepSeekV3Config;
use crate::moe::{max_violation, update_balancing_bias, RealTokens};
use crate::mtp::MtpModule;
use crate::nn::{Linear, ParamBuilder, Recompute, RmsNorm, WeightSource};
use crate::{Error, Result};

/// Targets equal to this are not predicted (HF's convention).
pub const IGNORE_INDEX: i64 = -100;

#[derive(Debug)]
pub struct DeepSeekV3 {
    pub config: DeepSeekV3Config,
    /// `model.embed_tokens.weight`: `[vocab, hidden]`.
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `lm_head.weight` (or the embedding when tied).
    pub lm_head: Linear,
    pub mtp: Vec<MtpModule>,
    /// Every trainable weight under its HF name.
    pub params: ParamStore,
    /// Saved, untrained state (`...mlp.gate.e_score_correction_bias`).
    pub buffers: BTreeMap<String, Tensor>,
    /// Dtype of activations and matmuls (f32 or bf16); master weights, gating and losses stay f32.
    pub compute_dtype: DType,
    /// The MTP loss weight the training loss uses (spec 3.2's lambda): config.json's
    /// `mtp_loss_weight` until a trainer's schedule sets another (DeepSeek-V3: 0.3 for its first
    /// 10T tokens, 0.1 for the last 4.8T). Saving writes the config's value, not this one.
    pub mtp_loss_weight: f64,
}

/// What a run of decoder layers produced.
#[derive(Debug, Clone)]
pub struct StageOutput {
    /// `[batch, seq, hidden]`.
    pub hidden: Tensor,
    /// Per MoE layer run: tokens routed to each expert.
    pub expert_load: Vec<Vec<usize>>,
    /// Their enabled balance losses, summed.
    pub aux_loss: Option<Tensor>,
}

/// A training forward's results.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// `[batch, seq, vocab]`.
    pub logits: Tensor,
    /// Mean next-token cross-entropy (when targets were given).
    pub main_loss: Option<Tensor>,
    /// Sum over depths of the MTP losses, each normalised by the main loss's token count.
    pub mtp_loss: Option<Tensor>,
    /// Sum of the enabled balance losses of all MoE layers.
    pub aux_loss: Option<Tensor>,
    /// `main + mtp_loss_weight / D * mtp + aux`: what to call `backward` on.
    pub loss: Option<Tensor>,
    /// Per MoE layer (main layers, then MTP layers): tokens routed to each expert.
    pub expert_load: Vec<Vec<usize>>,
}

fn add_opt(a: Option<Tensor>, b: Option<Tensor>) -> Result<Option<Tensor>> {
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some(a.add(&b)?),
        (a, b) => a.or(b),
    })
}

impl DeepSeekV3 {
    /// A freshly initialised model (weights Normal(0, initializer_range), norms 1, biases 0).
    pub fn new(config: DeepSeekV3Config, seed: u64) -> Result<Self> {
        let std = config.initializer_range as f32;
        Self::build(config, WeightSource::Random { rng: Rng::new(seed), std })
    }

    /// Loads `config.json` and the safetensors weights from an HF-style directory.
    pub fn from_pretrained(dir: &Path) -> Result<Self> {
        let config = DeepSeekV3Config::from_file(&dir.join("config.json"))?;
        let (tensors, files) = checkpoint::load_dir(dir)?;
        Self::from_tensors(config, tensors, files)
    }

    /// A model from named tensors (as a checkpoint holds them; `files`, or one path, is named in
    /// errors). Every tensor must be used.
    pub fn from_tensors(
        config: DeepSeekV3Config,
        mut tensors: BTreeMap<String, Tensor>,
        files: impl Into<TensorFiles>,
    ) -> Result<Self> {
        Self::drop_non_parameters(&config, &mut tensors);
        Self::build(config, WeightSource::Loaded { files: files.into(), tensors })
    }

    /// An independent copy (own weights, buffers and compute dtype): the frozen reference policy
    /// of RL, or the trunk of a value model.
    pub fn duplicate(&self) -> Result<Self> {
        self.to_device(&self.device())
    }

    /// An independent copy whose weights and buffers live on `device`, with the same compute
    /// dtype, FP8 recipe, dispatch and SwiGLU cache, and recomputation: on a GPU every op of its
    /// forward and backward runs there (whale-tensor's CUDA backend), and AdamW updates it there.
    pub fn to_device(&self, device: &whale_tensor::Device) -> Result<Self> {
        let mut tensors: BTreeMap<String, Tensor> = self
            .state_dict()
            .into_iter()
            // The builder copies every tensor it trains into a buffer of its own (frozen FP8
            // codes may stay shared on the same device).
            .map(|(n, t)| Ok((n, t.to_device(device)?.detach())))
            .collect::<whale_tensor::Result<_>>()?;
        Self::drop_non_parameters(&self.config, &mut tensors);
        let files = TensorFiles::copy_on(device);
        let mut copy = Self::build(self.config.clone(), WeightSource::Loaded { files, tensors })?;
        copy.compute_dtype = self.compute_dtype;
        copy.mtp_loss_weight = self.mtp_loss_weight;
        copy.set_fp8(self.fp8());
        copy.set_recompute(self.recompute());
        copy.set_fp8_dispatch(self.fp8_dispatch());
        copy.set_fp8_swiglu_cache(self.fp8_swiglu_cache());
        Ok(copy)
    }

    /// The MTP layers store copies of the shared embedding and head (spec 3.4), a tied model
    /// may store its head, and old checkpoints carry RoPE buffers; none is a parameter here.
    fn drop_non_parameters(config: &DeepSeekV3Config, tensors: &mut BTreeMap<String, Tensor>) {
        let l = config.num_hidden_layers;
        tensors.retain(|name, _| {
            let mtp_copy = (0..config.num_nextn_predict_layers).any(|k| {
                name == &format!("model.layers.{}.embed_tokens.weight", l + k)
                    || name == &format!("model.layers.{}.shared_head.head.weight", l + k)
            });
            // A tied checkpoint may store the head anyway; it is the embedding (as HF has it).
            let tied_head = config.tie_word_embeddings && name == "lm_head.weight";
            !mtp_copy && !tied_head && !name.ends_with("rotary_emb.inv_freq")
        });
    }

    fn build(config: DeepSeekV3Config, mut source: WeightSource) -> Result<Self> {
        config.validate()?;
        let (mut params, mut buffers) = (ParamStore::new(), BTreeMap::new());
        let mut root = ParamBuilder::new(&mut params, &mut buffers, &mut source);
        let (d, v) = (config.hidden_size, config.vocab_size);
        let (embed_tokens, layers, norm, mtp) = {
            let mut m = root.sub("model");
            let embed = m.weight("embed_tokens.weight", &[v, d])?;
            let layers = (0..config.num_hidden_layers)
                .map(|i| DecoderLayer::new(&mut m.sub(&format!("layers.{i}")), &config, i))
                .collect::<Result<Vec<_>>>()?;
            let norm = RmsNorm::new(&mut m, "norm", d, config.rms_norm_eps)?;
            let mtp = (0..config.num_nextn_predict_layers)
                .map(|k| {
                    let index = config.num_hidden_layers + k;
                    MtpModule::new(&mut m.sub(&format!("layers.{index}")), &config, index)
                })
                .collect::<Result<Vec<_>>>()?;
            (embed, layers, norm, mtp)
        };
        let lm_head = if config.tie_word_embeddings {
            Linear::tied(embed_tokens.clone())
        } else {
            Linear::new(&mut root, "lm_head", d, v)?
        };
        source.check_all_used()?;
        let mtp_loss_weight = config.mtp_loss_weight;
        Ok(DeepSeekV3 {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            mtp,
            params,
            buffers,
            compute_dtype: DType::F32,
            mtp_loss_weight,
        })
    }

    /// Writes `config.json` and `model.safetensors` (f32, HF names; MTP layers with their copies
    /// of the embedding and head) into `dir`. FP8 weights kept from a release are written back as
    /// they were, and `config.json` says so (`quantization_config`): without it, HF readers would
    /// take the codes for values.
    pub fn save_pretrained(&self, dir: &Path, dtype: SaveDType) -> Result<()> {
        let tensors = self.state_dict();
        let mut config = self.config.to_json_string()?;
        if tensors.values().any(|t| t.dtype().fp8_format().is_some()) {
            config = checkpoint::with_fp8_quantization_config(&config, self.activation_scales())?;
        }
        checkpoint::save_model_dir(dir, &config, &tensors, dtype)
    }

    /// Runs the GEMMs of every attention projection and MLP/expert (main and MTP layers) in FP8
    /// with `recipe` (`None`: back to the compute dtype). The recipe's higher-precision parts stay
    /// as they are: embedding, output head, router, norms, the attention core and `eh_proj`.
    pub fn set_fp8(&mut self, recipe: Option<Fp8Recipe>) {
        for layer in self.layers.iter_mut().chain(self.mtp.iter_mut().map(|m| &mut m.block)) {
            layer.set_fp8(recipe);
        }
    }

    /// Recomputes these sublayers of every decoder layer (main and MTP) in the backward instead
    /// of keeping their activations (see [`Recompute`]).
    pub fn set_recompute(&mut self, recompute: Recompute) {
        for layer in self.layers.iter_mut().chain(self.mtp.iter_mut().map(|m| &mut m.block)) {
            layer.set_recompute(recompute);
        }
    }

    /// Sends every MoE layer's dispatch in FP8 (see [`crate::moe::DeepSeekMoE::fp8_dispatch`]),
    /// main and MTP.
    pub fn set_fp8_dispatch(&mut self, on: bool) {
        self.moe_layers_mut().for_each(|moe| moe.fp8_dispatch = on);
    }

    /// What [`DeepSeekV3::set_fp8_dispatch`] last set (false without an MoE layer).
    pub fn fp8_dispatch(&self) -> bool {
        self.moe_layers().iter().any(|moe| moe.fp8_dispatch)
    }

    /// Keeps the SwiGLU inputs of every MoE layer's experts in FP8 when they train in FP8, the
    /// SwiGLU output recomputed in the backward (TR 3.3.2; [`Tensor::fp8_swiglu_mlp`]), main and
    /// MTP.
    pub fn set_fp8_swiglu_cache(&mut self, on: bool) {
        self.moe_layers_mut().for_each(|moe| moe.set_fp8_swiglu_cache(on));
    }

    /// What [`DeepSeekV3::set_fp8_swiglu_cache`] last set (false without an MoE layer).
    pub fn fp8_swiglu_cache(&self) -> bool {
        self.moe_layers().iter().any(|moe| moe.experts.iter().any(|e| e.fp8_swiglu_cache))
    }

    /// What [`DeepSeekV3::set_recompute`] last set (read from the first layer).
    pub fn recompute(&self) -> Recompute {
        self.layers.first().map(DecoderLayer::recompute).unwrap_or_default()
    }

    /// The FP8 training recipe [`DeepSeekV3::set_fp8`] last set (read from the first layer).
    pub fn fp8(&self) -> Option<Fp8Recipe> {
        self.layers.first().and_then(|l| l.self_attn.o_proj.fp8)
    }

    /// Loads a DeepSeek-V3 FP8 release keeping its FP8 weights (codes and `weight_scale_inv`) for
    /// FP8 inference; saving writes them back unchanged. A checkpoint without FP8 weights is an
    /// error: it would run no FP8 GEMM. Activations are quantized as its config's `scale_fmt`
    /// says: f32 scales (V3), or UE8M0 power-of-two ones (V3.1; the FP8 recipe then holds them),
    /// on the CPU and on a GPU alike.
    pub fn from_pretrained_fp8(dir: &Path) -> Result<Self> {
        let config = DeepSeekV3Config::from_file(&dir.join("config.json"))?;
        let activation_scales = checkpoint::fp8_activation_scales(dir)?;
        let (tensors, files) = checkpoint::load_dir_with(dir, Fp8Weights::Keep)?;
        if !tensors.values().any(|t| t.dtype().fp8_format().is_some()) {
            return Err(Error::Model(format!(
                "{}: no FP8 weights (F8_E4M3 with weight_scale_inv) to keep; `whale quantize` writes an FP8 release",
                dir.display()
            )));
        }
        let mut model = Self::from_tensors(config, tensors, files)?;
        if activation_scales == ScaleFormat::Ue8m0 {
            model.set_fp8(Some(Fp8Recipe { input_scales: ScaleFormat::Ue8m0, ..Fp8Recipe::default() }));
        }
        Ok(model)
    }

    /// How the FP8 GEMMs quantize activations (a release's `scale_fmt`): the recipe's, f32 without one.
    fn activation_scales(&self) -> ScaleFormat {
        self.fp8().map_or(ScaleFormat::F32, |r| r.input_scales)
    }

    /// Writes the model as a DeepSeek-V3 FP8 release: projection and expert weights in E4M3 with
    /// 128x128-block `weight_scale_inv` (already-FP8 weights as they are), the rest as `dtype`,
    /// and `quantization_config` in `config.json`.
    pub fn save_pretrained_fp8(&self, dir: &Path, dtype: SaveDType) -> Result<()> {
        let tensors = checkpoint::quantize_fp8_release(&self.state_dict())?;
        let config =
            checkpoint::with_fp8_quantization_config(&self.config.to_json_string()?, self.activation_scales())?;
        checkpoint::save_model_dir(dir, &config, &tensors, dtype)
    }

    /// Every tensor of the checkpoint under its HF name.
    pub fn state_dict(&self) -> BTreeMap<String, Tensor> {
        let mut all: BTreeMap<String, Tensor> = self.params.iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
        all.extend(self.buffers.iter().map(|(n, t)| (n.clone(), t.clone())));
        for k in 0..self.mtp.len() {
            let l = self.config.num_hidden_layers + k;
            all.insert(format!("model.layers.{l}.embed_tokens.weight"), self.embed_tokens.clone());
            all.insert(format!("model.layers.{l}.shared_head.head.weight"), self.lm_head.weight.clone());
        }
        all
    }

    /// Token embeddings in the compute dtype.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed_tokens.embedding(ids)?.to_dtype(self.compute_dtype)?)
    }

    /// Hidden states after the last decoder layer, before the final norm: `[batch, seq, hidden]`.
    fn trunk(
        &self,
        input_ids: &Tensor,
        real: Option<&RealTokens>,
        loads: &mut Vec<Vec<usize>>,
        aux: &mut Option<Tensor>,
    ) -> Result<Tensor> {
        let out = self.run_layers(0..self.layers.len(), &self.embed(input_ids)?, real)?;
        loads.extend(out.expert_load);
        *aux = add_opt(aux.take(), out.aux_loss)?;
        Ok(out.hidden)
    }

    /// Decoder layers `layers` on `h` (`[batch, seq, hidden]`, positions from 0): a pipeline
    /// stage's share of the trunk. `real`: the tokens the MoE layers count (`None`: all).
    pub fn run_layers(
        &self,
        layers: std::ops::Range<usize>,
        h: &Tensor,
        real: Option<&RealTokens>,
    ) -> Result<StageOutput> {
        let positions: Vec<usize> = (0..h.dims()[1]).collect();
        let (mut h, mut expert_load, mut aux_loss) = (h.clone(), Vec::new(), None);
        for layer in &self.layers[layers] {
            let out = layer.forward(&h, &positions, real)?;
            h = out.hidden;
            expert_load.extend(out.load);
            aux_loss = add_opt(aux_loss, out.aux_loss)?;
        }
        Ok(StageOutput { hidden: h, expert_load, aux_loss })
    }

    /// Final-norm hidden states `[batch, seq, hidden]` (what the output head reads; a value head
    /// reads them too). No MTP, no losses.
    pub fn hidden_states(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (mut loads, mut aux) = (Vec::new(), None);
        let h = self.trunk(input_ids, None, &mut loads, &mut aux)?;
        self.norm.forward(&h)
    }

    /// Next-token logits `[batch, seq, vocab]` in f32, without the MTP modules or any loss.
    pub fn logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(&self.hidden_states(input_ids)?)?.to_dtype(DType::F32)?)
    }

    /// `input_ids`: `[batch, seq]`; `targets`: `[batch, seq]` with `targets[b, i]` the token that
    /// should follow position i (`IGNORE_INDEX` to skip). MTP depth k at position i predicts
    /// `targets[b, i + k]` from its hidden state and the embedding of `input_ids[b, i + k]`.
    pub fn forward(&self, input_ids: &Tensor, targets: Option<&Tensor>) -> Result<ForwardOutput> {
        self.forward_counting(input_ids, targets, None)
    }

    /// [`DeepSeekV3::forward`] whose MoE layers count only the `real` tokens in their loads and
    /// balance losses (padding left out; `None`: every token).
    pub fn forward_counting(
        &self,
        input_ids: &Tensor,
        targets: Option<&Tensor>,
        real: Option<&RealTokens>,
    ) -> Result<ForwardOutput> {
        if input_ids.rank() != 2 {
            return Err(Error::Model(format!("input_ids must be [batch, seq], got {:?}", input_ids.dims())));
        }
        if let Some(t) = targets {
            if t.dims() != input_ids.dims() {
                return Err(Error::Model(format!(
                    "targets {:?} do not match input_ids {:?}",
                    t.dims(),
                    input_ids.dims()
                )));
            }
        }
        let (mut loads, mut aux) = (Vec::new(), None);
        let h = self.trunk(input_ids, real, &mut loads, &mut aux)?;
        self.head_and_losses(input_ids, targets, real, &h, loads, aux)
    }

    /// The last pipeline stage's part of [`DeepSeekV3::forward_counting`]: final norm, output
    /// head, the MTP modules and the losses, from the trunk's output `h`; `loads` and `aux` are
    /// what the decoder layers before it reported.
    pub fn head_and_losses(
        &self,
        input_ids: &Tensor,
        targets: Option<&Tensor>,
        real: Option<&RealTokens>,
        h: &Tensor,
        mut loads: Vec<Vec<usize>>,
        mut aux: Option<Tensor>,
    ) -> Result<ForwardOutput> {
        let (batch, seq) = (input_ids.dims()[0], input_ids.dims()[1]);
        let vocab = self.config.vocab_size;
        let h = h.clone();
        let logits = self.lm_head.forward(&self.norm.forward(&h)?)?.to_dtype(DType::F32)?;

        let (mut main_loss, mut mtp_loss, mut loss) = (None, None, None);
        if let Some(targets) = targets {
            let flat = targets.reshape(&[batch * seq])?;
            let main = logits.reshape(&[batch * seq, vocab])?.cross_entropy(&flat, IGNORE_INDEX)?;
            let t = targets.to_vec_i64()?;
            let n_main = t.iter().filter(|&&x| x != IGNORE_INDEX).count();
            let mut prev = h;
            for (k, module) in self.mtp.iter().enumerate().map(|(i, m)| (i + 1, m)) {
                if k >= seq {
                    // No position has a token k ahead: the module routes nothing. A zero load
                    // (which leaves its bias alone) keeps one load vector per MoE layer.
                    if module.block.moe().is_some() {
                        loads.push(vec![0; self.config.n_routed_experts]);
                    }
                    continue;
                }
                let s = seq - k;
                let emb = self.embed(&input_ids.narrow(1, k, s)?)?;
                // Position i reads token i + k: real where that token is.
                let shifted = real.map(|r| r.shifted(k));
                let (out, normed) = module.forward(&prev.narrow(1, 0, s)?, &emb, shifted.as_ref())?;
                loads.extend(out.load.clone());
                aux = add_opt(aux, out.aux_loss.clone())?;
                let tk = targets.narrow(1, k, s)?.contiguous()?.reshape(&[batch * s])?;
                let n_k = tk.to_vec_i64()?.iter().filter(|&&x| x != IGNORE_INDEX).count();
                let logits_k = self.lm_head.forward(&normed)?.to_dtype(DType::F32)?;
                let ce = logits_k.reshape(&[batch * s, vocab])?.cross_entropy(&tk, IGNORE_INDEX)?;
                // Normalised by the main loss's token count T, not T - k (spec 3.2).
                let scale = if n_main == 0 { 0.0 } else { n_k as f32 / n_main as f32 };
                mtp_loss = add_opt(mtp_loss, Some(ce.mul_scalar(scale)?))?;
                prev = out.hidden;
            }
            let mut total = main.clone();
            if let Some(m) = &mtp_loss {
                let w = self.mtp_loss_weight as f32 / self.mtp.len() as f32;
                total = total.add(&m.mul_scalar(w)?)?;
            }
            if let Some(a) = &aux {
                total = total.add(a)?;
            }
            main_loss = Some(main);
            loss = Some(total);
        }
        Ok(ForwardOutput { logits, main_loss, mtp_loss, aux_loss: aux, loss, expert_load: loads })
    }

    /// The MoE layers in the order `ForwardOutput::expert_load` reports them.
    pub fn moe_layers(&self) -> Vec<&crate::moe::DeepSeekMoE> {
        self.layers.iter().chain(self.mtp.iter().map(|m| &m.block)).filter_map(|l| l.moe()).collect()
    }

    /// [`DeepSeekV3::moe_layers`], to change.
    pub fn moe_layers_mut(&mut self) -> impl Iterator<Item = &mut crate::moe::DeepSeekMoE> {
        self.layers.iter_mut().chain(self.mtp.iter_mut().map(|m| &mut m.block)).filter_map(DecoderLayer::moe_mut)
    }

    /// The auxiliary-loss-free update after an optimizer step (spec 2.3): each MoE layer's bias
    /// moves by `bias_update_speed` against the step's whole-batch `loads` (one entry per MoE
    /// layer, as `ForwardOutput::expert_load`, summed over micro-batches).
    pub fn update_balancing_biases(&self, loads: &[Vec<usize>]) -> Result<()> {
        let layers = self.moe_layers();
        if loads.len() != layers.len() {
            return Err(Error::Model(format!("{} load vectors for {} MoE layers", loads.len(), layers.len())));
        }
        for (moe, load) in layers.iter().zip(loads) {
            if let Some(b) = &moe.gate.e_score_correction_bias {
                update_balancing_bias(b, load, self.config.bias_update_speed as f32)?;
            }
        }
        Ok(())
    }

    /// MaxVio per MoE layer for the given loads.
    pub fn max_violations(loads: &[Vec<usize>]) -> Vec<f64> {
        loads.iter().map(|l| max_violation(l)).collect()
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }
}
