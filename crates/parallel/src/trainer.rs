//! The training engine: one `train_step` = micro-batches with gradient accumulation, clipping,
//! AdamW at the scheduled learning rate, the MoE bias update from the step's whole-batch expert
//! load, and a metrics line. Non-finite losses or gradients are caught before the update and
//! reported with the layer where they first appear. Checkpoints are directories written to a
//! temporary path and renamed into place; `resume` continues bit-identically.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use whale_model::checkpoint::{
    complete_checkpoint, load_file, save_file, write_atomically, write_dir_atomically, write_json_synced, SaveDType,
};
use whale_model::moe::RealTokens;
use whale_model::nn::Recompute;
use whale_model::tensor::fp8::Fp8Recipe;
use whale_model::tensor::optim::{
    clip_grad_norm, AdamW, AdamWConfig, DeepSeekV3Schedule, Ema, LrSchedule, WarmupCosine,
};
use whale_model::tensor::{no_grad, DType, Device, Rng, Tensor};
use whale_model::{DeepSeekV3, IGNORE_INDEX};

use crate::{Error, Result};

/// How a model computes in training. Master weights, gradients, the router, losses and the
/// optimizer stay f32 in all three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    /// Activations and GEMMs in bf16.
    Bf16,
    /// DeepSeek-V3's recipe (spec 4.2): activations in bf16 and the three GEMMs of every
    /// attention projection and MLP/expert linear layer in FP8 E4M3 with fine-grained scales.
    Fp8,
}

impl Precision {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "fp32" | "f32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            "fp8" => Ok(Precision::Fp8),
            other => Err(Error::Train(format!("unknown precision `{other}` (fp32, bf16, fp8)"))),
        }
    }

    /// Sets the model's compute dtype and FP8 GEMMs for this precision.
    pub fn apply(self, model: &mut DeepSeekV3) {
        model.compute_dtype = match self {
            Precision::Fp32 => DType::F32,
            Precision::Bf16 | Precision::Fp8 => DType::BF16,
        };
        model.set_fp8((self == Precision::Fp8).then(Fp8Recipe::default));
    }
}

/// The dtype AdamW keeps its two moments in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MomentPrecision {
    Fp32,
    /// DeepSeek-V3's choice (spec 4.2): half the optimizer memory.
    Bf16,
}

impl MomentPrecision {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "fp32" | "f32" => Ok(MomentPrecision::Fp32),
            "bf16" => Ok(MomentPrecision::Bf16),
            other => Err(Error::Train(format!("unknown optimizer moment precision `{other}` (fp32, bf16)"))),
        }
    }
}

/// The shape of the learning rate over a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrShape {
    /// Linear warmup, then cosine from `lr` to `min_lr` at the last step.
    #[default]
    Cosine,
    /// DeepSeek-V3's (spec 6.2) on the run's steps: warmup, `lr` held for 10/14.8 of the run,
    /// cosine to `min_lr` by 14.3/14.8, `min_lr` to 14.633/14.8, then `min_lr` x 7.3/22.
    DeepseekV3,
}

impl LrShape {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cosine" => Ok(LrShape::Cosine),
            "deepseek-v3" => Ok(LrShape::DeepseekV3),
            other => Err(Error::Train(format!("unknown learning-rate schedule `{other}` (cosine, deepseek-v3)"))),
        }
    }
}

/// What to do with a step whose loss or gradient is not finite: stop with an error naming the
/// step and where the value first appears (the default), or skip the step (at most
/// [`MAX_SKIPS_IN_A_ROW`] in a row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinitePolicy {
    /// Drop the step's gradients and continue (the step counts, nothing is updated).
    Skip,
    /// Return an error.
    Stop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub steps: u64,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub seq_len: usize,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub grad_clip: f64,
    pub precision: Precision,
    /// AdamW's moments: fp32 or bf16.
    pub moments: MomentPrecision,
    /// Steps between checkpoints (0: only at the end).
    pub checkpoint_every: u64,
    pub seed: u64,
    pub on_non_finite: NonFinitePolicy,
    /// From this step of the schedule's clock on (the step itself without a batch ramp:
    /// [`TrainConfig::schedule_position`]) the MoE balancing biases stay where they are:
    /// DeepSeek-V3 sets the bias update speed to 0 for its last 500B of 14.8T tokens (TR 4.2).
    /// None: they move every step.
    pub freeze_bias_at: Option<u64>,
    pub lr_schedule: LrShape,
    /// From this step of the schedule's clock on the MTP loss weight is this value instead of
    /// config.json's `mtp_loss_weight` (DeepSeek-V3: 0.3 for its first 10T of 14.8T tokens, then 0.1, TR 4.2).
    pub mtp_weight_from: Option<(u64, f64)>,
    /// The sublayers recomputed in the backward instead of kept (the same gradients, less
    /// memory; a resumed run may change it).
    pub recompute: Recompute,
    /// Keep an exponential moving average of the parameters with this decay (DeepSeek-V3's EMA
    /// in host memory, TR 3.2.3; on a mesh, rank 0 keeps it). None: no average.
    pub ema_decay: Option<f64>,
    /// Send the MoE layers' dispatch in FP8 (DeepSeek-V3's low-precision communication, TR
    /// 3.3.2: tokens and the gradients back to the experts as E4M3 with power-of-two scales, the
    /// combine in high precision): rounded alike on one rank and under expert parallelism.
    pub fp8_dispatch: bool,
    /// Keep the MoE experts' SwiGLU inputs in FP8 and recompute the SwiGLU output in the
    /// backward (DeepSeek-V3's memory saver, TR 3.3.2; [`whale_model::nn::SwiGluMlp`]): with
    /// `precision` fp8 only.
    pub fp8_swiglu_cache: bool,
    /// Grow the batch over the run's first sequences (DeepSeek-V3's batch-size schedule); None:
    /// every step takes `grad_accum` micro-batches per replica.
    pub batch_ramp: Option<BatchRamp>,
}

