//! `whale distill`: R1's distillation (spec/rl.md 2.3). The R1 model writes verified reasoning
//! traces (rejection sampling); a small dense Qwen2-style student is fine-tuned on them (SFT
//! only). The same student is also trained by GRPO directly for the same wall-clock compute, the
//! comparison of the R1 paper's Table 6.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use whale_rl::eval::{evaluate, EvalConfig, EvalReport};
use whale_rl::grpo::{GrpoConfig, GrpoTrainer};
use whale_rl::parallel::model::checkpoint::{write_dir_atomically, SaveDType};
use whale_rl::parallel::model::nn::Recompute;
use whale_rl::parallel::model::tensor::Rng;
use whale_rl::parallel::model::tokenizer::Tokenizer;
use whale_rl::parallel::model::{moved_to, CausalLm, DenseConfig, DenseModel};
use whale_rl::sft::{fitting, rejection_sample, Example, RejectionStats, SftConfig};
use whale_rl::tasks::{Corpus, Split, TaskSet};

use crate::pretrain::{eval_from_json, eval_json, print_report, report_row, write_eval, write_json_atomically};
use crate::r1_zero::progress;

/// Every setting of a distillation run; a config file holds any subset.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillSettings {
    pub tasks: String,
    pub letters: f64,
    /// The student's own pretraining on the task corpus (when no --student is given).
    pub student_pretrain: SftConfig,
    /// Share of the student's pretraining traces with a wrong step, and with language mixing.
    pub imperfect: f64,
    pub mixing: f64,
    /// Prompts the teacher answers, samples per prompt, and the temperature it samples them at.
    pub trace_problems: usize,
    pub trace_samples: usize,
    pub trace_temperature: f32,
    pub sft: SftConfig,
    /// The RL-only arm: GRPO for `rl.steps` steps, calibrated to take about the distillation
    /// arm's time on a 2-core machine (both times are reported; a step count keeps the run
    /// deterministic where a time budget would not).
    pub rl: GrpoConfig,
    pub eval_problems: usize,
    pub k: usize,
    pub eval_seed: u64,
    pub seed: u64,
}

impl Default for DistillSettings {
    fn default() -> Self {
        let mut s = DistillSettings {
            tasks: "add:2-3".into(),
            letters: 0.25,
            student_pretrain: SftConfig {
                steps: 400,
                lr: 3e-3,
                min_lr: 3e-4,
                warmup: 20,
                loss_on_prompt: true,
                ..SftConfig::default()
            },
            imperfect: 0.2,
            mixing: 0.5,
            // A correct trace of a problem is unique, so prompts, not samples, make the data.
            trace_problems: 1024,
            trace_samples: 2,
            trace_temperature: 1.0,
            sft: SftConfig { steps: 200, lr: 1e-3, ..SftConfig::default() },
            // The R1 model's rewards: the two arms differ only in how the student learns.
            rl: GrpoConfig { steps: 10, rewards: crate::r1::ALL_RL_RULES.into(), ..GrpoConfig::default() },
            eval_problems: 128,
            k: 8,
            eval_seed: 0,
            seed: 0,
        };
        crate::settings::Settings::derive(&mut s);
        s
    }
}

impl crate::settings::Settings for DistillSettings {
    const DERIVED: &'static [(&'static str, &'static str)] = &[
        ("rl.tasks", "the RL-only arm trains on the top-level `tasks`"),
        ("rl.letters", "both arms pose the top-level `letters` share"),
        ("student_pretrain.seed", "every stream of the run draws from the top-level `seed`"),
        ("sft.seed", "every stream of the run draws from the top-level `seed`"),
        ("rl.seed", "every stream of the run draws from the top-level `seed`"),
    ];

    fn derive(&mut self) {
        self.rl.tasks = self.tasks.clone();
        self.rl.letters = self.letters;
        // One seed for the run: the student's pretraining and SFT batches and the RL-only arm's
        // rollouts, not only its corpus.
        self.student_pretrain.seed = self.seed;
        self.sft.seed = self.seed;
        self.rl.seed = self.seed;
    }
}

