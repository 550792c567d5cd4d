//! `whale r1-zero`: reinforcement learning with rule-based rewards directly on a pretrained base
//! model (R1-Zero), by GRPO or the PPO baseline on the same rollout budget, with held-out
//! pass@1 / pass@k / length / format before and after.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use whale_rl::eval::{evaluate, EvalConfig, EvalReport};
use whale_rl::grpo::{GrpoConfig, GrpoTrainer, LossType, RlRun, ScaleRewards, StepLog, RL_STATE_FILE};
use whale_rl::parallel::model::checkpoint::find_checkpoint;
use whale_rl::parallel::model::nn::Recompute;
use whale_rl::parallel::model::tensor::DType;
use whale_rl::parallel::model::tokenizer::Tokenizer;
use whale_rl::parallel::model::CausalLm;
use whale_rl::parallel::trainer::truncate_metrics;
use whale_rl::ppo::{PpoConfig, PpoTrainer};
use whale_rl::rollout::PromptTemplate;
use whale_rl::tasks::{Problem, TaskSet};

use crate::pretrain::{print_report, start_again, write_eval, write_json_atomically};
use crate::settings::HeldOut;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    Grpo,
    Ppo,
}

/// Every setting of an R1-Zero run; a config file holds any subset of these keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct R1ZeroSettings {
    /// The base checkpoint (recorded from `--base`).
    pub base: PathBuf,
    /// The JSONL prompt pool (recorded from `--data`); none: the embedded tasks.
    pub data: Option<PathBuf>,
    pub algo: Algo,
    pub grpo: GrpoConfig,
    /// PPO's own knobs; its rollout budget, learning rate and tasks come from `grpo`.
    pub ppo: PpoConfig,
    /// Held-out problems evaluated before and after.
    pub eval_problems: usize,
    /// Samples per problem for pass@1 / pass@k.
    pub k: usize,
    /// Seed of the held-out set (the pretraining run's seed gives the same problems it reported).
    pub eval_seed: u64,
    /// Steps between checkpoints (0: only at the end).
    pub checkpoint_every: u64,
    /// Steps between validation evaluations (eval_history.jsonl; 0: none).
    pub eval_every: u64,
    /// Problems of each validation (4 samples each), none of them held out for the final
    /// evaluation: the tasks' held-out problems, or those of a `--data` file's held-out prompts
    /// that follow the final evaluation's.
    pub validation_problems: usize,
}

impl crate::settings::Settings for R1ZeroSettings {}