/// DeepSeek-V3's batch-size schedule (TR 4.2: 3072 sequences a step, growing to 15360 over the
/// first 469B tokens), by Megatron-LM's rule for `--rampup-batch-size`: the ramp rises in
/// `(grad_accum - start) / increment` equal increments over its `sequences`, so a step that begins
/// after `consumed` sequences (over all replicas) takes
/// `start + increment * floor(consumed / (sequences / increments))` micro-batches per replica,
/// and `grad_accum` once `consumed` is past `sequences`. The losses stay means over the step's
/// sequences; after its warmup the learning-rate schedule counts sequences
/// ([`TrainConfig::schedule_position`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRamp {
    /// Micro-batches per replica in the first step: at least 1, fewer than `grad_accum`.
    pub start: usize,
    /// Micro-batches per replica each increment adds (dividing `grad_accum - start`): 2 keeps
    /// an even start even, as DualPipe needs.
    pub increment: usize,
    /// Sequences, over all replicas, the ramp spans.
    pub sequences: u64,
}

impl BatchRamp {
    /// Micro-batches per replica of a step that begins after `consumed` sequences.
    pub fn micro_batches(&self, consumed: u64, grad_accum: usize) -> usize {
        let increments = grad_accum.saturating_sub(self.start) / self.increment.max(1);
        if consumed > self.sequences || increments == 0 {
            return grad_accum;
        }
        let per_increment = self.sequences as f64 / increments as f64;
        (self.start + self.increment * (consumed as f64 / per_increment) as usize).min(grad_accum)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 1000,
            micro_batch: 16,
            grad_accum: 1,
            seq_len: 64,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup: 30,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: 1.0,
            precision: Precision::Fp32,
            moments: MomentPrecision::Fp32,
            checkpoint_every: 0,
            seed: 0,
            on_non_finite: NonFinitePolicy::Stop,
            freeze_bias_at: None,
            lr_schedule: LrShape::Cosine,
            mtp_weight_from: None,
            recompute: Recompute::default(),
            ema_decay: None,
            fp8_dispatch: false,
            fp8_swiglu_cache: false,
            batch_ramp: None,
        }
    }
}

/// The most token positions one batch may hold: the CUDA kernels count rows in 32-bit ints.
pub const MAX_BATCH_TOKENS: usize = i32::MAX as usize;

