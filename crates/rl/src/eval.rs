//! Evaluation on held-out problems (spec/rl.md "Definitions"): greedy accuracy, pass@1 (mean
//! accuracy of k samples at the sampling temperature), pass@k with the unbiased estimator,
//! cons@k (majority vote over the k answers), mean completion length and format rate. Prompts
//! are the runs' own, or a chat template's rendering of them; answers are in `<answer>` tags, or
//! in `\boxed{}` as the R1 paper scores its chat models.

use std::collections::HashMap;

use whale_parallel::model::chat::{ChatMessage, ChatTemplate};
use whale_parallel::model::generate::{CacheMode, Generation, SamplingConfig};
use whale_parallel::model::tensor::Rng;
use whale_parallel::model::tokenizer::Tokenizer;
use whale_parallel::model::CausalLm;
use whale_parallel::trainer::check_batch_tokens;

use crate::rewards::{LanguageConsistency, Sample};
use crate::rollout::{templated_prompts, PromptTemplate};
use crate::tasks::{answer_key, extract_boxed, verify, AnswerKey, Problem};
use crate::{Error, Result};

/// The unbiased pass@k estimator `1 - C(n-c, k) / C(n, k)` for `c` correct of `n` samples;
/// NaN where it is undefined (`k > n`, or more correct samples than samples).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if k > n || c > n {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    // Product form, stable for large n: prod_{i=n-c+1}^{n} (1 - k / i).
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

/// A generation as rewards and evaluation read it: its tokens decoded without the stop token
/// that ended it (whatever text that token decodes to in the tokenizer at hand).
pub fn completion_text(tok: &dyn Tokenizer, g: &Generation) -> String {
    let tokens =
        if g.truncated { &g.tokens[..] } else { g.tokens.split_last().map_or(&g.tokens[..], |(_, rest)| rest) };
    tok.decode(tokens)
}

/// The R1 template's tags.
const TEMPLATE_TAGS: [&str; 4] = ["<think>", "</think>", "<answer>", "</answer>"];

/// Whether a completion ([`completion_text`]) follows the R1 template: `<think>...</think>` then
/// `<answer>...</answer>`, each once, in that order, and nothing after. ASCII whitespace may
/// come before, between and after the blocks: the R1 paper's template writes
/// `<think> reasoning process here </think> <answer> answer here </answer>`, open-r1's puts
/// newlines there, and a prompt ending in `Assistant:` is continued with a space.
pub fn well_formatted(completion: &str) -> bool {
    let space = |c: char| c.is_ascii_whitespace();
    let Some(rest) = completion.trim_start_matches(space).strip_prefix("<think>") else { return false };
    let Some((think, rest)) = rest.split_once("</think>") else { return false };
    let Some(rest) = rest.trim_start_matches(space).strip_prefix("<answer>") else { return false };
    let Some((answer, tail)) = rest.split_once("</answer>") else { return false };
    tail.trim_matches(space).is_empty() && !TEMPLATE_TAGS.iter().any(|t| think.contains(t) || answer.contains(t))
}

#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    pub problems: usize,
    pub samples: usize,
    /// Greedy accuracy (not pass@1).
    pub greedy: f64,
    /// Mean accuracy of the k samples per problem at the sampling temperature.
    pub pass1: f64,
    /// pass@k for k = `samples`.
    pub pass_k: f64,
    /// Majority vote over the k extracted answers.
    pub cons_k: f64,
    /// Mean completion length in tokens (sampled).
    pub mean_length: f64,
    /// Share of sampled completions in the R1 template and ended (a truncated one is not, as the
    /// format reward has it).
    pub format_rate: f64,
    /// Mean language consistency of the sampled completions of problems that have a language
    /// (the share of the reasoning's numerals in the prompt's script); NaN when none has one.
    pub language: f64,
    /// pass@1 per task name.
    pub per_task: Vec<(String, f64)>,
}

#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub samples: usize,
    pub temperature: f32,
    /// The samples' top-k and top-p filters ([`SamplingConfig`]'s); off by default. The R1
    /// paper's evaluations sample at temperature 0.6 with top-p 0.95.
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub cache: CacheMode,
    /// Prompts through a chat template (`None`: as the runs encode them).
    pub chat: Option<ChatPrompts>,
    /// Without `chat`: what the prompts are written in, as the run being evaluated sampled them.
    pub template: PromptTemplate,
    /// Where completions give their answers.
    pub answers: AnswerStyle,
}

