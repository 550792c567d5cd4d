//! Test data shared by the RL test files.

use whale_rl::reward_model::PreferencePair;

/// A preference pair on reversing `s`: chosen is the clean reversal, rejected the same answer
/// with a stray tail.
pub fn reversal_pair(s: &str) -> PreferencePair {
    let rev: String = s.chars().rev().collect();
    PreferencePair {
        prompt: format!("r{s}="),
        chosen: format!("<think></think><answer>{rev}</answer>"),
        rejected: format!("<think></think><answer>{rev}</answer>zz"),
        rejected_ended: true,
    }
}