/// `rows` rows of `row_len` tokens as one batch: an error, saying why, past
/// [`MAX_BATCH_TOKENS`] (such a setting would fail in its first allocation, taking the process
/// with it, instead of at its check).
pub fn check_batch_tokens(rows: usize, row_len: usize) -> std::result::Result<(), String> {
    match rows.checked_mul(row_len) {
        Some(n) if n <= MAX_BATCH_TOKENS => Ok(()),
        _ => Err(format!(
            "{rows} rows of {row_len} tokens is more than the {MAX_BATCH_TOKENS} positions a batch may hold"
        )),
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, why: &str| Err(Error::Train(format!("train config `{k}`: {why}")));
        if self.micro_batch == 0 {
            return bad("micro_batch", "must be at least 1");
        }
        if let Err(why) = check_batch_tokens(self.micro_batch, self.seq_len) {
            return bad("micro_batch", &why);
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be at least 1");
        }
        if let Some(r) = self.batch_ramp {
            if r.start == 0 || r.start >= self.grad_accum {
                let why = format!(
                    "starts at {} micro-batches, which must be in [1, grad_accum {})",
                    r.start, self.grad_accum
                );
                return bad("batch_ramp", &why);
            }
            if r.increment == 0 || (self.grad_accum - r.start) % r.increment != 0 {
                let (inc, rise) = (r.increment, self.grad_accum - r.start);
                return bad(
                    "batch_ramp",
                    &format!("an increment of {inc} micro-batches does not divide the rise of {rise}"),
                );
            }
            if r.sequences == 0 {
                return bad("batch_ramp", "must span at least one sequence");
            }
        }
        if self.fp8_swiglu_cache && self.precision != Precision::Fp8 {
            let why = format!("keeps FP8 experts' SwiGLU inputs in FP8: precision fp8 only, not {:?}", self.precision);
            return bad("fp8_swiglu_cache", &why);
        }
        if let Some(d) = self.ema_decay.filter(|d| !(*d > 0.0 && *d < 1.0)) {
            return bad("ema_decay", &format!("{d} is not in (0, 1)"));
        }
        if self.seq_len < 2 {
            return bad("seq_len", "must be at least 2");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", "must be a positive number");
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad("min_lr", "must be in [0, lr]");
        }
        if self.grad_clip.is_nan() || self.grad_clip <= 0.0 {
            return bad("grad_clip", "must be positive");
        }
        if self.mtp_weight_from.is_some_and(|(_, w)| !(w.is_finite() && w >= 0.0)) {
            return bad("mtp_weight_from", "the weight must be a non-negative number");
        }
        AdamW::new(self.adamw())?;
        Ok(())
    }

    fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: 1e-8,
            weight_decay: self.weight_decay,
            decay_1d: false,
            moment_dtype: match self.moments {
                MomentPrecision::Fp32 => DType::F32,
                MomentPrecision::Bf16 => DType::BF16,
            },
        }
    }

    /// Micro-batches per replica of a step that begins after `consumed` sequences (over all
    /// replicas): `grad_accum`, or where the [`BatchRamp`] has got to by then.
    pub fn micro_batches_after(&self, consumed: u64) -> usize {
        self.batch_ramp.map_or(self.grad_accum, |r| r.micro_batches(consumed, self.grad_accum))
    }

    /// Every count of micro-batches per replica a step of this run may take (the ramp's, then
    /// `grad_accum`), for checks that depend on it (a pipeline schedule's).
    pub fn micro_batch_counts(&self) -> Vec<usize> {
        match self.batch_ramp {
            Some(r) => (r.start..=self.grad_accum).step_by(r.increment.max(1)).collect(),
            None => vec![self.grad_accum],
        }
    }

    /// Sequences, over `replicas` replicas, the run's first `steps` steps take (skipped steps
    /// too): `steps` full batches, less what a batch ramp leaves out of its steps.
    pub fn sequences_in(&self, steps: u64, replicas: usize) -> u64 {
        let per_micro_batch = (self.micro_batch * replicas) as u64;
        let (mut consumed, mut step) = (0u64, 0u64);
        while step < steps {
            let n = self.micro_batches_after(consumed);
            if n == self.grad_accum {
                // Past the ramp every step is a full batch (the count never falls again).
                let rest = (steps - step).saturating_mul(per_micro_batch * n as u64);
                return consumed.saturating_add(rest);
            }
            consumed += per_micro_batch * n as u64;
            step += 1;
        }
        consumed
    }

    /// Where the learning-rate schedule, and the switches placed on its steps
    /// (`mtp_weight_from`, `freeze_bias_at`), are at `step` of a run on `replicas` replicas that
    /// has taken `consumed` sequences. Without a batch ramp that is the step. Under one, as
    /// DeepSeek-V3 (TR 4.2: warmup over its first 2K steps, then the decay placed by tokens),
    /// warmup counts steps and the rest counts sequences: `warmup + (steps - warmup) * f`, where
    /// `f` is the share of the sequences between the warmup's end and the run's end taken so far.
    /// The last step of the warmup and the run's end are where they would be without a ramp.
    pub fn schedule_position(&self, step: u64, consumed: u64, replicas: usize) -> f64 {
        if self.batch_ramp.is_none() || step < self.warmup || self.steps <= self.warmup {
            return step as f64;
        }
        let from = self.sequences_in(self.warmup, replicas);
        let span = self.sequences_in(self.steps, replicas).saturating_sub(from).max(1);
        let share = consumed.saturating_sub(from) as f64 / span as f64;
        self.warmup as f64 + (self.steps - self.warmup) as f64 * share
    }

    /// The learning rate of `step` after `consumed` sequences on `replicas` replicas: the
    /// schedule at [`TrainConfig::schedule_position`].
    pub fn lr_at(&self, step: u64, consumed: u64, replicas: usize) -> f32 {
        self.schedule().lr_at(self.schedule_position(step, consumed, replicas))
    }

    pub fn schedule(&self) -> Box<dyn LrSchedule> {
        let (peak, min, warmup, total) = (self.lr, self.min_lr, self.warmup, self.steps);
        match self.lr_schedule {
            LrShape::Cosine => Box::new(WarmupCosine { peak, min, warmup, total }),
            LrShape::DeepseekV3 => Box::new(DeepSeekV3Schedule::shaped(peak, min, total, warmup)),
        }
    }

    /// The MTP loss weight at `position` on the schedule's clock
    /// ([`TrainConfig::schedule_position`]) for a model whose config says `configured`.
    pub fn mtp_weight(&self, position: f64, configured: f64) -> f64 {
        match self.mtp_weight_from {
            Some((from, w)) if position >= from as f64 => w,
            _ => configured,
        }
    }
}

