//! The two "languages" of the numeric tasks: numbers written in digits, or in a second numeral
//! script of letters (`0..9` -> `k l m n o p q u v w`, letters no task prompt uses as a marker).
//! A problem posed in one language should be reasoned about in it; R1's language-consistency
//! reward is the share of the reasoning written in the prompt's language (spec/rl.md 2.2).

use super::Problem;

/// The letter numerals, indexed by digit value.
pub const LETTER_NUMERALS: [char; 10] = ['k', 'l', 'm', 'n', 'o', 'p', 'q', 'u', 'v', 'w'];

/// Tasks whose text is made of numbers (the ones with two languages).
const NUMERIC_TASKS: [&str; 5] = ["add", "mul", "modchain", "countdown", "sort"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    Digits,
    Letters,
}

impl Language {
    /// The language of a numeral character, if it is one.
    pub fn of_char(c: char) -> Option<Language> {
        if c.is_ascii_digit() {
            Some(Language::Digits)
        } else if LETTER_NUMERALS.contains(&c) {
            Some(Language::Letters)
        } else {
            None
        }
    }

    /// The language `problem` is posed in; `None` for tasks without numbers (reverse, user data).
    pub fn of_problem(problem: &Problem) -> Option<Language> {
        if !NUMERIC_TASKS.contains(&problem.task.as_str()) {
            return None;
        }
        Some(if problem.prompt.chars().any(|c| c.is_ascii_digit()) { Language::Digits } else { Language::Letters })
    }
}

/// Applies `f` to every character outside the `<...>` special tags.
fn map_outside_tags(text: &str, f: impl Fn(char) -> char) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push(c);
                continue;
            }
            _ => {}
        }
        out.push(if in_tag { c } else { f(c) });
    }
    out
}

/// Digits written as letter numerals.
pub fn to_letters(text: &str) -> String {
    map_outside_tags(text, |c| c.to_digit(10).map_or(c, |d| LETTER_NUMERALS[d as usize]))
}

/// Letter numerals written as digits.
pub fn to_digits(text: &str) -> String {
    map_outside_tags(text, |c| match LETTER_NUMERALS.iter().position(|&l| l == c) {
        Some(d) => char::from(b'0' + d as u8),
        None => c,
    })
}

/// `problem` posed (prompt, answer and reference solution) in `language`.
pub fn translate(problem: &Problem, language: Language) -> Problem {
    let f = match language {
        Language::Digits => to_digits,
        Language::Letters => to_letters,
    };
    Problem {
        task: problem.task.clone(),
        prompt: f(&problem.prompt),
        answer: f(&problem.answer),
        solution: f(&problem.solution),
    }
}

/// The share of numeral characters of `reasoning` written in `language`; `None` when it has none.
pub fn language_share(reasoning: &str, language: Language) -> Option<f64> {
    let (mut same, mut total) = (0usize, 0usize);
    let mut in_tag = false;
    let outside = reasoning.chars().filter(|&c| {
        let inside = in_tag || c == '<';
        in_tag = (in_tag || c == '<') && c != '>';
        !inside
    });
    for l in outside.filter_map(Language::of_char) {
        total += 1;
        same += (l == language) as usize;
    }
    (total > 0).then(|| same as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::{verify, TaskSet};
    use whale_parallel::model::tensor::Rng;

    #[test]
    fn translation_round_trips_and_keeps_tags() {
        let s = "<think>7+5+0=12;4+8+1=13</think><answer>132</answer><eos>";
        let l = to_letters(s);
        assert_eq!(l, "<think>u+p+k=lm;o+v+l=ln</think><answer>lnm</answer><eos>");
        assert_eq!(to_digits(&l), s);
    }

    #[test]
    fn letter_problems_verify_like_their_digit_twins() {
        let set = TaskSet::parse("add,mul,modchain,countdown,sort").unwrap();
        let mut rng = Rng::new(3);
        for _ in 0..200 {
            let p = set.sample(&mut rng, crate::tasks::Split::Train);
            let q = translate(&p, Language::Letters);
            assert_eq!(Language::of_problem(&p), Some(Language::Digits), "{p:?}");
            assert_eq!(Language::of_problem(&q), Some(Language::Letters), "{q:?}");
            assert!(verify(&q, &q.solution), "{q:?}");
            // Accuracy is about the value: the right answer in the other script still counts
            // (the language reward is what asks for the prompt's script).
            assert!(verify(&q, &p.solution), "{q:?}");
            // A corrupted trace is corrupted the same way in both scripts and verifies alike.
            let mut twin = rng.clone();
            let (cq, cp) = (set.corrupt(&mut rng, &q), set.corrupt(&mut twin, &p));
            assert_eq!(cq, to_letters(&cp));
            assert_eq!(verify(&q, &cq), verify(&p, &cp));
            assert_eq!(translate(&q, Language::Digits), p);
        }
    }

    #[test]
    fn share_counts_numerals_only() {
        assert_eq!(language_share("<think>1+2=3</think>", Language::Digits), Some(1.0));
        assert_eq!(language_share("1+l=3;k", Language::Letters), Some(0.5));
        assert_eq!(language_share("<think>+;</think>", Language::Digits), None);
        let rev =
            Problem { task: "reverse".into(), prompt: "rkw=".into(), answer: "wk".into(), solution: String::new() };
        assert_eq!(Language::of_problem(&rev), None);
    }
}