/// Prompts as a chat model takes them: each problem's prompt is the user message (after an
/// optional system message), rendered by the checkpoint's template with the generation prompt.
#[derive(Debug, Clone)]
pub struct ChatPrompts {
    template: ChatTemplate,
    system: Option<String>,
    /// The generation prompt ends in `<think>` (R1's and R1-Distill's templates): completions
    /// start inside the reasoning, and are scored with the `<think>` put back in front.
    opens_think: bool,
}

impl ChatPrompts {
    pub fn new(template: ChatTemplate, system: Option<String>) -> Result<Self> {
        let probe = ChatPrompts { template, system, opens_think: false };
        let opens_think = probe.render("")?.trim_end().ends_with("<think>");
        Ok(ChatPrompts { opens_think, ..probe })
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The conversation up to the assistant's turn: the system message, `user`, the generation
    /// prompt.
    fn render(&self, user: &str) -> Result<String> {
        let system = self.system.iter().map(|s| ChatMessage::new("system", s.as_str()));
        let messages: Vec<ChatMessage> = system.chain([ChatMessage::new("user", user)]).collect();
        Ok(self.template.render(&messages, true)?)
    }
}

/// The R1 paper's instruction after a math question, asking for the answer in `\boxed{}`.
pub const BOXED_INSTRUCTION: &str = "Please reason step by step, and put your final answer within \\boxed{}.";

/// Where a completion gives its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AnswerStyle {
    /// The R1 template's `<think>...</think><answer>...</answer>`, what whale's runs train.
    #[default]
    Tags,
    /// The last `\boxed{...}` after the reasoning's `</think>`, as the R1 paper scores its chat
    /// models (R1, and the students distilled from it) on math; a chat prompt asks for it with
    /// [`BOXED_INSTRUCTION`].
    Boxed,
}

impl AnswerStyle {
    /// `completion` in the R1 template, which the verifiers, majority voting and the format rate
    /// read. A boxed answer after the last `</think>` becomes
    /// `<think>reasoning</think><answer>x</answer>`, the reasoning rid of the template's tags (so
    /// that an `<answer>` written while thinking neither scores nor swallows the boxed one);
    /// without `</think>`, the completion's last boxed answer still counts, but not as well
    /// formatted.
    pub fn as_template(self, completion: &str) -> String {
        let untagged = |text: &str| TEMPLATE_TAGS.iter().fold(text.to_string(), |t, tag| t.replace(tag, ""));
        match self {
            AnswerStyle::Tags => completion.to_string(),
            AnswerStyle::Boxed => match completion.rsplit_once("</think>") {
                Some((reasoning, response)) => {
                    let answer = extract_boxed(response).map_or_else(String::new, |a| format!("<answer>{a}</answer>"));
                    format!("<think>{}</think>{answer}", untagged(reasoning))
                }
                None => extract_boxed(completion).map_or_else(String::new, |a| format!("<answer>{a}</answer>")),
            },
        }
    }
}

impl EvalConfig {
    /// A completion as the scoring reads it: after the `<think>` a chat prompt opened, and in the
    /// R1 template ([`AnswerStyle::as_template`]).
    pub fn scored_text(&self, completion: &str) -> String {
        match &self.chat {
            Some(chat) if chat.opens_think => self.answers.as_template(&format!("<think>{completion}")),
            _ => self.answers.as_template(completion),
        }
    }
}

/// The prompt ids of `problems`: each prompt in `cfg.template` as the runs encode it
/// ([`templated_prompts`]), or with `cfg.chat` rendered as a user message (followed by
/// [`BOXED_INSTRUCTION`] on a line of its own for boxed answers) and encoded without the
/// tokenizer's own BOS, which the template writes.
pub fn eval_prompts(tok: &dyn Tokenizer, problems: &[Problem], cfg: &EvalConfig) -> Result<Vec<Vec<u32>>> {
    let Some(chat) = &cfg.chat else { return templated_prompts(tok, problems, cfg.template) };
    if cfg.template != PromptTemplate::Plain {
        return Err(Error::Rl("a chat template and a prompt template both given: choose one".into()));
    }
    problems
        .iter()
        .map(|p| {
            let text = match cfg.answers {
                AnswerStyle::Tags => chat.render(&p.prompt)?,
                AnswerStyle::Boxed => chat.render(&format!("{}\n{BOXED_INSTRUCTION}", p.prompt))?,
            };
            tok.encode(&text).map_err(|e| Error::Rl(format!("the chat prompt of {:?}: {e}", p.prompt)))
        })
        .collect()
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            samples: 8,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            max_new_tokens: 96,
            seed: 1234,
            cache: CacheMode::Absorb,
            chat: None,
            template: PromptTemplate::Plain,
            answers: AnswerStyle::Tags,
        }
    }
}

