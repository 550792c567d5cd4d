//! Dense Llama / Qwen2 decoders: the students of R1's distillation (DeepSeek-R1-Distill-Qwen and
//! -Llama). Pre-norm blocks of grouped-query attention (optional q/k/v biases, RoPE with
//! `rope_theta`, rotate-half pairing) and a SwiGLU MLP, a final RMSNorm, and a tied or untied
//! head; HF checkpoint names, so HF Qwen2 and Llama checkpoints load as they are.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use whale_tensor::{DType, ParamStore, Rng, Tensor};

use crate::checkpoint::{self, SaveDType, TensorFiles};
use crate::generate::KvCache;
use crate::mla::LayerCache;
use crate::nn::{
    in_dtype_of, recomputed, Linear, ParamBuilder, Recompute, RmsNorm, RotaryEmbedding, SwiGluMlp, WeightSource,
};
use crate::tokenizer::config_token_ids;
use crate::{Error, Result};

/// The keys of an HF `LlamaConfig` / `Qwen2Config` that matter here; the rest are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenseConfig {
    /// `llama` or `qwen2`.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head dimension (hidden / heads when absent).
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// HF's `rope_scaling` (or transformers 5's `rope_parameters`): none, linear or llama3.
    #[serde(default)]
    pub rope_scaling: Option<DenseRopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (always for Qwen2; Llama's `attention_bias`, which biases o_proj too).
    pub attention_bias: bool,
    pub initializer_range: f64,
    pub bos_token_id: Option<u32>,
    /// config.json's `eos_token_id`: one id, or the list Llama 3 gives (kept whole, so a saved
    /// checkpoint stops generation where the loaded one did).
    pub eos_token_ids: Vec<u32>,
}

/// How a dense checkpoint scales its RoPE frequencies, as config.json spells it (`rope_type` and
/// its parameters; transformers' `_compute_linear_scaling_rope_parameters` and
/// `_compute_llama3_parameters`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum DenseRopeScaling {
    /// Every frequency divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// Llama 3.1's (the R1-Distill-Llama models'): wavelengths longer than
    /// `original_max_position_embeddings / low_freq_factor` divided by `factor`, those shorter than
    /// `original_max_position_embeddings / high_freq_factor` kept, a smooth blend between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

