//! `whale pretrain`: train a DeepSeek-V3 preset on the embedded reasoning corpus, checkpoint it,
//! and report held-out accuracy at the end.
//!
//! With `--dp`, `--ep` and `--pp` (and `--schedule`) the run is a
//! [`whale_rl::parallel::parallel_trainer::Mesh`] of ranks, each a thread of this process on
//! `LocalComm`: data-parallel replicas, the routed experts split over `--ep` of them, the layers
//! over `--pp` pipeline stages. It takes the steps one rank would take on the same micro-batches
//! with `--grad-accum` dp x grad-accum (`dp x grad-accum x micro-batch` sequences a step): each
//! micro-batch's loss is the mean over its own real tokens and a step averages the micro-batches,
//! as torch's DDP and Megatron's default do, not a mean over every token of the global batch.
//! Rank 0 writes the checkpoints and metrics, and the run folder is the single-rank run's.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use whale_rl::data::CorpusData;
use whale_rl::eval::{evaluate, EvalConfig, EvalReport};
use whale_rl::parallel::comm::{Comm, CommError, LocalComm, ReduceOp};
use whale_rl::parallel::data_parallel::DataParallelConfig;
use whale_rl::parallel::model::checkpoint::{find_checkpoint, write_dir_atomically, SaveDType};
use whale_rl::parallel::model::nn::Recompute;
use whale_rl::parallel::model::tensor::optim::DeepSeekV3Schedule;
use whale_rl::parallel::model::tensor::Device;
use whale_rl::parallel::model::tokenizer::{CharTokenizer, Tokenizer};
use whale_rl::parallel::model::{DeepSeekV3, DeepSeekV3Config};
use whale_rl::parallel::parallel_trainer::{Mesh, ParallelTrainer};
use whale_rl::parallel::schedule::Method;
use whale_rl::parallel::trainer::{
    truncate_metrics, BatchRamp, DataSource, LrShape, MomentPrecision, NonFinitePolicy, Precision, TrainConfig,
    Trainer, TRAINER_FILE,
};
use whale_rl::parallel::Error as ParallelError;
use whale_rl::tasks::{Corpus, Problem, TaskSet};

/// Every setting of a pretraining run; a config file holds any subset of these keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainSettings {
    pub preset: String,
    pub out: PathBuf,
    pub precision: String,
    pub moments: String,
    pub steps: u64,
    pub micro_batch: usize,
    /// Micro-batches per step on each data-parallel replica (the pipeline's micro-batches).
    pub grad_accum: usize,
    pub seq_len: usize,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    /// The learning rate's shape: cosine, or deepseek-v3 (warmup, constant, cosine, two steps).
    pub lr_schedule: String,
    /// `STEP:WEIGHT`: from STEP on the MTP loss weight is WEIGHT (DeepSeek-V3 goes from 0.3 to
    /// 0.1 after 10T of its 14.8T tokens); unset: the preset's throughout.
    pub mtp_weight_from: Option<String>,
    /// `START[:INCREMENT]:SEQUENCES`: the batch grows from START sequences a step (over all
    /// replicas) to the whole `dp x grad_accum x micro_batch`, INCREMENT at a time, over the
    /// run's first SEQUENCES (DeepSeek-V3's batch-size schedule); unset: every step takes the
    /// whole batch.
    pub batch_ramp: Option<String>,
    pub seed: u64,
    /// Tasks and difficulty ranges, e.g. `add:3-4,mul`.
    pub tasks: String,
    /// Share of pretraining traces with one wrong step.
    pub imperfect: f64,
    /// Share of numeric problems posed in letter numerals (the second "language").
    pub letters: f64,
    /// Share of letter-numeral traces whose reasoning drifts into digits (language mixing).
    pub mixing: f64,
    /// The auxiliary-loss-free bias update speed (the preset's when unset; 0 disables it).
    pub gamma: Option<f64>,
    /// The step from which the balancing biases stay put (DeepSeek-V3's gamma = 0 for its last
    /// 500B tokens); unset: they move every step.
    pub freeze_bias_at: Option<u64>,
    pub checkpoint_every: u64,
    /// Steps between validation evaluations during training (0: only the final evaluation).
    pub eval_every: u64,
    /// Problems of each validation (4 samples each), none of them held out for the final
    /// evaluation.
    pub validation_problems: usize,
    pub eval_problems: usize,
    pub k: usize,
    /// Data-parallel replicas.
    pub dp: usize,
    /// Expert-parallel ranks (among the replicas).
    pub ep: usize,
    /// Nodes an expert-parallel group spans: node-limited routing, the router's groups being the
    /// nodes (n_group = ep_nodes); 1: one node.
    pub ep_nodes: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Pipeline schedule: 1f1b, zb1p, dualpipe or dualpipev.
    pub schedule: String,
    /// Where the model trains: cpu, or cuda / cuda:N (one GPU, one rank, any precision).
    pub device: String,
    /// A step with a non-finite loss or gradient: `stop` (an error naming the step and layer)
    /// or `skip` (dropped; ten in a row stop the run).
    pub on_non_finite: NonFinitePolicy,
    /// Sublayers recomputed in the backward instead of kept: none, or attention and/or mlp.
    pub recompute: Recompute,
    /// Keep an exponential moving average of the parameters with this decay (evaluated and saved
    /// as `ema/` at the end); unset: none.
    pub ema_decay: Option<f64>,
    /// The MoE dispatch in FP8 (DeepSeek-V3's low-precision communication).
    pub fp8_dispatch: bool,
    /// The FP8 experts' SwiGLU inputs kept in FP8, the SwiGLU output recomputed in the backward.
    pub fp8_swiglu_cache: bool,
}