/// Where training batches come from. Its state goes into checkpoints so a resumed run reads the
/// same batches.
pub trait DataSource: Send {
    /// The next micro-batch: `(input_ids, targets)`, both `[batch, seq]`, targets aligned with
    /// positions (`IGNORE_INDEX` to skip). A row's tokens are the positions up to its last
    /// target; the rest is padding, which the MoE layers leave out of their loads and balance
    /// losses ([`RealTokens::from_targets`]).
    fn next_batch(&mut self, batch: usize, seq: usize) -> Result<(Tensor, Tensor)>;
    fn state(&self) -> Value;
    fn restore(&mut self, state: &Value) -> Result<()>;
}

/// Synthetic token walks, for tests and benchmarks that need data without a corpus: each sequence
/// starts at a random token and moves up by 1 to `max_step` (uniformly) per token, modulo
/// `vocab`. With `max_step` 1 the stream is fully learnable; with 3 no model does better than
/// ln 3 nats per token, so a trained loss plateaus rather than reaching 0.
#[derive(Debug, Clone)]
pub struct TokenWalk {
    pub rng: Rng,
    pub vocab: u64,
    pub max_step: u64,
}

impl DataSource for TokenWalk {
    fn next_batch(&mut self, batch: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        let (mut x, mut y) = (Vec::with_capacity(batch * seq), Vec::with_capacity(batch * seq));
        for _ in 0..batch {
            let mut t = self.rng.below(self.vocab);
            for _ in 0..seq {
                let step = if self.max_step > 1 { 1 + self.rng.below(self.max_step) } else { 1 };
                let next = (t + step) % self.vocab;
                x.push(t as i64);
                y.push(next as i64);
                t = next;
            }
        }
        let dev = Device::Cpu;
        Ok((Tensor::from_vec(x, &[batch, seq], &dev)?, Tensor::from_vec(y, &[batch, seq], &dev)?))
    }

    fn state(&self) -> Value {
        json!({ "rng": self.rng.state() })
    }

    fn restore(&mut self, state: &Value) -> Result<()> {
        let s: [u64; 4] =
            serde_json::from_value(state["rng"].clone()).map_err(|e| Error::Train(format!("token walk state: {e}")))?;
        self.rng = Rng::from_state(s).map_err(|e| Error::Train(format!("token walk state: {e}")))?;
        Ok(())
    }
}

/// One optimizer step's measurements (a metrics line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub main_loss: f64,
    pub mtp_loss: Option<f64>,
    pub aux_loss: Option<f64>,
    pub lr: f32,
    /// The weight the loss gave the MTP loss (with MTP modules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtp_weight: Option<f64>,
    pub grad_norm: f64,
    /// The step's real tokens (padding left out), over the whole batch.
    #[serde(default)]
    pub tokens: usize,
    /// `tokens` per second of the step.
    pub tokens_per_s: f64,
    pub max_vio: Vec<f64>,
    pub expert_load: Vec<Vec<usize>>,
    pub skipped: bool,
}

/// What the forward/backward passes of a step measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Accumulated {
    pub loss: f64,
    pub main_loss: f64,
    pub mtp_loss: Option<f64>,
    pub aux_loss: Option<f64>,
    /// Per MoE layer, summed over micro-batches.
    pub loads: Vec<Vec<usize>>,
    /// A non-finite loss: (what, where it first appears).
    pub problem: Option<(String, String)>,
}

pub struct Trainer {
    pub model: DeepSeekV3,
    pub opt: AdamW,
    pub config: TrainConfig,
    /// Optimizer steps taken (the next step's index).
    pub step: u64,
    pub data: Box<dyn DataSource>,
    metrics: Option<File>,
    /// Steps skipped in a row for non-finite values (`NonFinitePolicy::Skip`).
    skipped_in_a_row: u64,
    /// Sequences the steps so far took, over all replicas (skipped steps too): where a
    /// [`BatchRamp`] is.
    consumed: u64,
    /// Data-parallel replicas the steps' batches are spread over (1 alone; set by the
    /// data-parallel wrappers): with `consumed`, where the schedule's clock is.
    replicas: usize,
    /// The parameters' moving average (`config.ema_decay`), blended in after each step taken.
    ema: Option<Ema>,
}

/// With `NonFinitePolicy::Skip`, this many skipped steps in a row stop the run: a transient
/// overflow skips a step, a diverged model would otherwise "train" to the end updating nothing.
pub const MAX_SKIPS_IN_A_ROW: u64 = 10;

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Trainer(step {} of {})", self.step, self.config.steps)
    }
}

