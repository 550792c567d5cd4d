//! Task mixes, the train/held-out split, the pretraining corpus, and user datasets in JSONL.

use std::collections::HashSet;
use std::ops::RangeInclusive;
use std::path::Path;

use super::language::{to_digits, translate, Language};
use super::{extract_answer, extract_boxed, math_answer, task_by_name, template, Problem, Task};
use crate::{Error, Result};
use whale_parallel::model::tensor::Rng;

/// Which side of the split a problem belongs to. The split is a pure function of the prompt
/// (a hash), so no problem can ever be on both sides, whatever seeds generated them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    HeldOut,
}

impl Split {
    /// One problem in ten is held out: an FNV-1a hash of the prompt's [`problem_key`], so a
    /// problem, its translation and its rewordings (`85+47=` for `47+85=`, another order of a
    /// list to sort or of countdown's numbers) are all on the same side.
    pub fn of(prompt: &str) -> Split {
        Split::of_key(&problem_key(prompt))
    }

    /// The side of a user dataset's prompt: [`Split::of`] on its [`line_key`], so spellings
    /// that differ in whitespace or a trailing `=`, `?` or `.` are one problem.
    pub fn of_line(prompt: &str) -> Split {
        Split::of_key(&line_key(prompt))
    }

    fn of_key(key: &str) -> Split {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        if h % 10 == 0 {
            Split::HeldOut
        } else {
            Split::Train
        }
    }
}

/// The problem a prompt poses, written the same for every prompt that poses it: letter numerals
/// as digits, the operands of a sum or product (`a+b=`, `a*b=`) in increasing order, a list to
/// sort (`s5,2,9=`) and countdown's numbers (`c7,3,25t46=`) sorted. Other prompts (a chain, a
/// string to reverse, a user's) are keys as they are, read as digits.
pub fn problem_key(prompt: &str) -> String {
    let digits = to_digits(prompt);
    let sorted = |items: &str, sep: char| -> Option<String> {
        let mut v: Vec<u64> = items.split(sep).map(|x| x.parse().ok()).collect::<Option<_>>()?;
        v.sort_unstable();
        Some(v.iter().map(u64::to_string).collect::<Vec<_>>().join(&sep.to_string()))
    };
    let key = digits.strip_suffix('=').and_then(|body| {
        if let Some(list) = body.strip_prefix('s') {
            return Some(format!("s{}=", sorted(list, ',')?));
        }
        if let Some((numbers, target)) = body.strip_prefix('c').and_then(|b| b.split_once('t')) {
            return Some(format!("c{}t{}=", sorted(numbers, ',')?, target.parse::<i64>().ok()?));
        }
        ['+', '*'].into_iter().find_map(|op| Some(format!("{}=", sorted(body, op).filter(|_| body.contains(op))?)))
    });
    key.unwrap_or(digits)
}

/// The problem a user's prompt poses: its text without whitespace and without a trailing `=`,
/// `?` or `.`, keyed as a built-in prompt ending in `=` ([`problem_key`]), so `10+11= `,
/// `10 + 11` and `11+10=` are one problem and a file cannot train on one spelling of a problem
/// it evaluates on. (A prompt in other words, `What is 10+11?`, is another text: the split
/// cannot see that it poses the same sum.)
pub fn line_key(prompt: &str) -> String {
    let compact: String = prompt.chars().filter(|c| !c.is_whitespace()).collect();
    problem_key(&format!("{}=", compact.trim_end_matches(['=', '?', '.'])))
}

/// A mix of tasks, each with its difficulty range, sampled uniformly.
pub struct TaskSet {
    entries: Vec<(Box<dyn Task>, RangeInclusive<u32>)>,
    /// Share of numeric problems posed in letter numerals (see [`super::language`]).
    letters: f64,
}

impl std::fmt::Debug for TaskSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> =
            self.entries.iter().map(|(t, r)| format!("{}:{}-{}", t.name(), r.start(), r.end())).collect();
        write!(f, "TaskSet[{}]", names.join(", "))
    }
}

/// The difficulty range each built-in task uses by default.
fn default_difficulty(name: &str) -> RangeInclusive<u32> {
    match name {
        "add" => 3..=4,
        "mul" => 1..=2,
        "modchain" => 2..=3,
        "countdown" => 3..=3,
        _ => 3..=5,
    }
}

