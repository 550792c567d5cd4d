//! The `whale` command. It parses flags, wires the crates together and draws progress; the work
//! itself lives in the library crates.

mod device;
mod distill;
mod eval_cmd;
mod infer;
mod plot;
mod pretrain;
mod r1;
mod r1_zero;
mod schedule;
mod settings;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "whale", version, about = "Train and post-train DeepSeek-V3/R1-style models, on CPU or CUDA.")]
struct Cli {
    #[command(subcommand)]
    command: Option<Job>,
}

#[derive(Subcommand, Debug)]
enum Job {
    /// The main job: pretrain -> R1-Zero -> R1 (four stages) -> distill, then a results table.
    /// `--out` is the run folder (default: the first free `runs/main[-N]`); the pretraining
    /// flags' tasks, letters, seed, eval-problems and k hold for every stage.
    #[command(
        mut_arg("out", |a| a.help("The main job's folder, holding pretrain/, r1-zero/, r1/, distill/ and results.md (default: the first free runs/main[-N])")),
        mut_arg("resume", |a| a.help("Continue the main job in --out (default runs/main): each stage it started resumes, the rest run"))
    )]
    All(pretrain::PretrainArgs),
    /// Pretrain a DeepSeek-V3 model (MLA, DeepSeekMoE, MTP) on the embedded reasoning corpus.
    Pretrain(pretrain::PretrainArgs),
    /// Held-out greedy accuracy, pass@1, pass@k and cons@k of a checkpoint on the embedded tasks.
    Eval(eval_cmd::EvalArgs),
    /// Charts (SVG) of a run's metrics: loss, MTP loss, LR, MaxVio per layer, expert load.
    Plot(plot::PlotArgs),
    /// R1-Zero: GRPO (or the PPO baseline) with rule-based rewards directly on a pretrained base model.
    R1Zero(r1_zero::R1ZeroArgs),
    /// The four-stage R1 pipeline: cold-start SFT, reasoning RL, rejection-sampling SFT,
    /// all-scenario RL with a learned reward model; or one stage from a checkpoint.
    R1(r1::R1Args),
    /// Distil the R1 model into a small dense Qwen2-style student (SFT on its verified traces),
    /// against the same student trained by GRPO for the same compute.
    Distill(distill::DistillArgs),
    /// Continue a prompt from a DeepSeek-V3, Qwen2 or Llama checkpoint (greedy, sampled, or MTP
    /// speculative), with tokens/s.
    Generate(infer::GenerateArgs),
    /// Config, parameter counts (total / activated) and KV-cache bytes per token of a checkpoint.
    Info(infer::InfoArgs),
    /// Write a DeepSeek-V3 checkpoint as an FP8 release: projection and expert weights in E4M3
    /// with 128x128-block `weight_scale_inv` (run it with `whale generate --fp8`).
    Quantize(infer::QuantizeArgs),
    /// Pipeline schedules (1F1B, ZB1P, DualPipe, DualPipeV): simulate under a cost model, print
    /// each rank's bubble against the DeepSeek-V3 table, and draw the timeline as an SVG.
    Schedule(schedule::ScheduleArgs),
}

