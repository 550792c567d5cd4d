//! `whale r1`: DeepSeek-R1's four stages (spec/rl.md 2.2) on a base model.
//!
//! 1. Cold start: SFT of the base on a few hundred readable, correct traces in the prompt's
//!    language (the task suite's reference solutions).
//! 2. Reasoning RL: GRPO with accuracy, format and language-consistency rewards.
//! 3. Rejection sampling from the stage-2 model (verified, well-formatted, language-consistent,
//!    deduplicated) mixed with non-reasoning examples, then SFT of the *base* model on them.
//! 4. RL for all scenarios: reasoning prompts with the rule rewards, non-reasoning prompts (the
//!    `reverse` task, standing in for writing and QA) scored by a reward model trained here on
//!    preference pairs with the Bradley-Terry loss.
//!
//! Every stage writes `<out>/<stage>/checkpoint` and `eval.json`, and can run alone from a
//! checkpoint (`--stage NAME --from DIR`).

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use whale_rl::eval::{evaluate, EvalConfig, EvalReport};
use whale_rl::grpo::{GrpoConfig, GrpoTrainer, RL_STATE_FILE};
use whale_rl::parallel::model::checkpoint::find_checkpoint;
use whale_rl::parallel::model::nn::Recompute;
use whale_rl::parallel::model::tensor::{DType, Device, Rng};
use whale_rl::parallel::model::tokenizer::Tokenizer;
use whale_rl::parallel::model::CausalLm;
use whale_rl::parallel::trainer::truncate_metrics;
use whale_rl::reward_model::{preference_pairs, LearnedReward, ReasoningOnly, RewardModel};
use whale_rl::rewards::{Reward, RewardSet};
use whale_rl::rollout::PromptTemplate;
use whale_rl::sft::{fitting, rejection_sample, Example, SftConfig};
use whale_rl::tasks::{Problem, Split, TaskSet};