impl TaskSet {
    /// Tasks by name with their default difficulties; `name:lo-hi` or `name:d` sets the range.
    pub fn parse(spec: &str) -> Result<Self> {
        let mut entries = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, range) = match item.split_once(':') {
                Some((n, r)) => {
                    let (lo, hi) = r.split_once('-').unwrap_or((r, r));
                    let parse = |s: &str| {
                        s.parse::<u32>().map_err(|_| Error::Task(format!("bad difficulty `{r}` in `{item}`")))
                    };
                    (n, parse(lo)?..=parse(hi)?)
                }
                None => (item, default_difficulty(item)),
            };
            let task = task_by_name(name).ok_or_else(|| {
                Error::Task(format!("unknown task `{name}` (known: {})", super::TASK_NAMES.join(", ")))
            })?;
            if range.is_empty() {
                return Err(Error::Task(format!("empty difficulty range in `{item}`")));
            }
            if *range.end() > task.max_difficulty() {
                return Err(Error::Task(format!(
                    "difficulty {} in `{item}`: `{name}` goes up to {}",
                    range.end(),
                    task.max_difficulty()
                )));
            }
            entries.push((task, range));
        }
        if entries.is_empty() {
            return Err(Error::Task("no tasks given".into()));
        }
        Ok(TaskSet { entries, letters: 0.0 })
    }

    /// Poses a `share` of the numeric problems in letter numerals instead of digits (the `letters`
    /// setting; outside 0..=1 it is an error naming it).
    pub fn with_letters(mut self, share: f64) -> Result<Self> {
        self.letters = share_of("letters", share)?;
        Ok(self)
    }

    /// One problem from `split` (generators are re-drawn until the prompt falls on that side).
    pub fn sample(&self, rng: &mut Rng, split: Split) -> Problem {
        loop {
            let (task, range) = &self.entries[rng.below(self.entries.len() as u64) as usize];
            let d = range.start() + rng.below((range.end() - range.start() + 1) as u64) as u32;
            let p = task.generate(rng, d);
            if Split::of(&p.prompt) == split {
                // Drawn whatever the share: the same seed poses the same problems at any
                // `letters`, only their script differs.
                let script = rng.uniform_f64();
                if script < self.letters && Language::of_problem(&p).is_some() {
                    return translate(&p, Language::Letters);
                }
                return p;
            }
        }
    }

    /// `n` distinct problems of `split` from `seed` (no two posing the same problem, see
    /// [`problem_key`]; fewer where the split has fewer: the draw stops after `100 n + 1000`
    /// samples, or after [`TaskSet::GIVE_UP`] in a row that were all seen, so an `n` beyond the
    /// split's size ends once the split is spent).
    pub fn problems(&self, n: usize, seed: u64, split: Split) -> Vec<Problem> {
        let mut rng = Rng::new(seed);
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let (mut attempts, mut misses) = (0usize, 0usize);
        let limit = n.saturating_mul(100).saturating_add(1000);
        while out.len() < n && attempts < limit && misses < Self::GIVE_UP {
            attempts += 1;
            let p = self.sample(&mut rng, split);
            if seen.insert(problem_key(&p.prompt)) {
                out.push(p);
                misses = 0;
            } else {
                misses += 1;
            }
        }
        out
    }

    /// Draws in a row that found no new problem after which [`TaskSet::problems`] stops.
    pub const GIVE_UP: usize = 100_000;

    /// `n` held-out evaluation problems for a run seed (their own seed stream, distinct from the
    /// corpus's).
    pub fn held_out(&self, n: usize, seed: u64) -> Vec<Problem> {
        self.problems(n, seed ^ 0x0000_E0A1, Split::HeldOut)
    }

    /// `n` held-out problems as [`TaskSet::held_out`] draws them, leaving out any of `test` (by
    /// [`problem_key`], so neither script nor a rewording of a test problem): a validation set
    /// that never scores a problem of the final evaluation.
    pub fn held_out_besides(&self, n: usize, seed: u64, test: &[Problem]) -> Vec<Problem> {
        let test: HashSet<String> = test.iter().map(|p| problem_key(&p.prompt)).collect();
        let drawn = self.held_out(n.saturating_add(test.len()), seed);
        drawn.into_iter().filter(|p| !test.contains(&problem_key(&p.prompt))).take(n).collect()
    }

    /// An imperfect completion of `p` from its own task.
    pub fn corrupt(&self, rng: &mut Rng, p: &Problem) -> String {
        if Language::of_problem(p) == Some(Language::Letters) {
            return super::language::to_letters(&self.corrupt(rng, &translate(p, Language::Digits)));
        }
        match self.entries.iter().find(|(t, _)| t.name() == p.task) {
            Some((t, _)) => t.corrupt(rng, p),
            None => p.solution.clone(),
        }
    }
}

/// A numeric problem and a completion both read as digits, so an answer counts by its value in
/// either script (the language reward asks for the prompt's); `None` when both already are.
fn read_as_digits(problem: &Problem, completion: &str) -> Option<(Problem, String)> {
    let language = Language::of_problem(problem)?;
    let digits = to_digits(completion);
    (language == Language::Letters || digits != completion).then(|| (translate(problem, Language::Digits), digits))
}

/// Whether `completion` solves `problem`: the task's own verifier, or (for user datasets) the
/// `<answer>` text the same as the expected answer the way the MATH benchmark grades them
/// ([`math_answer::equivalent`]: `\dfrac12`, `0.5` and `1/2` are one answer).
pub fn verify(problem: &Problem, completion: &str) -> bool {
    if let Some((problem, completion)) = read_as_digits(problem, completion) {
        return verify(&problem, &completion);
    }
    match task_by_name(&problem.task) {
        Some(t) => t.verify(problem, completion),
        None => extract_answer(completion).is_some_and(|a| math_answer::equivalent(a, problem.answer.trim())),
    }
}

/// One answer for majority voting (cons@k): the value the `<answer>` denotes where its task
/// says ([`Task::answer_value`]), else its text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AnswerKey {
    Value(String),
    Text(String),
}