/// The whole chain with embedded defaults: pretraining, R1-Zero, the four R1 stages and
/// distillation, each into its folder of the run; then the results table (printed and written
/// as `results.md`) and the RL charts. With `--resume` (in `--out`, by default `runs/main`) each
/// stage a run started continues with its own `--resume` (a finished one is read back or
/// evaluated again), and the stages it had not reached run.
fn main_job(mut args: pretrain::PretrainArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    const STAGES: [&str; 4] = ["pretrain", "r1-zero", "r1", "distill"];
    let resume = args.resume;
    let run = match args.out.take() {
        Some(run) => run,
        None if resume => PathBuf::from("runs/main"),
        None => pretrain::free_main_run(),
    };
    // A stage continues where it wrote its settings (each does before any work).
    let started = |stage: &str| resume && run.join(stage).join("settings.json").exists();
    if resume && !STAGES.iter().any(|s| started(s)) {
        anyhow::bail!("--resume: {} holds no main job to continue", run.display());
    }
    if let Some(used) = STAGES.iter().chain(&["results.md"]).map(|d| run.join(d)).find(|d| d.exists() && !resume) {
        anyhow::bail!(
            "{} already holds a run ({}); pass --resume to continue it or choose another --out",
            run.display(),
            used.display()
        );
    }
    args.out = Some(run.join("pretrain"));
    args.resume = started("pretrain");
    println!("whale: the main job (pretrain -> R1-Zero -> R1 in four stages -> distill) in {}\n", run.display());
    // Every stage runs where pretraining ran (`--device`, or its config file's `device`), on its
    // tasks and evaluation set.
    let ps = args.settings()?;
    let device = Some(ps.device.clone());
    // And recomputes what pretraining does (the same numbers either way), and computes in its
    // dtype: bf16 after a bf16 or fp8 run (whose non-GEMM compute is bf16; FP8 GEMMs are
    // pretraining's alone).
    let recompute = Some(ps.recompute);
    let trained_in = whale_rl::parallel::trainer::Precision::parse(&ps.precision)?;
    let precision = (trained_in != whale_rl::parallel::trainer::Precision::Fp32).then(|| "bf16".to_string());
    let shared = crate::settings::Shared {
        tasks: ps.tasks.clone(),
        letters: ps.letters,
        seed: ps.seed,
        eval_seed: ps.seed,
        eval_problems: ps.eval_problems,
        k: ps.k,
        validation_problems: ps.validation_problems,
    };
    let out = pretrain::run(args)?;
    let base = out.join("checkpoint");
    println!();
    let zero = r1_zero::run(r1_zero::R1ZeroArgs {
        base: base.clone(),
        out: Some(run.join("r1-zero")),
        steps: Some(50),
        tasks: Some(shared.tasks.clone()),
        letters: Some(shared.letters),
        seed: Some(shared.seed),
        eval_seed: Some(shared.eval_seed),
        eval_problems: Some(shared.eval_problems),
        k: Some(shared.k),
        validation_problems: Some(shared.validation_problems),
        device: device.clone(),
        recompute,
        precision: precision.clone(),
        resume: started("r1-zero"),
        ..Default::default()
    })?;
    println!();
    let stages = r1::run(r1::R1Args {
        from: base,
        base: None,
        stage: r1::Stage::All,
        out: Some(run.join("r1")),
        config: None,
        data: None,
        device: device.clone(),
        recompute,
        precision: precision.clone(),
        resume: started("r1"),
        shared: Some(shared.clone()),
    })?;
    let teacher = stages.last().expect("four stages").checkpoint.clone();
    let distilled = distill::run(distill::DistillArgs {
        from: teacher,
        student: None,
        out: Some(run.join("distill")),
        config: None,
        device,
        recompute,
        precision,
        shared: Some(shared),
        resume: started("distill"),
    })?;

    let mut rows =
        vec![("base (pretrained)".to_string(), zero.before.clone()), ("R1-Zero".to_string(), zero.after.clone())];
    rows.extend(stages.iter().map(|s| (s.label.clone(), s.report.clone())));
    rows.push(("student base (dense, pretrained)".into(), distilled.student_base.clone()));
    rows.push(("distilled student (SFT on R1 traces)".into(), distilled.distilled.clone()));
    rows.push(("RL-only student (GRPO, same compute)".into(), distilled.rl_only.clone()));
    let k = zero.after.samples;
    let mut table =
        format!("| model | pass@1 | pass@{k} | mean length | format | language |\n|---|---:|---:|---:|---:|---:|\n");
    for (name, r) in &rows {
        table.push_str(&format!(
            "| {name} | {:.3} | {:.3} | {:.1} | {:.3} | {:.3} |\n",
            r.pass1, r.pass_k, r.mean_length, r.format_rate, r.language
        ));
    }
    let mut charts: Vec<(String, std::path::PathBuf)> = vec![("R1-Zero".into(), zero.out.clone())];
    charts.extend(stages.iter().filter_map(|s| s.rl_dir.clone().map(|d| (s.label.clone(), d))));
    charts.push(("RL-only student".into(), distilled.rl_dir.clone()));
    plot::rl_charts(&run, &charts)?;
    let held = zero.after.problems;
    let times: Vec<String> = stages.iter().map(|s| format!("{} {:.0} s", s.label, s.seconds)).collect();
    let distill_note = format!(
        "Distillation: SFT of the student on the R1 model's verified traces took {:.0} s; the RL-only student ran {} \
         GRPO steps in {:.0} s.",
        distilled.distill_seconds, distilled.rl_steps, distilled.rl_seconds
    );
    let doc = format!(
        "# Whale main job\n\nHeld-out problems: {held} (their own seed; a quarter posed in letter numerals), {k} samples each at \
         temperature 1. pass@1 is the mean accuracy of the samples, pass@{k} the unbiased estimator, language the share of \
         the reasoning's numerals in the prompt's script.\n\n{table}\n{distill_note}\nStage times: {}.\n\nTotal time {:.0} s. \
         Charts: rl_reward.svg, rl_length.svg, rl_pass1.svg.\n",
        times.join(", "),
        t0.elapsed().as_secs_f64()
    );
    crate::pretrain::write_atomically(&run.join("results.md"), &doc)
        .with_context(|| format!("writing {}", run.join("results.md").display()))?;
    println!(
        "\n{table}\nmain job done in {:.0} s; table in {}",
        t0.elapsed().as_secs_f64(),
        run.join("results.md").display()
    );
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    keep_freed_memory();
    // The job computes on a rayon pool of its own, as each rank of a mesh does (see
    // whale_parallel::threads: a parallel loop started outside a pool costs two wake-ups).
    whale_rl::parallel::threads::in_own_pool(0, "whale", || match cli.command {
        None => main_job(pretrain::PretrainArgs::default()),
        Some(Job::All(args)) => main_job(args),
        Some(Job::Pretrain(args)) => pretrain::run(args).map(|_| ()),
        Some(Job::Eval(args)) => eval_cmd::run(args),
        Some(Job::Plot(args)) => plot::run(args),
        Some(Job::R1Zero(args)) => r1_zero::run(args).map(|_| ()),
        Some(Job::R1(args)) => r1::run(args).map(|_| ()),
        Some(Job::Distill(args)) => distill::run(args).map(|_| ()),
        Some(Job::Generate(args)) => infer::generate(args),
        Some(Job::Info(args)) => infer::info(args),
        Some(Job::Quantize(args)) => infer::quantize(args),
        Some(Job::Schedule(args)) => schedule::run(args),
    })?
}

