//! Procedurally generated reasoning tasks with exact verifiers (spec/rl.md section 6.2).
//!
//! Every problem is a prompt ending in `=` and a completion in the R1 template
//! `<think>...</think><answer>...</answer>`. Generators are seeded and have a difficulty knob;
//! [`corrupt`](Task::corrupt) writes an imperfect trace (one wrong step carried through to a
//! wrong answer), which a pretraining corpus mixes in so the base model is able but unreliable.

mod arith;
mod countdown;
mod dataset;
pub mod language;
mod listops;
pub mod math_answer;

pub use arith::{Addition, ModChain, Multiplication};
pub use countdown::Countdown;
pub use dataset::{
    answer_key, jsonl_side, line_key, load_jsonl, load_jsonl_split, problem_key, verify, AnswerKey, Corpus, Split,
    TaskSet,
};
pub use language::Language;
pub use listops::{Reverse, Sort};

use whale_parallel::model::tensor::Rng;

/// One problem instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub task: String,
    pub prompt: String,
    /// The exact expected answer text (what `<answer>` must hold; for countdown, one solution).
    pub answer: String,
    /// A correct completion: `<think>steps</think><answer>answer</answer>`.
    pub solution: String,
}

pub trait Task: Send + Sync {
    fn name(&self) -> &'static str;

    /// A problem at `difficulty` (task-specific: digits, chain length, list length...).
    fn generate(&self, rng: &mut Rng, difficulty: u32) -> Problem;

    /// The largest difficulty whose problems the task computes exactly (its numbers fit in 64
    /// bits); a task set asking for more is refused. Tasks whose difficulty is a length (a list,
    /// a chain) stop at 1024: a problem is a prompt and a trace a model reads, not a buffer of
    /// billions of elements.
    fn max_difficulty(&self) -> u32 {
        1024
    }

    /// An imperfect completion: one step wrong and the error carried to the answer.
    fn corrupt(&self, rng: &mut Rng, problem: &Problem) -> String;

    /// Whether the answer is an integer, verified by value (rl.md's "exact int": `019`, `+19`
    /// and `19.` are 19), not by its text.
    fn integer_answer(&self) -> bool {
        false
    }

    /// Whether `completion` solves `problem`. Default: the `<answer>` text equals the answer
    /// (as an integer where [`Task::integer_answer`]).
    fn verify(&self, problem: &Problem, completion: &str) -> bool {
        let Some(answer) = extract_answer(completion) else { return false };
        match self.answer_value(problem, answer) {
            Some(value) => value == problem.answer,
            None => !self.integer_answer() && answer == problem.answer,
        }
    }

    /// The value an `<answer>` text denotes, where the task accepts more than one spelling of
    /// it (an integer's canonical digits, a countdown expression's value over the prompt's
    /// numbers); `None`: the text itself. Answers with the same value must be both right or
    /// both wrong (majority voting groups them, see [`answer_key`]).
    fn answer_value(&self, _problem: &Problem, answer: &str) -> Option<String> {
        if self.integer_answer() {
            integer(answer)
        } else {
            None
        }
    }
}

/// The text of the last complete `<answer>...</answer>` block, trimmed (TinyZero's rule: a
/// completion that answers inside its reasoning and again after it is scored on the last).
pub fn extract_answer(completion: &str) -> Option<&str> {
    let (open, close) = ("<answer>", "</answer>");
    let mut last = None;
    let mut from = 0;
    while let Some(s) = completion[from..].find(open) {
        let start = from + s + open.len();
        let Some(e) = completion[start..].find(close) else { break };
        last = Some(completion[start..start + e].trim());
        from = start + e + close.len();
    }
    last
}