/// The trainer state file of a checkpoint (its marker: a checkpoint without it is incomplete).
pub const TRAINER_FILE: &str = "trainer.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The parameters' moving average in a checkpoint (with `ema_decay`), by parameter name.
pub const EMA_FILE: &str = "ema.safetensors";

/// The first layer named in a parameter name (`model.layers.3.` -> `model.layers.3`).
fn layer_of(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        ["model", "layers", n, ..] => format!("model.layers.{n}"),
        _ => name.trim_end_matches(".weight").to_string(),
    }
}

fn non_finite(t: &Tensor) -> Result<bool> {
    Ok(t.to_vec_f32()?.iter().any(|x| !x.is_finite()))
}

impl Trainer {
    pub fn new(mut model: DeepSeekV3, config: TrainConfig, data: Box<dyn DataSource>) -> Result<Self> {
        config.validate()?;
        config.precision.apply(&mut model);
        model.set_recompute(config.recompute);
        model.set_fp8_dispatch(config.fp8_dispatch);
        model.set_fp8_swiglu_cache(config.fp8_swiglu_cache);
        let opt = AdamW::new(config.adamw())?;
        let ema = config.ema_decay.map(|d| Ema::new(d, &model.params)).transpose()?;
        let (step, consumed, replicas, skipped_in_a_row) = (0, 0, 1, 0);
        Ok(Trainer { model, opt, config, step, data, metrics: None, skipped_in_a_row, consumed, replicas, ema })
    }

    /// Drops the parameters' moving average: on a mesh every rank's weights are the same after
    /// each step, so rank 0's average is the run's and the others keep none.
    pub(crate) fn leave_ema_to_rank_zero(&mut self) {
        self.ema = None;
    }

    /// The parameters' moving average (`config.ema_decay`), if the run keeps one (on a mesh,
    /// rank 0's trainer does).
    pub fn ema(&self) -> Option<&Ema> {
        self.ema.as_ref()
    }

    /// A copy of the model on the host holding the parameters' moving average (with the model's
    /// balancing biases), or `None` without `ema_decay`.
    pub fn ema_model(&self) -> Result<Option<DeepSeekV3>> {
        let Some(ema) = &self.ema else { return Ok(None) };
        let model = self.model.to_device(&Device::Cpu)?;
        for (name, average) in ema.average()? {
            model.params.get(&name)?.assign(&average)?;
        }
        Ok(Some(model))
    }

    /// Recomputes these sublayers in the backward from the next step on (the same gradients:
    /// a resumed run may change it).
    pub fn set_recompute(&mut self, recompute: Recompute) {
        self.config.recompute = recompute;
        self.model.set_recompute(recompute);
    }

