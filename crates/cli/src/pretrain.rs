//! `whale pretrain`: train a DeepSeek-V3 preset on the embedded reasoning corpus, checkpoint it,
//! and report held-out accuracy at the end.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use whale_rl::data::CorpusData;
use whale_rl::eval::{evaluate, EvalConfig, EvalReport};
use whale_rl::parallel::model::tokenizer::{CharTokenizer, Tokenizer};
use whale_rl::parallel::model::{DeepSeekV3, DeepSeekV3Config};
use whale_rl::parallel::trainer::{MomentPrecision, Precision, TrainConfig, Trainer};
use whale_rl::tasks::{Corpus, TaskSet};

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
    pub seq_len: usize,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
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
    pub checkpoint_every: u64,
    /// Steps between validation evaluations during training (0: only the final evaluation).
    pub eval_every: u64,
    pub eval_problems: usize,
    pub k: usize,
}

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
            seq_len: 44,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup: 30,
            seed: 0,
            tasks: "add:2-3".into(),
            imperfect: 0.2,
            letters: 0.25,
            mixing: 0.5,
            gamma: None,
            checkpoint_every: 100,
            eval_every: 0,
            eval_problems: 128,
            k: 8,
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
    /// fp32, bf16, or fp8 (DeepSeek-V3's recipe: bf16 activations, FP8 E4M3 GEMMs in every
    /// attention projection and MLP/expert layer with 1x128 / 128x128 scales).
    #[arg(long)]
    pub precision: Option<String>,
    /// AdamW moments: fp32 or bf16 (DeepSeek-V3's choice).
    #[arg(long)]
    pub moments: Option<String>,
    #[arg(long)]
    pub steps: Option<u64>,
    /// Sequences per step.
    #[arg(long)]
    pub micro_batch: Option<usize>,
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long)]
    pub lr: Option<f32>,
    #[arg(long)]
    pub min_lr: Option<f32>,
    #[arg(long)]
    pub warmup: Option<u64>,
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
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Evaluate on a validation set every N steps (0: off), logged to eval_history.jsonl.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Held-out problems evaluated at the end.
    #[arg(long)]
    pub eval_problems: Option<usize>,
    /// Samples per problem for pass@1 / pass@k.
    #[arg(long)]
    pub k: Option<usize>,
}

impl PretrainArgs {
    /// The main job's first stage: the defaults, in `runs/main` (or the first free `runs/main-N`,
    /// so running the main job again never touches an earlier run).
    pub fn main_job() -> Self {
        let out = (1..)
            .map(|n| if n == 1 { PathBuf::from("runs/main") } else { PathBuf::from(format!("runs/main-{n}")) })
            .find(|dir| !dir.exists())
            .expect("an unbounded range has a free name");
        PretrainArgs { out: Some(out.join("pretrain")), ..Default::default() }
    }

    fn settings(&self) -> Result<PretrainSettings> {
        let mut s: PretrainSettings = match &self.config {
            Some(path) => crate::settings::load(path)?,
            None => PretrainSettings::default(),
        };
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
            seq_len,
            lr,
            min_lr,
            warmup,
            seed,
            tasks,
            imperfect,
            letters,
            mixing,
            checkpoint_every,
            eval_every,
            eval_problems,
            k
        );
        if self.gamma.is_some() {
            s.gamma = self.gamma;
        }
        Ok(s)
    }
}

