#![allow(dead_code)] // each test binary uses a part of the helpers
//! Test data and checks shared by the RL test files.

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

/// `got` within `tol` of `want`, value by value, relative to `want`'s largest magnitude.
pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-12f32, |m, x| m.max(x.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol * scale, "{what}[{i}]: {a} vs {b} (scale {scale})");
    }
}