use crate::pretrain::{eval_from_json, eval_json, print_report, write_eval, write_json_atomically};
use crate::r1_zero::{train_loop, Validation};
use crate::settings::HeldOut;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ColdStart {
    /// Readable traces to fine-tune on.
    pub problems: usize,
    pub sft: SftConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rejection {
    /// Training prompts sampled from the stage-2 model.
    pub problems: usize,
    /// Samples per prompt.
    pub samples: usize,
    pub temperature: f32,
    /// Non-reasoning examples mixed in.
    pub non_reasoning: usize,
    /// Fewer unique reasoning traces than this stop the run: a stage-2 model that solves nothing
    /// would leave a stage 3 trained on non-reasoning data alone (0 allows it).
    pub min_traces: usize,
    pub sft: SftConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RmSettings {
    pub train_pairs: usize,
    pub heldout_pairs: usize,
    pub steps: usize,
    pub batch: usize,
    pub lr: f32,
}

impl Rejection {
    /// Refuses settings that would fail stage 3 only after stages 1 and 2, or sample from
    /// something else (the SFT settings are checked with the others).
    fn validate(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            bail!("`temperature` = {}: rejection sampling samples, so it must be positive", self.temperature);
        }
        for (key, v) in [("problems", self.problems), ("samples", self.samples)] {
            if v == 0 {
                bail!("`{key}` = 0: rejection sampling would draw nothing");
            }
        }
        Ok(())
    }
}

impl RmSettings {
    /// Refuses settings that would fail stage 4 after stages 1-3, or train nothing (0 steps would
    /// leave a reward that ties every pair).
    fn validate(&self) -> Result<()> {
        for (key, v) in [("train_pairs", self.train_pairs), ("steps", self.steps), ("batch", self.batch)] {
            if v == 0 {
                bail!("`{key}` = 0: the reward model would not train");
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("`lr` = {}: must be positive", self.lr);
        }
        Ok(())
    }
}

/// Every setting of the R1 pipeline; a config file holds any subset.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct R1Settings {
    /// Reasoning tasks.
    pub tasks: String,
    /// Share of numeric problems in letter numerals.
    pub letters: f64,
    /// Non-reasoning tasks (scored by the reward model in stage 4).
    pub non_reasoning: String,
    pub seed: u64,
    pub cold_start: ColdStart,
    pub reasoning_rl: GrpoConfig,
    pub rejection: Rejection,
    pub reward_model: RmSettings,
    pub all_rl: GrpoConfig,
    pub eval_problems: usize,
    pub k: usize,
    pub eval_seed: u64,
    /// Steps between validation evaluations in the RL stages (0: none).
    pub eval_every: u64,
    /// Problems of each validation (4 samples each), none of them held out for the final
    /// evaluation: the tasks' held-out problems, or those of a `--data` file's held-out prompts
    /// that follow the final evaluation's.
    pub validation_problems: usize,
    /// Steps between checkpoints of the RL stages (0: only at the end); `--resume` continues an
    /// interrupted RL stage from its last one.
    pub checkpoint_every: u64,
}

impl Default for ColdStart {
    fn default() -> Self {
        ColdStart { problems: 384, sft: SftConfig { steps: 40, lr: 1e-3, ..SftConfig::default() } }
    }
}

impl Default for Rejection {
    fn default() -> Self {
        Rejection {
            // A correct trace of a problem is unique, so prompts, not samples, make the data.
            problems: 1024,
            samples: 2,
            temperature: 1.0,
            non_reasoning: 128,
            min_traces: 1,
            sft: SftConfig { steps: 100, lr: 1e-3, ..SftConfig::default() },
        }
    }
}

impl Default for RmSettings {
    fn default() -> Self {
        RmSettings { train_pairs: 256, heldout_pairs: 64, steps: 80, batch: 16, lr: 1e-3 }
    }
}

impl Default for R1Settings {
    fn default() -> Self {
        let rl = GrpoConfig { steps: 30, rewards: ALL_RL_RULES.into(), ..GrpoConfig::default() };
        let mut s = R1Settings {
            tasks: "add:2-3".into(),
            letters: 0.25,
            non_reasoning: "reverse:3-5".into(),
            seed: 0,
            cold_start: ColdStart::default(),
            // Fewer steps at half the rate: the reward model is right on ~90% of held-out pairs,
            // and R1 too kept general rewards to the end of its last stage.
            all_rl: GrpoConfig { steps: 20, lr: 5e-5, ..rl.clone() },
            reasoning_rl: rl,
            rejection: Rejection::default(),
            reward_model: RmSettings::default(),
            eval_problems: 128,
            k: 8,
            eval_seed: 0,
            eval_every: 20,
            validation_problems: 32,
            checkpoint_every: 10,
        };
        crate::settings::Settings::derive(&mut s);
        s
    }
}

/// The RL stages' rule rewards: accuracy plus language consistency summed directly, as R1's
/// stage 2 (spec/rl.md 2.2), and TinyZero's 0.1 for the template. Stage 4 applies accuracy to
/// the reasoning prompts only and adds the reward model (in code) on the non-reasoning ones.
pub(crate) const ALL_RL_RULES: &str = "accuracy,format:0.1,language";

/// Mixed into the seed of stages 3 and 4 (see `derive`).
pub(crate) const SECOND_PASS_SALT: u64 = 0x5EC0_0D00_0000_0000;

impl crate::settings::Settings for R1Settings {
    const DERIVED: &'static [(&'static str, &'static str)] = &[
        ("reasoning_rl.tasks", "stage 2 trains on the top-level `tasks`"),
        ("reasoning_rl.letters", "every stage poses the top-level `letters` share"),
        ("all_rl.tasks", "stage 4 trains on the top-level `tasks` and `non_reasoning`"),
        ("all_rl.letters", "every stage poses the top-level `letters` share"),
        ("all_rl.rewards", "stage 4 scores with its rule rewards and the reward model trained before it"),
        ("cold_start.sft.seed", "every stage draws from the top-level `seed`"),
        ("reasoning_rl.seed", "every stage draws from the top-level `seed`"),
        ("rejection.sft.seed", "every stage draws from the top-level `seed` (stages 3 and 4 salted)"),
        ("all_rl.seed", "every stage draws from the top-level `seed` (stages 3 and 4 salted)"),
    ];

    fn derive(&mut self) {
        self.reasoning_rl.tasks = self.tasks.clone();
        self.all_rl.tasks = format!("{},{}", self.tasks, self.non_reasoning);
        self.reasoning_rl.letters = self.letters;
        self.all_rl.letters = self.letters;
        self.all_rl.rewards = ALL_RL_RULES.into();
        // One seed for the run: its SFT batches and RL rollouts too, not only its data. Stages 3
        // and 4 are SFT and GRPO again: salted, they draw their own streams rather than replay
        // stage 1's batch order and stage 2's sampling.
        self.cold_start.sft.seed = self.seed;
        self.reasoning_rl.seed = self.seed;
        self.rejection.sft.seed = self.seed ^ SECOND_PASS_SALT;
        self.all_rl.seed = self.seed ^ SECOND_PASS_SALT;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    All,
    ColdStart,
    ReasoningRl,
    RejectionSft,
    AllRl,
}

impl Stage {
    pub fn folder(self) -> &'static str {
        match self {
            Stage::All => "r1",
            Stage::ColdStart => "1-cold-start",
            Stage::ReasoningRl => "2-reasoning-rl",
            Stage::RejectionSft => "3-rejection-sft",
            Stage::AllRl => "4-all-scenarios-rl",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Stage::All => "R1",
            Stage::ColdStart => "R1 stage 1 (cold-start SFT)",
            Stage::ReasoningRl => "R1 stage 2 (reasoning RL)",
            Stage::RejectionSft => "R1 stage 3 (rejection-sampling SFT)",
            Stage::AllRl => "R1 stage 4 (all-scenario RL)",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct R1Args {
    /// The input checkpoint: the base model (stage 1 or all), or the previous stage's model.
    #[arg(long)]
    pub from: PathBuf,
    /// The base model stage 3 fine-tunes (default: --from for `all`, else required for
    /// rejection-sft).
    #[arg(long)]
    pub base: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "all")]
    pub stage: Stage,
    /// Run folder (default: `<run>/r1` next to the input's run).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A JSON or TOML file with any of the settings.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// JSONL reasoning prompts (`prompt`/`problem`/`question` with `answer`, as `whale eval
    /// --data` reads them) instead of the embedded tasks.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// cpu (the default), or cuda / cuda:N: every stage's models (policy, rejection sampler,
    /// reward model) sample and train there; rewards and advantages are host data.
    #[arg(long)]
    pub device: Option<String>,
    /// The sublayers every stage's trained model recomputes in its backward instead of keeping
    /// their activations: none (the default), or attention and/or mlp (as `whale pretrain
    /// --recompute`; the same gradients, so a resumed run may give another).
    #[arg(long)]
    pub recompute: Option<Recompute>,
    /// fp32 (the default) or bf16: the dtype every stage's models compute in (the trained ones,
    /// the rejection sampler, the reference, the reward model, the evaluations; weights and
    /// AdamW stay f32). Like --device, a resumed run may give another.
    #[arg(long)]
    pub precision: Option<String>,
    /// Continue the run in --out with its own settings.json: stages that finished are read back
    /// (their checkpoint and evaluation), and the first unfinished one starts over (an RL stage
    /// continues from its last checkpoint).
    #[arg(long)]
    pub resume: bool,
    /// The main job's tasks and evaluation set (over the settings' own).
    #[arg(skip)]
    pub shared: Option<crate::settings::Shared>,
}

/// One stage's result.
#[derive(Debug, Clone)]
pub struct StageResult {
    pub label: String,
    pub checkpoint: PathBuf,
    pub report: EvalReport,
    pub seconds: f64,
    /// Its RL run folder (metrics.jsonl, eval_history.jsonl), for RL stages.
    pub rl_dir: Option<PathBuf>,
}

/// The run folder next to a checkpoint's run: `<run>/<stage>/checkpoint` -> `<run>/<name>`.
pub fn sibling_run(from: &Path, name: &str) -> PathBuf {
    let from = from.canonicalize().unwrap_or_else(|_| from.to_path_buf());
    let run = if from.file_name().is_some_and(|n| n == "checkpoint") {
        from.parent().and_then(Path::parent)
    } else {
        from.parent()
    };
    run.map_or_else(|| PathBuf::from(name), |p| p.join(name))
}

struct Pipeline {
    s: R1Settings,
    out: PathBuf,
    /// `--from`'s tokenizer (every input's: they are one family).
    tok: Arc<dyn Tokenizer>,
    /// The reasoning tasks, with `letters` applied.
    tasks: TaskSet,
    /// What the evaluations and the RL stages' validations score.
    held: HeldOut,
    pool: Option<Vec<Problem>>,
    device: Device,
    /// What the models trained recompute in their backward.
    recompute: Recompute,
    /// What every model computes in.
    dtype: DType,
    /// Finished stages are read back instead of run again, up to the first that runs.
    resume: bool,
    /// Set once a stage runs: every later stage runs too (a stage read back was trained on the
    /// earlier stages' old output).
    ran: Cell<bool>,
    /// The checkpoint an interrupted attempt of the RL stage about to run left, which it
    /// continues from (set by `stage`, taken by `rl`).
    continuing: Cell<Option<PathBuf>>,
    /// The input checkpoints (canonical): a stage folder holding one is never cleared.
    inputs: Vec<PathBuf>,
}

/// A finished stage's result (its checkpoint in `dir`), its evaluation printed after `how`
/// ("done in", "finished earlier in") and its time.
fn finished(stage: Stage, dir: PathBuf, report: EvalReport, seconds: f64, rl: bool, how: &str) -> StageResult {
    println!("{} {how} {seconds:.0} s; held-out:", stage.label());
    print_report(stage.label(), &report);
    println!();
    StageResult {
        label: stage.label().into(),
        checkpoint: dir.join("checkpoint"),
        report,
        seconds,
        rl_dir: rl.then_some(dir),
    }
}

/// What a finished stage leaves in its folder, written last: its presence marks the stage done.
const STAGE_FILE: &str = "stage.json";

impl Pipeline {
    /// The checkpoint at `dir`, on this run's device, recomputing what the run asks for.
    fn load(&self, dir: &Path) -> Result<Box<dyn CausalLm>> {
        let mut model = crate::device::load(dir, &self.device, "the model")?;
        crate::device::check_fits(&*self.tok, &*model, dir, "the model")?;
        model.set_recompute(self.recompute);
        model.set_compute_dtype(self.dtype);
        Ok(model)
    }

    /// How long a completion the evaluations and rejection sampling let a model write: the RL
    /// stages' limit, or the evaluation default's where that is longer.
    fn generation_limit(&self) -> usize {
        let rl = self.s.reasoning_rl.max_new_tokens.max(self.s.all_rl.max_new_tokens);
        EvalConfig::covering(0, rl).max_new_tokens
    }

    fn eval(&self, model: &dyn CausalLm, dir: &Path) -> Result<EvalReport> {
        let cfg = EvalConfig::covering(self.s.k, self.generation_limit());
        let r = evaluate(model, &*self.tok, &self.held.test, &cfg)?;
        write_eval(&dir.join("eval.json"), &r)?;
        Ok(r)
    }

    /// The stage's folder, created (without --resume, `run` has refused one already in use; with
    /// it, `stage` has cleared what an attempt left unless the stage continues from it).
    fn stage_dir(&self, stage: Stage) -> Result<PathBuf> {
        let dir = self.out.join(stage.folder());
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        Ok(dir)
    }

    /// Clears what an interrupted attempt left in `stage`'s folder: the stage starts over.
    fn clear(&self, stage: Stage) -> Result<()> {
        let dir = self.out.join(stage.folder());
        if dir.try_exists().with_context(|| dir.display().to_string())? {
            let canonical = dir.canonicalize().with_context(|| dir.display().to_string())?;
            if let Some(input) = self.inputs.iter().find(|i| i.starts_with(&canonical)) {
                bail!("{} is inside {}, which --resume would clear to rerun the stage", input.display(), dir.display());
            }
            std::fs::remove_dir_all(&dir).with_context(|| dir.display().to_string())?;
        }
        Ok(())
    }

    /// `stage` read back from its folder when resuming a run that finished it, else run.
    fn stage(&self, stage: Stage, run: impl FnOnce() -> Result<StageResult>) -> Result<StageResult> {
        let dir = self.out.join(stage.folder());
        let marker = dir.join(STAGE_FILE);
        if !self.resume || self.ran.get() || !marker.exists() {
            // An RL stage an interrupted attempt checkpointed continues from there, unless an
            // earlier stage ran again (the checkpoint trained on its old output). Anything else
            // an attempt left goes now, before the stage does any work: a crash in that work
            // must not leave a stale checkpoint for the next --resume to continue.
            let saved = if self.resume && !self.ran.get() {
                find_checkpoint(&dir.join("checkpoint"), RL_STATE_FILE)?
            } else {
                None
            };
            if self.resume && saved.is_none() {
                self.clear(stage)?;
            }
            self.continuing.set(saved);
            self.ran.set(true);
            return run();
        }
        let v = crate::settings::read_json(&marker)?;
        let (report, seconds, rl) = (eval_from_json(&v["report"]), v["seconds"].as_f64(), v["rl"].as_bool());
        let (Some(report), Some(seconds), Some(rl)) = (report, seconds, rl) else {
            bail!("{}: not a finished stage's record (report, seconds, rl)", marker.display());
        };
        let ckpt = dir.join("checkpoint");
        if !ckpt.join("config.json").exists() {
            bail!("{}: the stage is marked finished but its checkpoint is missing", dir.display());
        }
        // Its checkpoint carries the tokenizer it trained with: the run's must be it (a stage
        // written before checkpoints kept their tokenizer trained on the character one).
        if !crate::device::same_tokenizer(&*self.tok, &*crate::device::tokenizer(&ckpt, "a finished stage")?) {
            bail!("--resume: {} was trained with another tokenizer than --from's", ckpt.display());
        }
        Ok(finished(stage, dir, report, seconds, rl, "finished earlier in"))
    }

    fn finish(&self, stage: Stage, dir: PathBuf, model: &dyn CausalLm, t0: Instant, rl: bool) -> Result<StageResult> {
        if !rl {
            crate::distill::save(model, &*self.tok, &dir)?;
        }
        let seconds = t0.elapsed().as_secs_f64();
        let report = self.eval(model, &dir)?;
        let record =
            serde_json::json!({ "label": stage.label(), "seconds": seconds, "rl": rl, "report": eval_json(&report) });
        write_json_atomically(&dir.join(STAGE_FILE), &record)?;
        Ok(finished(stage, dir, report, seconds, rl, "done in"))
    }

    fn cold_start(&self, base: &Path) -> Result<StageResult> {
        let t0 = Instant::now();
        let dir = self.stage_dir(Stage::ColdStart)?;
        let model = self.load(base)?;
        let c = &self.s.cold_start;
        let data: Vec<Example> =
            self.tasks.problems(c.problems, self.s.seed ^ 0xC01D, Split::Train).iter().map(Example::solution).collect();
        println!("{}: SFT on {} readable traces", Stage::ColdStart.label(), data.len());
        crate::distill::sft_with_bar(&*model, &self.tok, &data, &c.sft, Some(&dir.join("sft_metrics.jsonl")))
            .context("cold-start SFT (`cold_start.sft`)")?;
        self.finish(Stage::ColdStart, dir, &*model, t0, false)
    }

    /// An RL stage; `records` are files written into its folder before its `stage.json`.
    fn rl(
        &self,
        stage: Stage,
        from: &Path,
        cfg: &GrpoConfig,
        rewards: Option<RewardSet>,
        records: &[(&str, String)],
    ) -> Result<StageResult> {
        let t0 = Instant::now();
        let saved = self.continuing.take();
        let dir = self.stage_dir(stage)?;
        let tok = Box::new(self.tok.clone());
        let (metrics, completions) = (dir.join("metrics.jsonl"), dir.join("completions.jsonl"));
        // Resumed through the stage's checkpoint path (not where `saved` was found), so that a
        // swap cut short is finished before the stage saves again.
        let ckpt = dir.join("checkpoint");
        let mut t = match (&saved, rewards) {
            (Some(_), Some(r)) => GrpoTrainer::resume_with_rewards(&ckpt, tok, &self.device, r)?,
            (Some(_), None) => GrpoTrainer::resume(&ckpt, tok, &self.device)?,
            (None, Some(r)) => GrpoTrainer::with_rewards(self.load(from)?, cfg.clone(), tok, r)?,
            (None, None) => GrpoTrainer::new(self.load(from)?, cfg.clone(), tok)?,
        };
        t.policy.set_recompute(self.recompute);
        // A resumed stage's models load in f32.
        t.set_compute_dtype(self.dtype);
        if saved.is_some() {
            // Lines from the checkpoint's step on are redone (validation of that step too, which
            // a crash right after the checkpoint left unwritten): they go.
            let step = t.run.step;
            t.run.resume_logs(&metrics, &completions)?;
            truncate_metrics(&dir.join("eval_history.jsonl"), step)?;
            println!("{}: resuming at step {step} of {}", stage.label(), cfg.steps);
        } else {
            t.run.log_to(&metrics, &completions)?;
        }
        if stage == Stage::ReasoningRl {
            t.run.pool = self.pool.clone();
        }
        println!("{}: GRPO, {} steps, rewards {}", stage.label(), cfg.steps, t.run.rewards.describe());
        // Validation on the reasoning tasks (or a --data file's held-out prompts), the same for
        // every stage.
        let validation = Validation::new(
            self.tok.clone(),
            (&self.s.tasks, cfg.letters),
            self.s.eval_seed,
            &self.held,
            dir.join("eval_history.jsonl"),
            (self.s.validation_problems, self.s.eval_every),
        )?
        .covering(cfg.max_new_tokens);
        train_loop(&mut t, &dir.join("checkpoint"), self.s.checkpoint_every, Some(&validation))?;
        for (name, text) in records {
            std::fs::write(dir.join(name), text).with_context(|| dir.join(name).display().to_string())?;
        }
        self.finish(stage, dir, &*t.policy, t0, true)
    }

    fn rejection_sft(&self, sampler: &Path, base: &Path) -> Result<StageResult> {
        let t0 = Instant::now();
        let dir = self.stage_dir(Stage::RejectionSft)?;
        let r = &self.s.rejection;
        let teacher = self.load(sampler)?;
        let prompts = match &self.pool {
            // `problems` of the file's training prompts, drawn without repeats (all of a smaller
            // file).
            Some(pool) => {
                let order = Rng::new(self.s.seed ^ 0x4E1).permutation(pool.len());
                order.into_iter().take(r.problems).map(|i| pool[i].clone()).collect()
            }
            None => self.tasks.problems(r.problems, self.s.seed ^ 0x4E1, Split::Train),
        };
        let mut rng = Rng::new(self.s.seed ^ 0x5A3);
        let (sampled, stats) = rejection_sample(
            &*teacher,
            &self.tok,
            &prompts,
            r.samples,
            r.temperature,
            self.generation_limit(),
            &mut rng,
        )?;
        // The base fine-tunes next: the sampler's memory goes first.
        drop(teacher);
        let (mut data, long) = fitting(&self.tok, sampled, r.sft.seq_len)?;
        if long > 0 {
            println!(
                "{}: {long} of {} unique traces are longer than `rejection.sft.seq_len` = {} and are left out (raise \
                 it to keep them)",
                Stage::RejectionSft.label(),
                stats.unique,
                r.sft.seq_len
            );
        }
        let reasoning = data.len();
        if reasoning < r.min_traces {
            bail!(
                "{}: the stage-2 model {} wrote {} unique verified, well-formatted traces in their prompt's \
                 language in {} samples ({} correct), {long} of them longer than `rejection.sft.seq_len` = {}: \
                 {reasoning} left, fewer than `rejection.min_traces` = {}",
                Stage::RejectionSft.label(),
                sampler.display(),
                stats.unique,
                stats.sampled,
                stats.correct,
                r.sft.seq_len,
                r.min_traces
            );
        }
        let non = TaskSet::parse(&self.s.non_reasoning)?.problems(r.non_reasoning, self.s.seed ^ 0x404, Split::Train);
        data.extend(non.iter().map(Example::solution));
        println!(
            "{}: {} samples, {} correct, {} accepted, {} unique reasoning traces + {} non-reasoning examples",
            Stage::RejectionSft.label(),
            stats.sampled,
            stats.correct,
            stats.accepted,
            reasoning,
            non.len()
        );
        let jsonl: String = data.iter().map(|e| serde_json::to_string(e).expect("json") + "\n").collect();
        std::fs::write(dir.join("data.jsonl"), jsonl).context("data.jsonl")?;
        let model = self.load(base)?;
        crate::distill::sft_with_bar(&*model, &self.tok, &data, &r.sft, Some(&dir.join("sft_metrics.jsonl")))
            .context("rejection-sampling SFT (`rejection.sft`)")?;
        self.finish(Stage::RejectionSft, dir, &*model, t0, false)
    }

    fn all_scenarios(&self, from: &Path) -> Result<StageResult> {
        let model = self.load(from)?;
        let m = &self.s.reward_model;
        let non = TaskSet::parse(&self.s.non_reasoning)?;
        let corrupt = |rng: &mut Rng, p: &Problem| non.corrupt(rng, p);
        let train = preference_pairs(&non.problems(m.train_pairs, self.s.seed ^ 0x9A1, Split::Train), corrupt, 1);
        let heldout = preference_pairs(&non.held_out(m.heldout_pairs, self.s.eval_seed), corrupt, 2);
        let mut rm = RewardModel::from_policy(&*model)?;
        let report = rm.train(&self.tok, &train, &heldout, m.steps, m.batch, m.lr, self.s.seed)?;
        println!(
            "reward model: Bradley-Terry on {} pairs, final loss {:.3}, held-out pair accuracy {:.3} ({} pairs)",
            report.train_pairs, report.final_loss, report.heldout_accuracy, report.heldout_pairs
        );
        // The stage's rule rewards (ALL_RL_RULES, or what an earlier version's run recorded),
        // those read from the verifier (accuracy, cosine, length) on the reasoning prompts only,
        // and the reward model.
        let rules = RewardSet::parse(&self.s.all_rl.rewards, self.s.all_rl.max_new_tokens)?;
        let mut entries: Vec<(Box<dyn Reward>, f64)> = rules
            .entries
            .into_iter()
            .map(|(r, w)| if r.uses_verifier() { (Box::new(ReasoningOnly(r)) as Box<dyn Reward>, w) } else { (r, w) })
            .collect();
        entries.push((Box::new(LearnedReward { model: Arc::new(rm), tokenizer: self.tok.clone() }), 1.0));
        let rewards = RewardSet { entries };
        drop(model);
        let record = [("reward_model.json", serde_json::to_string_pretty(&report)?)];
        self.rl(Stage::AllRl, from, &self.s.all_rl, Some(rewards), &record)
    }
}

/// Runs the requested stage(s); returns each stage's result in order.
pub fn run(args: R1Args) -> Result<Vec<StageResult>> {
    let device = crate::device::open_or_cpu(args.device.as_deref())?;
    let dtype = crate::device::post_training_dtype(args.precision.as_deref())?;
    let out = args.out.clone().unwrap_or_else(|| sibling_run(&args.from, "r1"));
    // Derived keys are set by the load and by the defaults.
    let mut s: R1Settings = crate::settings::for_run(&out, args.config.as_deref(), args.resume)?;
    if let Some(sh) = &args.shared {
        s = sh.lay_over(s)?;
    }
    let tasks = TaskSet::parse(&s.tasks)?.with_letters(s.letters)?;
    // Every stage's training settings are checked before anything runs: a bad [all_rl] would
    // otherwise stop the run after stages 1-3.
    for (table, rl) in [("reasoning_rl", &s.reasoning_rl), ("all_rl", &s.all_rl)] {
        rl.validate().with_context(|| format!("the r1 settings' [{table}]"))?;
        crate::settings::plain_prompts_only(rl, &format!("the r1 settings' [{table}]"))?;
    }
    for (table, sft) in [("cold_start.sft", &s.cold_start.sft), ("rejection.sft", &s.rejection.sft)] {
        sft.validate().with_context(|| format!("the r1 settings' [{table}]"))?;
    }
    s.rejection.validate().context("the r1 settings' [rejection]")?;
    s.reward_model.validate().context("the r1 settings' [reward_model]")?;
    crate::settings::check_evaluation(
        s.eval_problems,
        s.k,
        "the r1 settings' `eval_problems`",
        "the r1 settings' `k`",
    )?;
    crate::settings::check_validation(
        s.validation_problems,
        s.eval_every,
        "the r1 settings' `validation_problems`",
        "`eval_every`",
    )?;
    crate::settings::note_letters_mismatch(args.base.as_ref().unwrap_or(&args.from), s.letters);
    // The stages pass text from one input's model to another's: --from's tokenizer serves them
    // all, and --base must have the same.
    let tok = crate::device::tokenizer(&args.from, "--from")?;
    if let Some(base) = &args.base {
        let other = crate::device::tokenizer(base, "--base")?;
        if !crate::device::same_tokenizer(&*tok, &*other) {
            bail!("--base {} and --from {} have different tokenizers", base.display(), args.from.display());
        }
    }
    let stages = match args.stage {
        Stage::All => vec![Stage::ColdStart, Stage::ReasoningRl, Stage::RejectionSft, Stage::AllRl],
        one => vec![one],
    };
    // The inputs a run was started with: --resume must be given the same ones (a run's `stage`
    // decides what its stages start from: stage 2 of `all` from stage 1, alone from --from).
    let stage_name = args.stage.to_possible_value().map(|v| v.get_name().to_string());
    let inputs = serde_json::json!({ "from": args.from, "base": args.base, "data": args.data, "stage": stage_name });
    let run_file = out.join("run.json");
    // (`stage` is recorded since it was checked: a run.json without it has none to compare.)
    let record_inputs =
        crate::settings::check_run_inputs(&run_file, &inputs, &["from", "base", "data", "stage"], args.resume)?;
    // A new run refuses a stage folder in use before anything is written (a refused command
    // leaves the run's settings alone); one an interrupted attempt left counts too (its logs
    // would be appended to).
    let in_use = |d: &PathBuf| d.read_dir().is_ok_and(|mut e| e.next().is_some());
    if let Some(done) = stages.iter().map(|st| out.join(st.folder())).find(|d| !args.resume && in_use(d)) {
        bail!("{} already holds this stage; pass --resume to continue the run or choose another --out", done.display());
    }
    // The inputs a stage needs, checked before anything is written.
    if args.stage == Stage::RejectionSft && args.base.is_none() {
        bail!("--stage rejection-sft needs --base (the model to fine-tune)");
    }
    let pool = args.data.as_deref().map(crate::settings::training_pool).transpose()?;
    let held = crate::settings::held_out_problems(
        args.data.as_deref(),
        &tasks,
        s.eval_problems,
        s.eval_seed,
        (s.validation_problems, s.eval_every),
    )?;
    // A --data file's prompts read in the tokenizer and fit the model, checked before stage 1
    // trains (the held-out ones are first scored after it, the pool's when a step draws them).
    if let (Some(path), Some(pool)) = (&args.data, &pool) {
        // Every model a stage samples from: --from, and --base where stage 3 fine-tunes it.
        let mut positions = crate::device::max_positions(&args.from, "--from")?;
        if let Some(base) = &args.base {
            positions = positions.min(crate::device::max_positions(base, "--base")?);
        }
        let source = format!("--data {}", path.display());
        for problems in [pool, &held.test].into_iter().chain(&held.data_validation) {
            crate::settings::check_prompts(&*tok, positions, problems, PromptTemplate::Plain, &source)?;
        }
    }
    std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
    write_json_atomically(&out.join("settings.json"), &serde_json::to_value(&s)?)?;
    if record_inputs {
        write_json_atomically(&run_file, &inputs)?;
    }
    let p = Pipeline {
        s: s.clone(),
        out: out.clone(),
        tok,
        tasks,
        held,
        pool,
        device,
        recompute: args.recompute.unwrap_or_default(),
        dtype,
        resume: args.resume,
        ran: Cell::new(false),
        continuing: Cell::new(None),
        inputs: [Some(&args.from), args.base.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|p| p.canonicalize().ok())
            .collect(),
    };
    let cold_start = |from: &Path| p.stage(Stage::ColdStart, || p.cold_start(from));
    let reasoning_rl =
        |from: &Path| p.stage(Stage::ReasoningRl, || p.rl(Stage::ReasoningRl, from, &s.reasoning_rl, None, &[]));
    let rejection_sft = |from: &Path, base: &Path| p.stage(Stage::RejectionSft, || p.rejection_sft(from, base));
    let all_rl = |from: &Path| p.stage(Stage::AllRl, || p.all_scenarios(from));
    Ok(match args.stage {
        Stage::All => {
            let base = args.base.clone().unwrap_or_else(|| args.from.clone());
            let s1 = cold_start(&args.from)?;
            let s2 = reasoning_rl(&s1.checkpoint)?;
            let s3 = rejection_sft(&s2.checkpoint, &base)?;
            let s4 = all_rl(&s3.checkpoint)?;
            vec![s1, s2, s3, s4]
        }
        Stage::ColdStart => vec![cold_start(&args.from)?],
        Stage::ReasoningRl => vec![reasoning_rl(&args.from)?],
        Stage::RejectionSft => {
            let base = args.base.as_ref().context("--stage rejection-sft needs --base (the model to fine-tune)")?;
            vec![rejection_sft(&args.from, base)?]
        }
        Stage::AllRl => vec![all_rl(&args.from)?],
    })
}
