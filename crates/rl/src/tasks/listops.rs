//! Sanity tasks: sort a list of digits, reverse a string of letters.

use super::{template, Problem, Task};
use whale_parallel::model::tensor::Rng;

/// `s5,2,9=` -> scratchpad picks the minimum of what is left each step (`2;5;9`), answer `2,5,9`.
/// Difficulty = list length.
#[derive(Debug, Clone, Copy)]
pub struct Sort;

impl Task for Sort {
    fn name(&self) -> &'static str {
        "sort"
    }

    fn generate(&self, rng: &mut Rng, difficulty: u32) -> Problem {
        let xs: Vec<u64> = (0..difficulty.max(2)).map(|_| rng.below(10)).collect();
        let mut sorted = xs.clone();
        sorted.sort_unstable();
        let join = |v: &[u64], sep: &str| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(sep);
        let answer = join(&sorted, ",");
        Problem {
            task: "sort".into(),
            prompt: format!("s{}=", join(&xs, ",")),
            solution: template(&join(&sorted, ";"), &answer),
            answer,
        }
    }

    fn corrupt(&self, rng: &mut Rng, p: &Problem) -> String {
        let mut xs: Vec<String> = p.answer.split(',').map(str::to_string).collect();
        let i = rng.below(xs.len() as u64 - 1) as usize;
        xs.swap(i, i + 1);
        if xs.join(",") == p.answer {
            // Equal neighbours: drop one instead, which is always wrong.
            xs.remove(i);
        }
        template(&xs.join(";"), &xs.join(","))
    }
}

/// `rabc=` -> answer `cba`; the scratchpad walks the letters from the end. Difficulty = length.
#[derive(Debug, Clone, Copy)]
pub struct Reverse;

impl Task for Reverse {
    fn name(&self) -> &'static str {
        "reverse"
    }

    fn generate(&self, rng: &mut Rng, difficulty: u32) -> Problem {
        let s: String = (0..difficulty.max(2)).map(|_| (b'a' + rng.below(26) as u8) as char).collect();
        let answer: String = s.chars().rev().collect();
        let steps: Vec<String> = answer.chars().map(|c| c.to_string()).collect();
        Problem {
            task: "reverse".into(),
            prompt: format!("r{s}="),
            solution: template(&steps.join(";"), &answer),
            answer,
        }
    }

    fn corrupt(&self, rng: &mut Rng, p: &Problem) -> String {
        let mut cs: Vec<char> = p.answer.chars().collect();
        let i = rng.below(cs.len() as u64) as usize;
        cs[i] = if cs[i] == 'z' { 'a' } else { (cs[i] as u8 + 1) as char };
        let wrong: String = cs.iter().collect();
        template(&cs.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(";"), &wrong)
    }
}