impl crate::settings::Settings for PretrainSettings {}

impl Default for PretrainSettings {
    fn default() -> Self {
        PretrainSettings {
            preset: "tiny".into(),
            out: PathBuf::from("runs/pretrain"),
            precision: "fp32".into(),
            moments: "fp32".into(),
            // Calibrated on 2 cores (see README): about 2.5 minutes including evaluation, leaving a
            // base model that is able but unreliable (pass@1 ~0.3, pass@8 ~0.5) for R1-Zero.
            steps: 550,
            // One document per row, starting at position 0 (the longest add:3 trace is 43 tokens):
            // packing several documents per row trained markedly worse.
            micro_batch: 24,
            grad_accum: 1,
            seq_len: 44,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup: 30,
            lr_schedule: "cosine".into(),
            mtp_weight_from: None,
            batch_ramp: None,
            seed: 0,
            tasks: "add:2-3".into(),
            imperfect: 0.2,
            letters: 0.25,
            mixing: 0.5,
            gamma: None,
            freeze_bias_at: None,
            checkpoint_every: 100,
            eval_every: 0,
            validation_problems: 32,
            eval_problems: 128,
            k: 8,
            dp: 1,
            ep: 1,
            ep_nodes: 1,
            pp: 1,
            schedule: "1f1b".into(),
            device: "cpu".into(),
            on_non_finite: NonFinitePolicy::Stop,
            recompute: Recompute::default(),
            ema_decay: None,
            fp8_dispatch: false,
            fp8_swiglu_cache: false,
        }
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct PretrainArgs {
    /// A JSON or TOML file with any of the settings below (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Model preset: tiny or small.
    #[arg(long)]
    pub preset: Option<String>,
    /// Run folder (checkpoint/, metrics.jsonl, eval.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// fp32, bf16, or fp8 (DeepSeek-V3's GEMM recipe: bf16 activations, FP8 E4M3 GEMMs in every
    /// attention projection and MLP/expert layer with 1x128 / 128x128 scales; add
    /// `--moments bf16` for its optimizer states).
    #[arg(long)]
    pub precision: Option<String>,
    /// AdamW moments: fp32 or bf16 (DeepSeek-V3's choice).
    #[arg(long)]
    pub moments: Option<String>,
    #[arg(long)]
    pub steps: Option<u64>,
    /// Sequences per micro-batch (a step is dp x grad-accum micro-batches).
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Micro-batches per step on each data-parallel replica, with gradient accumulation: the
    /// micro-batches a pipeline schedule runs (DualPipe needs an even count of at least 2 x pp).
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long)]
    pub lr: Option<f32>,
    #[arg(long)]
    pub min_lr: Option<f32>,
    #[arg(long)]
    pub warmup: Option<u64>,
    /// cosine (warmup, then cosine to --min-lr) or deepseek-v3 (DeepSeek-V3's shape over the
    /// run: warmup, --lr for 10/14.8 of the steps, cosine to --min-lr by 14.3/14.8, then
    /// --min-lr and --min-lr x 7.3/22; with it, unless given, the MTP weight is 0.1 from the
    /// decay's start and the balancing biases freeze at its end, as V3's).
    #[arg(long)]
    pub lr_schedule: Option<String>,
    /// STEP:WEIGHT: the MTP loss weight from STEP on (DeepSeek-V3: 0.3, then 0.1 for the last
    /// third of its tokens); unset: the preset's mtp_loss_weight throughout.
    #[arg(long)]
    pub mtp_weight_from: Option<String>,
    /// `START[:INCREMENT]:SEQUENCES`: the batch grows from START sequences a step to --dp x
    /// --grad-accum x --micro-batch in equal steps of INCREMENT (multiples of --dp x
    /// --micro-batch; by default one micro-batch per replica) spread over the run's first
    /// SEQUENCES, as DeepSeek-V3's did from 3072 to 15360 over its first 469B tokens
    /// (Megatron-LM's --rampup-batch-size rule). DualPipe needs an even START and INCREMENT.
    /// After the warmup the schedules (learning rate, --mtp-weight-from, --freeze-bias-at)
    /// then count sequences, as V3's counted tokens.
    #[arg(long)]
    pub batch_ramp: Option<String>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Tasks with optional difficulty ranges, e.g. add:3-4,mul:1-2.
    #[arg(long)]
    pub tasks: Option<String>,
    /// Share of traces with a wrong step (0..1).
    #[arg(long)]
    pub imperfect: Option<f64>,
    /// Share of numeric problems in letter numerals (0..1).
    #[arg(long)]
    pub letters: Option<f64>,
    /// Share of letter-numeral traces that drift into digits (0..1).
    #[arg(long)]
    pub mixing: Option<f64>,
    /// Bias update speed of the auxiliary-loss-free balancing (0 disables it).
    #[arg(long)]
    pub gamma: Option<f64>,
    /// Stop the bias update from this step on, as DeepSeek-V3 does for its last 500B tokens.
    #[arg(long)]
    pub freeze_bias_at: Option<u64>,
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Evaluate on a validation set every N steps (0: off), logged to eval_history.jsonl.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Problems of each validation (default 32, 4 samples each).
    #[arg(long)]
    pub validation_problems: Option<usize>,
    /// Held-out problems evaluated at the end.
    #[arg(long)]
    pub eval_problems: Option<usize>,
    /// Samples per problem for pass@1 / pass@k.
    #[arg(long)]
    pub k: Option<usize>,
    /// Data-parallel replicas, each on its own micro-batches (ranks are threads of this process
    /// on LocalComm; the run takes the steps one rank takes on all of them).
    #[arg(long)]
    pub dp: Option<usize>,
    /// Expert parallelism: the routed experts of every MoE layer split over this many of the
    /// replicas (must divide --dp and the number of routed experts).
    #[arg(long)]
    pub ep: Option<usize>,
    /// Node-limited routing (DeepSeek-V3's): the --ep ranks are spread over this many nodes
    /// (dividing --ep), which must be the preset's router groups (n_group: 2 for tiny), so a token
    /// reaches at most topk_group nodes; 1 (the default): one node.
    #[arg(long)]
    pub ep_nodes: Option<usize>,
    /// Pipeline stages (at most the number of decoder layers); the world is dp x pp ranks
    /// (dp x pp/2 with dualpipev).
    #[arg(long)]
    pub pp: Option<usize>,
    /// Pipeline schedule: 1f1b, zb1p, dualpipe (an even --pp and an even --grad-accum of at
    /// least 2 x pp) or dualpipev (an even --pp, --grad-accum at least pp).
    #[arg(long)]
    pub schedule: Option<String>,
    /// cpu (the default), or cuda / cuda:N: the model, its gradients and AdamW's moments live on
    /// that GPU (one rank, any --precision and --moments); evaluation runs on a CPU copy.
    #[arg(long)]
    pub device: Option<String>,
    /// Sublayers whose activations the backward recomputes instead of keeping them: none (the
    /// default), or attention and/or mlp, comma-separated (attention: the whole MLA sublayer,
    /// DeepSeek-V3's recomputed RMSNorms and up-projections among it; mlp: every SwiGLU MLP, a
    /// dense layer's with its RMSNorm, an MoE layer's routed and shared experts, its router
    /// kept). The same gradients bit for bit, less memory, a second forward of those sublayers;
    /// a resumed run may change it.
    #[arg(long)]
    pub recompute: Option<Recompute>,
    /// Keep an exponential moving average of the parameters with this decay, in (0, 1), e.g.
    /// 0.99 (DeepSeek-V3's EMA in host memory: an early look at the model after the learning
    /// rate decays). It is blended on a thread of its own after each step, checkpointed, evaluated
    /// beside the model at the end and saved as a model folder, `ema/`, in the run folder.
    #[arg(long = "ema")]
    pub ema_decay: Option<f64>,
    /// Send every MoE layer's tokens in FP8 (DeepSeek-V3's low-precision communication, paired
    /// with --precision fp8 in its recipe): E4M3 in 1x128 tiles with power-of-two scales, and
    /// so the gradients sent back to the experts; the combine stays high precision. Under --ep
    /// the all-to-alls carry the codes (about a quarter of the bytes); on one rank the tokens
    /// are rounded the same way, so both runs compute the same numbers. On the CPU or a GPU;
    /// `--fp8-dispatch false` turns off a config file's.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub fp8_dispatch: Option<bool>,
    /// With --precision fp8: keep the MoE experts' SwiGLU inputs in FP8 (a byte a value) instead
    /// of their projections and the SwiGLU output in bf16, recomputing the SwiGLU output in the
    /// backward (DeepSeek-V3's memory saver); the gradients are taken at the rounded inputs.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub fp8_swiglu_cache: Option<bool>,
}

