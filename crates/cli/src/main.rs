//! The `whale` command. It parses flags, wires the crates together and draws progress; the work
//! itself lives in the library crates.
//!
//! Today the foundation exists (tensors, autograd, CPU kernels, AdamW); the jobs below land with
//! the issues named beside them, and until then each says so instead of pretending to run.

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
    All,
    /// Pretrain a DeepSeek-V3 model (MLA, DeepSeekMoE, MTP) on the embedded reasoning corpus.
    Pretrain,
    /// GRPO with rule-based rewards directly on a pretrained base model.
    R1Zero,
    /// The four-stage R1 pipeline: cold-start SFT, reasoning RL, rejection sampling + SFT, RL.
    R1,
    /// Distil the R1 model into a small dense Llama/Qwen2-style student.
    Distill,
    /// Generate text from a checkpoint (latent KV cache, MTP speculative decoding).
    Generate,
    /// Config, parameter counts and cache sizes of a checkpoint.
    Info,
    /// Held-out pass@1 / pass@k of a checkpoint on the embedded tasks.
    Eval,
    /// Pipeline schedules (1F1B, ZB1P, DualPipe, DualPipeV): simulate and draw.
    Schedule,
}

/// What each job will run, and the issue that brings it.
fn plan(job: &Job) -> (&'static str, &'static str) {
    match job {
        Job::All => {
            ("pretrain -> R1-Zero -> R1 (4 stages) -> distill, with a table of held-out pass@1/pass@8 per model", "#7")
        }
        Job::Pretrain => {
            ("train the `tiny` DeepSeek-V3 preset on the embedded task corpus and report pass@1 / pass@8", "#5")
        }
        Job::R1Zero => ("GRPO with accuracy + format rewards on the base model; pass@1 before and after", "#6"),
        Job::R1 => {
            ("cold-start SFT, reasoning GRPO, rejection sampling + SFT, all-scenario RL with a reward model", "#7")
        }
        Job::Distill => ("SFT a dense student on verified R1 traces; compare with GRPO on the student", "#7"),
        Job::Generate => ("prefill + decode with the naive or absorbed latent cache, optional MTP speculation", "#4"),
        Job::Info => ("print config, total/activated parameters and cache bytes per token", "#4"),
        Job::Eval => ("pass@1 (greedy and sampled), pass@k, cons@k on held-out tasks", "#5"),
        Job::Schedule => ("simulate a pipeline schedule and draw its timeline as SVG", "#9"),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let job = cli.command.unwrap_or(Job::All);
    let (what, issue) = plan(&job);
    println!("whale {job:?}: {what}.");
    println!("This job is not built yet: it arrives with issue {issue}. The foundation it stands on is");
    println!("in place: whale-tensor (tensors, autograd with a B/W split, AdamW) on whale-kernels (CPU).");
    println!("Run the tests with: cargo test --workspace --all-targets");
    Ok(())
}