impl EvalConfig {
    /// The defaults with `samples` per problem and room for the completions of a model trained
    /// to write up to `trained` tokens (an RL run's `max_new_tokens`): a longer limit than the
    /// default's is kept, so a correct long answer is not cut off and counted wrong.
    pub fn covering(samples: usize, trained: usize) -> Self {
        let d = EvalConfig::default();
        EvalConfig { samples, max_new_tokens: d.max_new_tokens.max(trained), ..d }
    }
}

/// The completion whose answer most of `texts` give (cons@k), compared by value (a numeral in
/// either script, a countdown expression's value: see [`answer_key`]); ties go to the answer
/// seen first. `None` when no completion has an answer.
pub fn majority_vote(p: &Problem, texts: &[String]) -> Option<usize> {
    let keys: Vec<Option<AnswerKey>> = texts.iter().map(|t| answer_key(p, t)).collect();
    let mut votes: HashMap<&AnswerKey, (usize, std::cmp::Reverse<usize>)> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        if let Some(key) = key {
            votes.entry(key).or_insert((0, std::cmp::Reverse(i))).0 += 1;
        }
    }
    votes.into_values().max().map(|(_, std::cmp::Reverse(first))| first)
}

/// How many of one problem's samples solve it, and whether their majority answer does. A
/// truncated sample (`None`: it never ended) neither solves it nor votes, as the accuracy
/// reward has it.
pub fn score_samples(p: &Problem, samples: &[Option<String>]) -> (usize, bool) {
    let correct = samples.iter().flatten().filter(|t| verify(p, t)).count();
    let texts: Vec<String> = samples.iter().map(|t| t.clone().unwrap_or_default()).collect();
    (correct, majority_vote(p, &texts).is_some_and(|w| verify(p, &texts[w])))
}

/// `text`, the completion of `g`, as [`score_samples`] takes it: `None` when `g` was truncated.
fn finished(g: &Generation, text: &str) -> Option<String> {
    (!g.truncated).then(|| text.to_string())
}

/// Evaluates `model` on `problems`.
pub fn evaluate(
    model: &dyn CausalLm,
    tok: &dyn Tokenizer,
    problems: &[Problem],
    cfg: &EvalConfig,
) -> Result<EvalReport> {
    evaluate_prompts(model, tok, problems, &eval_prompts(tok, problems, cfg)?, cfg)
}

