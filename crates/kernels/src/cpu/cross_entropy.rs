//! Fused cross-entropy (log-softmax + NLL) with an ignore index, llm.c-style: the backward
//! recomputes softmax from the logits and the saved logsumexp instead of storing probabilities.

use rayon::prelude::*;

use super::expf::expf;
use super::{reduce, rows_per_task, wide_fn};

/// Accumulator lanes of `sum(exp(x - max))` over a row (see [`super::reduce`]): a fixed summation
/// order, and shorter rounding chains over a long vocabulary than one running sum.
const SUM_EXP_LANES: usize = 8;

/// `logits`: `[rows, vocab]`, `targets`: `[rows]`. Writes `loss[r] = lse[r] - logits[r, t]` (0 for rows
/// whose target is `ignore_index`) and `lse[r] = logsumexp(logits[r])`. Returns the number of rows
/// not ignored. Targets are validated by the caller (`0 <= t < vocab` or `ignore_index`).
pub fn cross_entropy_forward(
    logits: &[f32],
    vocab: usize,
    targets: &[i64],
    ignore_index: i64,
    loss: &mut [f32],
    lse: &mut [f32],
) -> usize {
    let rows = targets.len();
    assert_eq!(logits.len(), rows * vocab, "cross_entropy_forward: logits is not [rows, vocab]");
    assert_eq!(loss.len(), rows, "cross_entropy_forward: loss is not [rows]");
    assert_eq!(lse.len(), rows, "cross_entropy_forward: lse is not [rows]");
    if vocab == 0 {
        // Only ignored rows can have an empty vocabulary; the logsumexp of nothing is -inf.
        loss.fill(0.0);
        lse.fill(f32::NEG_INFINITY);
        return 0;
    }
    let chunk = rows_per_task(vocab);
    logits
        .par_chunks(chunk * vocab)
        .zip(targets.par_chunks(chunk))
        .zip(loss.par_chunks_mut(chunk))
        .zip(lse.par_chunks_mut(chunk))
        .for_each(|(((logits, targets), loss), lse)| {
            forward_rows_wide(logits, vocab, targets, ignore_index, loss, lse)
        });
    targets.iter().filter(|&&t| t != ignore_index).count()
}

wide_fn!(fn forward_rows_wide => forward_rows(
    logits: &[f32], vocab: usize, targets: &[i64], ignore_index: i64, loss: &mut [f32], lse: &mut [f32],
));

#[inline(always)]
fn forward_rows(logits: &[f32], vocab: usize, targets: &[i64], ignore_index: i64, loss: &mut [f32], lse: &mut [f32]) {
    for (((x, &t), loss), lse) in logits.chunks_exact(vocab).zip(targets).zip(loss).zip(lse) {
        let max = reduce::max(x);
        let log_sum = reduce::sum_exp::<SUM_EXP_LANES>(x, max).ln();
        *lse = max + log_sum;
        // (max - x_t) + ln(sum) rather than lse - x_t: the first difference is exact for
        // confident predictions, where the loss is small and lse - x_t would cancel.
        *loss = if t == ignore_index { 0.0 } else { (max - x[t as usize]) + log_sum };
    }
}

/// `dlogits[r] = dloss[r] * (softmax(logits[r]) - onehot(targets[r]))`, zero for ignored rows.
pub fn cross_entropy_backward(
    logits: &[f32],
    vocab: usize,
    targets: &[i64],
    ignore_index: i64,
    lse: &[f32],
    dloss: &[f32],
    dlogits: &mut [f32],
) {
    let rows = targets.len();
    assert_eq!(logits.len(), rows * vocab, "cross_entropy_backward: logits is not [rows, vocab]");
    assert_eq!(dlogits.len(), logits.len(), "cross_entropy_backward: dlogits is not [rows, vocab]");
    assert_eq!(lse.len(), rows, "cross_entropy_backward: lse is not [rows]");
    assert_eq!(dloss.len(), rows, "cross_entropy_backward: dloss is not [rows]");
    if vocab == 0 {
        return;
    }
    let chunk = rows_per_task(vocab);
    dlogits
        .par_chunks_mut(chunk * vocab)
        .zip(logits.par_chunks(chunk * vocab))
        .zip(targets.par_chunks(chunk))
        .zip(lse.par_chunks(chunk).zip(dloss.par_chunks(chunk)))
        .for_each(|(((dx, logits), targets), (lse, dloss))| {
            backward_rows_wide(logits, vocab, targets, ignore_index, lse, dloss, dx)
        });
}

wide_fn!(fn backward_rows_wide => backward_rows(
    logits: &[f32], vocab: usize, targets: &[i64], ignore_index: i64, lse: &[f32], dloss: &[f32], dlogits: &mut [f32],
));