#[derive(Args, Debug, Clone)]
pub struct DistillArgs {
    /// The teacher: the R1 model's checkpoint (e.g. `<run>/r1/4-all-scenarios-rl/checkpoint`).
    #[arg(long)]
    pub from: PathBuf,
    /// A student checkpoint (HF Qwen2 or Llama directory); default: a fresh `student`-sized
    /// Qwen2-style model pretrained here on the task corpus.
    #[arg(long)]
    pub student: Option<PathBuf>,
    /// Run folder (default: `distill` beside the folder of --from's run, e.g. `runs/NAME/r1/distill`
    /// for `runs/NAME/r1/4-all-scenarios-rl/checkpoint`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// cpu (the default), or cuda / cuda:N: the teacher samples and the students train there.
    #[arg(long)]
    pub device: Option<String>,
    /// The sublayers the students recompute in their backward instead of keeping their
    /// activations: none (the default), or attention and/or mlp (as `whale pretrain
    /// --recompute`; the same gradients, so a resumed run may give another).
    #[arg(long)]
    pub recompute: Option<Recompute>,
    /// fp32 (the default) or bf16: the dtype the teacher samples in and the students train and
    /// are evaluated in (weights and AdamW stay f32). Like --device, a resumed run may give
    /// another.
    #[arg(long)]
    pub precision: Option<String>,
    /// Continue an interrupted run in --out with its own settings: the teacher's saved traces
    /// and every finished arm are kept, an unfinished arm runs again.
    #[arg(long)]
    pub resume: bool,
    /// The main job's tasks and evaluation set (over the settings' own).
    #[arg(skip)]
    pub shared: Option<crate::settings::Shared>,
}

/// The three students' held-out results.
#[derive(Debug, Clone)]
pub struct DistillOutcome {
    pub student_base: EvalReport,
    pub distilled: EvalReport,
    pub rl_only: EvalReport,
    pub distill_seconds: f64,
    pub rl_seconds: f64,
    pub rl_steps: u64,
    pub rl_dir: PathBuf,
}

/// `dir/checkpoint`: the model with its tokenizer's files, written aside and swapped in (over a
/// checkpoint an interrupted run left there).
pub(crate) fn save(model: &dyn CausalLm, tok: &dyn Tokenizer, dir: &Path) -> Result<()> {
    Ok(write_dir_atomically(&dir.join("checkpoint"), |tmp| {
        model.save_pretrained(tmp, SaveDType::F32)?;
        tok.save_pretrained(tmp)
    })?)
}

/// What marks an arm finished: its record (report, seconds, steps), written after its checkpoint.
const ARM_FILE: &str = "arm.json";
/// The teacher's verified traces, kept so that a resumed run does not sample them again.
const TRACES_FILE: &str = "traces.json";
const ARMS: [&str; 3] = ["student-base", "distilled", "rl-only"];

/// A finished arm's record: its held-out report, its training time and steps.
struct Arm {
    report: EvalReport,
    seconds: f64,
    steps: u64,
}