/// [`evaluate`] on the problems' prompt ids, [`eval_prompts`]' for the same `cfg` (a caller that
/// has already checked them need not build them twice).
pub fn evaluate_prompts(
    model: &dyn CausalLm,
    tok: &dyn Tokenizer,
    problems: &[Problem],
    prompts: &[Vec<u32>],
    cfg: &EvalConfig,
) -> Result<EvalReport> {
    assert_eq!(prompts.len(), problems.len(), "evaluate_prompts: one prompt a problem");
    // Either would report 0.000 for a model that was never asked.
    if problems.is_empty() || cfg.samples == 0 {
        return Err(Error::Rl(format!(
            "evaluation of {} problems with {} samples each: there is nothing to score",
            problems.len(),
            cfg.samples
        )));
    }
    // Every problem's samples are one generation's rows.
    if let Err(why) = check_batch_tokens(problems.len().saturating_mul(cfg.samples), cfg.max_new_tokens) {
        return Err(Error::Rl(format!(
            "evaluation of {} problems with {} samples each: {why}",
            problems.len(),
            cfg.samples
        )));
    }
    let stop = tok.stop_ids();
    let mut rng = Rng::new(cfg.seed);
    let greedy_cfg =
        SamplingConfig { cache: cfg.cache, ..SamplingConfig::greedy(cfg.max_new_tokens, stop.clone()) }.limited_to(tok);
    let greedy = model.generate(prompts, &greedy_cfg, &mut rng)?;
    let k = cfg.samples;
    let repeated: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), k)).collect();
    let sampled_cfg = SamplingConfig {
        cache: cfg.cache,
        top_k: cfg.top_k,
        top_p: cfg.top_p,
        ..SamplingConfig::sampled(cfg.temperature, cfg.max_new_tokens, stop)
    }
    .limited_to(tok);
    let sampled = model.generate(&repeated, &sampled_cfg, &mut rng)?;

    let n = problems.len() as f64;
    let (mut g_ok, mut p1, mut pk, mut cons, mut len, mut fmt) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let (mut lang, mut lang_n) = (0.0, 0usize);
    let mut per_task: HashMap<String, (f64, usize)> = HashMap::new();
    let text = |g: &Generation| cfg.scored_text(&completion_text(tok, g));
    for (i, p) in problems.iter().enumerate() {
        g_ok += score_samples(p, &[finished(&greedy[i], &text(&greedy[i]))]).0 as f64;
        let group = &sampled[i * k..(i + 1) * k];
        let texts: Vec<String> = group.iter().map(text).collect();
        let samples: Vec<Option<String>> = group.iter().zip(&texts).map(|(g, t)| finished(g, t)).collect();
        let (correct, majority) = score_samples(p, &samples);
        p1 += correct as f64 / k as f64;
        pk += pass_at_k(k, correct, k);
        cons += majority as u8 as f64;
        len += sampled[i * k..(i + 1) * k].iter().map(|g| g.tokens.len()).sum::<usize>() as f64 / k as f64;
        fmt += samples.iter().flatten().filter(|t| well_formatted(t)).count() as f64 / k as f64;
        for (t, g) in texts.iter().zip(&sampled[i * k..(i + 1) * k]) {
            let s = Sample { problem: p, text: t, tokens: g.tokens.len(), truncated: g.truncated };
            if let Some(v) = LanguageConsistency.share(&s) {
                lang += v;
                lang_n += 1;
            }
        }
        let e = per_task.entry(p.task.clone()).or_default();
        e.0 += correct as f64 / k as f64;
        e.1 += 1;
    }
    let mut per_task: Vec<(String, f64)> = per_task.into_iter().map(|(t, (s, c))| (t, s / c as f64)).collect();
    per_task.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(EvalReport {
        problems: problems.len(),
        samples: k,
        greedy: g_ok / n,
        pass1: p1 / n,
        pass_k: pk / n,
        cons_k: cons / n,
        mean_length: len / n,
        format_rate: fmt / n,
        language: if lang_n == 0 { f64::NAN } else { lang / lang_n as f64 },
        per_task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_at_k_matches_the_combinatorial_definition() {
        let binom = |n: u64, r: u64| -> f64 { (0..r).map(|i| (n - i) as f64 / (i + 1) as f64).product() };
        for n in 1..12u64 {
            for c in 0..=n {
                for k in 1..=n {
                    let want = if n - c < k { 1.0 } else { 1.0 - binom(n - c, k) / binom(n, k) };
                    assert!((pass_at_k(n as usize, c as usize, k as usize) - want).abs() < 1e-12);
                }
            }
        }
        assert_eq!(pass_at_k(8, 0, 8), 0.0);
        assert_eq!(pass_at_k(8, 1, 8), 1.0);
        assert!((pass_at_k(8, 2, 1) - 0.25).abs() < 1e-12);
        assert!(pass_at_k(3, 5, 1).is_nan() && pass_at_k(3, 1, 4).is_nan(), "undefined, not a number");
    }

    #[test]
    fn majority_vote_counts_answers_by_value() {
        use crate::tasks::language::to_digits;
        use crate::tasks::{Split, TaskSet};
        let answer = |a: &str| format!("<think>x</think><answer>{a}</answer>");
        // `c3,7,25t35=`: three spellings of one right expression outvote two identical wrong ones
        // (voting on the text alone, `25*7*3` would win 2 to 1).
        let p = Problem {
            task: "countdown".into(),
            prompt: "c3,7,25t35=".into(),
            answer: "(25+7)+3".into(),
            solution: String::new(),
        };
        let texts: Vec<String> = ["25*7*3", "(25+7)+3", "25*7*3", "25+(7+3)", "3+7+25", "<think>no answer"]
            .iter()
            .map(|a| if a.starts_with('<') { a.to_string() } else { answer(a) })
            .collect();
        let winner = majority_vote(&p, &texts).unwrap();
        assert!(verify(&p, &texts[winner]), "{}", texts[winner]);
        // Ties go to the answer seen first; no answer at all, no vote.
        assert_eq!(majority_vote(&p, &texts[..2]), Some(0));
        assert_eq!(majority_vote(&p, &texts[5..]), None);
        // A letter-numeral problem answered in either script: one answer.
        let tasks = TaskSet::parse("add:2").unwrap().with_letters(1.0).unwrap();
        let p = &tasks.problems(1, 3, Split::Train)[0];
        let (letters, digits) = (p.answer.clone(), to_digits(&p.answer));
        assert_ne!(letters, digits);
        let texts = vec![answer("1"), answer(&letters), answer("1"), answer(&digits), answer(&digits)];
        assert!(verify(p, &texts[majority_vote(p, &texts).unwrap()]));
    }

    #[test]
    fn truncated_samples_neither_solve_nor_vote() {
        let p = Problem { task: "add".into(), prompt: "12+7=".into(), answer: "19".into(), solution: String::new() };
        let text = |a: &str| Some(format!("<think>x</think><answer>{a}</answer>"));
        assert_eq!(score_samples(&p, &[text("19"), text("18"), text("18")]), (1, false));
        // The two right answers never ended: no credit, and the one finished answer wins the vote.
        assert_eq!(score_samples(&p, &[None, None, text("18")]), (0, false));
        assert_eq!(score_samples(&p, &[None, None, text("19")]), (1, true));
        assert_eq!(score_samples(&p, &[None]), (0, false));
    }

    #[test]
    fn format_check_is_strict_about_order_and_repetition() {
        assert!(well_formatted("<think>1+1=2</think><answer>2</answer>"));
        assert!(!well_formatted("<think>1+1=2</think><answer>2</answer><eos>"), "texts end before the stop token");
        assert!(well_formatted("<think></think><answer>2</answer>"));
        assert!(!well_formatted("<answer>2</answer><think>x</think>"));
        assert!(!well_formatted("<think>a</think><answer>2</answer>junk"));
        assert!(!well_formatted("<think>a<think>b</think><answer>2</answer>"));
        assert!(!well_formatted("<think>a</think><answer>2"));
        // Whitespace around the blocks, as the R1 paper's template and open-r1's write them.
        assert!(well_formatted(" <think> reasoning </think> <answer> 2 </answer>"));
        assert!(well_formatted("<think>\nreasoning\n</think>\n<answer>\n2\n</answer>\n"));
        assert!(!well_formatted("<think>a</think> so <answer>2</answer>"), "only whitespace between");
        assert!(!well_formatted("x <think>a</think><answer>2</answer>"));
        assert!(!well_formatted("\u{a0}<think>a</think><answer>2</answer>"), "ASCII whitespace only");
    }

    #[test]
    fn boxed_answers_read_as_the_template_would_write_them() {
        let p = Problem { task: "add".into(), prompt: "12+7=".into(), answer: "19".into(), solution: String::new() };
        let boxed = AnswerStyle::Boxed;
        // R1-Distill's shape: the template opened <think>, the model closes it and answers.
        let distill = "Okay, 12 and 7 make 19.\n</think>\n\nSo the sum is \\boxed{19}.";
        assert_eq!(boxed.as_template(distill), "<think>Okay, 12 and 7 make 19.\n</think><answer>19</answer>");
        assert!(verify(&p, &boxed.as_template(distill)) && well_formatted(&boxed.as_template(distill)));
        // The model's own <think>, and a boxed guess inside the reasoning that the final one overrides.
        let own = "<think>maybe \\boxed{18}? no</think>\\boxed{ 19 }";
        assert_eq!(boxed.as_template(own), "<think>maybe \\boxed{18}? no</think><answer>19</answer>");
        // No </think>: the answer counts, the format does not; no boxed answer after it: wrong.
        assert_eq!(boxed.as_template("\\boxed{19}"), "<answer>19</answer>");
        assert!(verify(&p, &boxed.as_template("\\boxed{19}")) && !well_formatted(&boxed.as_template("\\boxed{19}")));
        assert!(!verify(&p, &boxed.as_template("\\boxed{19}</think>19")));
        assert!(!verify(&p, &boxed.as_template("19")));
        // Tags written while thinking neither score nor swallow the boxed answer.
        assert!(verify(&p, &boxed.as_template("<answer>18</answer></think>\\boxed{19}")));
        assert!(verify(&p, &boxed.as_template("so <answer> 1</think>\\boxed{19}")));
        assert!(!verify(&p, &boxed.as_template("<answer>19</answer></think>no box")));
        // Tags leave a completion as it is, and a boxed answer is not a tagged one.
        assert_eq!(AnswerStyle::Tags.as_template(distill), distill);
        assert!(!verify(&p, &AnswerStyle::Tags.as_template(distill)));
    }

    /// Bytes, with a BOS that only `encode_prompt` adds (as HF's post-processors do).
    struct ByteTokenizer;

    impl Tokenizer for ByteTokenizer {
        fn encode(&self, text: &str) -> whale_parallel::model::Result<Vec<u32>> {
            Ok(text.bytes().map(u32::from).collect())
        }
        fn encode_prompt(&self, text: &str) -> whale_parallel::model::Result<Vec<u32>> {
            Ok([self.bos_id()].into_iter().chain(self.encode(text)?).collect())
        }
        fn decode(&self, ids: &[u32]) -> String {
            String::from_utf8(ids.iter().map(|&i| i as u8).collect()).unwrap()
        }
        fn vocab_size(&self) -> usize {
            258
        }
        fn bos_id(&self) -> u32 {
            256
        }
        fn eos_id(&self) -> u32 {
            257
        }
        fn pad_id(&self) -> u32 {
            257
        }
        fn special_id(&self, _: &str) -> Option<u32> {
            None
        }
    }

    #[test]
    fn chat_prompts_are_the_rendered_user_message() {
        let tok = ByteTokenizer;
        let problems = crate::tasks::TaskSet::parse("add:1").unwrap().held_out(2, 0);
        let template = ChatTemplate::new(
            "{% for m in messages %}[{{ m.role }}: {{ m.content }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}",
            "test",
            vec![],
        );
        let chat = ChatPrompts::new(template, Some("Be brief.".into())).unwrap();
        for answers in [AnswerStyle::Tags, AnswerStyle::Boxed] {
            let cfg = EvalConfig { chat: Some(chat.clone()), answers, ..EvalConfig::default() };
            let prompts = eval_prompts(&tok, &problems, &cfg).unwrap();
            for (ids, p) in prompts.iter().zip(&problems) {
                let user = match answers {
                    AnswerStyle::Tags => p.prompt.clone(),
                    AnswerStyle::Boxed => format!("{}\n{BOXED_INSTRUCTION}", p.prompt),
                };
                // The template's text alone: no BOS of the tokenizer's before it.
                assert_eq!(ids, &tok.encode(&format!("[system: Be brief.][user: {user}]>")).unwrap());
            }
        }
        // Without a template, the prompts the runs encode, BOS first.
        let plain = eval_prompts(&tok, &problems, &EvalConfig::default()).unwrap();
        assert_eq!(plain, crate::rollout::problem_prompts(&tok, &problems).unwrap());
        assert_eq!(plain[0][0], tok.bos_id());
    }

    /// A model that writes `script` (as byte tokens, then EOS) whatever it is asked, every row.
    #[derive(Debug)]
    struct Scripted {
        script: Vec<u32>,
        params: whale_parallel::model::tensor::ParamStore,
        step: std::sync::atomic::AtomicUsize,
    }

    impl CausalLm for Scripted {
        fn vocab_size(&self) -> usize {
            ByteTokenizer.vocab_size()
        }
        fn hidden_size(&self) -> usize {
            1
        }
        fn num_layers(&self) -> usize {
            0
        }
        fn params(&self) -> &whale_parallel::model::tensor::ParamStore {
            &self.params
        }
        fn max_positions(&self) -> usize {
            512
        }
        fn forward_cached(
            &self,
            ids: &whale_parallel::model::tensor::Tensor,
            _: &mut whale_parallel::model::generate::KvCache,
        ) -> whale_parallel::model::Result<whale_parallel::model::tensor::Tensor> {
            use std::sync::atomic::Ordering;
            let (b, s, vocab) = (ids.dims()[0], ids.dims()[1], self.vocab_size());
            // A prompt (more than one position) starts a generation; each later call is a token.
            let at = if s > 1 {
                self.step.store(0, Ordering::SeqCst);
                0
            } else {
                self.step.fetch_add(1, Ordering::SeqCst) + 1
            };
            let next = self.script.get(at).copied().unwrap_or(ByteTokenizer.eos_id());
            let mut v = vec![-50.0f32; b * s * vocab];
            for r in 0..b {
                v[(r * s + s - 1) * vocab + next as usize] = 50.0;
            }
            Ok(whale_parallel::model::tensor::Tensor::from_vec(
                v,
                &[b, s, vocab],
                &whale_parallel::model::tensor::Device::Cpu,
            )?)
        }
        fn logits(
            &self,
            _: &whale_parallel::model::tensor::Tensor,
        ) -> whale_parallel::model::Result<whale_parallel::model::tensor::Tensor> {
            unreachable!("generate decodes through forward_cached")
        }
        fn hidden_states(
            &self,
            _: &whale_parallel::model::tensor::Tensor,
        ) -> whale_parallel::model::Result<whale_parallel::model::tensor::Tensor> {
            unreachable!("generate decodes through forward_cached")
        }
        fn train_loss(
            &self,
            _: &whale_parallel::model::tensor::Tensor,
            _: &whale_parallel::model::tensor::Tensor,
            _: &[usize],
        ) -> whale_parallel::model::Result<whale_parallel::model::tensor::Tensor> {
            unreachable!("not trained")
        }
        fn save_pretrained(
            &self,
            _: &std::path::Path,
            _: whale_parallel::model::checkpoint::SaveDType,
        ) -> whale_parallel::model::Result<()> {
            unreachable!("not saved")
        }
        fn duplicate(&self) -> whale_parallel::model::Result<Box<dyn CausalLm>> {
            unreachable!("not copied")
        }
        fn to_device(
            &self,
            _: &whale_parallel::model::tensor::Device,
        ) -> whale_parallel::model::Result<Box<dyn CausalLm>> {
            unreachable!("not moved")
        }
    }

    #[test]
    fn a_chat_model_is_scored_on_its_boxed_answers_after_the_thinking_its_template_opened() {
        let tok = ByteTokenizer;
        let p = [Problem { task: "add".into(), prompt: "12+7=".into(), answer: "19".into(), solution: String::new() }];
        let model = |script: &str| Scripted {
            script: tok.encode(script).unwrap(),
            params: Default::default(),
            step: Default::default(),
        };
        // R1-Distill's template opens the thinking in the generation prompt.
        let template = ChatTemplate::new("{% for m in messages %}{{ m.content }}{% endfor %}<think>\n", "test", vec![]);
        let chat = Some(ChatPrompts::new(template, None).unwrap());
        let cfg =
            EvalConfig { samples: 2, max_new_tokens: 64, chat, answers: AnswerStyle::Boxed, ..EvalConfig::default() };
        let r = evaluate(&model("12 and 7: 19.\n</think>\n\n\\boxed{19}"), &tok, &p, &cfg).unwrap();
        assert_eq!((r.greedy, r.pass1, r.pass_k, r.cons_k, r.format_rate), (1.0, 1.0, 1.0, 1.0, 1.0));
        let r = evaluate(&model("12 and 7: 18.\n</think>\n\n\\boxed{18}"), &tok, &p, &cfg).unwrap();
        assert_eq!((r.greedy, r.pass1, r.cons_k, r.format_rate), (0.0, 0.0, 0.0, 1.0));
        // The same model scored on tags finds no answer; in the R1 template, the opened <think>
        // makes its completion well formatted.
        let tags = EvalConfig { answers: AnswerStyle::Tags, ..cfg.clone() };
        let r = evaluate(&model("12 and 7: 19.\n</think>\n\n\\boxed{19}"), &tok, &p, &tags).unwrap();
        assert_eq!((r.greedy, r.format_rate), (0.0, 0.0));
        let r = evaluate(&model("12 and 7: 19.</think><answer>19</answer>"), &tok, &p, &tags).unwrap();
        assert_eq!((r.greedy, r.pass1, r.format_rate), (1.0, 1.0, 1.0));
    }

    #[test]
    fn the_r1_zero_template_is_what_runs_sample_and_evaluations_read() {
        use crate::rollout::{sample_groups, RolloutConfig, R1_ZERO_PREAMBLE};
        let tok = ByteTokenizer;
        let p = [Problem { task: "add".into(), prompt: "12+7=".into(), answer: "19".into(), solution: String::new() }];
        let cfg = EvalConfig { samples: 2, max_new_tokens: 64, template: PromptTemplate::R1, ..EvalConfig::default() };
        let prompts = eval_prompts(&tok, &p, &cfg).unwrap();
        let text = format!("{R1_ZERO_PREAMBLE} User: 12+7=. Assistant:");
        assert!(text.starts_with("A conversation between User and Assistant.") && text.contains("<think> </think>"));
        assert_eq!(prompts, vec![tok.encode_prompt(&text).unwrap()]);
        // A base model continues `Assistant:` with a space and spaces its blocks as the template
        // does: right and well formatted.
        let script = tok.encode(" <think> 2+7=9 and 1+0=1 </think> <answer> 19 </answer>").unwrap();
        let model = Scripted { script, params: Default::default(), step: Default::default() };
        let r = evaluate(&model, &tok, &p, &cfg).unwrap();
        assert_eq!((r.greedy, r.pass1, r.format_rate), (1.0, 1.0, 1.0));
        // Training samples from the same prompts.
        let rollout = RolloutConfig {
            group_size: 2,
            temperature: 1.0,
            top_p: None,
            top_k: None,
            max_new_tokens: 64,
            cache: CacheMode::Absorb,
            template: PromptTemplate::R1,
        };
        let rollouts = sample_groups(&model, &tok, &p, &rollout, &mut Rng::new(0)).unwrap();
        assert!(rollouts.iter().all(|r| r.prompt == prompts[0]));
        // A chat template as well is refused, as is a template of another name.
        let template = ChatTemplate::new("{{ messages[0].content }}", "test", vec![]);
        let both = EvalConfig { chat: Some(ChatPrompts::new(template, None).unwrap()), ..cfg.clone() };
        assert!(eval_prompts(&tok, &p, &both).unwrap_err().to_string().contains("choose one"));
        assert!(PromptTemplate::parse("qwen").unwrap_err().to_string().contains("plain or r1"));
    }

    #[test]
    fn deepseek_r1s_own_template_opens_the_thinking_and_chatml_does_not() {
        // The templates transformers rendered for the chat fixtures (crates/model/tests).
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../model/tests/fixtures/chat_templates/expected.json");
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let source = |name: &str| {
            let templates = fixture["templates"].as_array().unwrap();
            templates.iter().find(|t| t["name"] == name).unwrap()["source"].as_str().unwrap().to_string()
        };
        let tokens = vec![("bos_token".to_string(), "<｜begin▁of▁sentence｜>".to_string())];
        let scored = |name: &str| {
            let chat = ChatPrompts::new(ChatTemplate::new(source(name), name, tokens.clone()), None).unwrap();
            EvalConfig { chat: Some(chat), ..EvalConfig::default() }.scored_text("12+7</think><answer>19</answer>")
        };
        assert_eq!(scored("deepseek_r1"), "<think>12+7</think><answer>19</answer>");
        assert_eq!(scored("chatml"), "12+7</think><answer>19</answer>");
    }

    #[test]
    fn top_k_and_top_p_reach_the_samples() {
        use whale_parallel::model::tokenizer::CharTokenizer;
        use whale_parallel::model::{DeepSeekV3, DeepSeekV3Config};
        let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 3).unwrap();
        let tok = CharTokenizer::new();
        let problems = crate::tasks::TaskSet::parse("add:1").unwrap().held_out(6, 0);
        let cfg = EvalConfig { samples: 4, max_new_tokens: 12, ..EvalConfig::default() };
        // Keeping one token, every sample is the greedy completion: the samples' mean length is
        // the greedy completions' mean length, and both filters give the same report.
        let prompts = crate::rollout::problem_prompts(&tok, &problems).unwrap();
        let greedy_cfg = SamplingConfig::greedy(cfg.max_new_tokens, tok.stop_ids()).limited_to(&tok);
        let greedy = model.generate(&prompts, &greedy_cfg, &mut Rng::new(0)).unwrap();
        let greedy_length = greedy.iter().map(|g| g.tokens.len()).sum::<usize>() as f64 / problems.len() as f64;
        let top_k = evaluate(&model, &tok, &problems, &EvalConfig { top_k: Some(1), ..cfg.clone() }).unwrap();
        let top_p = evaluate(&model, &tok, &problems, &EvalConfig { top_p: Some(1e-6), ..cfg.clone() }).unwrap();
        let plain = evaluate(&model, &tok, &problems, &cfg).unwrap();
        assert_eq!(top_k.mean_length, greedy_length);
        assert_eq!(
            (top_p.mean_length, top_p.format_rate, top_p.pass1),
            (top_k.mean_length, top_k.format_rate, top_k.pass1)
        );
        assert_eq!(top_k.pass1, top_k.greedy);
        assert_ne!(plain.mean_length, greedy_length, "an untrained model's samples at T = 1 wander");
    }

    #[test]
    fn an_evaluation_that_would_score_nothing_or_cannot_be_held_is_refused() {
        use whale_parallel::model::tokenizer::CharTokenizer;
        use whale_parallel::model::{DeepSeekV3, DeepSeekV3Config};
        let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 1).unwrap();
        let tok = CharTokenizer::new();
        let problems = crate::tasks::TaskSet::parse("add:1").unwrap().held_out(2, 0);
        let cfg = EvalConfig::covering(2, 4);
        for (problems, cfg, words) in [
            (&problems[..0], cfg.clone(), "0 problems with 2 samples each: there is nothing to score"),
            (&problems[..], EvalConfig { samples: 0, ..cfg.clone() }, "2 problems with 0 samples each"),
            (&problems[..], EvalConfig { samples: usize::MAX / 2, ..cfg.clone() }, "positions a batch may hold"),
        ] {
            let err = evaluate(&model, &tok, problems, &cfg).unwrap_err().to_string();
            assert!(err.contains(words), "{err}");
        }
        let report = evaluate(&model, &tok, &problems, &cfg).unwrap();
        assert!((0.0..=1.0).contains(&report.pass1));
    }
}
