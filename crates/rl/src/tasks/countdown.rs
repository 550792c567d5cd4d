//! Countdown: reach a target with the given numbers, each used exactly once, with + - *.
//! The verifier accepts any correct expression (TinyZero's rule), not just the generated one.

use super::{template, Problem, Task};
use whale_parallel::model::tensor::Rng;

/// Prompt `c3,7,25t46=`; scratchpad `25+7=32;32+3=35`-style steps, answer an expression such as
/// `(25+7)+3`. Difficulty = how many numbers (at least 2).
#[derive(Debug, Clone, Copy)]
pub struct Countdown;

const OPS: [char; 3] = ['+', '-', '*'];

fn apply(a: i64, op: char, b: i64) -> i64 {
    match op {
        '+' => a + b,
        '-' => a - b,
        _ => a * b,
    }
}

/// Left-to-right combination of `nums` with `ops`: the steps, the expression and the value.
fn combine(nums: &[i64], ops: &[char]) -> (String, String, i64) {
    let (mut acc, mut expr, mut steps) = (nums[0], nums[0].to_string(), Vec::new());
    for (&n, &op) in nums[1..].iter().zip(ops) {
        let next = apply(acc, op, n);
        steps.push(format!("{acc}{op}{n}={next}"));
        expr = if steps.len() == 1 { format!("{expr}{op}{n}") } else { format!("({expr}){op}{n}") };
        acc = next;
    }
    (steps.join(";"), expr, acc)
}

fn parse_prompt(prompt: &str) -> (Vec<i64>, i64) {
    let body = prompt.trim_start_matches('c').trim_end_matches('=');
    let (nums, target) = body.split_once('t').expect("c...t...=");
    (nums.split(',').map(|n| n.parse().expect("number")).collect(), target.parse().expect("target"))
}

/// Evaluates an expression of integers, + - * and parentheses (usual precedence); `None` when
/// malformed (a number with a leading zero included, as in Python). Also returns the numbers it
/// used.
fn evaluate(expr: &str) -> Option<(i64, Vec<i64>)> {
    struct P<'a> {
        s: &'a [u8],
        i: usize,
        used: Vec<i64>,
    }
    impl P<'_> {
        fn expr(&mut self) -> Option<i64> {
            let mut v = self.term()?;
            while self.i < self.s.len() && (self.s[self.i] == b'+' || self.s[self.i] == b'-') {
                let op = self.s[self.i];
                self.i += 1;
                let r = self.term()?;
                v = if op == b'+' { v.checked_add(r)? } else { v.checked_sub(r)? };
            }
            Some(v)
        }
        fn term(&mut self) -> Option<i64> {
            let mut v = self.atom()?;
            while self.i < self.s.len() && self.s[self.i] == b'*' {
                self.i += 1;
                v = v.checked_mul(self.atom()?)?;
            }
            Some(v)
        }
        fn atom(&mut self) -> Option<i64> {
            if self.s.get(self.i) == Some(&b'(') {
                self.i += 1;
                let v = self.expr()?;
                (self.s.get(self.i) == Some(&b')')).then_some(())?;
                self.i += 1;
                return Some(v);
            }
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                self.i += 1;
            }
            let digits = &self.s[start..self.i];
            // `07` is not a number Python's eval (TinyZero's checker) accepts.
            if digits.len() > 1 && digits[0] == b'0' {
                return None;
            }
            let n: i64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
            self.used.push(n);
            Some(n)
        }
    }
    // Spaces between tokens are fine; inside a number (`2 5`) they make two numbers, which
    // Python's eval refuses, not 25.
    let parts: Vec<&str> = expr.split_whitespace().collect();
    if parts
        .windows(2)
        .any(|w| w[0].ends_with(|c: char| c.is_ascii_digit()) && w[1].starts_with(|c: char| c.is_ascii_digit()))
    {
        return None;
    }
    let compact: String = parts.concat();
    let mut p = P { s: compact.as_bytes(), i: 0, used: Vec::new() };
    let v = p.expr()?;
    (p.i == p.s.len()).then_some((v, p.used))
}

impl Task for Countdown {
    fn name(&self) -> &'static str {
        "countdown"
    }

    /// Numbers up to 25: a product of 13 stays below 2^63 (25^13 is about 1.5e18).
    fn max_difficulty(&self) -> u32 {
        13
    }

    fn generate(&self, rng: &mut Rng, difficulty: u32) -> Problem {
        let k = difficulty.max(2) as usize;
        let nums: Vec<i64> = (0..k).map(|_| 1 + rng.below(25) as i64).collect();
        let ops: Vec<char> = (1..k).map(|_| OPS[rng.below(3) as usize]).collect();
        let (think, expr, target) = combine(&nums, &ops);
        let list: Vec<String> = nums.iter().map(|n| n.to_string()).collect();
        Problem {
            task: "countdown".into(),
            prompt: format!("c{}t{target}=", list.join(",")),
            solution: template(&think, &expr),
            answer: expr,
        }
    }

    fn corrupt(&self, rng: &mut Rng, p: &Problem) -> String {
        let (nums, target) = parse_prompt(&p.prompt);
        // A different operator sequence: usually misses the target.
        loop {
            let ops: Vec<char> = (1..nums.len()).map(|_| OPS[rng.below(3) as usize]).collect();
            let (think, expr, value) = combine(&nums, &ops);
            if value != target {
                return template(&think, &expr);
            }
        }
    }

    fn verify(&self, p: &Problem, completion: &str) -> bool {
        let (mut nums, target) = parse_prompt(&p.prompt);
        let Some(answer) = super::extract_answer(completion) else { return false };
        let Some((value, mut used)) = evaluate(answer) else { return false };
        nums.sort_unstable();
        used.sort_unstable();
        value == target && used == nums
    }

    /// Any expression over exactly the prompt's numbers, by its value: `(25+7)+3` and `25+(7+3)`
    /// are one answer.
    fn answer_value(&self, p: &Problem, answer: &str) -> Option<String> {
        let (mut nums, _) = parse_prompt(&p.prompt);
        let (value, mut used) = evaluate(answer)?;
        nums.sort_unstable();
        used.sort_unstable();
        (used == nums).then(|| value.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_correct_expression_using_each_number_once_passes() {
        let p = Problem {
            task: "countdown".into(),
            prompt: "c3,7,25t46=".into(),
            answer: String::new(),
            solution: String::new(),
        };
        assert!(Countdown.verify(&p, "<answer>25+7*3</answer>"));
        assert!(Countdown.verify(&p, "<answer>(7*3)+25</answer>"));
        assert!(!Countdown.verify(&p, "<answer>25+21</answer>"), "21 is not a given number");
        assert!(!Countdown.verify(&p, "<answer>25+7*3+0</answer>"), "0 not given");
        assert!(!Countdown.verify(&p, "<answer>(25+7*3</answer>"), "malformed");
        assert!(!Countdown.verify(&p, "<answer>25+07*3</answer>"), "a leading zero is malformed");
        assert!(!Countdown.verify(&p, "<answer>25+7*03</answer>"), "a leading zero is malformed");
        assert!(Countdown.verify(&p, "<answer> 25 + 7 * 3 </answer>"), "spaces between tokens");
        assert!(!Countdown.verify(&p, "<answer>2 5+7*3</answer>"), "a space inside a number makes two");
        let mut rng = Rng::new(3);
        for d in 2..5 {
            let p = Countdown.generate(&mut rng, d);
            assert!(Countdown.verify(&p, &p.solution), "{p:?}");
            assert!(!Countdown.verify(&p, &Countdown.corrupt(&mut rng, &p)));
        }
    }
}