pub fn train_config(s: &PretrainSettings) -> Result<TrainConfig> {
    Ok(TrainConfig {
        steps: s.steps,
        micro_batch: s.micro_batch,
        seq_len: s.seq_len,
        lr: s.lr,
        min_lr: s.min_lr,
        warmup: s.warmup,
        seed: s.seed,
        checkpoint_every: s.checkpoint_every,
        precision: Precision::parse(&s.precision)?,
        moments: MomentPrecision::parse(&s.moments)?,
        ..TrainConfig::default()
    })
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

/// Runs (or resumes) pretraining; returns the run folder.
pub fn run(args: PretrainArgs) -> Result<PathBuf> {
    let s = args.settings()?;
    let tok = CharTokenizer::new();
    let tasks = TaskSet::parse(&s.tasks)?.with_letters(s.letters);
    let ckpt = s.out.join("checkpoint");
    let metrics = s.out.join("metrics.jsonl");
    let corpus =
        Corpus::new(TaskSet::parse(&s.tasks)?.with_letters(s.letters), s.imperfect, s.seed).with_mixing(s.mixing);
    let data = Box::new(CorpusData::new(corpus, tok.clone()));
    let mut trainer = if args.resume {
        let mut t = Trainer::resume(&ckpt, data, Some(&metrics))
            .with_context(|| format!("resuming from {}", ckpt.display()))?;
        if let Some(steps) = args.steps {
            // An explicit --steps extends (or ends) the resumed run.
            t.config.steps = steps;
        }
        println!("resuming {} at step {} of {}", s.out.display(), t.step, t.config.steps);
        t
    } else {
        if ckpt.exists() || metrics.exists() {
            bail!("{} already holds a run; pass --resume to continue it or choose another --out", s.out.display());
        }
        std::fs::create_dir_all(&s.out).with_context(|| format!("creating {}", s.out.display()))?;
        let cfg = model_config(&s, &tok)?;
        let counts = cfg.param_counts();
        println!(
            "pretraining `{}` ({:.2}M parameters, {:.2}M active per token) on {tasks:?}, {} steps of {}x{} tokens",
            s.preset,
            counts.total as f64 / 1e6,
            counts.activated as f64 / 1e6,
            s.steps,
            s.micro_batch,
            s.seq_len
        );
        let mut t = Trainer::new(DeepSeekV3::new(cfg, s.seed)?, train_config(&s)?, data)?;
        t.log_metrics_to(&metrics)?;
        t
    };
    let settings_path = s.out.join("settings.json");
    std::fs::write(&settings_path, serde_json::to_string_pretty(&s)?)
        .with_context(|| settings_path.display().to_string())?;

    // Validation problems: held-out side of the split, their own seed (not the final test set).
    let validation = tasks.held_out(32, s.seed.wrapping_add(0x5A11));
    let history = s.out.join("eval_history.jsonl");
    let start = Instant::now();
    let pb = progress(trainer.config.steps, trainer.step);
    let mut last_vio = Vec::new();
    while !trainer.done() {
        let m = trainer.train_step()?;
        last_vio = m.max_vio.clone();
        pb.set_position(trainer.step);
        pb.set_message(format!("loss {:.3} | {:.0} tok/s", m.loss, m.tokens_per_s));
        let every = trainer.config.checkpoint_every;
        if every > 0 && trainer.step % every == 0 && !trainer.done() {
            trainer.save_checkpoint(&ckpt)?;
        }
        if s.eval_every > 0 && trainer.step % s.eval_every == 0 && !trainer.done() {
            let r = evaluate(&trainer.model, &tok, &validation, &EvalConfig { samples: 4, ..EvalConfig::default() })?;
            pb.suspend(|| {
                println!(
                    "step {}: validation greedy {:.3}, pass@1 {:.3}, pass@4 {:.3}",
                    trainer.step, r.greedy, r.pass1, r.pass_k
                )
            });
            append_history(&history, trainer.step, &r)?;
        }
    }
    trainer.save_checkpoint(&ckpt)?;
    pb.finish_with_message(format!("done in {:.0} s", start.elapsed().as_secs_f64()));
    let vio: Vec<String> = last_vio.iter().map(|v| format!("{v:.2}")).collect();
    println!("final expert-load MaxVio per MoE layer: [{}]", vio.join(", "));

    let problems = tasks.held_out(s.eval_problems, s.seed);
    let eval_cfg = EvalConfig { samples: s.k, ..EvalConfig::default() };
    let t0 = Instant::now();
    let report = evaluate(&trainer.model, &tok, &problems, &eval_cfg)?;
    println!(
        "\nheld-out evaluation ({} problems, {} samples each at T = 1, {:.0} s):",
        report.problems,
        report.samples,
        t0.elapsed().as_secs_f64()
    );
    print_report("base", &report);
    write_eval(&s.out.join("eval.json"), &report)?;
    println!(
        "\ncheckpoint: {}   metrics: {}   charts: whale plot {}",
        ckpt.display(),
        metrics.display(),
        s.out.display()
    );
    Ok(s.out)
}

fn append_history(path: &Path, step: u64, r: &EvalReport) -> Result<()> {
    use std::io::Write;
    let line = serde_json::json!({ "step": step, "greedy": r.greedy, "pass@1": r.pass1, "pass@k": r.pass_k, "samples": r.samples });
    let mut f =
        std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| path.display().to_string())?;
    writeln!(f, "{line}").with_context(|| path.display().to_string())
}

pub fn write_eval(path: &Path, r: &EvalReport) -> Result<()> {
    let v = serde_json::json!({
        "problems": r.problems, "samples": r.samples, "greedy": r.greedy, "pass@1": r.pass1,
        "pass@k": r.pass_k, "cons@k": r.cons_k, "mean_length": r.mean_length, "format_rate": r.format_rate,
        "language": if r.language.is_finite() { serde_json::json!(r.language) } else { serde_json::Value::Null },
        "per_task": r.per_task,
    });
    std::fs::write(path, serde_json::to_string_pretty(&v)?).with_context(|| path.display().to_string())
}
