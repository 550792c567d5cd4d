//! The `whale` command. It parses flags, wires the crates together and draws progress; the work
//! itself lives in the library crates.

mod eval_cmd;
mod infer;
mod plot;
mod pretrain;
mod r1_zero;
mod settings;

use anyhow::Result;
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
    /// Today it runs pretraining and R1-Zero (the R1 stages and distillation arrive with #7).
    All(pretrain::PretrainArgs),
    /// Pretrain a DeepSeek-V3 model (MLA, DeepSeekMoE, MTP) on the embedded reasoning corpus.
    Pretrain(pretrain::PretrainArgs),
    /// Held-out greedy accuracy, pass@1, pass@k and cons@k of a checkpoint on the embedded tasks.
    Eval(eval_cmd::EvalArgs),
    /// Charts (SVG) of a run's metrics: loss, MTP loss, LR, MaxVio per layer, expert load.
    Plot(plot::PlotArgs),
    /// R1-Zero: GRPO (or the PPO baseline) with rule-based rewards directly on a pretrained base model.
    R1Zero(r1_zero::R1ZeroArgs),
    /// The four-stage R1 pipeline (not built yet).
    R1,
    /// Distil the R1 model into a small dense student (not built yet).
    Distill,
    /// Continue a prompt from a DeepSeek-V3, Qwen2 or Llama checkpoint (greedy, sampled, or MTP
    /// speculative), with tokens/s.
    Generate(infer::GenerateArgs),
    /// Config, parameter counts (total / activated) and KV-cache bytes per token of a checkpoint.
    Info(infer::InfoArgs),
    /// Pipeline schedules: simulate and draw (not built yet).
    Schedule,
}

fn not_built(what: &str, issue: &str) -> Result<()> {
    anyhow::bail!("`whale {what}` is not built yet: it arrives with issue {issue}")
}

/// Pretraining, then R1-Zero (GRPO) on its checkpoint, each into its folder of the run.
fn main_job(args: pretrain::PretrainArgs) -> Result<()> {
    println!("whale: the main job (pretrain -> R1-Zero -> R1 -> distill). Pretraining and R1-Zero run now;");
    println!("the R1 stages and distillation arrive with issue #7.\n");
    let out = pretrain::run(args)?;
    println!();
    r1_zero::run(r1_zero::R1ZeroArgs { base: out.join("checkpoint"), ..Default::default() })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => main_job(pretrain::PretrainArgs::main_job()),
        Some(Job::All(args)) => main_job(args),
        Some(Job::Pretrain(args)) => pretrain::run(args).map(|_| ()),
        Some(Job::Eval(args)) => eval_cmd::run(args),
        Some(Job::Plot(args)) => plot::run(args),
        Some(Job::R1Zero(args)) => r1_zero::run(args),
        Some(Job::R1) => not_built("r1", "#7"),
        Some(Job::Distill) => not_built("distill", "#7"),
        Some(Job::Generate(args)) => infer::generate(args),
        Some(Job::Info(args)) => infer::info(args),
        Some(Job::Schedule) => not_built("schedule", "#9"),
    }
}