/// The main job's run folder: `runs/main`, or the first free `runs/main-N`, so running the main
/// job again never touches an earlier run.
pub fn free_main_run() -> PathBuf {
    (1..)
        .map(|n| if n == 1 { PathBuf::from("runs/main") } else { PathBuf::from(format!("runs/main-{n}")) })
        .find(|dir| !dir.exists())
        .expect("an unbounded range has a free name")
}

impl PretrainArgs {
    pub fn settings(&self) -> Result<PretrainSettings> {
        if self.resume {
            return self.resumed_settings();
        }
        let mut s: PretrainSettings = match &self.config {
            Some(path) => crate::settings::load(path)?,
            None => PretrainSettings::default(),
        };
        self.overlay(&mut s);
        Ok(s)
    }

    /// With --resume: the run's own settings.json. A continued run may change --steps,
    /// --freeze-bias-at, --mtp-weight-from, --device and --recompute; any other flag must repeat the run's
    /// value (the corpus, the evaluation set and the saved settings would otherwise mix two runs).
    fn resumed_settings(&self) -> Result<PretrainSettings> {
        if self.config.is_some() {
            bail!("--resume continues with the run's own settings.json; drop --config");
        }
        let out = self.out.clone().unwrap_or_else(|| PretrainSettings::default().out);
        let saved: PretrainSettings = crate::settings::run_settings(&out)?;
        let mut asked = saved.clone();
        self.overlay(&mut asked);
        asked.out = out;
        let (was, now) = (serde_json::to_value(&saved)?, serde_json::to_value(&asked)?);
        const MAY_CHANGE: [&str; 6] = ["out", "steps", "freeze_bias_at", "mtp_weight_from", "device", "recompute"];
        let changed = crate::settings::changed_flags(&was, &now, &MAY_CHANGE);
        if !changed.is_empty() {
            bail!(
                "--resume continues {} with its own settings; only --steps, --freeze-bias-at, --mtp-weight-from, \
                 --device and --recompute may change: {}",
                asked.out.join("settings.json").display(),
                changed.join(", ")
            );
        }
        Ok(asked)
    }