impl DenseRopeScaling {
    /// `plain` frequencies (per rotary pair) scaled.
    pub fn inv_freq(&self, plain: &[f64]) -> Vec<f64> {
        match *self {
            DenseRopeScaling::Linear { factor } => plain.iter().map(|f| f / factor).collect(),
            DenseRopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings,
            } => {
                let context = original_max_position_embeddings as f64;
                plain
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < context / high {
                            f
                        } else if wavelen > context / low {
                            f / factor
                        } else {
                            let smooth = (context / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// The scaling a config.json object (`rope_scaling` or `rope_parameters`) describes; errors
    /// name `key` (the object's key) and the missing or bad parameter.
    fn parse(obj: &Value, key: &str, bad: &dyn Fn(&str, &str) -> Error) -> Result<Option<Self>> {
        if !(obj.is_null() || obj.is_object()) {
            return Err(bad(key, "must be an object (or null)"));
        }
        let kind = match obj.get("rope_type").filter(|t| !t.is_null()).or_else(|| obj.get("type")) {
            None | Some(Value::Null) => "default",
            Some(t) => t.as_str().ok_or_else(|| bad(&format!("{key}.rope_type"), "must be a string"))?,
        };
        let num = |name: &str| -> Result<f64> {
            obj[name]
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| bad(&format!("{key}.{name}"), "missing or not a positive number"))
        };
        Ok(match kind {
            "default" => None,
            "linear" => Some(DenseRopeScaling::Linear { factor: num("factor")? }),
            "llama3" => {
                let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
                if high <= low {
                    return Err(bad(&format!("{key}.high_freq_factor"), "must be above low_freq_factor"));
                }
                Some(DenseRopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
                })
            }
            other => {
                return Err(bad(
                    key,
                    &format!("rope type `{other}` is not supported for dense students (linear, llama3)"),
                ))
            }
        })
    }
}

impl DenseConfig {
    /// Whether o_proj has a bias: Llama's `attention_bias` covers all four projections
    /// (modeling_llama.py), Qwen2's biases are on q/k/v only.
    pub fn o_proj_bias(&self) -> bool {
        self.attention_bias && self.model_type == "llama"
    }

    /// Parses an HF config.json text; errors name the key.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::file(path, e))?;
        let bad = |key: &str, why: &str| Error::Config {
            key: key.to_string(),
            msg: format!("{why} (in {})", path.display()),
        };
        let model_type = v["model_type"].as_str().ok_or_else(|| bad("model_type", "missing"))?.to_string();
        if !matches!(model_type.as_str(), "llama" | "qwen2") {
            return Err(bad("model_type", &format!("`{model_type}` is not a dense student (llama, qwen2)")));
        }
        let usize_key = |key: &str| -> Result<usize> {
            v[key].as_u64().map(|x| x as usize).ok_or_else(|| bad(key, "missing or not a non-negative integer"))
        };
        let (hidden, heads) = (usize_key("hidden_size")?, usize_key("num_attention_heads")?);
        let kv_heads = if v["num_key_value_heads"].is_null() { heads } else { usize_key("num_key_value_heads")? };
        let head_dim = if v["head_dim"].is_null() { hidden / heads.max(1) } else { usize_key("head_dim")? };
        // Optional keys take their default when absent (or null), and are an error when present
        // with a value of the wrong type: a quoted number is not silently the default.
        let optional = |value: &Value, key: &str, want: &str, fits: fn(&Value) -> bool| -> Result<Option<Value>> {
            match value {
                Value::Null => Ok(None),
                x if fits(x) => Ok(Some(x.clone())),
                x => Err(bad(key, &format!("{x} is not {want}"))),
            }
        };
        let number = |key: &str, default: f64| -> Result<f64> {
            Ok(optional(&v[key], key, "a number", Value::is_number)?.and_then(|x| x.as_f64()).unwrap_or(default))
        };
        let count = |key: &str, default: u64| -> Result<usize> {
            let x = optional(&v[key], key, "a non-negative integer", Value::is_u64)?;
            Ok(x.and_then(|x| x.as_u64()).unwrap_or(default) as usize)
        };
        let flag = |key: &str| -> Result<bool> {
            Ok(optional(&v[key], key, "true or false", Value::is_boolean)?.and_then(|x| x.as_bool()).unwrap_or(false))
        };
        // transformers 4 writes `rope_theta` and `rope_scaling`, 5 `rope_parameters` (with
        // rope_theta inside; 5's `rope_scaling` getter returns that dict, so a file written back
        // from it carries rope_theta inside rope_scaling, which transformers then prefers). The
        // spellings may be there together; values that disagree are refused rather than one
        // silently preferred.
        let mut thetas = Vec::new();
        for (key, value) in [
            ("rope_theta", &v["rope_theta"]),
            ("rope_parameters.rope_theta", &v["rope_parameters"]["rope_theta"]),
            ("rope_scaling.rope_theta", &v["rope_scaling"]["rope_theta"]),
        ] {
            if let Some(x) = optional(value, key, "a number", Value::is_number)?.and_then(|x| x.as_f64()) {
                thetas.push((key, x));
            }
        }
        if let Some((key, b)) = thetas.iter().find(|(_, x)| *x != thetas[0].1) {
            return Err(bad(thetas[0].0, &format!("{} disagrees with {key} {b}", thetas[0].1)));
        }
        let rope_theta = thetas.first().map_or(10_000.0, |t| t.1);
        let old_scaling = DenseRopeScaling::parse(&v["rope_scaling"], "rope_scaling", &bad)?;
        let new_scaling = DenseRopeScaling::parse(&v["rope_parameters"], "rope_parameters", &bad)?;
        if !v["rope_scaling"].is_null() && !v["rope_parameters"].is_null() && old_scaling != new_scaling {
            return Err(bad(
                "rope_scaling",
                &format!("{old_scaling:?} disagrees with rope_parameters' {new_scaling:?} (one spelling, or the same values)"),
            ));
        }
        let rope_scaling = old_scaling.or(new_scaling);
        if flag("use_sliding_window")? {
            return Err(bad("use_sliding_window", "sliding-window attention is not supported"));
        }
        if flag("mlp_bias")? {
            return Err(bad("mlp_bias", "MLP biases are not supported"));
        }
        if let Some(act) = v["hidden_act"].as_str() {
            if act != "silu" {
                return Err(bad("hidden_act", &format!("`{act}`: only silu (SwiGLU) is supported")));
            }
        }
        let token_ids = |key: &str| config_token_ids(&v, key).map_err(|e| bad(key, &e));
        // transformers' defaults when the key is absent: LlamaConfig 2048, Qwen2Config 32768.
        let default_positions = if model_type == "qwen2" { 32_768 } else { 2_048 };
        let cfg = DenseConfig {
            attention_bias: model_type == "qwen2" || flag("attention_bias")?,
            model_type,
            vocab_size: usize_key("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: usize_key("intermediate_size")?,
            num_hidden_layers: usize_key("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: number("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: count("max_position_embeddings", default_positions)?,
            tie_word_embeddings: flag("tie_word_embeddings")?,
            initializer_range: number("initializer_range", 0.02)?,
            bos_token_id: token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: token_ids("eos_token_id")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        Self::from_json(&text, path)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::Config { key: key.into(), msg });
        use crate::config::{check_bounds, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH};
        check_bounds([
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH),
            ("num_attention_heads", self.num_attention_heads, MAX_WIDTH),
            ("num_key_value_heads", self.num_key_value_heads, MAX_WIDTH),
            ("head_dim", self.head_dim, MAX_WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
        ])?;
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            );
        }
        if self.head_dim % 2 != 0 {
            return bad("head_dim", format!("{} must be even for RoPE", self.head_dim));
        }
        for (key, v) in [("rope_theta", self.rope_theta), ("initializer_range", self.initializer_range)] {
            if !(v.is_finite() && v > 0.0) {
                return bad(key, format!("{v} must be a positive finite number"));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad("rms_norm_eps", format!("{} must be finite and >= 0", self.rms_norm_eps));
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings", "must be at least 1".into());
        }
        Ok(())
    }

    /// A small Qwen2-style student for the embedded tasks (tied head, q/k/v biases).
    pub fn student(vocab_size: usize) -> Self {
        DenseConfig {
            model_type: "qwen2".into(),
            vocab_size,
            hidden_size: 96,
            intermediate_size: 256,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 24,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 256,
            tie_word_embeddings: true,
            attention_bias: true,
            initializer_range: 0.02,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    /// HF config.json for this config.
    pub fn to_json_string(&self) -> String {
        let arch = if self.model_type == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" };
        let v = serde_json::json!({
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => serde_json::json!(one),
                many => serde_json::json!(many),
            },
        });
        serde_json::to_string_pretty(&v).expect("json")
    }

    /// Total parameters.
    pub fn param_count(&self) -> usize {
        let (d, h, kv, hd) = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim);
        let qkv_bias = if self.attention_bias { h * hd + 2 * kv * hd } else { 0 };
        let attn = d * h * hd * 2 + d * kv * hd * 2 + qkv_bias + if self.o_proj_bias() { d } else { 0 };
        let layer = attn + 3 * d * self.intermediate_size + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * d };
        self.vocab_size * d + self.num_hidden_layers * layer + d + head
    }

    /// Cached elements per token per layer (K and V of the key/value heads).
    pub fn cache_elements_per_token(&self) -> usize {
        2 * self.num_key_value_heads * self.head_dim
    }
}

/// `y = x W^T + b`.
#[derive(Debug, Clone)]
pub struct BiasedLinear {
    pub linear: Linear,
    pub bias: Option<Tensor>,
}

impl BiasedLinear {
    fn new(b: &mut ParamBuilder<'_>, name: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let linear = Linear::new(b, name, in_dim, out_dim)?;
        let bias = if bias { Some(b.zeros(&format!("{name}.bias"), &[out_dim])?) } else { None };
        Ok(BiasedLinear { linear, bias })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.linear.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.add(&in_dtype_of(b, &y)?)?,
            None => y,
        })
    }
}

