//! Multi-digit addition with a carry scratchpad, multiplication with partial products, and
//! chained modular arithmetic.

use super::{number_with_digits, template, Problem, Task};
use whale_parallel::model::tensor::Rng;

/// `a+b=`; the scratchpad adds digit pairs least-significant first with the carry:
/// `7+5+0=12;4+8+1=13;3+0+1=4`, then the answer `432`. Difficulty = digits of each operand.
#[derive(Debug, Clone, Copy)]
pub struct Addition;

fn digits_lsb(mut x: u64) -> Vec<u64> {
    let mut d = vec![x % 10];
    x /= 10;
    while x > 0 {
        d.push(x % 10);
        x /= 10;
    }
    d
}

/// The scratchpad for `a + b` with `error` added to the sum at step `wrong` (if any); the error
/// then flows through the carries into the answer, as a real slip would.
fn add_trace(a: u64, b: u64, wrong: Option<(usize, i64)>) -> (String, String) {
    let (da, db) = (digits_lsb(a), digits_lsb(b));
    let n = da.len().max(db.len());
    let (mut carry, mut steps, mut out) = (0i64, Vec::new(), Vec::new());
    for i in 0..n {
        let (x, y) = (*da.get(i).unwrap_or(&0) as i64, *db.get(i).unwrap_or(&0) as i64);
        let mut s = x + y + carry;
        if let Some((w, e)) = wrong {
            if w == i {
                // A digit sum is 0..=19; where the slip would leave that range it goes the
                // other way, so the step is always wrong.
                s = if (0..=19).contains(&(s + e)) { s + e } else { s - e };
            }
        }
        steps.push(format!("{x}+{y}+{carry}={s}"));
        out.push(s % 10);
        carry = s / 10;
    }
    if carry > 0 {
        out.push(carry);
    }
    let answer: String = out.iter().rev().map(|d| d.to_string()).collect();
    (steps.join(";"), answer.trim_start_matches('0').to_string()).map_answer()
}

trait MapAnswer {
    fn map_answer(self) -> (String, String);
}

impl MapAnswer for (String, String) {
    /// An all-zero answer trims to the empty string: write it as `0`.
    fn map_answer(self) -> (String, String) {
        let (t, a) = self;
        (t, if a.is_empty() { "0".into() } else { a })
    }
}

impl Task for Addition {
    fn name(&self) -> &'static str {
        "add"
    }

    fn integer_answer(&self) -> bool {
        true
    }

    /// Two 18-digit operands still sum below 2^63.
    fn max_difficulty(&self) -> u32 {
        18
    }

    fn generate(&self, rng: &mut Rng, difficulty: u32) -> Problem {
        let d = difficulty.max(1);
        let (a, b) = (number_with_digits(rng, d), number_with_digits(rng, d));
        let (think, answer) = add_trace(a, b, None);
        debug_assert_eq!(answer, (a + b).to_string());
        Problem { task: "add".into(), prompt: format!("{a}+{b}="), solution: template(&think, &answer), answer }
    }

    fn corrupt(&self, rng: &mut Rng, p: &Problem) -> String {
        let (a, b) = parse_pair(&p.prompt, '+');
        let steps = digits_lsb(a).len().max(digits_lsb(b).len());
        let err = if rng.below(2) == 0 { 1 } else { -1 };
        let (think, answer) = add_trace(a, b, Some((rng.below(steps as u64) as usize, err)));
        template(&think, &answer)
    }
}

fn parse_pair(prompt: &str, op: char) -> (u64, u64) {
    let body = prompt.trim_end_matches('=');
    let (a, b) = body.split_once(op).expect("a generated prompt");
    (a.parse().expect("digits"), b.parse().expect("digits"))
}

/// `a*b=` with `a` of `difficulty + 1` digits and `b` of `difficulty` digits; the scratchpad lists
/// the partial product of each digit of `b` (least significant first), shifted, then their sum.
#[derive(Debug, Clone, Copy)]
pub struct Multiplication;

fn mul_trace(a: u64, b: u64, wrong: Option<(usize, i64)>) -> (String, String) {
    let mut parts = Vec::new();
    let mut steps = Vec::new();
    for (i, d) in digits_lsb(b).into_iter().enumerate() {
        let mut p = (a * d) as i64 * 10i64.pow(i as u32);
        if let Some((w, e)) = wrong {
            if w == i {
                // A partial product of 0 slips up, never below 0, so the step is always wrong.
                let slip = e * 10i64.pow(i as u32);
                p = if p + slip >= 0 { p + slip } else { p - slip };
            }
        }
        steps.push(format!("{a}*{d}{}={p}", "0".repeat(i)));
        parts.push(p);
    }
    let total: i64 = parts.iter().sum();
    steps.push(format!("{}={total}", parts.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("+")));
    (steps.join(";"), total.to_string())
}

impl Task for Multiplication {
    fn name(&self) -> &'static str {
        "mul"
    }

    fn integer_answer(&self) -> bool {
        true
    }

    /// A (d + 1)-digit by d-digit product has at most 2d + 1 digits: 17 stays below 2^63.
    fn max_difficulty(&self) -> u32 {
        8
    }

    fn generate(&self, rng: &mut Rng, difficulty: u32) -> Problem {
        let d = difficulty.max(1);
        let (a, b) = (number_with_digits(rng, d + 1), number_with_digits(rng, d));
        let (think, answer) = mul_trace(a, b, None);
        debug_assert_eq!(answer, (a * b).to_string());
        Problem { task: "mul".into(), prompt: format!("{a}*{b}="), solution: template(&think, &answer), answer }
    }

    fn corrupt(&self, rng: &mut Rng, p: &Problem) -> String {
        let (a, b) = parse_pair(&p.prompt, '*');
        let n = digits_lsb(b).len() as u64;
        let err = if rng.below(2) == 0 { 1 } else { -1 };
        let (think, answer) = mul_trace(a, b, Some((rng.below(n) as usize, err)));
        template(&think, &answer)
    }
}