    /// The flags given, laid over `s`.
    fn overlay(&self, s: &mut PretrainSettings) {
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { s.$f = v.clone(); } )* };
        }
        over!(
            preset,
            out,
            precision,
            moments,
            steps,
            micro_batch,
            grad_accum,
            seq_len,
            lr,
            min_lr,
            warmup,
            lr_schedule,
            seed,
            tasks,
            imperfect,
            letters,
            mixing,
            checkpoint_every,
            eval_every,
            validation_problems,
            eval_problems,
            k,
            dp,
            ep,
            ep_nodes,
            pp,
            schedule,
            device,
            recompute
        );
        if self.gamma.is_some() {
            s.gamma = self.gamma;
        }
        if self.freeze_bias_at.is_some() {
            s.freeze_bias_at = self.freeze_bias_at;
        }
        if self.mtp_weight_from.is_some() {
            s.mtp_weight_from = self.mtp_weight_from.clone();
        }
        if self.batch_ramp.is_some() {
            s.batch_ramp = self.batch_ramp.clone();
        }
        if self.ema_decay.is_some() {
            s.ema_decay = self.ema_decay;
        }
        if let Some(on) = self.fp8_dispatch {
            s.fp8_dispatch = on;
        }
        if let Some(on) = self.fp8_swiglu_cache {
            s.fp8_swiglu_cache = on;
        }
    }
}

pub fn train_config(s: &PretrainSettings) -> Result<TrainConfig> {
    let mut c = TrainConfig {
        steps: s.steps,
        micro_batch: s.micro_batch,
        grad_accum: s.grad_accum,
        seq_len: s.seq_len,
        lr: s.lr,
        min_lr: s.min_lr,
        warmup: s.warmup,
        seed: s.seed,
        checkpoint_every: s.checkpoint_every,
        precision: Precision::parse(&s.precision)?,
        moments: MomentPrecision::parse(&s.moments)?,
        freeze_bias_at: s.freeze_bias_at,
        lr_schedule: LrShape::parse(&s.lr_schedule)?,
        mtp_weight_from: s.mtp_weight_from.as_deref().map(parse_step_weight).transpose()?,
        batch_ramp: s.batch_ramp.as_deref().map(|text| parse_batch_ramp(text, s)).transpose()?,
        on_non_finite: s.on_non_finite,
        recompute: s.recompute,
        ema_decay: s.ema_decay,
        fp8_dispatch: s.fp8_dispatch,
        fp8_swiglu_cache: s.fp8_swiglu_cache,
        ..TrainConfig::default()
    };
    v3_switches(&mut c, s);
    Ok(c)
}

/// V3's schedule is more than its learning rate (TR 4.2): under `--lr-schedule deepseek-v3` the
/// MTP weight drops from 0.3 to 0.1 where the decay starts (10T of 14.8T tokens) and the bias
/// update stops where it ends (the last 500B), on `c`'s steps, unless the run's settings `s`
/// give either.
fn v3_switches(c: &mut TrainConfig, s: &PretrainSettings) {
    if c.lr_schedule != LrShape::DeepseekV3 {
        return;
    }
    let shape = DeepSeekV3Schedule::shaped(c.lr, c.min_lr, c.steps, c.warmup);
    if s.mtp_weight_from.is_none() {
        c.mtp_weight_from = Some((shape.decay_start, 0.1));
    }
    if s.freeze_bias_at.is_none() {
        c.freeze_bias_at = Some(shape.decay_end);
    }
}

/// `START[:INCREMENT]:SEQUENCES` of `batch_ramp`, START and INCREMENT in sequences a step over
/// all replicas (INCREMENT by default one micro-batch a replica), as the ramp of micro-batches per
/// replica it is.
fn parse_batch_ramp(text: &str, s: &PretrainSettings) -> Result<BatchRamp> {
    let unit = s.dp * s.micro_batch;
    let parts: Vec<&str> = text.split(':').map(str::trim).collect();
    let count = |t: &str| t.parse::<usize>().ok();
    let parsed = match parts[..] {
        [start, sequences] => Some((count(start), Some(unit), sequences.parse::<u64>().ok())),
        [start, increment, sequences] => Some((count(start), count(increment), sequences.parse::<u64>().ok())),
        _ => None,
    };
    let Some((Some(start), Some(increment), Some(sequences))) = parsed else {
        bail!("batch_ramp `{text}`: expected START[:INCREMENT]:SEQUENCES, e.g. 48:20000 or 48:48:20000");
    };
    let whole = unit * s.grad_accum;
    let (dp, accum, micro) = (s.dp, s.grad_accum, s.micro_batch);
    let batch = format!("{whole} sequences: --dp {dp} x --grad-accum {accum} x --micro-batch {micro}");
    if unit == 0 || start % unit != 0 || start == 0 || start >= whole {
        let what = format!("START must be a multiple of --dp x --micro-batch ({unit}) below the whole batch");
        bail!("batch_ramp `{text}`: {what} ({batch})");
    }
    if increment == 0 || increment % unit != 0 || (whole - start) % increment != 0 {
        bail!(
            "batch_ramp `{text}`: INCREMENT must be a multiple of --dp x --micro-batch ({unit}) that divides the rise \
             from START to the whole batch ({batch})"
        );
    }
    Ok(BatchRamp { start: start / unit, increment: increment / unit, sequences })
}

/// `STEP:WEIGHT` of `mtp_weight_from`.
fn parse_step_weight(text: &str) -> Result<(u64, f64)> {
    let parsed = text.split_once(':').and_then(|(step, w)| Some((step.trim().parse().ok()?, w.trim().parse().ok()?)));
    parsed.with_context(|| format!("mtp_weight_from `{text}`: expected STEP:WEIGHT, e.g. 650:0.1"))
}