    /// Appends one JSON object per step to `path` (created if needed).
    pub fn log_metrics_to(&mut self, path: &Path) -> Result<()> {
        let f = OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::file(path, e))?;
        self.metrics = Some(f);
        Ok(())
    }

    pub fn done(&self) -> bool {
        self.step >= self.config.steps
    }

    /// The forward and backward passes of one step over its micro-batches
    /// ([`Trainer::micro_batches_now`]): gradients accumulate in the parameters (each
    /// micro-batch's loss divided by their number), nothing is updated.
    pub fn accumulate_gradients(&mut self) -> Result<Accumulated> {
        self.accumulate_micro_batches(self.micro_batches_now())
    }

    /// Micro-batches per replica the next step takes: `grad_accum`, or the batch ramp's count.
    pub fn micro_batches_now(&self) -> usize {
        self.config.micro_batches_after(self.consumed)
    }

    /// Sequences the steps so far took, over all replicas.
    pub fn consumed_sequences(&self) -> u64 {
        self.consumed
    }

    /// The next step's place on the learning-rate schedule's clock
    /// ([`TrainConfig::schedule_position`]).
    pub fn schedule_position(&self) -> f64 {
        self.config.schedule_position(self.step, self.consumed, self.replicas)
    }

    /// The learning rate the next step takes.
    pub fn scheduled_lr(&self) -> f32 {
        self.config.lr_at(self.step, self.consumed, self.replicas)
    }

    /// The steps' batches are spread over `replicas` data-parallel replicas (a wrapper's call).
    pub(crate) fn set_replicas(&mut self, replicas: usize) {
        self.replicas = replicas;
    }

    /// [`Trainer::accumulate_gradients`] over the next `n` micro-batches.
    pub(crate) fn accumulate_micro_batches(&mut self, n: usize) -> Result<Accumulated> {
        let cfg = self.config.clone();
        let scale = 1.0 / n as f64;
        let mut acc = Accumulated::default();
        for _ in 0..n {
            let (ids, targets) = self.data.next_batch(cfg.micro_batch, cfg.seq_len)?;
            // The MoE layers count the real tokens, not the padding after each row's last target.
            let real = RealTokens::from_targets(&targets, IGNORE_INDEX)?;
            let out = self.model.forward_counting(&ids, Some(&targets), Some(&real))?;
            let l = out.loss.expect("targets were given");
            let lv = l.to_scalar()? as f64;
            if !lv.is_finite() && acc.problem.is_none() {
                acc.problem = Some(("loss".into(), self.locate_in_forward(&ids)?));
            }
            acc.loss += lv * scale;
            acc.main_loss += out.main_loss.expect("targets").to_scalar()? as f64 * scale;
            if let Some(m) = out.mtp_loss {
                *acc.mtp_loss.get_or_insert(0.0) += m.to_scalar()? as f64 * scale;
            }
            if let Some(a) = out.aux_loss {
                *acc.aux_loss.get_or_insert(0.0) += a.to_scalar()? as f64 * scale;
            }
            if acc.loads.is_empty() {
                acc.loads = out.expert_load.iter().map(|l| vec![0; l.len()]).collect();
            }
            for (a, l) in acc.loads.iter_mut().zip(&out.expert_load) {
                a.iter_mut().zip(l).for_each(|(a, b)| *a += b);
            }
            if acc.problem.is_none() {
                l.mul_scalar(scale as f32)?.backward()?;
            }
        }
        Ok(acc)
    }

    /// The mean main (next-token) loss over `batches` micro-batches of `data`, without
    /// gradients: a held-out loss when `data` is a stream the run does not train on.
    pub fn held_out_loss(&self, data: &mut dyn DataSource, batches: usize) -> Result<f64> {
        let mut total = 0.0;
        for _ in 0..batches {
            let (x, y) = data.next_batch(self.config.micro_batch, self.config.seq_len)?;
            let out = no_grad(|| self.model.forward(&x, Some(&y)))?;
            let loss = out.main_loss.ok_or_else(|| Error::Train("the forward returned no loss".into()))?;
            total += loss.to_scalar()? as f64;
        }
        Ok(total / batches.max(1) as f64)
    }

    /// What a step's forward passes take from the schedule's clock (every way of taking a step
    /// calls this first): the scheduled MTP loss weight.
    pub(crate) fn begin_step(&mut self) {
        self.model.mtp_loss_weight =
            self.config.mtp_weight(self.schedule_position(), self.model.config.mtp_loss_weight);
    }

    /// One optimizer step.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        self.begin_step();
        let t0 = Instant::now();
        let cfg = self.config.clone();
        let micro_batches = self.micro_batches_now();
        let mut acc = self.accumulate_micro_batches(micro_batches)?;
        let grad_norm =
            if acc.problem.is_none() { clip_grad_norm(&self.model.params, cfg.grad_clip)? } else { f64::NAN };
        if acc.problem.is_none() && !grad_norm.is_finite() {
            acc.problem = Some(("gradient".into(), self.locate_in_gradients()?));
        }
        self.finish_step(acc, grad_norm, cfg.micro_batch * micro_batches, t0, |t, lr| {
            Ok(t.opt.step(&t.model.params, lr)?)
        })
    }

    /// The end of a step whose gradients are final (summed over ranks, scaled and clipped), shared
    /// by every way of computing them: a step with a problem drops its gradients and is skipped
    /// or stopped as the config says; otherwise `update` runs the optimizer at the scheduled
    /// learning rate and the balancing biases move by the step's whole-batch load (until
    /// `freeze_bias_at`). Then the
    /// metrics line (`sequences` in the whole batch) is written and the step counted.
    pub(crate) fn finish_step(
        &mut self,
        mut measured: Accumulated,
        grad_norm: f64,
        sequences: usize,
        started: Instant,
        update: impl FnOnce(&mut Trainer, f32) -> Result<()>,
    ) -> Result<StepMetrics> {
        // The clock places the run's steps by the replicas it was told of.
        debug_assert_eq!(sequences, self.config.micro_batch * self.micro_batches_now() * self.replicas);
        let position = self.schedule_position();
        let lr = self.config.schedule().lr_at(position);
        let skipped = measured.problem.is_some();
        self.consumed += sequences as u64;
        if let Some((what, location)) = measured.problem.take() {
            self.model.params.zero_grad();
            self.skipped_in_a_row += 1;
            if self.config.on_non_finite == NonFinitePolicy::Stop {
                return Err(Error::NonFinite { step: self.step, what, location });
            }
            if self.skipped_in_a_row >= MAX_SKIPS_IN_A_ROW {
                let what = format!("{what} (the {MAX_SKIPS_IN_A_ROW}th step skipped in a row)");
                return Err(Error::NonFinite { step: self.step, what, location });
            }
            eprintln!("warning: step {}: non-finite {what} first appears in {location}; step skipped", self.step);
        } else {
            self.skipped_in_a_row = 0;
            update(self, lr)?;
            if self.config.freeze_bias_at.is_none_or(|at| position < at as f64) {
                self.model.update_balancing_biases(&measured.loads)?;
            }
            if let Some(ema) = &mut self.ema {
                ema.update(&self.model.params)?;
            }
            self.model.params.zero_grad();
        }
        // Real tokens, not padded positions: each routes top-k experts in the first MoE layer,
        // whose whole-batch load counts real tokens only (positions without an MoE layer).
        let top_k = self.model.config.num_experts_per_tok;
        let tokens = match measured.loads.first() {
            Some(load) if top_k > 0 => load.iter().sum::<usize>() / top_k,
            _ => sequences * self.config.seq_len,
        };
        let m = StepMetrics {
            step: self.step,
            loss: measured.loss,
            main_loss: measured.main_loss,
            mtp_loss: measured.mtp_loss,
            aux_loss: measured.aux_loss,
            lr,
            mtp_weight: measured.mtp_loss.map(|_| self.model.mtp_loss_weight),
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
            max_vio: DeepSeekV3::max_violations(&measured.loads),
            expert_load: measured.loads,
            skipped,
        };
        self.step += 1;
        if let Some(f) = &mut self.metrics {
            let line = serde_json::to_string(&m).map_err(|e| Error::Train(e.to_string()))?;
            writeln!(f, "{line}").map_err(|e| Error::Train(format!("metrics: {e}")))?;
        }
        Ok(m)
    }

    /// Re-runs the forward without gradients, checking each stage for non-finite values.
    fn locate_in_forward(&self, ids: &Tensor) -> Result<String> {
        no_grad(|| -> Result<String> {
            let seq = ids.dims()[1];
            let positions: Vec<usize> = (0..seq).collect();
            let mut h = self.model.embed(ids)?;
            if non_finite(&h)? {
                return Ok("model.embed_tokens".into());
            }
            for (i, layer) in self.model.layers.iter().enumerate() {
                h = layer.forward(&h, &positions, None)?.hidden;
                if non_finite(&h)? {
                    return Ok(format!("model.layers.{i}"));
                }
            }
            let logits = self.model.lm_head.forward(&self.model.norm.forward(&h)?)?;
            Ok(if non_finite(&logits)? {
                "model.norm / lm_head".into()
            } else {
                "the loss (MTP or balance terms)".into()
            })
        })
    }

    /// The layer of the deepest parameter with a non-finite gradient (where backward met it first).
    fn locate_in_gradients(&self) -> Result<String> {
        let mut found: Option<(usize, String)> = None;
        for (name, p) in self.model.params.iter() {
            if let Some(g) = p.grad() {
                if non_finite(&g)? {
                    let layer = layer_of(name);
                    let depth = layer.strip_prefix("model.layers.").and_then(|n| n.parse().ok()).unwrap_or(usize::MAX);
                    if found.as_ref().is_none_or(|(d, _)| depth > *d || *d == usize::MAX) {
                        found = Some((depth, layer));
                    }
                }
            }
        }
        Ok(found.map_or_else(|| "an unknown parameter".into(), |(_, l)| l))
    }

    /// Writes a checkpoint directory at `dir` atomically (see [`write_dir_atomically`]), with
    /// `trainer.json` last.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        write_dir_atomically(dir, |tmp| {
            self.model.save_pretrained(tmp, SaveDType::F32)?;
            let opt: std::collections::BTreeMap<String, Tensor> = self.opt.state_tensors()?.into_iter().collect();
            save_file(&tmp.join(OPTIMIZER_FILE), &opt, SaveDType::F32)?;
            if let Some(ema) = &self.ema {
                save_file(&tmp.join(EMA_FILE), &ema.average()?, SaveDType::F32)?;
            }
            let state = json!({
                "step": self.step,
                "optimizer_steps": self.opt.steps(),
                // A resumed run counts a streak of skipped steps on from where it was.
                "skipped_in_a_row": self.skipped_in_a_row,
                // Where a batch ramp is, over all replicas (not a function of the steps alone).
                "consumed_sequences": self.consumed,
                "config": self.config,
                "data": self.data.state(),
            });
            Ok(write_json_synced(&tmp.join(TRAINER_FILE), &state)?)
        })
    }

    /// Continues from the checkpoint at `dir` (or `dir.old` when a crash interrupted the swap),
    /// with `data` restored to where the checkpoint left it. `metrics` lines past the checkpoint's
    /// step (written by the interrupted run) are dropped.
    pub fn resume(dir: &Path, mut data: Box<dyn DataSource>, metrics: Option<&Path>) -> Result<Self> {
        let dir = complete_checkpoint(dir, TRAINER_FILE)?;
        let path = dir.join(TRAINER_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
        let state: Value = serde_json::from_str(&text).map_err(|e| Error::file(&path, e))?;
        let config: TrainConfig =
            serde_json::from_value(state["config"].clone()).map_err(|e| Error::file(&path, format!("config: {e}")))?;
        let step = state["step"].as_u64().ok_or_else(|| Error::file(&path, "missing `step`"))?;
        let opt_steps =
            state["optimizer_steps"].as_u64().ok_or_else(|| Error::file(&path, "missing `optimizer_steps`"))?;
        data.restore(&state["data"])?;
        let model = DeepSeekV3::from_pretrained(&dir)?;
        // The average comes from the checkpoint, not from these weights.
        let ema_decay = config.ema_decay;
        let mut t = Trainer::new(model, TrainConfig { ema_decay: None, ..config }, data)?;
        t.config.ema_decay = ema_decay;
        let opt_state = load_file(&dir.join(OPTIMIZER_FILE))?;
        t.opt.load_state(opt_steps, &opt_state, &t.model.params)?;
        if let Some(decay) = t.config.ema_decay {
            let saved = load_file(&dir.join(EMA_FILE))?;
            let ema = Ema::resume(decay, &t.model.params, &saved).map_err(|e| Error::file(dir.join(EMA_FILE), e))?;
            t.ema = Some(ema);
        }
        t.step = step;
        // A count a checkpoint written before it was saved lacks is 0: no streak of skipped
        // steps, no batch ramp to place.
        let count = |key: &str| {
            state
                .get(key)
                .map_or(Ok(0), |v| v.as_u64().ok_or_else(|| Error::file(&path, format!("`{key}` {v} is not a count"))))
        };
        t.skipped_in_a_row = count("skipped_in_a_row")?;
        t.consumed = count("consumed_sequences")?;
        if let Some(m) = metrics {
            truncate_metrics(m, step)?;
            t.log_metrics_to(m)?;
        }
        Ok(t)
    }
}

