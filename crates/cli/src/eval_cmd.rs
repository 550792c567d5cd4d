//! `whale eval`: held-out accuracy of a checkpoint.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use whale_rl::eval::{completion_text, eval_prompts, evaluate_prompts, AnswerStyle, ChatPrompts, EvalConfig};
use whale_rl::parallel::model::generate::{CacheMode, SamplingConfig};
use whale_rl::parallel::model::tensor::Rng;
use whale_rl::parallel::model::tokenizer::tokenizer_for;
use whale_rl::rollout::PromptTemplate;
use whale_rl::tasks::{load_jsonl, load_jsonl_split, verify, Split, TaskSet};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A checkpoint directory (config.json + model.safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Tasks with optional difficulty ranges, e.g. add:3-4,mul.
    #[arg(long, default_value = "add:2-3")]
    pub tasks: String,
    /// The share of --tasks problems whose operands are written in letter numerals (0-9 as
    /// k l m n o p q u v w), as the runs' `letters` (0.25 by default, as pretraining's): the same
    /// value draws the run's problems.
    #[arg(long, default_value_t = 0.25)]
    pub letters: f64,
    /// A JSONL file of problems (`prompt`/`problem`/`question` and `answer`, or MATH's
    /// `solution`: MATH-500, AIME and GSM8K files load as they are) instead of the embedded
    /// tasks: its held-out prompts (those training on the file leaves out), or every line with
    /// --all-lines.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// With --data: evaluate every line of the file (a test set no run trained on).
    #[arg(long, requires = "data")]
    pub all_lines: bool,
    /// Samples per problem.
    #[arg(long, default_value_t = 8)]
    pub k: usize,
    /// Held-out problems drawn from --tasks; with --data, the first this many of the file's
    /// held-out problems, as a run's table reports them (every line with --all-lines).
    #[arg(long, default_value_t = 128)]
    pub problems: usize,
    /// Sampling temperature (> 0: pass@1 and pass@k are over samples, never greedy decoding).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Sample from the K most probable tokens only (off by default).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample from the most probable tokens whose mass reaches P, in (0, 1] (off by default; the
    /// R1 paper evaluates with --temperature 0.6 --top-p 0.95).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// The completion length limit: at least the `max_new_tokens` the model was trained with (a
    /// completion cut off counts as wrong).
    #[arg(long, default_value_t = EvalConfig::default().max_new_tokens)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The decode cache: naive (per-head K/V) or absorb (the MLA latent).
    #[arg(long, default_value = "absorb")]
    pub cache: String,
    /// Print the greedy completions of the first N problems.
    #[arg(long, default_value_t = 0)]
    pub show: usize,
    /// cpu (the default), or cuda / cuda:N: the model samples there.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// fp32 (the default) or bf16: the dtype the model computes in (as `--precision` of the
    /// post-training commands, whose evaluations it then reproduces).
    #[arg(long)]
    pub precision: Option<String>,
    /// Each prompt as a user message in the checkpoint's chat template, with the generation
    /// prompt (as `whale generate --chat`): how a chat model such as R1-Distill-Qwen is asked.
    #[arg(long)]
    pub chat: bool,
    /// What each prompt is written in, as the run being evaluated wrote it: `plain`, or `r1`
    /// (R1-Zero's template, `whale r1-zero --template r1`).
    #[arg(long, conflicts_with = "chat", value_parser = ["plain", "r1"])]
    pub template: Option<String>,
    /// A system message before each prompt (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Score the last `\boxed{}` after the completion's `</think>` rather than `<answer>` tags, and
    /// (with --chat) ask for it after each prompt with the R1 paper's "Please reason step by
    /// step, and put your final answer within \boxed{}.".
    #[arg(long)]
    pub boxed: bool,
}