/// The parallel layout the settings ask for.
pub fn mesh(s: &PretrainSettings) -> Result<Mesh> {
    let schedule: Method = s.schedule.parse()?;
    if s.dp == 0 || s.ep == 0 || s.pp == 0 || s.ep_nodes == 0 {
        bail!("{}: dp, ep, ep-nodes and pp must be at least 1", layout_flags(s));
    }
    Ok(Mesh { dp: s.dp, ep: s.ep, pp: s.pp, schedule, ep_nodes: s.ep_nodes })
}

/// The device the settings ask for, opened (an error that says why when it cannot be): GPU
/// training is one rank.
pub fn device(s: &PretrainSettings) -> Result<Device> {
    if s.device != "cpu" && s.dp * s.pp * s.ep != 1 {
        bail!("--device {}: GPU training runs on one rank in this build ({})", s.device, layout_flags(s));
    }
    crate::device::open(&s.device)
}

/// The flags of the parallel layout, for errors.
fn layout_flags(s: &PretrainSettings) -> String {
    let (dp, ep, nodes, pp, schedule, accum) = (s.dp, s.ep, s.ep_nodes, s.pp, &s.schedule, s.grad_accum);
    format!("--dp {dp} --ep {ep} --ep-nodes {nodes} --pp {pp} --schedule {schedule} --grad-accum {accum}")
}

fn model_config(s: &PretrainSettings, tok: &CharTokenizer) -> Result<DeepSeekV3Config> {
    let mut cfg = match s.preset.as_str() {
        "tiny" | "small" => DeepSeekV3Config::preset(&s.preset)?,
        other => bail!("preset `{other}` is not for CPU pretraining here (tiny, small)"),
    };
    cfg.vocab_size = cfg.vocab_size.max(tok.vocab_size());
    cfg.bos_token_id = Some(tok.bos_id());
    cfg.eos_token_id = Some(tok.eos_id());
    if let Some(g) = s.gamma {
        cfg.bias_update_speed = g;
    }
    cfg.validate()?;
    Ok(cfg)
}

fn progress(total: u64, done: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps, ETA {eta} {msg}")
            .expect("valid template"),
    );
    pb.set_position(done);
    pb
}

/// Held-out evaluation table rows.
pub fn print_report(name: &str, r: &EvalReport) {
    println!("| model | greedy | pass@1 | pass@{k} | cons@{k} | mean length | format | language |", k = r.samples);
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    println!("{}", report_row(name, r));
}

/// One row of the evaluation table.
pub fn report_row(name: &str, r: &EvalReport) -> String {
    format!(
        "| {name} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.3} | {:.3} |",
        r.greedy, r.pass1, r.pass_k, r.cons_k, r.mean_length, r.format_rate, r.language
    )
}

/// The step a pretraining checkpoint (`dir`, holding `trainer.json`) was saved at.
fn checkpoint_step(dir: &Path) -> Result<u64> {
    let path = dir.join(TRAINER_FILE);
    let state = crate::settings::read_json(&path)?;
    state.get("step").and_then(serde_json::Value::as_u64).with_context(|| format!("{}: no `step`", path.display()))
}

