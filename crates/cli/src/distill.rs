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
use whale_rl::parallel::model::tensor::Rng;
use whale_rl::parallel::model::tokenizer::Tokenizer;
use whale_rl::parallel::model::{moved_to, CausalLm, DenseConfig, DenseModel};
use whale_rl::sft::{fitting, rejection_sample, Example, SftConfig};
use whale_rl::tasks::{Corpus, Split, TaskSet};

use crate::pretrain::{print_report, report_row, write_eval};
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
    /// Prompts the teacher answers, and samples per prompt.
    pub trace_problems: usize,
    pub trace_samples: usize,
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

pub fn run(args: DistillArgs) -> Result<DistillOutcome> {
    let device = crate::device::open_or_cpu(args.device.as_deref())?;
    let mut s: DistillSettings = match &args.config {
        Some(p) => crate::settings::load(p)?,
        None => DistillSettings::default(),
    };
    if let Some(sh) = &args.shared {
        s = sh.lay_over(s)?;
    }
    let out = args.out.clone().unwrap_or_else(|| crate::r1::sibling_run(&args.from, "distill"));
    // Any arm's folder in use, finished or not, is another run's: refused before any work.
    if let Some(arm) = ["student-base", "distilled", "rl-only"].iter().map(|a| out.join(a)).find(|d| d.exists()) {
        anyhow::bail!("{} already holds a distillation run ({}); choose another --out", out.display(), arm.display());
    }
    // The student's pretraining corpus (used when no --student is given); building it refuses
    // its shares before anything is written.
    let mut corpus = Corpus::new(TaskSet::parse(&s.tasks)?.with_letters(s.letters)?, s.imperfect, s.seed ^ 0x57)?
        .with_mixing(s.mixing)?;
    let tasks = &corpus.tasks;
    // The RL arm's settings are checked before the student and the distillation train.
    s.rl.validate().context("the distill settings' [rl]")?;
    s.student_pretrain.validate().context("the distill settings' [student_pretrain]")?;
    s.sft.validate().context("the distill settings' [sft]")?;
    // Both models' folders, checked before the teacher samples for minutes.
    crate::device::require_checkpoint(&args.from, "the teacher (--from)")?;
    let student_tok = args.student.as_deref().map(|dir| crate::device::tokenizer(dir, "the student")).transpose()?;
    std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
    crate::pretrain::write_json_atomically(&out.join("settings.json"), &serde_json::to_value(&s)?)?;
    let heldout = tasks.held_out(s.eval_problems, s.eval_seed);
    // The teacher's traces and every evaluation may run as long as the RL arm's completions.
    let eval_cfg = EvalConfig::covering(s.k, s.rl.max_new_tokens);

    // The teacher's verified traces.
    let (teacher, teacher_tok) = crate::device::load_with_tokenizer(&args.from, &device, "the teacher")?;
    // The student reads the traces as text, through its own tokenizer (a fresh one the teacher's).
    let tok = student_tok.unwrap_or_else(|| teacher_tok.clone());
    let prompts = tasks.problems(s.trace_problems, s.seed ^ 0xD157, Split::Train);
    let (traces, stats) = rejection_sample(
        &*teacher,
        &*teacher_tok,
        &prompts,
        s.trace_samples,
        1.0,
        eval_cfg.max_new_tokens,
        &mut Rng::new(s.seed ^ 0x7EAC),
    )?;
    drop(teacher);
    let (traces, long) = fitting(&*tok, traces, s.sft.seq_len)?;
    if long > 0 {
        println!("distill: {long} traces longer than `sft.seq_len` left out");
    }
    if traces.is_empty() {
        anyhow::bail!(
            "the teacher {} wrote no verified, well-formatted trace in {} samples: nothing to distil",
            args.from.display(),
            stats.sampled
        );
    }
    println!(
        "distill: the teacher wrote {} samples, {} correct, {} kept, {} unique traces",
        stats.sampled, stats.correct, stats.accepted, stats.unique
    );

    // The student base.
    let student: Box<dyn CausalLm> = match &args.student {
        Some(dir) => {
            let model = crate::device::load(dir, &device, "the student")?;
            crate::device::check_fits(&*tok, &*model, dir, "the student")?;
            model
        }
        None => {
            // Its config names the tokenizer's BOS and stop tokens, so its checkpoints stop
            // generation where this run does.
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
            let model = moved_to(Box::new(DenseModel::new(cfg, s.seed)?), &device)?;
            let n = (s.student_pretrain.steps as usize * s.student_pretrain.batch).min(20_000);
            let docs: Vec<Example> = (0..n)
                .map(|_| {
                    let (prompt, completion) = corpus.next_pair();
                    Example { prompt, completion }
                })
                .collect();
            sft_with_bar(&*model, &*tok, &docs, &s.student_pretrain, None)
                .context("the student's pretraining (`student_pretrain`)")?;
            model
        }
    };
    let base_dir = out.join("student-base");
    std::fs::create_dir_all(&base_dir)?;
    save(&*student, &*tok, &base_dir)?;
    let student_base = evaluate(&*student, &*tok, &heldout, &eval_cfg)?;
    write_eval(&base_dir.join("eval.json"), &student_base)?;

    // Arm 1: SFT on the teacher's traces.
    let t0 = Instant::now();
    let distilled = student.duplicate()?;
    sft_with_bar(&*distilled, &*tok, &traces, &s.sft, None).context("distillation SFT (`sft`)")?;
    let distill_seconds = t0.elapsed().as_secs_f64();
    let dir = out.join("distilled");
    std::fs::create_dir_all(&dir)?;
    save(&*distilled, &*tok, &dir)?;
    let distilled_report = evaluate(&*distilled, &*tok, &heldout, &eval_cfg)?;
    write_eval(&dir.join("eval.json"), &distilled_report)?;

    // Arm 2: GRPO on the student base for the same wall-clock time.
    let rl_dir = out.join("rl-only");
    std::fs::create_dir_all(&rl_dir)?;
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
    let rl_steps = t.run.step;
    let rl_seconds = t1.elapsed().as_secs_f64();
    save(&*t.policy, &*tok, &rl_dir)?;
    let rl_only = evaluate(&*t.policy, &*tok, &heldout, &eval_cfg)?;
    write_eval(&rl_dir.join("eval.json"), &rl_only)?;

    println!(
        "\ndistillation vs RL on the same student (SFT {} steps on {} traces in {distill_seconds:.0} s vs GRPO {rl_steps} steps in {rl_seconds:.0} s):",
        s.sft.steps,
        traces.len()
    );
    print_report("student base", &student_base);
    println!("{}", report_row("distilled (SFT on R1 traces)", &distilled_report));
    println!("{}", report_row("RL-only (GRPO, same compute)", &rl_only));
    Ok(DistillOutcome {
        student_base,
        distilled: distilled_report,
        rl_only,
        distill_seconds,
        rl_seconds,
        rl_steps,
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