/// The answer `completion` gives to `problem`, such that two completions with the same key are
/// both right or both wrong: a numeric problem's answer by its integer value (either script is
/// accepted), a countdown expression by its value, a user dataset's answer by its normal form
/// ([`math_answer::normalize`]) where both it and the expected answer have one. `None` without
/// an `<answer>` or with an empty one (majority voting never picks "no answer").
pub fn answer_key(problem: &Problem, completion: &str) -> Option<AnswerKey> {
    if let Some((problem, completion)) = read_as_digits(problem, completion) {
        return answer_key(&problem, &completion);
    }
    // An empty `<answer></answer>` gives no answer: it does not vote.
    let answer = extract_answer(completion).filter(|a| !a.is_empty())?;
    let value = match task_by_name(&problem.task) {
        Some(t) => t.answer_value(problem, answer),
        // A user dataset's answer votes by its normal form only where the expected answer has
        // one too: otherwise `verify` compares the texts alone.
        None if math_answer::normalize(problem.answer.trim()).is_some() => math_answer::normalize(answer),
        None => None,
    };
    Some(value.map_or_else(|| AnswerKey::Text(answer.to_string()), AnswerKey::Value))
}

/// Pretraining text: `prompt + completion + <eos>` from the train split, a `imperfect` fraction
/// of the completions carrying one wrong step. Deterministic for a seed; `cursor` counts the
/// documents drawn so a resumed run continues the same stream.
#[derive(Debug)]
pub struct Corpus {
    pub tasks: TaskSet,
    pub imperfect: f64,
    /// Share of letter-numeral traces whose reasoning drifts into digits part-way (the language
    /// mixing R1-Zero showed, which R1's language reward removes).
    pub mixing: f64,
    rng: Rng,
    pub cursor: u64,
}

/// `value` if it is a share (0 to 1), else an error naming the setting `key`: a share of 1.5 or
/// NaN is a typo to report, not a value to clamp.
fn share_of(key: &str, value: f64) -> Result<f64> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(Error::Task(format!("`{key}` = {value}: a share, so between 0 and 1")))
    }
}

impl Corpus {
    /// A corpus of `tasks` with an `imperfect` share of traces holding a wrong step (an error
    /// naming `imperfect` outside 0..=1).
    pub fn new(tasks: TaskSet, imperfect: f64, seed: u64) -> Result<Self> {
        let imperfect = share_of("imperfect", imperfect)?;
        Ok(Corpus { tasks, imperfect, mixing: 0.0, rng: Rng::new(seed), cursor: 0 })
    }

    /// Lets a `share` of letter-numeral traces drift into digits (the `mixing` setting).
    pub fn with_mixing(mut self, share: f64) -> Result<Self> {
        self.mixing = share_of("mixing", share)?;
        Ok(self)
    }

    /// The generator state, for checkpoints.
    pub fn state(&self) -> ([u64; 4], u64) {
        (self.rng.state(), self.cursor)
    }

    pub fn restore(&mut self, state: [u64; 4], cursor: u64) -> Result<()> {
        self.rng = Rng::from_state(state).map_err(|e| Error::Task(format!("corpus generator: {e}")))?;
        self.cursor = cursor;
        Ok(())
    }

    pub fn next_document(&mut self) -> String {
        let (prompt, completion) = self.next_pair();
        format!("{prompt}{completion}<eos>")
    }

    /// The next document as (prompt, completion), without the EOS.
    pub fn next_pair(&mut self) -> (String, String) {
        self.cursor += 1;
        let p = self.tasks.sample(&mut self.rng, Split::Train);
        let mut completion = if self.rng.uniform_f64() < self.imperfect {
            self.tasks.corrupt(&mut self.rng, &p)
        } else {
            p.solution.clone()
        };
        if self.mixing > 0.0
            && Language::of_problem(&p) == Some(Language::Letters)
            && self.rng.uniform_f64() < self.mixing
        {
            completion = mix_languages(&completion, &mut self.rng);
        }
        (p.prompt, completion)
    }
}

/// The reasoning steps from a random one on written in digits (the answer keeps its script).
fn mix_languages(completion: &str, rng: &mut Rng) -> String {
    let Some((think, rest)) = completion.strip_prefix("<think>").and_then(|c| c.split_once("</think>")) else {
        return completion.to_string();
    };
    let steps: Vec<&str> = think.split(';').collect();
    let from = rng.below(steps.len() as u64) as usize;
    let mixed: Vec<String> =
        steps.iter().enumerate().map(|(i, s)| if i >= from { to_digits(s) } else { s.to_string() }).collect();
    format!("<think>{}</think>{rest}", mixed.join(";"))
}

/// A user dataset: one JSON object per line with a prompt and its expected answer, under the
/// names the usual math benchmarks use, so their files load as they are:
/// - the prompt: `prompt`, else `problem` (MATH, MATH-500, AIME), else `question` (GSM8K);
/// - the answer: `answer`, a string or a number (AIME's integers); GSM8K's, which ends its
///   worked solution with `#### 72`, is the text after the last `####`; without `answer`, the
///   last `\boxed{}` of `solution` (MATH's own files).
///
/// Errors name the file, the line and the field.
pub fn load_jsonl(path: &Path) -> Result<Vec<Problem>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Task(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Task(format!("{}: {e}", at())))?;
        let (prompt, answer) = line_fields(&v).map_err(|e| Error::Task(format!("{}: {e}", at())))?;
        out.push(Problem { task: "jsonl".into(), solution: template("", &answer), prompt, answer });
    }
    Ok(out)
}