/// Runs (or resumes) pretraining; returns the run folder.
pub fn run(args: PretrainArgs) -> Result<PathBuf> {
    let s = args.settings()?;
    let mesh = mesh(&s)?;
    let device = device(&s)?;
    // Training settings out of range are refused before anything is written.
    let config = train_config(&s)?;
    config.validate()?;
    crate::settings::check_evaluation(s.eval_problems, s.k, "--eval-problems", "--k")?;
    crate::settings::check_validation(s.validation_problems, s.eval_every, "--validation-problems", "--eval-every")?;
    let tok = CharTokenizer::new();
    // Building the corpus refuses its shares (`letters`, `imperfect`, `mixing`) before anything
    // is written.
    let mut text = CorpusData::new(corpus(&s)?, tok.clone());
    // So are tasks whose documents do not fit the rows (the stream refuses one mid-run too).
    text.check_fit(s.seq_len, 16_384)
        .with_context(|| format!("--seq-len {}: rows too short for --tasks {}", s.seq_len, s.tasks))?;
    let tasks = text.corpus.tasks;
    let ckpt = s.out.join("checkpoint");
    let metrics = s.out.join("metrics.jsonl");
    // A run stopped before its first checkpoint has nothing to continue: --resume starts it again
    // (its logs, all of steps not checkpointed, go).
    let saved = find_checkpoint(&ckpt, TRAINER_FILE)?;
    let restart = args.resume && saved.is_none();
    let model = if let Some(saved) = saved.filter(|_| args.resume) {
        // --steps below the checkpoint's step would rewrite the run's settings and re-save its
        // checkpoint as a run of fewer steps than it took.
        if let Some(steps) = args.steps {
            let at = checkpoint_step(&saved)?;
            if steps < at {
                bail!("--steps {steps}: {} is already at step {at}", s.out.display());
            }
        }
        None
    } else {
        if restart {
            start_again(&s.out, &[&metrics, &s.out.join("eval_history.jsonl")])?;
        } else if ckpt.exists() || metrics.exists() {
            bail!("{} already holds a run; pass --resume to continue it or choose another --out", s.out.display());
        }
        let cfg = model_config(&s, &tok)?;
        // Positions past the model's would train RoPE angles no saved config admits (generation
        // and evaluation refuse them).
        if s.seq_len > cfg.max_position_embeddings {
            bail!(
                "--seq-len {}: the `{}` preset holds {} positions (max_position_embeddings)",
                s.seq_len,
                s.preset,
                cfg.max_position_embeddings
            );
        }
        // An impossible layout is refused before anything is written (with a batch ramp, for
        // every count of micro-batches a step takes).
        mesh.plan_steps(&cfg, &config).with_context(|| match &s.batch_ramp {
            Some(ramp) => format!("{} --batch-ramp {ramp}", layout_flags(&s)),
            None => layout_flags(&s),
        })?;
        std::fs::create_dir_all(&s.out).with_context(|| format!("creating {}", s.out.display()))?;
        let counts = cfg.param_counts();
        println!(
            "pretraining `{}` ({:.2}M parameters, {:.2}M active per token) on {tasks:?}, {} steps of {}x{} tokens",
            s.preset,
            counts.total as f64 / 1e6,
            counts.activated as f64 / 1e6,
            s.steps,
            s.dp * s.grad_accum * s.micro_batch,
            s.seq_len
        );
        if let Some(ramp) = config.batch_ramp {
            let unit = s.dp * s.micro_batch;
            println!(
                "the batch grows from {} sequences a step, {} at a time, over the first {} sequences",
                ramp.start * unit,
                ramp.increment * unit,
                ramp.sequences
            );
        }
        Some(cfg)
    };
    if mesh.world_size() > 1 {
        println!(
            "parallel: {mesh}, {} ranks as LocalComm threads; each step {} replicas x {}{} micro-batches x {} \
             sequences",
            mesh.world_size(),
            s.dp,
            if s.batch_ramp.is_some() { "up to " } else { "" },
            s.grad_accum,
            s.micro_batch
        );
    }
    write_json_atomically(&s.out.join("settings.json"), &serde_json::to_value(&s)?)?;

    let problems = tasks.held_out(s.eval_problems, s.seed);
    let plan = RankPlan {
        // Validation problems: held-out side of the split, their own seed, none of the test set's.
        validation: crate::r1_zero::validation_problems(&tasks, s.seed, &problems, s.validation_problems, s.eval_every),
        history: s.out.join("eval_history.jsonl"),
        s: &s,
        mesh,
        model,
        steps: args.steps,
        freeze_bias_at: args.freeze_bias_at,
        mtp_weight_from: args.mtp_weight_from.as_deref().map(parse_step_weight).transpose()?,
        tok: &tok,
        ckpt: &ckpt,
        metrics: &metrics,
        device,
    };
    let start = Instant::now();
    let ranks = LocalComm::run(mesh.world_size(), |comm| train_rank(comm, &plan));
    let (trainer, last_vio, nodes) = rank_zero(ranks)?;
    println!("trained in {:.0} s", start.elapsed().as_secs_f64());
    let vio: Vec<String> = last_vio.iter().map(|v| format!("{v:.2}")).collect();
    println!("final expert-load MaxVio per MoE layer: [{}]", vio.join(", "));
    if mesh.ep_nodes > 1 {
        // Node-limited routing: at most topk_group of the nodes.
        let most = trainer.model.config.topk_group;
        println!("the last step's tokens reached at most {nodes} of {} nodes (topk_group {most})", mesh.ep_nodes);
    }

    let eval_cfg = EvalConfig { samples: s.k, ..EvalConfig::default() };
    let t0 = Instant::now();
    let report = evaluate_on_cpu(&trainer.model, device, &tok, &problems, &eval_cfg)?;
    println!(
        "\nheld-out evaluation ({} problems, {} samples each at T = 1, {:.0} s):",
        report.problems,
        report.samples,
        t0.elapsed().as_secs_f64()
    );
    print_report("base", &report);
    write_eval(&s.out.join("eval.json"), &report)?;
    if let Some(average) = trainer.ema_model()? {
        // The same problems and sampling streams: the rows compare the weights alone.
        let ema = evaluate_on_cpu(&average, device, &tok, &problems, &eval_cfg)?;
        print_report(
            &format!("base, EMA of the weights (decay {})", trainer.config.ema_decay.unwrap_or_default()),
            &ema,
        );
        let dir = s.out.join("ema");
        write_dir_atomically(&dir, |tmp| average.save_pretrained(tmp, SaveDType::F32))?;
        write_eval(&dir.join("eval.json"), &ema)?;
        println!("the average's model: {}", dir.display());
    }
    println!(
        "\ncheckpoint: {}   metrics: {}   charts: whale plot {}",
        ckpt.display(),
        metrics.display(),
        s.out.display()
    );
    Ok(s.out)
}

/// The pretraining text the settings describe, from its start (an error naming any share out of
/// range).
fn corpus(s: &PretrainSettings) -> Result<Corpus> {
    Ok(Corpus::new(TaskSet::parse(&s.tasks)?.with_letters(s.letters)?, s.imperfect, s.seed)?.with_mixing(s.mixing)?)
}

/// What every rank of a run works from.
struct RankPlan<'a> {
    s: &'a PretrainSettings,
    mesh: Mesh,
    /// The model to start from; `None`: resume from the checkpoint.
    model: Option<DeepSeekV3Config>,
    /// An explicit --steps, which extends (or ends) a resumed run.
    steps: Option<u64>,
    /// An explicit --freeze-bias-at, which a resumed run takes too (say, to freeze the biases
    /// for the last stretch of a run extended with --steps).
    freeze_bias_at: Option<u64>,
    /// An explicit --mtp-weight-from, which a resumed run takes too.
    mtp_weight_from: Option<(u64, f64)>,
    tok: &'a CharTokenizer,
    ckpt: &'a Path,
    metrics: &'a Path,
    validation: Vec<Problem>,
    history: PathBuf,
    /// Where the model trains.
    device: Device,
}