/// One line of a JSON-lines file: its number (from 1), text and value.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonLine {
    pub number: usize,
    pub text: String,
    pub value: Value,
}

/// The lines of the JSON-lines file at `path` (blank ones skipped). A last line without its
/// newline that is no UTF-8 or does not parse is a write a killed run left half done (cut inside
/// a character, perhaps): it is left out (a resume cuts it too). Any other such line is an error
/// naming the file and the line.
pub fn read_jsonl(path: &Path) -> Result<Vec<JsonLine>> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    let torn = bytes.last().is_some_and(|&b| b != b'\n');
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if !torn {
        lines.pop(); // what follows the last newline: nothing
    }
    let count = lines.len();
    let mut rows = Vec::with_capacity(count);
    for (i, raw) in lines.into_iter().enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let parsed = std::str::from_utf8(raw).map_err(|e| e.to_string()).and_then(|text| {
            let value = (!text.trim().is_empty()).then(|| serde_json::from_str(text)).transpose();
            value.map(|v| v.map(|value| (text, value))).map_err(|e| e.to_string())
        });
        match parsed {
            Ok(Some((text, value))) => rows.push(JsonLine { number: i + 1, text: text.to_string(), value }),
            Ok(None) => {}
            Err(_) if torn && i + 1 == count => {}
            Err(e) => return Err(Error::file(path, format!("line {}: {e}", i + 1))),
        }
    }
    Ok(rows)
}