/// `x=7;*3+2;*5+1;%11=`: start from x, apply each `x = x*m + c` reduced mod the modulus; the
/// scratchpad shows every intermediate value. Difficulty = number of steps.
#[derive(Debug, Clone, Copy)]
pub struct ModChain;

const MODULI: [u64; 4] = [7, 11, 13, 17];

fn chain_trace(x0: u64, ops: &[(u64, u64)], m: u64, wrong: Option<usize>) -> (String, String) {
    let mut x = x0;
    let mut steps = Vec::new();
    for (i, &(mul, add)) in ops.iter().enumerate() {
        let mut next = (x * mul + add) % m;
        if wrong == Some(i) {
            next = (next + 1) % m;
        }
        steps.push(format!("{x}*{mul}+{add}={}={next}", x * mul + add));
        x = next;
    }
    (steps.join(";"), x.to_string())
}

fn parse_chain(prompt: &str) -> (u64, Vec<(u64, u64)>, u64) {
    let body = prompt.trim_end_matches('=');
    let mut parts = body.split(';');
    let x0 = parts.next().and_then(|p| p.strip_prefix("x=")).and_then(|v| v.parse().ok()).expect("x=");
    let mut ops = Vec::new();
    let mut m = 0;
    for p in parts {
        if let Some(v) = p.strip_prefix('%') {
            m = v.parse().expect("modulus");
        } else {
            let (mul, add) = p.trim_start_matches('*').split_once('+').expect("*m+c");
            ops.push((mul.parse().expect("m"), add.parse().expect("c")));
        }
    }
    (x0, ops, m)
}

impl Task for ModChain {
    fn name(&self) -> &'static str {
        "modchain"
    }

    fn integer_answer(&self) -> bool {
        true
    }

    fn generate(&self, rng: &mut Rng, difficulty: u32) -> Problem {
        let m = MODULI[rng.below(MODULI.len() as u64) as usize];
        let x0 = rng.below(m);
        let ops: Vec<(u64, u64)> = (0..difficulty.max(1)).map(|_| (2 + rng.below(8), rng.below(10))).collect();
        let (think, answer) = chain_trace(x0, &ops, m, None);
        let spec: String = ops.iter().map(|(a, c)| format!(";*{a}+{c}")).collect();
        Problem {
            task: "modchain".into(),
            prompt: format!("x={x0}{spec};%{m}="),
            solution: template(&think, &answer),
            answer,
        }
    }

    fn corrupt(&self, rng: &mut Rng, p: &Problem) -> String {
        let (x0, ops, m) = parse_chain(&p.prompt);
        let (think, answer) = chain_trace(x0, &ops, m, Some(rng.below(ops.len() as u64) as usize));
        if answer != p.answer {
            return template(&think, &answer);
        }
        // A later multiplier divisible by the modulus erased the slip; one in the last step
        // always reaches the answer.
        let (think, answer) = chain_trace(x0, &ops, m, Some(ops.len() - 1));
        template(&think, &answer)
    }
}

#[cfg(test)]
mod tests {
    use super::super::extract_answer;
    use super::*;

    #[test]
    fn traces_are_right_and_corruptions_are_wrong() {
        let mut rng = Rng::new(1);
        let tasks: [&dyn Task; 3] = [&Addition, &Multiplication, &ModChain];
        for task in tasks {
            for d in 1..5 {
                for _ in 0..50 {
                    let p = task.generate(&mut rng, d);
                    assert!(task.verify(&p, &p.solution), "{p:?}");
                    let bad = task.corrupt(&mut rng, &p);
                    assert!(extract_answer(&bad).is_some());
                    assert!(!task.verify(&p, &bad), "{} {bad}", p.prompt);
                }
            }
        }
        // The slips that had cancelled: a digit sum of 0 down, a partial product of 0 down, a
        // step before a multiplier divisible by the modulus.
        assert_eq!(add_trace(10, 20, Some((0, -1))).1, "31");
        assert_eq!(mul_trace(23, 40, Some((0, -1))).1, "921");
        let chain = Problem {
            task: "modchain".into(),
            prompt: "x=3;*2+1;*7+0;%7=".into(),
            answer: "0".into(),
            solution: String::new(),
        };
        for seed in 0..8 {
            assert!(!ModChain.verify(&chain, &ModChain.corrupt(&mut Rng::new(seed), &chain)));
        }
        let p = Problem { task: "add".into(), prompt: "347+85=".into(), answer: "432".into(), solution: String::new() };
        assert_eq!(add_trace(347, 85, None).0, "7+5+0=12;4+8+1=13;3+0+1=4");
        assert!(Addition.verify(&p, "<think>x</think><answer> 432 </answer>"));
        assert!(!Addition.verify(&p, "<think>x</think><answer>4320</answer>"));
        assert!(!Addition.verify(&p, "<answer>432"), "unterminated answer");
        assert_eq!(mul_trace(23, 45, None), ("23*5=115;23*40=920;115+920=1035".into(), "1035".into()));
        assert_eq!(parse_chain("x=3;*2+1;*4+0;%7="), (3, vec![(2, 1), (4, 0)], 7));
    }
}