/// The held-out evaluation of `model`, on a CPU copy when it trains on a GPU (sampling runs on
/// the CPU).
fn evaluate_on_cpu(
    model: &DeepSeekV3,
    device: Device,
    tok: &CharTokenizer,
    problems: &[Problem],
    cfg: &EvalConfig,
) -> Result<EvalReport> {
    let copy = if device.is_cpu() { None } else { Some(model.to_device(&Device::Cpu)?) };
    Ok(evaluate(copy.as_ref().unwrap_or(model), tok, problems, cfg)?)
}

/// Rank 0's trainer at the end of the run, the last step's MaxVio per MoE layer, and the most
/// nodes a token reached in that step (0 without expert parallelism).
type Trained = (Trainer, Vec<f64>, usize);

/// One rank's training loop (all ranks at once, in step). Rank 0 writes the metrics, checkpoints
/// and validation history and returns its trainer, every expert local again, with the last
/// step's MaxVio.
fn train_rank(comm: &dyn Comm, plan: &RankPlan) -> Result<Option<Trained>> {
    let s = plan.s;
    let lead = comm.rank() == 0;
    // Every rank reads the same stream (same seed) and keeps its replica's micro-batches.
    let stream: Box<dyn DataSource> = Box::new(CorpusData::new(corpus(s)?, plan.tok.clone()));
    let data = Box::new(plan.mesh.shard(comm.rank(), stream));
    let trainer = match &plan.model {
        None => {
            let mut t = Trainer::resume(plan.ckpt, data, lead.then_some(plan.metrics))
                .with_context(|| format!("resuming from {}", plan.ckpt.display()))?;
            if let Some(steps) = plan.steps.filter(|&n| n != t.config.steps) {
                // The schedule's horizon is `steps`: moving it moves the learning rate from here
                // on (a finished cosine run extended climbs back from its floor), which is said.
                // (On the run's replicas: the trainer is not yet wrapped for the mesh.)
                let lr = |t: &Trainer| t.config.lr_at(t.step, t.consumed_sequences(), plan.mesh.dp);
                let before = lr(&t);
                let old = std::mem::replace(&mut t.config.steps, steps);
                // V3's switches stretch with it (those the run was not given).
                v3_switches(&mut t.config, s);
                let after = lr(&t);
                if lead && before != after {
                    println!(
                        "note: --steps {steps} (was {old}) stretches the learning-rate schedule: step {} trains at {after:.3e}, not {before:.3e}",
                        t.step
                    );
                }
            }
            if plan.freeze_bias_at.is_some() {
                t.config.freeze_bias_at = plan.freeze_bias_at;
            }
            if plan.mtp_weight_from.is_some() {
                t.config.mtp_weight_from = plan.mtp_weight_from;
            }
            t.set_recompute(s.recompute);
            if lead {
                // Validations from the checkpoint's step on are redone (its own below, which a
                // crash right after the checkpoint may have left unwritten): their lines go.
                truncate_metrics(&plan.history, t.step)?;
                println!("resuming {} at step {} of {}", s.out.display(), t.step, t.config.steps);
            }
            t
        }
        Some(cfg) => {
            let mut t = Trainer::new(DeepSeekV3::new(cfg.clone(), s.seed)?, train_config(s)?, data)?;
            if lead {
                t.log_metrics_to(plan.metrics)?;
            }
            t
        }
    };
    let mut trainer = trainer;
    if !plan.device.is_cpu() {
        trainer.model = trainer.model.to_device(&plan.device)?;
    }
    let mut trainer = ParallelTrainer::new(trainer, comm, plan.mesh, DataParallelConfig::default())
        .with_context(|| layout_flags(s))?;
    let (steps, done) = (trainer.trainer().config.steps, trainer.trainer().step);
    let pb = if lead { progress(steps, done) } else { ProgressBar::hidden() };
    // The validation after `step` steps, when one is due (not after the last: the final
    // evaluation is that).
    let validate = |trainer: &mut ParallelTrainer, step: u64| -> Result<()> {
        if !(lead
            && s.eval_every > 0
            && !plan.validation.is_empty()
            && step > 0
            && step % s.eval_every == 0
            && !trainer.trainer().done())
        {
            return Ok(());
        }
        let cfg = EvalConfig { samples: 4, ..EvalConfig::default() };
        let r =
            trainer.with_whole_model(|t| evaluate_on_cpu(&t.model, plan.device, plan.tok, &plan.validation, &cfg))?;
        pb.suspend(|| {
            println!("step {step}: validation greedy {:.3}, pass@1 {:.3}, pass@4 {:.3}", r.greedy, r.pass1, r.pass_k)
        });
        append_history(&plan.history, step, &r)
    };
    // A resumed run's own step first (its line was cut above).
    validate(&mut trainer, done)?;
    let mut last_vio = Vec::new();
    while !trainer.trainer().done() {
        let m = trainer.train_step()?;
        last_vio = m.max_vio.clone();
        let t = trainer.trainer();
        let (step, every, done) = (t.step, t.config.checkpoint_every, t.done());
        pb.set_position(step);
        pb.set_message(format!("loss {:.3} | {:.0} tok/s", m.loss, m.tokens_per_s));
        if every > 0 && step % every == 0 && !done {
            trainer.save_checkpoint(plan.ckpt)?;
        }
        validate(&mut trainer, step)?;
    }
    trainer.save_checkpoint(plan.ckpt)?;
    pb.finish_and_clear();
    // The most nodes a token reached in the last step, over every rank (a collective call).
    let mut nodes = [trainer.max_nodes_per_token() as f32];
    comm.all_reduce(&mut nodes, ReduceOp::Max)?;
    let trainer = trainer.into_trainer()?;
    Ok(lead.then_some((trainer, last_vio, nodes[0] as usize)))
}