/// The text of the last boxed answer, trimmed: `\boxed{...}` or `\fbox{...}` with its braces
/// balanced (a space before the brace allowed), or `\boxed 5` up to a `$` or the line's end.
/// These are the spellings the MATH benchmark's reference code reads, the R1 paper's math
/// evaluations ask for the first, and which one counts is whale's rule: the last of any (the
/// reference takes a `\boxed 5` before any other). `None` without one, or when the last one
/// never closes.
pub fn extract_boxed(completion: &str) -> Option<&str> {
    let mut end = completion.len();
    loop {
        let (at, name) = ["\\boxed", "\\fbox"]
            .into_iter()
            .filter_map(|name| completion[..end].rfind(name).map(|at| (at, name)))
            .max()?;
        let after = &completion[at + name.len()..];
        // Spaces or tabs may stand before the brace; `\boxed 5` is the spaced spelling, its
        // answer on the same line.
        let argument = after.trim_start_matches([' ', '\t']);
        if let Some(inside) = argument.strip_prefix('{') {
            return balanced(inside);
        }
        if name == "\\boxed" && after.starts_with(' ') {
            let line = &argument[..argument.find(['$', '\n']).unwrap_or(argument.len())];
            if !line.trim().is_empty() {
                return Some(line.trim());
            }
        }
        // `\boxedsymbol` or `\fbox 5`: not a box; look further back.
        end = at;
    }
}

/// `text` up to the `}` that closes a brace opened just before it, trimmed; `None` if none does.
fn balanced(text: &str) -> Option<&str> {
    let mut depth = 1usize;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 1 => return Some(text[..i].trim()),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// An answer read as an integer: an optional sign, digits, an optional trailing `.`; its
/// canonical digits (`019`, `+19` and `19.` give `19`, `-0` gives `0`). `None` otherwise.
fn integer(answer: &str) -> Option<String> {
    let s = answer.strip_suffix('.').unwrap_or(answer);
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let magnitude = match digits.trim_start_matches('0') {
        "" => "0",
        m => m,
    };
    Some(if negative && magnitude != "0" { format!("-{magnitude}") } else { magnitude.to_string() })
}

/// Wraps steps and an answer in the R1 template.
pub fn template(think: &str, answer: &str) -> String {
    format!("<think>{think}</think><answer>{answer}</answer>")
}

/// The built-in tasks by name.
pub fn task_by_name(name: &str) -> Option<Box<dyn Task>> {
    Some(match name {
        "add" => Box::new(Addition),
        "mul" => Box::new(Multiplication),
        "modchain" => Box::new(ModChain),
        "countdown" => Box::new(Countdown),
        "sort" => Box::new(Sort),
        "reverse" => Box::new(Reverse),
        _ => return None,
    })
}

pub const TASK_NAMES: [&str; 6] = ["add", "mul", "modchain", "countdown", "sort", "reverse"];

/// A uniformly random number with exactly `digits` digits (1-digit numbers include 0).
pub(crate) fn number_with_digits(rng: &mut Rng, digits: u32) -> u64 {
    if digits <= 1 {
        return rng.below(10);
    }
    let lo = 10u64.pow(digits - 1);
    lo + rng.below(9 * lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_the_last_box() {
        assert_eq!(extract_boxed("\\boxed{\\frac{1}{2}}"), Some("\\frac{1}{2}"));
        assert_eq!(extract_boxed("\\boxed{1} then \\boxed{ 2 }"), Some("2"));
        assert_eq!(extract_boxed("\\boxed{1} then \\boxed{2"), None, "the last box never closes");
        assert_eq!(extract_boxed("\\boxed{\\boxed{3}}"), Some("3"));
        assert_eq!(extract_boxed("答えは\\boxed{１９}です"), Some("１９"));
        assert_eq!(extract_boxed("boxed{3} {4}"), None);
        assert_eq!(extract_boxed("\\boxed{}"), Some(""));
        // The other spellings MATH's reference reads, the last of any spelling counting.
        assert_eq!(extract_boxed("\\fbox{\\frac{1}{2}}"), Some("\\frac{1}{2}"));
        assert_eq!(extract_boxed("so $\\boxed 5$."), Some("5"));
        assert_eq!(extract_boxed("\\boxed 7\nsince 7 = 3 + 4"), Some("7"));
        assert_eq!(extract_boxed("\\boxed 7 and then \\boxed{8}"), Some("8"));
        assert_eq!(extract_boxed("\\boxed{7} and then \\fbox{8"), None);
        assert_eq!(extract_boxed("\\boxed {5}."), Some("5"), "a space before the brace is LaTeX");
        assert_eq!(extract_boxed("\\boxed{4} then \\boxed\n\nWait"), Some("4"), "a line break is no argument");
        assert_eq!(extract_boxed("\\boxed{4} then \\boxed $x$"), Some("4"), "nor is an empty spaced one");
        assert_eq!(extract_boxed("\\boxed{5} is not \\boxedsymbol or \\fbox 6"), Some("5"));
    }
}