impl Default for R1ZeroSettings {
    fn default() -> Self {
        R1ZeroSettings {
            base: PathBuf::new(),
            data: None,
            algo: Algo::Grpo,
            grpo: GrpoConfig::default(),
            ppo: PpoConfig::default(),
            eval_problems: 128,
            k: 8,
            eval_seed: 0,
            checkpoint_every: 20,
            eval_every: 20,
            validation_problems: 32,
        }
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct R1ZeroArgs {
    /// The base model: a DeepSeek-V3, Qwen2 or Llama checkpoint directory (config.json +
    /// safetensors), e.g. the
    /// `checkpoint` folder of `whale pretrain`.
    #[arg(long)]
    pub base: PathBuf,
    /// Run folder (default: next to the base run, `<base run>/r1-zero` or `r1-zero-ppo`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A JSON or TOML file with any of the settings (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, value_enum)]
    pub algo: Option<Algo>,
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub lr: Option<f32>,
    /// Unique prompts per step.
    #[arg(long)]
    pub prompts_per_step: Option<usize>,
    /// Completions per prompt (G).
    #[arg(long)]
    pub group_size: Option<usize>,
    /// KL weight to the reference model (0: no reference).
    #[arg(long)]
    pub beta: Option<f32>,
    /// grpo, bnpo, dr_grpo or dapo.
    #[arg(long)]
    pub loss_type: Option<String>,
    /// group, batch or none.
    #[arg(long)]
    pub scale_rewards: Option<String>,
    /// Rewards with weights, e.g. accuracy,format:0.1.
    #[arg(long)]
    pub rewards: Option<String>,
    /// Training tasks, e.g. add:2-3.
    #[arg(long)]
    pub tasks: Option<String>,
    /// Share of the training and held-out problems posed in letter numerals (0 to 1; 0 for a
    /// base pretrained on digits only).
    #[arg(long)]
    pub letters: Option<f64>,
    /// JSONL training prompts (`prompt`/`problem`/`question` with `answer`, as `whale eval
    /// --data` reads them) instead of the task generators.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// What each prompt is written in: `plain` (as it is, for whale's own models) or `r1`
    /// (R1-Zero's template from the R1 paper, for a base model that has never seen the tags).
    #[arg(long, value_parser = ["plain", "r1"])]
    pub template: Option<String>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub eval_problems: Option<usize>,
    /// Seed of the held-out set (the pretraining run's --seed gives the problems it reported).
    #[arg(long)]
    pub eval_seed: Option<u64>,
    #[arg(long)]
    pub k: Option<usize>,
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Steps between validation evaluations (0: none).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Problems of each validation (default 32, 4 samples each).
    #[arg(long)]
    pub validation_problems: Option<usize>,
    /// cpu (the default), or cuda / cuda:N: the policy, its reference and the PPO critic sample,
    /// score and train there; rewards and advantages are host data.
    #[arg(long)]
    pub device: Option<String>,
    /// The sublayers whose activations the policy's backward (and PPO's critic's) recomputes
    /// instead of keeping them: none (the default), or attention and/or mlp (as `whale pretrain
    /// --recompute`; the same gradients, less memory, so a resumed run may give another).
    #[arg(long)]
    pub recompute: Option<Recompute>,
    /// fp32 (the default) or bf16: the dtype the policy, its reference and PPO's critic compute
    /// in (sampling, scoring, the update; weights and AdamW stay f32), and the held-out
    /// evaluations with them. Like --device, a resumed run may give another.
    #[arg(long)]
    pub precision: Option<String>,
}

fn parse_enum<T: serde::de::DeserializeOwned>(flag: &str, v: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(v.into())).with_context(|| format!("--{flag} {v}"))
}

impl R1ZeroArgs {
    pub fn settings(&self) -> Result<R1ZeroSettings> {
        let mut s: R1ZeroSettings = match &self.config {
            Some(p) => crate::settings::load(p)?,
            None => R1ZeroSettings::default(),
        };
        self.overlay(&mut s)?;
        Ok(s)
    }

    /// With --resume: the run's own settings.json, with an explicit --steps (which extends or
    /// ends the run). Any other flag must repeat the run's value: the policy's optimizer, its
    /// sampling streams and its logs belong to those settings. --base and --data are checked by
    /// [`run`], which names the folders.
    fn resumed_settings(&self, out: &Path) -> Result<R1ZeroSettings> {
        let saved: R1ZeroSettings = crate::settings::run_settings(out)?;
        let mut asked = saved.clone();
        self.overlay(&mut asked)?;
        let (was, now) = (serde_json::to_value(&saved)?, serde_json::to_value(&asked)?);
        let changed = crate::settings::changed_flags(&was, &now, &["base", "data", "grpo.steps"]);
        if !changed.is_empty() {
            bail!(
                "--resume continues {} with its own settings; only --steps may change (--device, --recompute and --precision are not settings): {}",
                out.join("settings.json").display(),
                changed.join(", ")
            );
        }
        Ok(asked)
    }