#[inline(always)]
fn backward_rows(
    logits: &[f32],
    vocab: usize,
    targets: &[i64],
    ignore_index: i64,
    lse: &[f32],
    dloss: &[f32],
    dlogits: &mut [f32],
) {
    let rows = dlogits.chunks_exact_mut(vocab).zip(logits.chunks_exact(vocab));
    for (((dx, x), &t), (&lse, &d)) in rows.zip(targets).zip(lse.iter().zip(dloss)) {
        if t == ignore_index {
            dx.fill(0.0);
            continue;
        }
        for (dx, &x) in dx.iter_mut().zip(x) {
            *dx = d * expf(x - lse);
        }
        dx[t as usize] = d * (expf(x[t as usize] - lse) - 1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{bits, Rng};

    const IGNORE: i64 = -100;

    /// Targets in [0, vocab), every fourth-ish row ignored.
    fn targets(rng: &mut Rng, rows: usize, vocab: usize) -> Vec<i64> {
        (0..rows)
            .map(|_| {
                let r = rng.next_u64() >> 32;
                if r % 4 == 0 {
                    IGNORE
                } else {
                    (r % vocab as u64) as i64
                }
            })
            .collect()
    }

    /// f64 reference: (loss, lse, dlogits).
    fn reference(logits: &[f32], vocab: usize, targets: &[i64], dloss: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut loss, mut lse, mut dx) = (vec![], vec![], vec![]);
        for (r, x) in logits.chunks(vocab).enumerate() {
            let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let l = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            lse.push(l);
            let t = targets[r];
            loss.push(if t == IGNORE { 0.0 } else { l - x[t as usize] as f64 });
            for (j, &v) in x.iter().enumerate() {
                let onehot = if j as i64 == t { 1.0 } else { 0.0 };
                dx.push(if t == IGNORE { 0.0 } else { dloss[r] as f64 * ((v as f64 - l).exp() - onehot) });
            }
        }
        (loss, lse, dx)
    }

    fn check(rows: usize, vocab: usize, scale: f32, seed: u64) {
        let mut rng = Rng::new(seed);
        let logits = rng.vec(rows * vocab, scale);
        let targets = targets(&mut rng, rows, vocab);
        let dloss = rng.vec(rows, 1.0);
        let (want_loss, want_lse, want_dx) = reference(&logits, vocab, &targets, &dloss);

        let (mut loss, mut lse) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
        let n = cross_entropy_forward(&logits, vocab, &targets, IGNORE, &mut loss, &mut lse);
        assert_eq!(n, targets.iter().filter(|&&t| t != IGNORE).count());
        for r in 0..rows {
            assert!((lse[r] as f64 - want_lse[r]).abs() <= 1e-6 * (1.0 + want_lse[r].abs()), "lse[{r}]");
            // The loss is a difference of O(lse) terms, so its error is measured against lse.
            let err = (loss[r] as f64 - want_loss[r]).abs();
            assert!(err <= 1e-6 * (1.0 + want_lse[r].abs()), "loss[{r}]: {} vs {}", loss[r], want_loss[r]);
            if targets[r] == IGNORE {
                assert_eq!(loss[r], 0.0);
            }
        }

        let mut dx = vec![f32::NAN; rows * vocab];
        cross_entropy_backward(&logits, vocab, &targets, IGNORE, &lse, &dloss, &mut dx);
        for (i, (&g, &w)) in dx.iter().zip(&want_dx).enumerate() {
            let d = dloss[i / vocab].abs() as f64;
            assert!((g as f64 - w).abs() <= 1e-5 * (w.abs() + d * 1e-3), "dlogits[{i}]: {g} vs {w}");
        }
        for (r, &t) in targets.iter().enumerate() {
            if t == IGNORE {
                assert!(dx[r * vocab..][..vocab].iter().all(|&g| g == 0.0));
            }
        }
    }

    #[test]
    fn matches_reference() {
        check(13, 37, 4.0, 1);
        check(9, 1, 1.0, 2);
        check(3, 5000, 20.0, 3);
        check(700, 50, 8.0, 4);
    }

    #[test]
    fn large_logits_are_stable() {
        let logits = [1000.0f32, 990.0, -1000.0];
        let (mut loss, mut lse) = ([0.0], [0.0]);
        cross_entropy_forward(&logits, 3, &[1], IGNORE, &mut loss, &mut lse);
        // 10 + ln(1 + e^-10 + e^-1990)
        assert!((loss[0] as f64 - 10.000_045_399).abs() < 1e-5, "{}", loss[0]);
        let mut dx = [0.0; 3];
        cross_entropy_backward(&logits, 3, &[1], IGNORE, &lse, &[1.0], &mut dx);
        assert!(dx.iter().all(|g| g.is_finite()) && dx[1] < -0.99);
    }

    #[test]
    fn empty_and_all_ignored() {
        assert_eq!(cross_entropy_forward(&[], 7, &[], IGNORE, &mut [], &mut []), 0);
        cross_entropy_backward(&[], 7, &[], IGNORE, &[], &[], &mut []);
        let (mut loss, mut lse) = ([1.0; 2], [0.0; 2]);
        assert_eq!(cross_entropy_forward(&[0.0; 6], 3, &[IGNORE; 2], IGNORE, &mut loss, &mut lse), 0);
        assert_eq!(loss, [0.0; 2]);
    }

    #[test]
    fn deterministic() {
        let (rows, vocab) = (2000, 61);
        let mut rng = Rng::new(8);
        let logits = rng.vec(rows * vocab, 6.0);
        let targets = targets(&mut rng, rows, vocab);
        let dloss = rng.vec(rows, 1.0);
        let run = || {
            let (mut loss, mut lse, mut dx) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows * vocab]);
            cross_entropy_forward(&logits, vocab, &targets, IGNORE, &mut loss, &mut lse);
            cross_entropy_backward(&logits, vocab, &targets, IGNORE, &lse, &dloss, &mut dx);
            [loss, lse, dx].map(|v| bits(&v))
        };
        assert_eq!(run(), run());
    }
}
