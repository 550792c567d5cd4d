//! Rule-based rewards (spec/rl.md 2.1, 3.4, 3.8): accuracy from the task's verifier, the R1
//! template, language consistency, length shaping (DAPO's soft overlong punishment, the cosine
//! length reward, Kimi's length reward within a group), and open-r1's n-gram repetition
//! penalty. A reward may answer "not applicable" (`None`); a weighted sum skips those, and a
//! completion for which every reward is `None` has no reward at all (NaN), which the advantage
//! computation leaves out of its group baseline (TRL's convention).

use crate::eval::well_formatted;
use crate::tasks::language::language_share;
use crate::tasks::{verify, Language, Problem};
use crate::{Error, Result};

/// A completion as the rewards see it: decoded text, cut at EOS.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    pub problem: &'a Problem,
    pub text: &'a str,
    /// Completion length in tokens (EOS included).
    pub tokens: usize,
    /// Ended by the length limit rather than EOS.
    pub truncated: bool,
}

pub trait Reward: Send + Sync {
    /// The name metrics use (`rewards/<name>/mean`).
    fn name(&self) -> &str;
    /// The reward, `None` where it does not apply; an error where it could not be computed (a
    /// learned reward whose model failed: the run stops rather than train without it).
    fn score(&self, s: &Sample<'_>) -> Result<Option<f64>>;

    /// The rewards of one prompt's group of completions, in order. Most rewards score each
    /// completion alone; one that compares a completion with the rest of its group (Kimi's
    /// length reward) overrides this.
    fn score_group(&self, group: &[Sample<'_>]) -> Result<Vec<Option<f64>>> {
        group.iter().map(|s| self.score(s)).collect()
    }

    /// Whether the reward compares a completion with the rest of its group, so that a
    /// completion scored alone (PPO's one per prompt) learns nothing from it.
    fn compares_within_group(&self) -> bool {
        false
    }

    /// Whether the reward reads the task's verifier (right or wrong), so that it means nothing
    /// on a prompt without a checkable answer (R1's stage 4 scores those with a reward model).
    fn uses_verifier(&self) -> bool {
        false
    }
}

/// `reward`'s scores of `group`, one per completion: an error naming the reward otherwise.
pub(crate) fn group_scores(reward: &dyn Reward, group: &[Sample<'_>]) -> Result<Vec<Option<f64>>> {
    let scores = reward.score_group(group)?;
    if scores.len() != group.len() {
        let (name, got, want) = (reward.name(), scores.len(), group.len());
        return Err(Error::Rl(format!("reward `{name}` gave {got} scores for a group of {want}")));
    }
    Ok(scores)
}

/// 1 when the verifier accepts the answer, else 0. Truncated completions get 0 (Dr. GRPO): an
/// answer followed by text that never ends is not an answer. With `gated`, an answer outside the
/// R1 template also gets 0 (open-instruct's fix for format rewards paying long wrong answers).
#[derive(Debug, Clone, Copy, Default)]
pub struct Accuracy {
    pub gated: bool,
}

impl Reward for Accuracy {
    fn name(&self) -> &str {
        "accuracy"
    }

    fn uses_verifier(&self) -> bool {
        true
    }

    fn score(&self, s: &Sample<'_>) -> Result<Option<f64>> {
        let ok = !s.truncated && verify(s.problem, s.text) && (!self.gated || well_formatted(s.text));
        Ok(Some(ok as u8 as f64))
    }
}

/// 1 when the completion is `<think>...</think><answer>...</answer>` (each tag once, in order,
/// nothing but whitespace around the blocks, nothing after but EOS: [`well_formatted`]), else
/// 0; a truncated completion has no EOS and gets 0 (spec/rl.md 6.2: truncated -> 0), even when
/// the limit fell just after `</answer>`. A structural check, so there is no regex to get wrong
/// (spec/rl.md section 5, item 10: DOTALL and multiple blocks).
#[derive(Debug, Clone, Copy, Default)]
pub struct Format;

impl Reward for Format {
    fn name(&self) -> &str {
        "format"
    }

    fn score(&self, s: &Sample<'_>) -> Result<Option<f64>> {
        Ok(Some((!s.truncated && well_formatted(s.text)) as u8 as f64))
    }
}

/// The share of the reasoning's numerals written in the prompt's language (R1 section 2.3:
/// "the proportion of target language words in the CoT"). Not applicable to tasks without
/// numbers; reasoning with no numerals at all scores 0.
#[derive(Debug, Clone, Copy, Default)]
pub struct LanguageConsistency;

/// The text of the `<think>` block, up to `</think>` (or, unclosed, up to an `<answer>`); empty
/// without a block: an answer alone has no reasoning to be consistent, and scores 0 rather than
/// the full reward a consistent chain of thought earns.
fn reasoning(text: &str) -> &str {
    let Some((_, body)) = text.split_once("<think>") else { return "" };
    let end = body.find("</think>").or_else(|| body.find("<answer>")).unwrap_or(body.len());
    &body[..end]
}

impl LanguageConsistency {
    /// The reward itself (a rule: it cannot fail).
    pub fn share(&self, s: &Sample<'_>) -> Option<f64> {
        Language::of_problem(s.problem).map(|lang| language_share(reasoning(s.text), lang).unwrap_or(0.0))
    }
}

impl Reward for LanguageConsistency {
    fn name(&self) -> &str {
        "language"
    }

    fn score(&self, s: &Sample<'_>) -> Result<Option<f64>> {
        Ok(self.share(s))
    }
}

/// DAPO's soft overlong punishment (eq. 13): 0 up to `max_len - buffer` tokens, then falling
/// linearly to -1 at `max_len`, and -1 beyond (a truncated completion counts as beyond).
#[derive(Debug, Clone, Copy)]
pub struct OverlongPenalty {
    pub max_len: usize,
    pub buffer: usize,
}

impl Reward for OverlongPenalty {
    fn name(&self) -> &str {
        "overlong"
    }

    fn score(&self, s: &Sample<'_>) -> Result<Option<f64>> {
        let free = self.max_len.saturating_sub(self.buffer) as f64;
        let len = s.tokens as f64;
        Ok(Some(if s.truncated || s.tokens > self.max_len {
            -1.0
        } else if len <= free {
            0.0
        } else {
            (free - len) / self.buffer.max(1) as f64
        }))
    }
}

/// The cosine length reward (Yeo et al., open-r1's `get_cosine_scaled_reward`): with
/// `c = cos(pi * len / max_len)`, a correct answer gets `min_correct + (max_correct - min_correct)
/// (1 + c) / 2` (short correct answers best) and a wrong one `max_wrong + (min_wrong - max_wrong)
/// (1 + c) / 2` (long wrong answers penalised less). A truncated completion gets `exceed`
/// instead (the authors' exceed-length penalty): scored as a wrong answer at the limit it would
/// get `max_wrong`, the best a wrong answer can, and running to the limit would pay.
#[derive(Debug, Clone, Copy)]
pub struct CosineLength {
    pub min_wrong: f64,
    pub max_wrong: f64,
    pub min_correct: f64,
    pub max_correct: f64,
    pub max_len: usize,
    pub exceed: f64,
}

impl CosineLength {
    /// open-r1's defaults with our length limit; a truncated completion gets `min_wrong`, what
    /// the shortest wrong answer gets, so that no finished answer scores below it.
    pub fn new(max_len: usize) -> Self {
        let min_wrong = -1.0;
        CosineLength { min_wrong, max_wrong: -0.5, min_correct: 0.5, max_correct: 1.0, max_len, exceed: min_wrong }
    }
}

impl Reward for CosineLength {
    fn name(&self) -> &str {
        "cosine"
    }

    fn uses_verifier(&self) -> bool {
        true
    }

    fn score(&self, s: &Sample<'_>) -> Result<Option<f64>> {
        if s.truncated {
            return Ok(Some(self.exceed));
        }
        let p = (s.tokens as f64 / self.max_len.max(1) as f64).min(1.0);
        let half = (1.0 + (std::f64::consts::PI * p).cos()) / 2.0;
        let correct = verify(s.problem, s.text);
        Ok(Some(if correct {
            self.min_correct + (self.max_correct - self.min_correct) * half
        } else {
            self.max_wrong + (self.min_wrong - self.max_wrong) * half
        }))
    }
}

/// open-r1's n-gram repetition penalty (`get_repetition_penalty_reward`, Yeo et al. 2502.03373
/// App. C.2): `max_penalty` (at most 0) times the share of the completion's n-grams of words
/// that repeat an earlier one, `1 - unique / total`, the words being the lowercased text split
/// at whitespace as Python's `str.split()` splits; 0 for a completion of fewer than `n` words.
#[derive(Debug, Clone, Copy)]
pub struct RepetitionPenalty {
    ngram: usize,
    max_penalty: f64,
}

impl RepetitionPenalty {
    /// The penalty over `ngram`-word n-grams, down to `max_penalty`; open-r1's defaults
    /// (`repetition_n_grams`, `repetition_max_penalty`) are 3 and -1, what `repetition` takes.
    pub fn new(ngram: usize, max_penalty: f64) -> Result<Self> {
        if ngram == 0 || max_penalty.is_nan() || max_penalty > 0.0 {
            return Err(Error::Rl(format!(
                "repetition penalty: n-grams of {ngram} words with max_penalty {max_penalty} (n >= 1, max_penalty <= 0)"
            )));
        }
        Ok(RepetitionPenalty { ngram, max_penalty })
    }
}

impl Reward for RepetitionPenalty {
    fn name(&self) -> &str {
        "repetition"
    }

    fn score(&self, s: &Sample<'_>) -> Result<Option<f64>> {
        // Python's `str.isspace`: Unicode's White_Space and the ASCII separators U+001C..U+001F.
        let space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
        let lower = s.text.to_lowercase();
        let words: Vec<&str> = lower.split(space).filter(|w| !w.is_empty()).collect();
        if words.len() < self.ngram {
            return Ok(Some(0.0));
        }
        let ngrams: Vec<&[&str]> = words.windows(self.ngram).collect();
        let unique: std::collections::HashSet<&[&str]> = ngrams.iter().copied().collect();
        Ok(Some(self.max_penalty * (1.0 - unique.len() as f64 / ngrams.len() as f64)))
    }
}

/// Kimi k1.5's length reward (section 2.3.3; open-r1's `len_reward`): within a prompt's group,
/// with the shortest and longest completions' lengths, `lambda = 0.5 - (len - min) / (max -
/// min)`; a right answer gets `lambda` (short right answers gain, long ones lose) and a wrong one
/// `min(0, lambda)` (long wrong answers lose, short ones gain nothing). All 0 when the lengths
/// are equal, as for a group of one. Right is [`Accuracy`]'s verdict (a truncated completion is
/// wrong); lengths in tokens, as Kimi counts them, and per group as Kimi defines it (open-r1
/// counts characters, over the whole batch of prompts).
#[derive(Debug, Clone, Copy, Default)]
pub struct LengthReward;

impl Reward for LengthReward {
    fn name(&self) -> &str {
        "length"
    }

    fn uses_verifier(&self) -> bool {
        true
    }

    fn score(&self, s: &Sample<'_>) -> Result<Option<f64>> {
        Ok(self.score_group(std::slice::from_ref(s))?[0])
    }

    fn compares_within_group(&self) -> bool {
        true
    }

    fn score_group(&self, group: &[Sample<'_>]) -> Result<Vec<Option<f64>>> {
        let lengths = group.iter().map(|s| s.tokens);
        let (min, max) = (lengths.clone().min().unwrap_or(0), lengths.max().unwrap_or(0));
        if min == max {
            return Ok(vec![Some(0.0); group.len()]);
        }
        let right = Accuracy { gated: false };
        group
            .iter()
            .map(|s| {
                let lambda = 0.5 - (s.tokens - min) as f64 / (max - min) as f64;
                Ok(Some(if right.score(s)? == Some(1.0) { lambda } else { lambda.min(0.0) }))
            })
            .collect()
    }
}

/// Rewards with weights; the total is their weighted sum over the applicable ones.
pub struct RewardSet {
    pub entries: Vec<(Box<dyn Reward>, f64)>,
}

impl std::fmt::Debug for RewardSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RewardSet[{}]", self.describe())
    }
}

/// One completion's rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// Per reward, in the set's order.
    pub each: Vec<Option<f64>>,
    /// Weighted sum of the applicable rewards; NaN when none applies.
    pub total: f64,
}

impl RewardSet {
    /// From `name[:weight]` items separated by commas: `accuracy`, `accuracy_gated`, `format`,
    /// `language`, `overlong` (buffer = a quarter of `max_len`), `cosine`, `repetition`
    /// (open-r1's defaults: 3-grams, down to -1), `length` (Kimi's, within each group).
    /// `max_len` is the completion length limit in tokens.
    pub fn parse(spec: &str, max_len: usize) -> Result<Self> {
        let mut entries: Vec<(Box<dyn Reward>, f64)> = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, weight) = match item.split_once(':') {
                Some((n, w)) => {
                    let w = w
                        .parse::<f64>()
                        .ok()
                        .filter(|w| w.is_finite())
                        .ok_or_else(|| Error::Rl(format!("reward `{n}`: weight `{w}` is not a finite number")))?;
                    (n, w)
                }
                None => (item, 1.0),
            };
            let reward: Box<dyn Reward> = match name {
                "accuracy" => Box::new(Accuracy { gated: false }),
                "accuracy_gated" => Box::new(Accuracy { gated: true }),
                "format" => Box::new(Format),
                "language" => Box::new(LanguageConsistency),
                "overlong" => Box::new(OverlongPenalty { max_len, buffer: (max_len / 4).max(1) }),
                "cosine" => Box::new(CosineLength::new(max_len)),
                "repetition" => Box::new(RepetitionPenalty::new(3, -1.0)?),
                "length" => Box::new(LengthReward),
                other => {
                    return Err(Error::Rl(format!(
                        "unknown reward `{other}` (accuracy, accuracy_gated, format, language, overlong, cosine, \
                         repetition, length)"
                    )))
                }
            };
            entries.push((reward, weight));
        }
        if entries.is_empty() {
            return Err(Error::Rl("no rewards given".into()));
        }
        Ok(RewardSet { entries })
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|(r, _)| r.name().to_string()).collect()
    }

    /// `accuracy:1,format:0.5`.
    pub fn describe(&self) -> String {
        self.entries.iter().map(|(r, w)| format!("{}:{w}", r.name())).collect::<Vec<_>>().join(",")
    }

    /// One completion's rewards and their weighted sum, scored as a group of one.
    pub fn score(&self, s: &Sample<'_>) -> Result<Scores> {
        Ok(self.score_group(std::slice::from_ref(s))?.remove(0))
    }

    /// Each completion of one prompt's group: its rewards and their weighted sum. A reward that
    /// is not a finite number is an error naming it and the prompt: counted as "not applicable",
    /// it would silently zero the advantages.
    pub fn score_group(&self, group: &[Sample<'_>]) -> Result<Vec<Scores>> {
        let per_reward: Vec<Vec<Option<f64>>> =
            self.entries.iter().map(|(r, _)| group_scores(&**r, group)).collect::<Result<_>>()?;
        group
            .iter()
            .enumerate()
            .map(|(i, s)| self.total(s, per_reward.iter().map(|scores| scores[i]).collect()))
            .collect()
    }

    /// `each` reward of `s` and their weighted sum over the applicable ones.
    fn total(&self, s: &Sample<'_>, each: Vec<Option<f64>>) -> Result<Scores> {
        if let Some(((r, _), v)) = self.entries.iter().zip(&each).find(|(_, v)| v.is_some_and(|v| !v.is_finite())) {
            return Err(Error::Rl(format!(
                "reward `{}` is {} for the completion of prompt {:?}",
                r.name(),
                v.unwrap_or_default(),
                s.problem.prompt
            )));
        }
        let applicable: Vec<f64> = each.iter().zip(&self.entries).filter_map(|(v, (_, w))| v.map(|v| v * w)).collect();
        let total = if applicable.is_empty() { f64::NAN } else { applicable.iter().sum() };
        Ok(Scores { each, total })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::language::translate;

    fn add_problem() -> Problem {
        Problem {
            task: "add".into(),
            prompt: "12+7=".into(),
            answer: "19".into(),
            solution: "<think>2+7+0=9;1+0+0=1</think><answer>19</answer>".into(),
        }
    }

    fn sample<'a>(p: &'a Problem, text: &'a str, tokens: usize, truncated: bool) -> Sample<'a> {
        Sample { problem: p, text, tokens, truncated }
    }

    #[test]
    fn accuracy_and_format_follow_the_verifier_and_the_template() {
        let p = add_problem();
        let good = "<think>2+7+0=9;1+0+0=1</think><answer>19</answer>";
        let unformatted = "<answer>19</answer>";
        let set = RewardSet::parse("accuracy,accuracy_gated,format:0.5", 96).unwrap();
        assert_eq!(set.score(&sample(&p, good, 20, false)).unwrap().each, vec![Some(1.0), Some(1.0), Some(1.0)]);
        assert_eq!(set.score(&sample(&p, good, 20, false)).unwrap().total, 2.5);
        assert_eq!(set.score(&sample(&p, unformatted, 8, false)).unwrap().each, vec![Some(1.0), Some(0.0), Some(0.0)]);
        // Truncated: no credit even with the right answer inside, nor for the template when the
        // limit fell just after `</answer>` (there is no EOS).
        assert_eq!(
            set.score(&sample(&p, "<think></think><answer>19</answer>19", 96, true)).unwrap().each[0],
            Some(0.0)
        );
        assert_eq!(set.score(&sample(&p, good, 96, true)).unwrap().each, vec![Some(0.0), Some(0.0), Some(0.0)]);
        assert!(RewardSet::parse("accuracy:x", 96).unwrap_err().to_string().contains("accuracy"));
        // A reward that is not a number (a learned reward gone NaN) stops the step, naming it.
        struct Broken;
        impl Reward for Broken {
            fn name(&self) -> &str {
                "broken"
            }
            fn score(&self, _: &Sample<'_>) -> Result<Option<f64>> {
                Ok(Some(f64::NAN))
            }
        }
        let set = RewardSet { entries: vec![(Box::new(Accuracy::default()), 1.0), (Box::new(Broken), 0.5)] };
        let err = set.score(&sample(&p, good, 20, false)).unwrap_err().to_string();
        assert!(err.contains("`broken` is NaN") && err.contains("12+7="), "{err}");
        assert!(RewardSet::parse("speed", 96).unwrap_err().to_string().contains("speed"));
    }

    #[test]
    fn language_reward_is_the_share_of_numerals_in_the_prompts_script() {
        let p = add_problem();
        let q = translate(&p, Language::Letters);
        let r = LanguageConsistency;
        assert_eq!(r.score(&sample(&p, &p.solution, 0, false)).unwrap(), Some(1.0));
        assert_eq!(r.score(&sample(&q, &q.solution, 0, false)).unwrap(), Some(1.0));
        assert_eq!(r.score(&sample(&q, &p.solution, 0, false)).unwrap(), Some(0.0));
        // Half the reasoning in each script; the answer block does not count.
        let mixed = "<think>m+u+k=w;1+0+0=1</think><answer>19</answer>";
        assert_eq!(r.score(&sample(&q, mixed, 0, false)).unwrap(), Some(0.5));
        // No reasoning is not consistent reasoning: an answer alone scores 0, not 1; an unclosed
        // block ends at the answer.
        assert_eq!(r.score(&sample(&q, "<answer>lw</answer>", 0, false)).unwrap(), Some(0.0));
        assert_eq!(r.score(&sample(&q, "<think>m+u+k=w<answer>19</answer>", 0, false)).unwrap(), Some(1.0));
        let rev =
            Problem { task: "reverse".into(), prompt: "rab=".into(), answer: "ba".into(), solution: String::new() };
        assert_eq!(r.score(&sample(&rev, "<think>b;a</think><answer>ba</answer>", 0, false)).unwrap(), None);
        // Every reward not applicable: no total.
        let only_lang = RewardSet::parse("language", 96).unwrap();
        assert!(only_lang.score(&sample(&rev, "x", 1, false)).unwrap().total.is_nan());
    }

    #[test]
    fn length_shaping_matches_its_piecewise_formulas_at_the_boundaries() {
        let p = add_problem();
        let o = OverlongPenalty { max_len: 100, buffer: 20 };
        let at = |n: usize, tr: bool| o.score(&sample(&p, "", n, tr)).unwrap().unwrap();
        assert_eq!(at(0, false), 0.0);
        assert_eq!(at(80, false), 0.0);
        assert!((at(90, false) + 0.5).abs() < 1e-12);
        assert!((at(100, false) + 1.0).abs() < 1e-12);
        assert_eq!(at(101, false), -1.0);
        assert_eq!(at(50, true), -1.0);

        let c = CosineLength::new(100);
        let good = "<think></think><answer>19</answer>";
        let bad = "<think></think><answer>18</answer>";
        let cos = |text: &str, n: usize| c.score(&sample(&p, text, n, false)).unwrap().unwrap();
        assert!((cos(good, 0) - 1.0).abs() < 1e-12);
        assert!((cos(good, 100) - 0.5).abs() < 1e-12);
        assert!((cos(good, 50) - 0.75).abs() < 1e-12);
        assert!((cos(bad, 0) + 1.0).abs() < 1e-12);
        assert!((cos(bad, 100) + 0.5).abs() < 1e-12);
        assert!((cos(bad, 200) + 0.5).abs() < 1e-12, "capped at max_len");
        // Truncated: the exceed penalty, below every finished answer, right or wrong.
        for text in [good, bad] {
            assert_eq!(c.score(&sample(&p, text, 100, true)).unwrap(), Some(-1.0));
        }
        assert!((0..=100).all(|n| cos(bad, n) >= c.exceed));
    }

    #[test]
    fn length_reward_ranks_a_groups_lengths_as_kimi_defines_it() {
        let p = add_problem();
        let (good, bad) = ("<think></think><answer>19</answer>", "<think></think><answer>18</answer>");
        // Lengths 10..=30: lambda 0.5 at the shortest, 0 halfway, -0.5 at the longest.
        let group = [
            sample(&p, good, 10, false),
            sample(&p, good, 20, false),
            sample(&p, good, 30, false),
            sample(&p, bad, 10, false),
            sample(&p, bad, 25, false),
            sample(&p, good, 15, true),
        ];
        let got: Vec<f64> = LengthReward.score_group(&group).unwrap().into_iter().map(Option::unwrap).collect();
        assert_eq!(got, vec![0.5, 0.0, -0.5, 0.0, -0.25, 0.0], "a truncated answer is wrong: min(0, 0.25)");
        // Equal lengths, and a group of one: no length signal.
        let same = [sample(&p, good, 12, false), sample(&p, bad, 12, false)];
        assert_eq!(LengthReward.score_group(&same).unwrap(), vec![Some(0.0), Some(0.0)]);
        assert_eq!(LengthReward.score(&group[0]).unwrap(), Some(0.0));
        // Through a set, each completion's total sees its group.
        let set = RewardSet::parse("accuracy,length:2", 96).unwrap();
        let totals: Vec<f64> = set.score_group(&group).unwrap().iter().map(|s| s.total).collect();
        assert_eq!(totals, vec![2.0, 1.0, 0.0, 0.0, -0.5, 0.0]);
    }

    #[test]
    fn repetition_penalty_is_the_share_of_repeated_word_ngrams() {
        let p = add_problem();
        let r = RepetitionPenalty::new(3, -1.0).unwrap();
        let score = |text: &str| r.score(&sample(&p, text, 0, false)).unwrap().unwrap();
        // a b c | b c a | c a b | a b c: four trigrams, three distinct.
        assert_eq!(score("a b c a b c"), -0.25);
        assert_eq!(score("A b\tC\n a  B\u{1c}c"), -0.25, "lowercased, split at Python's whitespace");
        assert_eq!(score("the cat sat on the mat"), 0.0);
        assert_eq!(score("x x"), 0.0, "fewer words than n");
        assert_eq!(score(""), 0.0);
        // One word said n + k times: k + 1 trigrams, one distinct.
        assert_eq!(score("so so so so so so"), -0.75);
        assert_eq!(
            RepetitionPenalty::new(1, -0.5).unwrap().score(&sample(&p, "a a b b", 0, false)).unwrap(),
            Some(-0.25)
        );
        for (n, max) in [(0, -1.0), (3, 0.5), (3, f64::NAN)] {
            assert!(RepetitionPenalty::new(n, max).unwrap_err().to_string().contains("repetition"));
        }
        assert_eq!(RewardSet::parse("accuracy,repetition:0.5", 96).unwrap().describe(), "accuracy:1,repetition:0.5");
    }
}