/// The arm at `dir` if a run finished it (with --resume), else `None` after clearing what an
/// interrupted attempt left there.
fn finished_arm(dir: &Path, resume: bool) -> Result<Option<Arm>> {
    let marker = dir.join(ARM_FILE);
    if resume && marker.exists() {
        let v = crate::settings::read_json(&marker)?;
        let (report, seconds, steps) = (eval_from_json(&v["report"]), v["seconds"].as_f64(), v["steps"].as_u64());
        let (Some(report), Some(seconds), Some(steps)) = (report, seconds, steps) else {
            anyhow::bail!("{}: not a finished arm's record (report, seconds, steps)", marker.display());
        };
        println!("distill: {} finished earlier", dir.display());
        return Ok(Some(Arm { report, seconds, steps }));
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {} to run it again", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    Ok(None)
}

/// Saves `model` into the arm's folder, evaluates it, and writes the arm's record last.
#[allow(clippy::too_many_arguments)]
fn finish_arm(
    dir: &Path,
    model: &dyn CausalLm,
    tok: &dyn Tokenizer,
    heldout: &[whale_rl::tasks::Problem],
    eval_cfg: &EvalConfig,
    seconds: f64,
    steps: u64,
) -> Result<Arm> {
    save(model, tok, dir)?;
    let report = evaluate(model, tok, heldout, eval_cfg)?;
    write_eval(&dir.join("eval.json"), &report)?;
    let record = serde_json::json!({ "report": eval_json(&report), "seconds": seconds, "steps": steps });
    write_json_atomically(&dir.join(ARM_FILE), &record)?;
    Ok(Arm { report, seconds, steps })
}

pub fn run(args: DistillArgs) -> Result<DistillOutcome> {
    let device = crate::device::open_or_cpu(args.device.as_deref())?;
    let dtype = crate::device::post_training_dtype(args.precision.as_deref())?;
    let out = args.out.clone().unwrap_or_else(|| crate::r1::sibling_run(&args.from, "distill"));
    let mut s: DistillSettings = crate::settings::for_run(&out, args.config.as_deref(), args.resume)?;
    if let Some(sh) = &args.shared {
        s = sh.lay_over(s)?;
    }
    // The inputs a run was started with; --resume must be given the same ones.
    let inputs = serde_json::json!({ "from": args.from, "student": args.student });
    let run_file = out.join("run.json");
    let record_inputs = crate::settings::check_run_inputs(&run_file, &inputs, &["from", "student"], args.resume)?;
    if let Some(used) = ARMS.iter().chain(&[TRACES_FILE]).map(|a| out.join(a)).find(|d| !args.resume && d.exists()) {
        // Any arm's folder in use, finished or not, is another run's: refused before any work.
        anyhow::bail!(
            "{} already holds a distillation run ({}); pass --resume to continue it or choose another --out",
            out.display(),
            used.display()
        );
    }
    // The student's pretraining corpus (used when no --student is given); building it refuses
    // its shares before anything is written.
    let mut corpus = Corpus::new(TaskSet::parse(&s.tasks)?.with_letters(s.letters)?, s.imperfect, s.seed ^ 0x57)?
        .with_mixing(s.mixing)?;
    // The student's pretraining documents (none with --student), drawn before the corpus lends
    // its tasks to the rest of the run.
    let pretraining_docs: Vec<Example> = if args.student.is_none() {
        let n = (s.student_pretrain.steps as usize).saturating_mul(s.student_pretrain.batch).min(20_000);
        (0..n)
            .map(|_| {
                let (prompt, completion) = corpus.next_pair();
                Example { prompt, completion }
            })
            .collect()
    } else {
        vec![]
    };
    let tasks = &corpus.tasks;
    // Every arm's settings are checked before any trains.
    s.rl.validate().context("the distill settings' [rl]")?;
    crate::settings::plain_prompts_only(&s.rl, "the distill settings' [rl]")?;
    s.student_pretrain.validate().context("the distill settings' [student_pretrain]")?;
    s.sft.validate().context("the distill settings' [sft]")?;
    if !(s.trace_temperature > 0.0 && s.trace_temperature.is_finite()) {
        anyhow::bail!("the distill settings' `trace_temperature` = {}: must be positive", s.trace_temperature);
    }
    crate::settings::check_evaluation(
        s.eval_problems,
        s.k,
        "the distill settings' `eval_problems`",
        "the distill settings' `k`",
    )?;
    // Both models, and the student's pretraining data, checked before the teacher samples for
    // minutes.
    crate::device::require_checkpoint(&args.from, "the teacher (--from)")?;
    let teacher_tok = crate::device::tokenizer(&args.from, "the teacher")?;
    // The student reads the traces as text, through its own tokenizer (a fresh one the teacher's).
    let tok = match args.student.as_deref() {
        Some(dir) => crate::device::tokenizer(dir, "the student")?,
        None => teacher_tok.clone(),
    };
    // Loaded to be checked, then dropped: the teacher samples alone in memory, and the student
    // loads again only if its base arm runs.
    if let Some(dir) = &args.student {
        let model = crate::device::load(dir, &device, "the student")?;
        crate::device::check_fits(&*tok, &*model, dir, "the student")?;
    }
    whale_rl::sft::check_lengths(&*tok, &pretraining_docs, s.student_pretrain.seq_len)
        .context("the student's pretraining corpus (`student_pretrain.seq_len`)")?;
    std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
    write_json_atomically(&out.join("settings.json"), &serde_json::to_value(&s)?)?;
    if record_inputs {
        write_json_atomically(&run_file, &inputs)?;
    }
    let heldout = tasks.held_out(s.eval_problems, s.eval_seed);
    // The teacher's traces and every evaluation may run as long as the RL arm's completions.
    let eval_cfg = EvalConfig::covering(s.k, s.rl.max_new_tokens);

    // The teacher's verified traces, sampled once and kept.
    let traces_file = out.join(TRACES_FILE);
    let (traces, stats): (Vec<Example>, RejectionStats) = if args.resume && traces_file.exists() {
        let v = crate::settings::read_json(&traces_file)?;
        let traces = serde_json::from_value(v["traces"].clone()).with_context(|| traces_file.display().to_string())?;
        let stats = serde_json::from_value(v["stats"].clone()).with_context(|| traces_file.display().to_string())?;
        println!("distill: the teacher's traces from {}", traces_file.display());
        (traces, stats)
    } else {
        let mut teacher = crate::device::load(&args.from, &device, "the teacher")?;
        teacher.set_compute_dtype(dtype);
        let prompts = tasks.problems(s.trace_problems, s.seed ^ 0xD157, Split::Train);
        let (traces, stats) = rejection_sample(
            &*teacher,
            &*teacher_tok,
            &prompts,
            s.trace_samples,
            s.trace_temperature,
            eval_cfg.max_new_tokens,
            &mut Rng::new(s.seed ^ 0x7EAC),
        )?;
        (traces, stats)
    };
    println!(
        "distill: the teacher wrote {} samples, {} correct, {} kept, {} unique traces",
        stats.sampled, stats.correct, stats.accepted, stats.unique
    );
    let unique = traces.len();
    let traces_to_keep = traces.clone();
    let (traces, long) = fitting(&*tok, traces, s.sft.seq_len)?;
    if long > 0 {
        println!(
            "distill: {long} of {unique} traces are longer than `sft.seq_len` = {} and are left out (a new run with it \
             raised keeps them, sampling the teacher again)",
            s.sft.seq_len
        );
    }
    if traces.is_empty() {
        anyhow::bail!(
            "nothing to distil: the teacher {} wrote {} verified, well-formatted traces in {} samples, and {long} of them \
             are longer than `sft.seq_len` = {}",
            args.from.display(),
            unique,
            stats.sampled,
            s.sft.seq_len
        );
    }
    // Kept once they can be used (a run with no usable trace leaves none, so that a new run with
    // other settings may take the folder).
    if !traces_file.exists() {
        write_json_atomically(&traces_file, &serde_json::json!({ "stats": stats, "traces": traces_to_keep }))?;
    }

    // The student base (its copies, the arms' students, keep what it recomputes and its dtype).
    let recompute = args.recompute.unwrap_or_default();
    let load_student = |dir: &Path, what: &str| -> Result<Box<dyn CausalLm>> {
        let mut model = crate::device::load(dir, &device, what)?;
        model.set_recompute(recompute);
        model.set_compute_dtype(dtype);
        Ok(model)
    };
    let base_dir = out.join("student-base");
    let (student, student_base) = match finished_arm(&base_dir, args.resume)? {
        Some(arm) => (load_student(&base_dir.join("checkpoint"), "the student base")?, arm.report),
        None => {
            let t0 = Instant::now();
            let student: Box<dyn CausalLm> = match &args.student {
                Some(dir) => load_student(dir, "the student")?,
                None => {
                    // Its config names the tokenizer's BOS and stop tokens, so its checkpoints
                    // stop generation where this run does.
                    let cfg = DenseConfig {
                        bos_token_id: Some(tok.bos_id()),
                        eos_token_ids: tok.stop_ids(),
                        ..DenseConfig::student(tok.vocab_size())
                    };
                    println!(
                        "distill: pretraining a {}-layer Qwen2-style student ({:.2}M parameters) on the task corpus",
                        cfg.num_hidden_layers,
                        cfg.param_count() as f64 / 1e6
                    );
                    let mut model = moved_to(Box::new(DenseModel::new(cfg, s.seed)?), &device)?;
                    model.set_recompute(recompute);
                    model.set_compute_dtype(dtype);
                    sft_with_bar(&*model, &*tok, &pretraining_docs, &s.student_pretrain, None)
                        .context("the student's pretraining (`student_pretrain`)")?;
                    model
                }
            };
            let steps = if args.student.is_some() { 0 } else { s.student_pretrain.steps };
            let arm = finish_arm(&base_dir, &*student, &*tok, &heldout, &eval_cfg, t0.elapsed().as_secs_f64(), steps)?;
            (student, arm.report)
        }
    };

    // Arm 1: SFT on the teacher's traces.
    let dir = out.join("distilled");
    let distilled = match finished_arm(&dir, args.resume)? {
        Some(arm) => arm,
        None => {
            let t0 = Instant::now();
            let distilled = student.duplicate()?;
            sft_with_bar(&*distilled, &*tok, &traces, &s.sft, None).context("distillation SFT (`sft`)")?;
            let seconds = t0.elapsed().as_secs_f64();
            finish_arm(&dir, &*distilled, &*tok, &heldout, &eval_cfg, seconds, s.sft.steps)?
        }
    };

    // Arm 2: GRPO on the student base for the same wall-clock time.
    let rl_dir = out.join("rl-only");
    let rl_only = match finished_arm(&rl_dir, args.resume)? {
        Some(arm) => arm,
        None => {
            let rl_cfg = s.rl.clone();
            let mut t = GrpoTrainer::new(student.duplicate()?, rl_cfg.clone(), Box::new(tok.clone()))?;
            t.run.log_to(&rl_dir.join("metrics.jsonl"), &rl_dir.join("completions.jsonl"))?;
            let pb = progress(rl_cfg.steps);
            let t1 = Instant::now();
            while !t.run.done() {
                let log = t.train_step()?;
                pb.set_position(log.step + 1);
                pb.set_message(format!("RL-only student: reward {:.3}", log.get("reward")));
            }
            pb.finish_and_clear();
            let seconds = t1.elapsed().as_secs_f64();
            finish_arm(&rl_dir, &*t.policy, &*tok, &heldout, &eval_cfg, seconds, t.run.step)?
        }
    };

    println!(
        "\ndistillation vs RL on the same student (SFT {} steps on {} traces in {:.0} s vs GRPO {} steps in {:.0} s):",
        distilled.steps,
        traces.len(),
        distilled.seconds,
        rl_only.steps,
        rl_only.seconds
    );
    print_report("student base", &student_base);
    println!("{}", report_row("distilled (SFT on R1 traces)", &distilled.report));
    println!("{}", report_row("RL-only (GRPO, same compute)", &rl_only.report));
    Ok(DistillOutcome {
        student_base,
        distilled: distilled.report,
        rl_only: rl_only.report,
        distill_seconds: distilled.seconds,
        rl_seconds: rl_only.seconds,
        rl_steps: rl_only.steps,
        rl_dir,
    })
}

/// SFT with a progress bar; each step's log line also goes to `metrics` (JSON lines) when given.
pub fn sft_with_bar(
    model: &dyn CausalLm,
    tok: &dyn Tokenizer,
    data: &[Example],
    cfg: &SftConfig,
    metrics: Option<&Path>,
) -> Result<()> {
    let pb = progress(cfg.steps);
    let mut lines = String::new();
    whale_rl::sft::sft(model, tok, data, cfg, |l| {
        pb.set_position(l.step + 1);
        pb.set_message(format!("SFT loss {:.3}", l.loss));
        lines.push_str(&serde_json::to_string(l).expect("json"));
        lines.push('\n');
    })?;
    pb.finish_and_clear();
    if let Some(path) = metrics {
        std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