/// The prompt and the expected answer of one line of a user dataset ([`load_jsonl`]).
fn line_fields(v: &serde_json::Value) -> std::result::Result<(String, String), String> {
    let keys = || v.as_object().map(|o| o.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "));
    let text = |key: &str| -> std::result::Result<Option<String>, String> {
        // The key as written, else one that differs only in case (AIME 2024's `Problem`).
        let Some((name, value)) = v.get(key).map(|value| (key, value)).or_else(|| {
            v.as_object()?.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(k, value)| (k.as_str(), value))
        }) else {
            return Ok(None);
        };
        match value {
            // An empty answer would make every empty `<answer>` right.
            serde_json::Value::String(x) if x.trim().is_empty() => Err(format!("field `{name}` is empty")),
            serde_json::Value::String(x) => Ok(Some(x.clone())),
            serde_json::Value::Number(n) if key == "answer" => Ok(Some(number_text(n))),
            other => {
                let kind = if key == "answer" { "a string or a number" } else { "a string" };
                let shown: String = other.to_string().chars().take(80).collect();
                Err(format!("field `{name}` is not {kind}: {shown}"))
            }
        }
    };
    let mut prompt = None;
    for key in ["prompt", "problem", "question"] {
        if let Some(p) = text(key)? {
            prompt = Some(p);
            break;
        }
    }
    let prompt = prompt.ok_or_else(|| {
        format!("missing string field `prompt` (or `problem`, `question`); the line has {}", keys().unwrap_or_default())
    })?;
    let answer = match text("answer")? {
        Some(a) => match a.rsplit_once("####") {
            Some((_, last)) if !last.trim().is_empty() => gsm8k_number(last.trim()),
            Some(_) => return Err(format!("field `answer` ({a:?}) has nothing after its `####`")),
            None => a,
        },
        None => match text("solution")? {
            Some(solution) => match extract_boxed(&solution) {
                Some(boxed) if !boxed.is_empty() => boxed.to_string(),
                _ => return Err("no field `answer`, and field `solution` has no `\\boxed{}` answer".into()),
            },
            None => return Err("missing string field `answer` (or a `solution` with a `\\boxed{}` answer)".into()),
        },
    };
    if math_answer::normalize(answer.trim()).is_some_and(|n| n.is_empty()) {
        // `k=` or `\$`: graded as MATH grades them, an empty answer would be right.
        return Err(format!(
            "field `answer` ({answer:?}) is empty once normalised as MATH's grader does (it drops `k=`, `\\$`, \
             units written `\\text{{ unit}}`)"
        ));
    }
    Ok((prompt, answer))
}

/// A JSON number as an answer's text: an integer in its digits, a whole float too (`72.0` is
/// `72`, as the MATH grader would not see it), others as JSON writes them.
fn number_text(n: &serde_json::Number) -> String {
    match (n.as_i64(), n.as_u64(), n.as_f64()) {
        (Some(i), _, _) => i.to_string(),
        (_, Some(u), _) => u.to_string(),
        (_, _, Some(x)) if x.fract() == 0.0 && x.abs() < 2f64.powi(53) => (x as i64).to_string(),
        _ => n.to_string(),
    }
}

/// GSM8K's final answer after `####` as its graders read it: thousands separators dropped
/// (`1,000` is `1000`), other text as it is.
fn gsm8k_number(tail: &str) -> String {
    let numeric = tail.chars().all(|c| c.is_ascii_digit() || matches!(c, ',' | '.' | '-'));
    if numeric {
        tail.replace(',', "")
    } else {
        tail.to_string()
    }
}

/// The problems of a user dataset ([`load_jsonl`]) on one side of the split ([`Split::of_line`])
/// and the file's line count. On the held-out side each problem comes once (its first line), so
/// a repeated line is not scored twice; it may be empty.
pub fn jsonl_side(path: &Path, side: Split) -> Result<(Vec<Problem>, usize)> {
    let all = load_jsonl(path)?;
    let total = all.len();
    let mut seen = HashSet::new();
    let kept = all
        .into_iter()
        .filter(|p| {
            let key = line_key(&p.prompt);
            Split::of_key(&key) == side && (side == Split::Train || seen.insert(key))
        })
        .collect();
    Ok((kept, total))
}