    /// The flags given, laid over `s`, which must then hold together.
    fn overlay(&self, s: &mut R1ZeroSettings) -> Result<()> {
        let g = &mut s.grpo;
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field.clone() { g.$field = v; } )* };
        }
        set!(steps, lr, prompts_per_step, group_size, beta, rewards, tasks, letters, seed);
        if let Some(v) = &self.loss_type {
            g.loss_type = parse_enum::<LossType>("loss-type", v)?;
        }
        if let Some(v) = &self.scale_rewards {
            g.scale_rewards = parse_enum::<ScaleRewards>("scale-rewards", v)?;
        }
        if let Some(v) = &self.template {
            g.template = PromptTemplate::parse(v).map_err(|e| anyhow::anyhow!("--template: {e}"))?;
        }
        if let Some(a) = self.algo {
            s.algo = a;
        }
        if let Some(n) = self.eval_problems {
            s.eval_problems = n;
        }
        if let Some(seed) = self.eval_seed {
            s.eval_seed = seed;
        }
        if let Some(k) = self.k {
            s.k = k;
        }
        if let Some(n) = self.checkpoint_every {
            s.checkpoint_every = n;
        }
        if let Some(n) = self.eval_every {
            s.eval_every = n;
        }
        if let Some(n) = self.validation_problems {
            s.validation_problems = n;
        }
        crate::settings::check_validation(
            s.validation_problems,
            s.eval_every,
            "validation_problems (--validation-problems)",
            "eval_every (--eval-every)",
        )?;
        match s.algo {
            Algo::Grpo => s.grpo.validate()?,
            Algo::Ppo => s.ppo.validate(&s.grpo)?,
        }
        crate::settings::check_evaluation(s.eval_problems, s.k, "eval_problems (--eval-problems)", "k (--k)")
    }

    fn out_dir(&self, algo: Algo) -> PathBuf {
        if let Some(o) = &self.out {
            return o.clone();
        }
        let name = match algo {
            Algo::Grpo => "r1-zero",
            Algo::Ppo => "r1-zero-ppo",
        };
        // `<run>/pretrain/checkpoint` -> `<run>/r1-zero`; any other folder -> a sibling.
        let base = self.base.canonicalize().unwrap_or_else(|_| self.base.clone());
        let parent = if base.file_name().is_some_and(|n| n == "checkpoint") {
            base.parent().and_then(Path::parent)
        } else {
            base.parent()
        };
        parent.map_or_else(|| PathBuf::from(name), |p| p.join(name))
    }
}

/// Peak resident memory of this process (Linux), in MiB.
pub fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn progress(total: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps, ETA {eta} {msg}")
            .expect("valid template"),
    );
    pb
}