/// Rank 0's result, or the error that stopped the run: the first rank's that failed on its own
/// rather than because another rank left.
fn rank_zero(ranks: Vec<Result<Option<Trained>>>) -> Result<Trained> {
    let left = |e: &anyhow::Error| {
        e.chain().any(|c| {
            matches!(c.downcast_ref::<ParallelError>(), Some(ParallelError::Comm(CommError::RankLeft { .. })))
                || c.to_string().contains("has left")
        })
    };
    let mut errors: Vec<anyhow::Error> = Vec::new();
    let mut lead = None;
    for r in ranks {
        match r {
            Ok(Some(t)) => lead = Some(t),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    if let Some(i) = errors.iter().position(|e| !left(e)) {
        return Err(errors.swap_remove(i));
    }
    match (errors.into_iter().next(), lead) {
        (Some(e), _) => Err(e),
        (None, Some(t)) => Ok(t),
        (None, None) => bail!("rank 0 returned no trainer"),
    }
}

fn append_history(path: &Path, step: u64, r: &EvalReport) -> Result<()> {
    use std::io::Write;
    let line = serde_json::json!({ "step": step, "greedy": r.greedy, "pass@1": r.pass1, "pass@k": r.pass_k, "samples": r.samples });
    let mut f =
        std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| path.display().to_string())?;
    writeln!(f, "{line}").with_context(|| path.display().to_string())
}

/// An evaluation as `eval.json` holds it.
pub fn eval_json(r: &EvalReport) -> serde_json::Value {
    serde_json::json!({
        "problems": r.problems, "samples": r.samples, "greedy": r.greedy, "pass@1": r.pass1,
        "pass@k": r.pass_k, "cons@k": r.cons_k, "mean_length": r.mean_length, "format_rate": r.format_rate,
        "language": if r.language.is_finite() { serde_json::json!(r.language) } else { serde_json::Value::Null },
        "per_task": r.per_task,
    })
}

/// [`eval_json`] read back; `None` when a field is missing or of the wrong type.
pub fn eval_from_json(v: &serde_json::Value) -> Option<EvalReport> {
    let num = |k: &str| v.get(k)?.as_f64();
    let count = |k: &str| v.get(k)?.as_u64().map(|n| n as usize);
    let per_task =
        v.get("per_task")?.as_array()?.iter().map(|p| Some((p.get(0)?.as_str()?.to_string(), p.get(1)?.as_f64()?)));
    Some(EvalReport {
        problems: count("problems")?,
        samples: count("samples")?,
        greedy: num("greedy")?,
        pass1: num("pass@1")?,
        pass_k: num("pass@k")?,
        cons_k: num("cons@k")?,
        mean_length: num("mean_length")?,
        format_rate: num("format_rate")?,
        language: if v.get("language")?.is_null() { f64::NAN } else { num("language")? },
        per_task: per_task.collect::<Option<_>>()?,
    })
}

/// A run (in `out`) stopped before its first checkpoint, started again: its `logs`, all of steps
/// no checkpoint kept, are emptied.
pub fn start_again(out: &Path, logs: &[&Path]) -> Result<()> {
    println!("{} stopped before its first checkpoint: starting it again", out.display());
    for log in logs {
        truncate_metrics(log, 0)?;
    }
    Ok(())
}

/// Writes `text` beside `path` (`path.tmp`) and renames it into place: a reader never sees half
/// of it.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    Ok(whale_rl::parallel::model::checkpoint::write_atomically(path, text.as_bytes())?)
}

/// [`write_atomically`] of `value` as pretty JSON.
pub fn write_json_atomically(path: &Path, value: &serde_json::Value) -> Result<()> {
    write_atomically(path, &serde_json::to_string_pretty(value)?)
}

pub fn write_eval(path: &Path, r: &EvalReport) -> Result<()> {
    write_json_atomically(path, &eval_json(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepseek_v3s_schedule_brings_its_mtp_weight_drop_and_bias_freeze() {
        let s = PretrainSettings { steps: 1480, warmup: 20, lr_schedule: "deepseek-v3".into(), ..Default::default() };
        let mut c = train_config(&s).unwrap();
        assert_eq!((c.mtp_weight_from, c.freeze_bias_at), (Some((1000, 0.1)), Some(1430)));
        // A resumed run given more steps moves them with its schedule.
        c.steps = 2960;
        v3_switches(&mut c, &s);
        assert_eq!((c.mtp_weight_from, c.freeze_bias_at), (Some((2000, 0.1)), Some(2860)));
        // Given ones stay; the cosine shape brings none.
        let given = PretrainSettings { mtp_weight_from: Some("5:0.2".into()), freeze_bias_at: Some(7), ..s.clone() };
        let c = train_config(&given).unwrap();
        assert_eq!((c.mtp_weight_from, c.freeze_bias_at), (Some((5, 0.2)), Some(7)));
        let c = train_config(&PretrainSettings { lr_schedule: "cosine".into(), ..s }).unwrap();
        assert_eq!((c.mtp_weight_from, c.freeze_bias_at), (None, None));
    }
}