pub fn run(a: EvalArgs) -> Result<()> {
    if !(a.temperature > 0.0 && a.temperature.is_finite()) {
        anyhow::bail!(
            "--temperature {}: must be > 0 (pass@k scores samples; --show prints greedy ones)",
            a.temperature
        );
    }
    if a.top_k == Some(0) {
        anyhow::bail!("--top-k 0: keeps no token (leave it out to sample from every token)");
    }
    if let Some(p) = a.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        anyhow::bail!("--top-p {p}: must be in (0, 1] (1 keeps every token)");
    }
    if a.max_new_tokens == 0 {
        anyhow::bail!("--max-new-tokens 0: a completion needs at least one token (its answer and EOS)");
    }
    // (--all-lines scores every line of the file, which has at least one.)
    crate::settings::check_evaluation(if a.all_lines { usize::MAX } else { a.problems }, a.k, "--problems", "--k")?;
    let device = crate::device::open(&a.device)?;
    let dtype = crate::device::compute_dtype(a.precision.as_deref(), "FP8 GEMMs run in `whale generate --fp8`")?;
    let mut model = crate::device::load(&a.checkpoint, &device, "the checkpoint")?;
    model.set_compute_dtype(dtype);
    let problems = match &a.data {
        Some(path) if a.all_lines => load_jsonl(path)?,
        Some(path) => {
            let context =
                || format!("evaluating the held-out prompts of {} (--all-lines takes every line)", path.display());
            // The first --problems of them, each problem once, as a run's table reports.
            let mut held = load_jsonl_split(path, Split::HeldOut).with_context(context)?.0;
            held.truncate(a.problems);
            held
        }
        None => TaskSet::parse(&a.tasks)?.with_letters(a.letters)?.held_out(a.problems, a.seed),
    };
    let cache = CacheMode::parse(&a.cache).with_context(|| format!("--cache {}: expected naive or absorb", a.cache))?;
    let cfg = EvalConfig {
        samples: a.k,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        max_new_tokens: a.max_new_tokens,
        cache,
        chat: match a.chat {
            true => Some(ChatPrompts::new(crate::infer::chat_template(&a.checkpoint)?, a.system.clone())?),
            false => None,
        },
        answers: if a.boxed { AnswerStyle::Boxed } else { AnswerStyle::Tags },
        template: match &a.template {
            Some(name) => PromptTemplate::parse(name).map_err(|e| anyhow::anyhow!("--template: {e}"))?,
            // A run's checkpoint is asked as the run sampled (its settings.json records it).
            None if !a.chat => match crate::settings::run_template(&a.checkpoint) {
                Some(template) if template != PromptTemplate::Plain => {
                    eprintln!(
                        "note: asking in the `{template}` prompt template its run trained with (--template plain: \
                         without)"
                    );
                    template
                }
                _ => PromptTemplate::Plain,
            },
            None => PromptTemplate::Plain,
        },
        ..EvalConfig::default()
    };
    // The checkpoint's tokenizer: the character one for our own runs, tokenizer.json for an HF
    // model (whose vocabulary the character one cannot be).
    let tok = tokenizer_for(&a.checkpoint)?;
    crate::device::check_fits(&*tok, &*model, &a.checkpoint, "the checkpoint")?;
    // Every prompt as the model will read it (a chat template's text and all) leaves room for a
    // completion.
    let source_flag = match &a.data {
        Some(path) => format!("--data {}", path.display()),
        None => format!("--tasks {}", a.tasks),
    };
    let asked_by = source_flag
        + match (a.chat, cfg.template) {
            (true, _) => " in the chat template",
            (false, PromptTemplate::R1) => " in R1-Zero's template",
            (false, PromptTemplate::Plain) => "",
        };
    let prompts = eval_prompts(&*tok, &problems, &cfg).with_context(|| asked_by.clone())?;
    crate::settings::check_prompt_room(&prompts, &problems, model.max_positions(), &asked_by)?;
    if a.show > 0 {
        let shown = a.show.min(problems.len());
        let greedy =
            SamplingConfig { cache, ..SamplingConfig::greedy(cfg.max_new_tokens, tok.stop_ids()) }.limited_to(&*tok);
        let completions = model.generate(&prompts[..shown], &greedy, &mut Rng::new(a.seed))?;
        for ((p, ids), g) in problems.iter().zip(&prompts).zip(completions) {
            let text = completion_text(&*tok, &g);
            let verdict = if g.truncated {
                "truncated"
            } else if verify(p, &cfg.scored_text(&text)) {
                "correct"
            } else {
                "wrong"
            };
            // A chat or R1-Zero prompt as the model read it, template and all.
            let templated = cfg.chat.is_some() || cfg.template != PromptTemplate::Plain;
            let prompt = if templated { tok.decode(ids) } else { p.prompt.clone() };
            println!("{prompt}{text}  [{verdict}]");
        }
    }
    let source = match &a.data {
        Some(path) if a.all_lines => format!("every line of {}", path.display()),
        Some(path) => format!("the held-out prompts of {}", path.display()),
        None => format!("held-out {}", a.tasks),
    };
    let filters = a.top_k.map_or(String::new(), |k| format!(", top-k {k}"))
        + &a.top_p.map_or(String::new(), |p| format!(", top-p {p}"));
    let template = cfg.chat.as_ref().map(|c| format!(", in {}'s chat template", c.template().origin().display()));
    let asked = template.unwrap_or_default() + if a.boxed { ", answers in \\boxed{}" } else { "" };
    println!(
        "evaluating {} problems: {source} ({} samples at T = {}{filters}{asked})",
        problems.len(),
        a.k,
        a.temperature
    );
    let t0 = std::time::Instant::now();
    let r = evaluate_prompts(&*model, &*tok, &problems, &prompts, &cfg)?;
    println!("evaluated in {:.1} s ({:?} cache)", t0.elapsed().as_secs_f64(), cache);
    crate::pretrain::print_report(&a.checkpoint.display().to_string(), &r);
    for (task, p1) in &r.per_task {
        println!("  {task}: pass@1 {p1:.3}");
    }
    Ok(())
}