pub fn run(args: R1ZeroArgs) -> Result<R1ZeroOutcome> {
    if args.resume && args.config.is_some() {
        bail!("--resume continues with the run's own settings.json; drop --config");
    }
    let mut s = args.settings()?;
    let out = args.out_dir(s.algo);
    let ckpt = out.join("checkpoint");
    let (metrics, completions) = (out.join("metrics.jsonl"), out.join("completions.jsonl"));
    let settings_path = out.join("settings.json");
    if args.resume {
        // The run's own settings, with an explicit --steps; its base and prompt pool are the
        // run's too.
        s = args.resumed_settings(&out)?;
        let same = crate::settings::same_path;
        if !same(&args.base, &s.base) {
            bail!(
                "--resume: {} was started from --base {}, not {}",
                out.display(),
                s.base.display(),
                args.base.display()
            );
        }
        match (&args.data, &s.data) {
            (Some(given), Some(recorded)) if !same(given, recorded) => {
                bail!("--resume: {} trains on --data {}, not {}", out.display(), recorded.display(), given.display())
            }
            (Some(given), None) => {
                bail!("--resume: {} trains on the embedded tasks, not --data {}", out.display(), given.display())
            }
            _ => {}
        }
    } else {
        // --base is required, so a config file's `base` could only be overridden: refuse one
        // that names another model rather than drop it silently.
        if !s.base.as_os_str().is_empty() && !crate::settings::same_path(&s.base, &args.base) {
            bail!(
                "the config's `base` ({}) differs from --base {}: --base sets it",
                s.base.display(),
                args.base.display()
            );
        }
        s.base = args.base.clone();
        // --data over the config file's `data`, as every flag overrides the file.
        if args.data.is_some() {
            s.data = args.data.clone();
        }
    }
    let pool = s.data.as_deref().map(crate::settings::training_pool).transpose()?;
    let device = crate::device::open_or_cpu(args.device.as_deref())?;
    let dtype = crate::device::post_training_dtype(args.precision.as_deref())?;
    let (mut base, tok) = crate::device::load_with_tokenizer(&args.base, &device, "the base model")?;
    // The base is evaluated as the policy will compute (which starts as its copy).
    base.set_compute_dtype(dtype);
    // Every prompt of a --data pool reads in the base's tokenizer and fits the model, checked now
    // rather than when a step first draws it.
    let check = |problems: &[Problem], source: &str| {
        crate::settings::check_prompts(&*tok, base.max_positions(), problems, s.grpo.template, source)
    };
    let data_source = s.data.as_ref().map(|path| format!("--data {}", path.display()));
    if let (Some(pool), Some(source)) = (&pool, &data_source) {
        check(pool, source)?;
    }
    // The held-out set too, before anything is written. In a template, every prompt evaluated
    // (the held-out set, the validations' task problems) must encode and leave room as well:
    // R1-Zero's preamble is some 270 tokens of a small BPE, and has capitals the character
    // tokenizer cannot spell.
    let tasks = TaskSet::parse(&s.grpo.tasks)?.with_letters(s.grpo.letters)?;
    let held = crate::settings::held_out_problems(
        s.data.as_deref(),
        &tasks,
        s.eval_problems,
        s.eval_seed,
        (s.validation_problems, s.eval_every),
    )?;
    let problems = &held.test;
    let templated = s.grpo.template != PromptTemplate::Plain;
    let template_source = format!("--template {}", s.grpo.template);
    match &data_source {
        Some(source) => check(problems, source)?,
        None if templated => check(problems, &template_source)?,
        None => {}
    }
    match (&held.data_validation, &data_source) {
        (Some(validation), Some(source)) => check(validation, source)?,
        _ if templated => {
            check(&validation_set(&tasks, s.eval_seed, problems, s.validation_problems), &template_source)?
        }
        _ => {}
    }
    // A run stopped before its first checkpoint has nothing to continue: --resume starts it again
    // (its logs, all of steps not checkpointed, go).
    let saved = find_checkpoint(&ckpt, RL_STATE_FILE)?;
    let resume = args.resume && saved.is_some();
    if let Some(saved) = saved.as_ref().filter(|_| resume) {
        // The run's checkpoint carries the tokenizer it trained with: the base's must be it.
        let trained = crate::device::tokenizer(saved, "the run's checkpoint")?;
        if !crate::device::same_tokenizer(&*tok, &*trained) {
            bail!(
                "--resume: {} was trained with another tokenizer than --base {}'s",
                ckpt.display(),
                args.base.display()
            );
        }
    }
    let mut trainer: Box<dyn RlTrainer> = if resume {
        let mut t: Box<dyn RlTrainer> = match s.algo {
            Algo::Grpo => Box::new(GrpoTrainer::resume(&ckpt, Box::new(tok.clone()), &device)?),
            Algo::Ppo => Box::new(PpoTrainer::resume(&ckpt, Box::new(tok.clone()), &device)?),
        };
        if s.grpo.steps < t.run_mut().step {
            bail!("--steps {}: {} is already at step {}", s.grpo.steps, out.display(), t.run_mut().step);
        }
        t.run_mut().config.steps = s.grpo.steps;
        t.run_mut().resume_logs(&metrics, &completions)?;
        // Validations from the checkpoint's step on are redone (`train_loop` validates the step
        // it starts at, which a crash just after the checkpoint left unwritten): their lines go
        // (kept, they would appear twice).
        let step = t.run_mut().step;
        truncate_metrics(&out.join("eval_history.jsonl"), step)?;
        println!("resuming {} at step {step} of {}", out.display(), s.grpo.steps);
        t
    } else {
        if args.resume {
            start_again(&out, &[&metrics, &completions, &out.join("eval_history.jsonl")])?;
        } else if ckpt.exists() || metrics.exists() {
            bail!("{} already holds a run; pass --resume to continue it or choose another --out", out.display());
        }
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let mut t: Box<dyn RlTrainer> = match s.algo {
            Algo::Grpo => Box::new(GrpoTrainer::new(base.duplicate()?, s.grpo.clone(), Box::new(tok.clone()))?),
            Algo::Ppo => {
                Box::new(PpoTrainer::new(base.duplicate()?, s.grpo.clone(), s.ppo.clone(), Box::new(tok.clone()))?)
            }
        };
        t.run_mut().log_to(&metrics, &completions)?;
        t
    };
    if let Some(pool) = pool {
        trainer.run_mut().pool = Some(pool);
    }
    if let Some(recompute) = args.recompute {
        trainer.set_recompute(recompute);
    }
    // A resumed run's models load in f32.
    trainer.set_compute_dtype(dtype);
    write_json_atomically(&settings_path, &serde_json::to_value(&s)?)?;

    crate::settings::note_letters_mismatch(&args.base, s.grpo.letters);
    let eval_cfg = EvalConfig { template: s.grpo.template, ..EvalConfig::covering(s.k, s.grpo.max_new_tokens) };
    let t0 = Instant::now();
    let before = evaluate(&*base, &tok, problems, &eval_cfg)?;
    println!(
        "R1-Zero by {:?} on {} from {} ({} steps x {} prompts x {} samples); held-out before ({:.0} s):",
        s.algo,
        s.grpo.tasks,
        args.base.display(),
        s.grpo.steps,
        s.grpo.prompts_per_step,
        s.grpo.group_size,
        t0.elapsed().as_secs_f64()
    );
    print_report("base", &before);
    write_eval(&out.join("eval_before.json"), &before)?;

    let validation = Validation::new(
        tok.clone(),
        (&s.grpo.tasks, s.grpo.letters),
        s.eval_seed,
        &held,
        out.join("eval_history.jsonl"),
        (s.validation_problems, s.eval_every),
    )?
    .covering(s.grpo.max_new_tokens)
    .in_template(s.grpo.template);
    let first = trainer.run_mut().step;
    let train_seconds = train_loop(&mut *trainer, &ckpt, s.checkpoint_every, Some(&validation))?;
    let steps_run = s.grpo.steps.saturating_sub(first).max(1) as f64;
    let policy = trainer.policy();

    let after = evaluate(policy, &tok, problems, &eval_cfg)?;
    println!("\nheld-out after {} steps ({:.2} s/step):", s.grpo.steps, train_seconds / steps_run);
    print_report("base", &before);
    println!("{}", crate::pretrain::report_row(&format!("R1-Zero ({:?})", s.algo), &after));
    println!(
        "pass@1 {:+.1} points, pass@{} {:+.1} points; peak memory {:.0} MiB",
        100.0 * (after.pass1 - before.pass1),
        s.k,
        100.0 * (after.pass_k - before.pass_k),
        peak_memory_mib().unwrap_or(f64::NAN)
    );
    write_eval(&out.join("eval.json"), &after)?;
    println!("\ncheckpoint: {}   metrics: {}   samples: {}", ckpt.display(), metrics.display(), completions.display());
    Ok(R1ZeroOutcome { out, before, after })
}