#[derive(Debug, Clone)]
pub struct DenseAttention {
    pub q_proj: BiasedLinear,
    pub k_proj: BiasedLinear,
    pub v_proj: BiasedLinear,
    pub o_proj: BiasedLinear,
    pub rotary: RotaryEmbedding,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl DenseAttention {
    fn new(b: &mut ParamBuilder<'_>, cfg: &DenseConfig) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let (h, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(DenseAttention {
            q_proj: BiasedLinear::new(b, "q_proj", d, h * hd, cfg.attention_bias)?,
            k_proj: BiasedLinear::new(b, "k_proj", d, kv * hd, cfg.attention_bias)?,
            v_proj: BiasedLinear::new(b, "v_proj", d, kv * hd, cfg.attention_bias)?,
            o_proj: BiasedLinear::new(b, "o_proj", h * hd, d, cfg.o_proj_bias())?,
            rotary: RotaryEmbedding::dense(hd, cfg.rope_theta, cfg.rope_scaling.as_ref()),
            heads: h,
            kv_heads: kv,
            head_dim: hd,
        })
    }

    /// Causal attention of `x` (tokens at `positions`) over the cached keys/values and its own,
    /// extending the cache.
    fn forward(&self, x: &Tensor, positions: &[usize], cache: &mut Option<LayerCache>) -> Result<Tensor> {
        let (b, s) = (x.dims()[0], x.dims()[1]);
        let hd = self.head_dim;
        let split = |t: Tensor, heads: usize| -> Result<Tensor> { Ok(t.reshape(&[b, s, heads, hd])?) };
        let q = self.rotary.apply(&split(self.q_proj.forward(x)?, self.heads)?, positions)?;
        let k = self.rotary.apply(&split(self.k_proj.forward(x)?, self.kv_heads)?, positions)?;
        let v = split(self.v_proj.forward(x)?, self.kv_heads)?;
        let to_heads = |t: &Tensor| -> Result<Tensor> { Ok(t.transpose(1, 2)?.contiguous()?) };
        let (k, v) = LayerCache::extend_naive(cache, to_heads(&k)?, to_heads(&v)?)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let o = Tensor::scaled_dot_product_attention(&to_heads(&q)?, &k, &v, scale, true)?;
        self.o_proj.forward(&o.transpose(1, 2)?.reshape(&[b, s, self.heads * hd])?)
    }
}