/// glibc's malloc gives the free memory at the top of a thread's heap back to the kernel once it
/// passes 128 KiB (and serves blocks of 128 KiB or more, until its threshold adapts, with mmap),
/// so the next training step faults the same pages in again, zero-filled: a step of a small model
/// frees thousands of activation-sized buffers. The job keeps what it frees for its next
/// allocations instead: trimming only past 1 GiB, and mmap only for blocks of 32 MiB or more
/// (glibc's largest threshold on 64-bit, where its adaptive one ends; fixing the trim threshold
/// stops the adapting). 100 steps and an evaluation of `tiny` on two cores made 314 madvise calls
/// in 30 steps and took 13.3 s; with these, 3 calls and 11.4 s, for 60 MB more resident memory at
/// the peak.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    for (param, value, name) in
        [(libc::M_TRIM_THRESHOLD, 1 << 30, "M_TRIM_THRESHOLD"), (libc::M_MMAP_THRESHOLD, 32 << 20, "M_MMAP_THRESHOLD")]
    {
        // SAFETY: mallopt only sets one of the allocator's thresholds; nothing else runs yet.
        if unsafe { libc::mallopt(param, value) } != 1 {
            eprintln!("whale: glibc refused mallopt({name}, {value}); freed memory may go back to the kernel");
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