/// What `whale r1-zero` produced.
#[derive(Debug)]
pub struct R1ZeroOutcome {
    pub out: PathBuf,
    pub before: EvalReport,
    pub after: EvalReport,
}

/// The validation problems of a run evaluated on `test`: `count` held-out problems of `tasks`
/// from the run seed's validation stream, none of them in `test` (fewer where the held-out side
/// has fewer). A task set whose held-out side the test takes whole has none: validation every
/// `every` steps (0: none) is then off, and says so (scoring no problems would log 0.000 for a
/// model never asked).
pub fn validation_problems(tasks: &TaskSet, seed: u64, test: &[Problem], count: usize, every: u64) -> Vec<Problem> {
    let problems = validation_set(tasks, seed, test, count);
    if problems.is_empty() && every > 0 {
        println!(
            "no validation during training: the final evaluation's {} problems take every held-out problem of the tasks",
            test.len()
        );
    }
    problems
}

/// `count` held-out problems of `tasks` from the run seed's validation stream, none of them in
/// `test`: [`validation_problems`] without its note.
fn validation_set(tasks: &TaskSet, seed: u64, test: &[Problem], count: usize) -> Vec<Problem> {
    tasks.held_out_besides(count, seed.wrapping_add(0x5A11), test)
}

/// A small validation set evaluated every `every` steps of an RL run (pass@1 of 4 samples),
/// appended to `history` as JSON lines: the pass@1-over-steps curve.
pub struct Validation {
    pub tokenizer: Arc<dyn Tokenizer>,
    pub problems: Vec<Problem>,
    pub every: u64,
    pub history: PathBuf,
    /// The completion length limit of the run it validates (the evaluation default's when shorter).
    pub max_new_tokens: usize,
    /// What the run writes its prompts in.
    pub template: PromptTemplate,
}