#[derive(Debug, Clone)]
pub struct DenseLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: DenseAttention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: SwiGluMlp,
    /// The sublayers a training forward recomputes in the backward ([`DenseLayer::set_recompute`]).
    recompute: Recompute,
}

impl DenseLayer {
    /// Recomputes these sublayers in the backward (see [`Recompute`]).
    pub fn set_recompute(&mut self, recompute: Recompute) {
        self.recompute = recompute;
    }

    /// What [`DenseLayer::set_recompute`] last set.
    pub fn recompute(&self) -> Recompute {
        self.recompute
    }

    /// `h += attention(norm(h))`, then `h += mlp(norm(h))`. `cache`: the layer's decoding cache,
    /// extended; `None`: a training forward (which may recompute, see [`Recompute`]).
    fn forward(&self, h: &Tensor, positions: &[usize], cache: Option<&mut Option<LayerCache>>) -> Result<Tensor> {
        let a = match cache {
            Some(slot) => self.self_attn.forward(&self.input_layernorm.forward(h)?, positions, slot)?,
            None => {
                let (norm, attn, at) = (self.input_layernorm.clone(), self.self_attn.clone(), positions.to_vec());
                let sublayer = move |h: &Tensor| attn.forward(&norm.forward(h)?, &at, &mut None);
                recomputed(self.recompute.attention, "attention sublayer", h, sublayer)?
            }
        };
        let h = h.add(&a)?;
        let (norm, mlp) = (self.post_attention_layernorm.clone(), self.mlp.clone());
        let f = recomputed(self.recompute.mlp, "MLP sublayer", &h, move |h: &Tensor| mlp.forward(&norm.forward(h)?))?;
        Ok(h.add(&f)?)
    }
}

/// A Llama / Qwen2 causal language model.
#[derive(Debug)]
pub struct DenseModel {
    pub config: DenseConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DenseLayer>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    pub params: ParamStore,
    pub compute_dtype: DType,
}

impl DenseModel {
    pub fn new(config: DenseConfig, seed: u64) -> Result<Self> {
        let std = config.initializer_range as f32;
        Self::build(config, WeightSource::Random { rng: Rng::new(seed), std })
    }

    /// An HF Qwen2 or Llama checkpoint directory (config.json + safetensors, single or sharded).
    pub fn from_pretrained(dir: &Path) -> Result<Self> {
        let config = DenseConfig::from_file(&dir.join("config.json"))?;
        let (tensors, files) = checkpoint::load_dir(dir)?;
        Self::from_tensors(config, tensors, files)
    }

    /// A model from named tensors (`files`, or one path, is named in errors).
    pub fn from_tensors(
        config: DenseConfig,
        mut tensors: BTreeMap<String, Tensor>,
        files: impl Into<TensorFiles>,
    ) -> Result<Self> {
        if config.tie_word_embeddings {
            // Some tied checkpoints store the head anyway; it is the embedding.
            tensors.remove("lm_head.weight");
        }
        tensors.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
        Self::build(config, WeightSource::Loaded { files: files.into(), tensors })
    }