/// Keeps only the metrics lines of steps before `step` (a missing file is no lines), read as
/// [`read_jsonl`] reads them; a line that is not a JSON object with a `step` is an error naming
/// the file and line, and the file is left as it was.
pub fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let mut keep = String::new();
    for line in read_jsonl(path)? {
        let at = line.value["step"]
            .as_u64()
            .ok_or_else(|| Error::file(path, format!("line {} is not a metrics line with a `step`", line.number)))?;
        if at < step {
            keep.push_str(&line.text);
            keep.push('\n');
        }
    }
    Ok(write_atomically(path, keep.as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use whale_model::tensor::testing::TempDir;
    use whale_model::DeepSeekV3Config;

    fn walk() -> Box<dyn DataSource> {
        Box::new(TokenWalk { rng: Rng::new(1), vocab: 64, max_step: 1 })
    }

    #[test]
    fn a_streak_of_skipped_steps_survives_a_resume() {
        let config = TrainConfig { micro_batch: 2, seq_len: 8, ..TrainConfig::default() };
        let mut t = Trainer::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 1).unwrap(), config, walk()).unwrap();
        t.skipped_in_a_row = 7;
        let dir = TempDir::new("trainer-skips");
        let ckpt = dir.join("checkpoint");
        t.save_checkpoint(&ckpt).unwrap();
        assert_eq!(Trainer::resume(&ckpt, walk(), None).unwrap().skipped_in_a_row, 7);
        // A checkpoint from before the streak was saved starts it at 0; a damaged one is an error.
        let path = ckpt.join(TRAINER_FILE);
        let mut state: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        state.as_object_mut().unwrap().remove("skipped_in_a_row");
        std::fs::write(&path, state.to_string()).unwrap();
        assert_eq!(Trainer::resume(&ckpt, walk(), None).unwrap().skipped_in_a_row, 0);
        state["skipped_in_a_row"] = json!("seven");
        std::fs::write(&path, state.to_string()).unwrap();
        let err = Trainer::resume(&ckpt, walk(), None).unwrap_err().to_string();
        assert!(err.contains("skipped_in_a_row") && err.contains("trainer.json"), "{err}");
    }
}