impl Validation {
    /// Validation every `every` steps on a `--data` file's held-out prompts past the final
    /// evaluation's (`held.data_validation`), or else on `count` held-out problems of `tasks` (a
    /// task spec such as `add:3-4,mul`; `letters` of them in letter numerals) from their own
    /// seed, none of them in `held.test`. None: no validation.
    pub fn new(
        tokenizer: Arc<dyn Tokenizer>,
        (tasks, letters): (&str, f64),
        seed: u64,
        held: &HeldOut,
        history: PathBuf,
        (count, every): (usize, u64),
    ) -> Result<Self> {
        let problems = match &held.data_validation {
            Some(on_data) => on_data.clone(),
            None => validation_problems(&TaskSet::parse(tasks)?.with_letters(letters)?, seed, &held.test, count, every),
        };
        let every = if problems.is_empty() { 0 } else { every };
        Ok(Validation { tokenizer, problems, every, history, max_new_tokens: 0, template: PromptTemplate::Plain })
    }

    /// Validation of a run that writes up to `max_new_tokens` tokens.
    pub fn covering(self, max_new_tokens: usize) -> Self {
        Validation { max_new_tokens, ..self }
    }

    /// Validation of a run that writes its prompts in `template`.
    pub fn in_template(self, template: PromptTemplate) -> Self {
        Validation { template, ..self }
    }

    fn record(&self, model: &dyn CausalLm, step: u64) -> Result<EvalReport> {
        use std::io::Write;
        let cfg = EvalConfig { template: self.template, ..EvalConfig::covering(4, self.max_new_tokens) };
        let r = evaluate(model, &*self.tokenizer, &self.problems, &cfg)?;
        let line = serde_json::json!({ "step": step, "pass@1": r.pass1, "pass@k": r.pass_k, "greedy": r.greedy });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.history)
            .with_context(|| self.history.display().to_string())?;
        writeln!(f, "{line}").with_context(|| self.history.display().to_string())?;
        Ok(r)
    }
}