    fn build(config: DenseConfig, mut source: WeightSource) -> Result<Self> {
        config.validate()?;
        let (mut params, mut buffers) = (ParamStore::new(), BTreeMap::new());
        let mut root = ParamBuilder::new(&mut params, &mut buffers, &mut source);
        let (d, v) = (config.hidden_size, config.vocab_size);
        let (embed_tokens, layers, norm) = {
            let mut m = root.sub("model");
            let embed = m.weight("embed_tokens.weight", &[v, d])?;
            let layers = (0..config.num_hidden_layers)
                .map(|i| {
                    let mut l = m.sub(&format!("layers.{i}"));
                    Ok(DenseLayer {
                        input_layernorm: RmsNorm::new(&mut l, "input_layernorm", d, config.rms_norm_eps)?,
                        self_attn: DenseAttention::new(&mut l.sub("self_attn"), &config)?,
                        post_attention_layernorm: RmsNorm::new(
                            &mut l,
                            "post_attention_layernorm",
                            d,
                            config.rms_norm_eps,
                        )?,
                        mlp: SwiGluMlp::new(&mut l.sub("mlp"), d, config.intermediate_size)?,
                        recompute: Recompute::default(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let norm = RmsNorm::new(&mut m, "norm", d, config.rms_norm_eps)?;
            (embed, layers, norm)
        };
        let lm_head = if config.tie_word_embeddings {
            Linear::tied(embed_tokens.clone())
        } else {
            Linear::new(&mut root, "lm_head", d, v)?
        };
        source.check_all_used()?;
        Ok(DenseModel { config, embed_tokens, layers, norm, lm_head, params, compute_dtype: DType::F32 })
    }

    /// Recomputes these sublayers of every layer in the backward instead of keeping their
    /// activations (see [`Recompute`]).
    pub fn set_recompute(&mut self, recompute: Recompute) {
        self.layers.iter_mut().for_each(|l| l.set_recompute(recompute));
    }

    /// What [`DenseModel::set_recompute`] last set (read from the first layer).
    pub fn recompute(&self) -> Recompute {
        self.layers.first().map(DenseLayer::recompute).unwrap_or_default()
    }

    /// Hidden states after the final norm, continuing `cache` (`None`: a fresh full sequence).
    fn run(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let mut h = self.embed_tokens.embedding(ids)?.to_dtype(self.compute_dtype)?;
        match cache {
            Some(cache) => {
                cache.fit(self.layers.len())?;
                let start = cache.len();
                let positions: Vec<usize> = (start..start + ids.dims()[1]).collect();
                for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
                    h = layer.forward(&h, &positions, Some(slot))?;
                }
            }
            None => {
                let positions: Vec<usize> = (0..ids.dims()[1]).collect();
                for layer in &self.layers {
                    h = layer.forward(&h, &positions, None)?;
                }
            }
        }
        self.norm.forward(&h)
    }

    /// Final-norm hidden states `[batch, seq, hidden]`.
    pub fn hidden_states(&self, ids: &Tensor) -> Result<Tensor> {
        self.run(ids, None)
    }

    /// Logits `[batch, seq, vocab]` in f32.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(&self.hidden_states(ids)?)?.to_dtype(DType::F32)?)
    }

    /// Logits for `ids` continuing the cached positions.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        crate::generate::decoding_only("DenseModel::forward_cached")?;
        Ok(self.lm_head.forward(&self.run(ids, Some(cache))?)?.to_dtype(DType::F32)?)
    }

    /// [`DenseModel::forward_cached`]'s logits of the last position only, `[batch, 1, vocab]`
    /// (a prompt's prefill: HF's `logits_to_keep = 1`).
    pub fn forward_cached_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        crate::generate::decoding_only("DenseModel::forward_cached")?;
        let last = crate::generate::last_position(&self.run(ids, Some(cache))?)?;
        Ok(self.lm_head.forward(&last)?.to_dtype(DType::F32)?)
    }

    /// Writes `config.json` and `model.safetensors` (HF names; a tied head is not stored).
    pub fn save_pretrained(&self, dir: &Path, dtype: SaveDType) -> Result<()> {
        let state: BTreeMap<String, Tensor> = self.params.iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
        checkpoint::save_model_dir(dir, &self.config.to_json_string(), &state, dtype)
    }
}