/// The prompts of a user dataset ([`load_jsonl`]) on one side of the split: to train on
/// (`Split::Train`, leaving out the prompts evaluation draws from) or to evaluate
/// (`Split::HeldOut`, each problem once). Returns them and how many lines were not kept; none
/// on this side is an error.
pub fn load_jsonl_split(path: &Path, side: Split) -> Result<(Vec<Problem>, usize)> {
    let (kept, total) = jsonl_side(path, side)?;
    if kept.is_empty() {
        let (this, other) = match side {
            Split::Train => ("training", "held-out"),
            Split::HeldOut => ("held-out", "training"),
        };
        return Err(Error::Task(format!(
            "{}: no {this} prompts ({total} lines, all in the {other} split or none at all)",
            path.display()
        )));
    }
    let other = total - kept.len();
    Ok((kept, other))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_outside_zero_to_one_are_errors_naming_the_setting() {
        let tasks = || TaskSet::parse("add").unwrap();
        for bad in [-0.1, 1.5, f64::NAN] {
            let err = |r: Result<()>| r.unwrap_err().to_string();
            assert!(err(tasks().with_letters(bad).map(drop)).contains("`letters`"));
            assert!(err(Corpus::new(tasks(), bad, 1).map(drop)).contains("`imperfect`"));
            assert!(err(Corpus::new(tasks(), 0.5, 1).unwrap().with_mixing(bad).map(drop)).contains("`mixing`"));
        }
        for ok in [0.0, 0.25, 1.0] {
            assert_eq!(tasks().with_letters(ok).unwrap().letters, ok);
            assert_eq!(Corpus::new(tasks(), ok, 1).unwrap().with_mixing(ok).unwrap().mixing, ok);
        }
    }

    #[test]
    fn train_and_held_out_never_overlap() {
        // Half the problems in letter numerals: the split is by the problem, not its wording.
        let set = TaskSet::parse("add,mul,modchain,countdown,sort,reverse").unwrap().with_letters(0.5).unwrap();
        let train: HashSet<String> =
            set.problems(4000, 1, Split::Train).iter().map(|p| problem_key(&p.prompt)).collect();
        let held = set.problems(500, 2, Split::HeldOut);
        assert_eq!(held.len(), 500);
        assert!(held.iter().any(|p| Language::of_problem(p) == Some(Language::Letters)));
        assert!(held.iter().all(|p| !train.contains(&problem_key(&p.prompt))));
        // Even a training stream from the held-out seed stays on its side.
        assert!(set.problems(500, 2, Split::Train).iter().all(|p| Split::of(&p.prompt) == Split::Train));
        // The same seed poses the same problems at any share of letter numerals.
        let digits = TaskSet::parse("add,sort").unwrap().problems(50, 3, Split::HeldOut);
        let some = TaskSet::parse("add,sort").unwrap().with_letters(0.5).unwrap().problems(50, 3, Split::HeldOut);
        let keys = |ps: &[Problem]| ps.iter().map(|p| problem_key(&p.prompt)).collect::<Vec<_>>();
        assert_eq!(keys(&digits), keys(&some));
    }

    #[test]
    fn corpus_mixes_in_the_requested_share_of_imperfect_traces() {
        let mut c = Corpus::new(TaskSet::parse("add").unwrap(), 0.3, 5).unwrap();
        let docs: Vec<String> = (0..2000).map(|_| c.next_document()).collect();
        let wrong = docs
            .iter()
            .filter(|d| {
                let (prompt, rest) = d.split_at(d.find('=').unwrap() + 1);
                let p = Problem {
                    task: "add".into(),
                    prompt: prompt.into(),
                    answer: String::new(),
                    solution: String::new(),
                };
                let (a, b) = prompt.trim_end_matches('=').split_once('+').unwrap();
                let p = Problem { answer: (a.parse::<u64>().unwrap() + b.parse::<u64>().unwrap()).to_string(), ..p };
                !verify(&p, rest)
            })
            .count();
        assert!((wrong as f64 / 2000.0 - 0.3).abs() < 0.04, "{wrong}");
        let (state, cursor) = c.state();
        let mut d = Corpus::new(TaskSet::parse("add").unwrap(), 0.3, 99).unwrap();
        d.restore(state, cursor).unwrap();
        assert_eq!(c.next_document(), d.next_document());
    }

    #[test]
    fn mixed_language_traces_keep_their_value_and_drift_into_digits() {
        use crate::tasks::language::language_share;
        let tasks = TaskSet::parse("add:3").unwrap().with_letters(1.0).unwrap();
        let mut c = Corpus::new(tasks, 0.0, 4).unwrap().with_mixing(1.0).unwrap();
        let mut drifted = 0;
        for _ in 0..200 {
            let doc = c.next_document();
            let (prompt, rest) = doc.split_at(doc.find('=').unwrap() + 1);
            assert!(!prompt.chars().any(|ch| ch.is_ascii_digit()), "{doc}");
            let think = rest.split_once("</think>").unwrap().0;
            let share = language_share(think, Language::Letters).unwrap();
            drifted += (share < 1.0) as usize;
            // Still a correct trace: its value verifies.
            let p =
                Problem { task: "add".into(), prompt: prompt.into(), answer: String::new(), solution: String::new() };
            let digits = translate(&p, Language::Digits);
            let (a, b) = digits.prompt.trim_end_matches('=').split_once('+').unwrap();
            let sum = (a.parse::<u64>().unwrap() + b.parse::<u64>().unwrap()).to_string();
            assert!(verify(&Problem { answer: super::super::language::to_letters(&sum), ..p }, rest), "{doc}");
        }
        assert!(drifted > 100, "{drifted} of 200 mixed");
    }

    #[test]
    fn jsonl_answers_are_graded_as_math_grades_them() {
        let p = |answer: &str| Problem {
            task: "jsonl".into(),
            prompt: "q".into(),
            answer: answer.into(),
            solution: String::new(),
        };
        let says = |a: &str| format!("<think>t</think><answer>{a}</answer>");
        let half = p("\\frac{1}{2}");
        for right in ["0.5", "1/2", "\\dfrac12", "x = \\tfrac{1}{2}"] {
            assert!(verify(&half, &says(right)), "{right}");
        }
        for wrong in ["1/3", "", "\\frac{1}{2}/2"] {
            assert!(!verify(&half, &says(wrong)), "{wrong}");
        }
        // Spellings of one answer vote together; one without a normal form votes by its text.
        let key = |p: &Problem, a: &str| answer_key(p, &says(a)).unwrap();
        assert_eq!(key(&half, "0.5"), key(&half, "\\dfrac12"));
        assert_ne!(key(&half, "0.5"), key(&half, "1/3"));
        assert_eq!(key(&half, "\\sqrt"), AnswerKey::Text("\\sqrt".into()));
        // An expected answer without a normal form is right only as written, so every answer
        // votes by its text.
        let odd = p("x/4");
        assert!(verify(&odd, &says("x/4")) && !verify(&odd, &says("x / 4")));
        assert_eq!(key(&odd, "0.5"), AnswerKey::Text("0.5".into()));
    }

    #[test]
    fn the_usual_math_benchmarks_files_load_as_they_are() {
        let dir = whale_parallel::model::tensor::testing::TempDir::new("benchmarks");
        let f = dir.join("mixed.jsonl");
        let lines = [
            // MATH-500: problem, solution, answer (and more).
            concat!(
                r#"{"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "solution": "... $\\boxed{\\frac34}$.", "#,
                r#""answer": "\\frac{3}{4}", "level": 1}"#
            ),
            // AIME: an integer answer.
            r#"{"problem": "Find N.", "answer": 204, "id": 1}"#,
            // GSM8K: the worked solution ends in #### and the number.
            concat!(
                r#"{"question": "Natalia sold 48 clips...", "#,
                r#""answer": "48/2 = <<48/2=24>>24\n48+24 = <<48+24=72>>72\n#### 72"}"#
            ),
            // MATH's own files: only a solution.
            r#"{"problem": "Simplify.", "solution": "We get $\\boxed{x^{2} + 1}$ at the end."}"#,
            // A prompt field wins over the others.
            r#"{"prompt": "p", "problem": "not this", "answer": "1"}"#,
            // Another AIME file: capitalised keys; a whole float; GSM8K's thousands separator.
            r#"{"ID": "2024-I-1", "Problem": "Every morning...", "Answer": 204.0}"#,
            r#"{"question": "How many?", "answer": "so 1000\n#### 1,000"}"#,
        ];
        std::fs::write(&f, lines.join("\n")).unwrap();
        let ps = load_jsonl(&f).unwrap();
        let got: Vec<(&str, &str)> = ps.iter().map(|p| (p.prompt.as_str(), p.answer.as_str())).collect();
        assert_eq!(
            got,
            [
                ("What is $\\frac{1}{2}+\\frac{1}{4}$?", "\\frac{3}{4}"),
                ("Find N.", "204"),
                ("Natalia sold 48 clips...", "72"),
                ("Simplify.", "x^{2} + 1"),
                ("p", "1"),
                ("Every morning...", "204"),
                ("How many?", "1000"),
            ]
        );
        let says = |a: &str| format!("<think>t</think><answer>{a}</answer>");
        assert!(verify(&ps[0], &says("\\dfrac34")) && verify(&ps[1], &says("204")) && verify(&ps[2], &says("72")));
        assert!(verify(&ps[3], &says("x^{2}+1")), "spaces are not part of the answer");
    }

    #[test]
    fn jsonl_datasets_load_and_verify_with_named_errors() {
        let dir = whale_parallel::model::tensor::testing::TempDir::new("jsonl");
        let f = dir.join("data.jsonl");
        std::fs::write(&f, "{\"prompt\": \"2+2=\", \"answer\": \"4\"}\n\n{\"prompt\": \"3*3=\", \"answer\": \"9\"}\n")
            .unwrap();
        let ps = load_jsonl(&f).unwrap();
        assert_eq!(ps.len(), 2);
        assert!(verify(&ps[1], "<think>3*3</think><answer>9</answer>"));
        assert!(!verify(&ps[1], "<answer>8</answer>"));
        for (line, words) in [
            ("{\"prompt\": \"2+2=\"}", "missing string field `answer`"),
            ("{\"prompt\": \"2+2=\", \"answer\": [4]}", "field `answer` is not a string or a number: [4]"),
            ("{\"prompt\": 2, \"answer\": \"4\"}", "field `prompt` is not a string: 2"),
            ("{\"question\": \"2+2=\", \"answer\": \"so 4 ####\"}", "nothing after its `####`"),
            ("{\"problem\": \"2+2=\", \"solution\": \"it is 4\"}", "`solution` has no `\\boxed{}` answer"),
            ("{\"answer\": \"4\", \"q\": 1}", "(or `problem`, `question`); the line has `answer`, `q`"),
            ("{\"prompt\": \"2+2=\", \"answer\": \" \"}", "field `answer` is empty"),
            ("{\"prompt\": \"\", \"answer\": \"4\"}", "field `prompt` is empty"),
            (
                "{\"prompt\": \"1+1=\", \"answer\": \"k = \\\\$\"}",
                "field `answer` (\"k = \\\\$\") is empty once normalised",
            ),
        ] {
            std::fs::write(&f, format!("{{\"prompt\": \"1+1=\", \"answer\": \"2\"}}\n{line}\n")).unwrap();
            let err = load_jsonl(&f).unwrap_err().to_string();
            assert!(err.contains("data.jsonl:2") && err.contains(words), "{err}");
        }
        assert!(TaskSet::parse("add,division").unwrap_err().to_string().contains("division"));
        for (spec, limit) in [
            ("mul:9", "up to 8"),
            ("add:3-19", "up to 18"),
            ("countdown:14", "up to 13"),
            ("modchain:4000000000", "up to 1024"),
        ] {
            let err = TaskSet::parse(spec).unwrap_err().to_string();
            assert!(err.contains(spec) && err.contains(limit), "{err}");
        }
        assert!(TaskSet::parse("mul:8,add:18,countdown:13").is_ok());
    }

    #[test]
    fn asking_for_more_problems_than_a_split_holds_gives_the_split() {
        // One-digit sums in digits hold three held-out problems (see below): any larger ask
        // draws the same three, in the same order, and ends.
        let tasks = TaskSet::parse("add:1").unwrap();
        let three = tasks.held_out(3, 7);
        assert_eq!(three.len(), 3);
        assert_eq!(tasks.held_out(1000, 7), three);
        assert_eq!(tasks.held_out(usize::MAX, 7), three);
        assert_eq!(tasks.held_out_besides(usize::MAX, 7, &three[..1]), three[1..]);
    }

    #[test]
    fn validation_problems_leave_out_the_test_set_in_either_script() {
        // A small problem space: one-digit sums hold three held-out problems, so two draws of
        // two overlap.
        let tasks = TaskSet::parse("add:1").unwrap().with_letters(0.5).unwrap();
        let test = tasks.held_out(2, 0);
        let plain = tasks.held_out(2, 0x5A11);
        let keys = |ps: &[Problem]| -> HashSet<String> { ps.iter().map(|p| problem_key(&p.prompt)).collect() };
        assert!(!keys(&plain).is_disjoint(&keys(&test)), "the draws must overlap for this test");
        let validation = tasks.held_out_besides(2, 0x5A11, &test);
        assert!(!validation.is_empty() && keys(&validation).is_disjoint(&keys(&test)));
        assert!(validation.iter().all(|p| Split::of(&p.prompt) == Split::HeldOut));
        // What did not overlap is drawn as before, in order.
        let kept: Vec<&Problem> = plain.iter().filter(|p| !keys(&test).contains(&problem_key(&p.prompt))).collect();
        assert!(kept.iter().zip(&validation).all(|(a, b)| *a == b));
    }

    #[test]
    fn an_answer_counts_by_its_value_in_either_script() {
        let digits =
            Problem { task: "add".into(), prompt: "12+7=".into(), answer: "19".into(), solution: String::new() };
        let letters = translate(&digits, Language::Letters);
        for p in [&digits, &letters] {
            for answer in ["19", "lw"] {
                let completion = format!("<think>x</think><answer>{answer}</answer>");
                assert!(verify(p, &completion), "{} {answer}", p.prompt);
                assert_eq!(answer_key(p, &completion), Some(AnswerKey::Value("19".into())));
            }
            assert!(!verify(p, "<think>x</think><answer>lv</answer>"));
        }
    }

    #[test]
    fn rewordings_of_a_problem_share_its_side_of_the_split() {
        for (a, b) in [
            ("47+85=", "85+47="),
            ("7*123=", "123*7="),
            ("s5,2,9=", "s2,9,5="),
            ("c3,7,25t46=", "c25,3,7t46="),
            ("vp+ou=", "85+47="),
            ("sm,w,p=", "s2,9,5="),
        ] {
            assert_eq!(problem_key(a), problem_key(b), "{a} {b}");
        }
        assert_eq!(problem_key("c5,19,11t-3="), problem_key("c11,19,5t-3="));
        for (a, b) in [("47+85=", "47*85="), ("c3,7t46=", "c3,7t47="), ("r123=", "r321="), ("s1,2=", "s1,2,2=")] {
            assert_ne!(problem_key(a), problem_key(b), "{a} {b}");
        }
        assert_eq!(problem_key("x=3;*2+1;%7="), "x=3;*2+1;%7=");
        // Every held-out problem's rewordings are held out too, so none is trained on.
        let set = TaskSet::parse("add:2,mul:1,countdown,sort").unwrap();
        for p in set.problems(300, 3, Split::HeldOut) {
            let reworded = match p.task.as_str() {
                "add" | "mul" => {
                    let op = if p.task == "add" { '+' } else { '*' };
                    let (x, y) = p.prompt.trim_end_matches('=').split_once(op).unwrap();
                    format!("{y}{op}{x}=")
                }
                _ => {
                    let (list, rest) = p.prompt[1..].split_once(['t', '=']).unwrap();
                    let sep = &p.prompt[1 + list.len()..p.prompt.len() - rest.len()];
                    let mut items: Vec<&str> = list.split(',').collect();
                    items.reverse();
                    format!("{}{}{sep}{rest}", &p.prompt[..1], items.join(","))
                }
            };
            assert_ne!(reworded, "", "{}", p.prompt);
            assert_eq!(Split::of(&reworded), Split::HeldOut, "{} -> {reworded}", p.prompt);
        }
    }

    #[test]
    fn a_training_pool_leaves_out_the_held_out_split() {
        let dir = whale_parallel::model::tensor::testing::TempDir::new("pool");
        let f = dir.join("pool.jsonl");
        let tasks = TaskSet::parse("add:2").unwrap();
        let (train, held) = (tasks.problems(20, 1, Split::Train), tasks.held_out(5, 1));
        let line = |p: &Problem| format!("{{\"prompt\": {:?}, \"answer\": {:?}}}\n", p.prompt, p.answer);
        std::fs::write(&f, train.iter().chain(&held).map(line).collect::<String>()).unwrap();
        let (pool, left_out) = load_jsonl_split(&f, Split::Train).unwrap();
        assert_eq!((pool.len(), left_out), (20, 5));
        assert!(pool.iter().map(|p| &p.prompt).eq(train.iter().map(|p| &p.prompt)));
        std::fs::write(&f, held.iter().map(line).collect::<String>()).unwrap();
        let err = load_jsonl_split(&f, Split::Train).unwrap_err().to_string();
        assert!(err.contains("pool.jsonl") && err.contains("no training prompts"), "{err}");
        std::fs::write(&f, "").unwrap();
        assert!(load_jsonl_split(&f, Split::Train).is_err());
    }

    #[test]
    fn a_files_spellings_of_one_problem_are_on_one_side_and_held_out_once() {
        // Whitespace, a missing or extra `=`/`?`/`.`, and the operands' order: one problem.
        let spellings = ["10+11=", "10+11= ", "10 + 11", "11+10=?", " 10+11 ."];
        assert!(spellings.iter().all(|p| line_key(p) == line_key("10+11=")), "{:?}", spellings.map(line_key));
        assert_eq!(line_key("10+11="), problem_key("10+11="), "a built-in prompt keeps its key");
        // A held-out problem and its spellings: all held out, scored once.
        let held = (10..100u32).map(|a| format!("{a}+11=")).find(|p| Split::of(p) == Split::HeldOut).unwrap();
        let dir = whale_parallel::model::tensor::testing::TempDir::new("spellings");
        let f = dir.join("spellings.jsonl");
        let body = held.trim_end_matches('=');
        let lines: String = [held.clone(), format!("{body} = "), body.to_string(), held.clone()]
            .iter()
            .map(|p| format!("{{\"prompt\": {p:?}, \"answer\": \"1\"}}\n"))
            .collect();
        std::fs::write(&f, lines).unwrap();
        assert!(load_jsonl_split(&f, Split::Train).is_err(), "no spelling of it is trained on");
        let (kept, total) = jsonl_side(&f, Split::HeldOut).unwrap();
        assert_eq!((kept.len(), total), (1, 4));
        assert_eq!(kept[0].prompt, held);
    }

    #[test]
    fn integer_answers_count_by_value_and_empty_answers_do_not_vote() {
        let p = Problem { task: "add".into(), prompt: "12+7=".into(), solution: String::new(), answer: "19".into() };
        let said = |a: &str| format!("<think>2+7=9</think><answer>{a}</answer>");
        for right in ["19", "019", "+19", "19.", " 19 "] {
            assert!(verify(&p, &said(right)), "{right}");
            assert_eq!(answer_key(&p, &said(right)), Some(AnswerKey::Value("19".into())), "{right}");
        }
        for wrong in ["-19", "1 9", "19.0", "0x13", "", "nineteen", "+-19"] {
            assert!(!verify(&p, &said(wrong)), "{wrong}");
        }
        let zero = Problem { answer: "0".into(), prompt: "0+0=".into(), ..p.clone() };
        assert!(verify(&zero, &said("-0")) && verify(&zero, &said("00")));
        // The last complete answer block counts (TinyZero's rule), not one inside the reasoning.
        let revised = "<think>try <answer>18</answer></think><answer>19</answer>";
        assert!(verify(&p, revised));
        assert!(!verify(&p, "<think>x</think><answer>19</answer><answer>18</answer>"));
        assert!(verify(&p, "<think>x</think><answer>19</answer><answer>18"), "an unclosed block is no answer");
        // An empty answer gives no vote: two empty ones do not outvote one right answer.
        assert_eq!(answer_key(&p, &said("")), None);
        let texts = [said(""), said(""), said("19")];
        assert_eq!(crate::eval::majority_vote(&p, &texts), Some(2));
        // A text answer's task keeps comparing text.
        let sort =
            Problem { task: "sort".into(), prompt: "s3,1=".into(), solution: String::new(), answer: "1,3".into() };
        assert!(verify(&sort, &said("1,3")) && !verify(&sort, &said("1, 3")));
    }
}