/// Runs `trainer` to its last step with a progress bar, checkpointing every `checkpoint_every`
/// steps and at the end, evaluating `validation` (at the start and every `validation.every`
/// steps). Returns the training seconds.
pub fn train_loop(
    trainer: &mut dyn RlTrainer,
    ckpt: &Path,
    checkpoint_every: u64,
    validation: Option<&Validation>,
) -> Result<f64> {
    let start = Instant::now();
    let steps = trainer.run_mut().config.steps;
    let first = trainer.run_mut().step;
    let pb = progress(steps);
    pb.set_position(first);
    let validate = |t: &dyn RlTrainer, step: u64| -> Result<()> {
        if let Some(v) = validation.filter(|v| v.every > 0 && step % v.every == 0) {
            let r = v.record(t.policy(), step)?;
            pb.suspend(|| println!("  step {step}: validation pass@1 {:.3}, pass@4 {:.3}", r.pass1, r.pass_k));
        }
        Ok(())
    };
    // The step it starts at: 0, or a resumed checkpoint's (whose validation, if due, a crash
    // right after the checkpoint may have kept from being written).
    validate(&*trainer, first)?;
    while !trainer.run_mut().done() {
        let log = trainer.train_step()?;
        let step = log.step + 1;
        pb.set_position(step);
        pb.set_message(format!(
            "reward {:.3} | acc {:.2} | len {:.1} | zero-std {:.2} | {:.1} s/step",
            log.get("reward"),
            log.get("rewards/accuracy/mean"),
            log.get("completions/mean_length"),
            log.get("frac_reward_zero_std"),
            log.get("step_time"),
        ));
        if checkpoint_every > 0 && step % checkpoint_every == 0 && step < steps {
            trainer.save_checkpoint(ckpt)?;
        }
        validate(&*trainer, step)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    pb.finish_with_message(format!("done in {seconds:.0} s"));
    trainer.save_checkpoint(ckpt)?;
    Ok(seconds)
}

/// The two algorithms behind one loop.
pub trait RlTrainer {
    fn train_step(&mut self) -> whale_rl::Result<StepLog>;
    fn policy(&self) -> &dyn CausalLm;
    /// Recomputes these sublayers in the backward of every model it trains.
    fn set_recompute(&mut self, recompute: Recompute);
    /// Every model it runs computes in `dtype` (the policy, its reference, PPO's critic).
    fn set_compute_dtype(&mut self, dtype: DType);
    fn run_mut(&mut self) -> &mut RlRun;
    fn save_checkpoint(&self, dir: &Path) -> whale_rl::Result<()>;
}

macro_rules! rl_trainer {
    ($t:ty, $trained:expr) => {
        impl RlTrainer for $t {
            fn train_step(&mut self) -> whale_rl::Result<StepLog> {
                <$t>::train_step(self)
            }
            fn policy(&self) -> &dyn CausalLm {
                &*self.policy
            }
            fn set_recompute(&mut self, recompute: Recompute) {
                let trained: fn(&mut $t) -> Vec<&mut dyn CausalLm> = $trained;
                trained(self).into_iter().for_each(|m| m.set_recompute(recompute));
            }
            fn set_compute_dtype(&mut self, dtype: DType) {
                <$t>::set_compute_dtype(self, dtype)
            }
            fn run_mut(&mut self) -> &mut RlRun {
                &mut self.run
            }
            fn save_checkpoint(&self, dir: &Path) -> whale_rl::Result<()> {
                <$t>::save_checkpoint(self, dir)
            }
        }
    };
}

rl_trainer!(GrpoTrainer, |t| vec![&mut *t.policy]);
rl_trainer!(PpoTrainer, |t| vec![&mut *t.policy, &mut *t.critic.trunk]);

#[cfg(test)]
mod tests {
    use super::*;
    use whale_rl::parallel::model::tokenizer::CharTokenizer;

    #[test]
    fn validation_is_off_where_the_test_takes_every_held_out_problem() {
        let tasks = TaskSet::parse("add:1").unwrap();
        let all = tasks.held_out(10_000, 3);
        let new = |test: &[Problem]| {
            let held = HeldOut { test: test.to_vec(), data_validation: None };
            Validation::new(Arc::new(CharTokenizer::new()), ("add:1", 0.0), 3, &held, PathBuf::from("h.jsonl"), (32, 2))
                .unwrap()
        };
        let v = new(&all);
        assert!(v.problems.is_empty() && v.every == 0, "{} problems, every {}", v.problems.len(), v.every);
        let v = new(&all[..1]);
        assert!(!v.problems.is_empty() && v.every == 2, "{} problems, every {}", v.problems.len(), v.every);
    }
}
