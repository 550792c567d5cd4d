//! Token permutation for expert dispatch (DeepSeekMoE, spec deepseek-v3.md section 2): a batch's
//! (token, expert) assignments sorted by expert, so every expert runs once on a contiguous block
//! of rows (a grouped GEMM), and the way back, each token's expert outputs weighted by the gate
//! and summed.
//!
//! The combine is a gather per token: every output row reads its own copies, in a fixed order.
//! It is not a scatter-add into the tokens. On a GPU that means no atomics, and the same bits on
//! every run and on both devices.

use rayon::prelude::*;

use super::rows_per_task;

/// Where a batch's assignments go when they are sorted by expert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchPlan {
    /// Dispatched rows per expert, in expert order: the grouped GEMM's block sizes.
    pub sizes: Vec<usize>,
    /// `[P]`: the token that dispatched row `p` copies.
    pub rows: Vec<u32>,
    /// `[P]`: the assignment (an index into the caller's list) that row `p` serves.
    pub slots: Vec<u32>,
    /// `[T + 1]`: token `t`'s dispatched rows are `token_rows[token_offsets[t]..token_offsets[t + 1]]`.
    pub token_offsets: Vec<u32>,
    /// `[P]`: every token's dispatched rows, ascending (CSR, with `token_offsets`).
    pub token_rows: Vec<u32>,
}

impl DispatchPlan {
    /// The plan for `assignments` of (token, expert) pairs. They are sorted by expert, stably, so
    /// every expert's block keeps the order of the list. A token or expert out of range is an
    /// error that names it.
    pub fn new(assignments: &[(usize, usize)], n_tokens: usize, n_experts: usize) -> Result<Self, String> {
        if let Some((i, &(t, e))) = assignments.iter().enumerate().find(|(_, &(t, e))| t >= n_tokens || e >= n_experts)
        {
            return Err(format!(
                "dispatch: assignment {i} is (token {t}, expert {e}), outside {n_tokens} tokens and {n_experts} experts"
            ));
        }
        if assignments.len() > u32::MAX as usize {
            return Err(format!("dispatch: {} assignments do not fit u32 indices", assignments.len()));
        }
        let mut order: Vec<usize> = (0..assignments.len()).collect();
        order.sort_by_key(|&i| assignments[i].1);
        let mut sizes = vec![0usize; n_experts];
        let mut per_token = vec![0u32; n_tokens + 1];
        for &(t, e) in assignments {
            sizes[e] += 1;
            per_token[t + 1] += 1;
        }
        let token_offsets: Vec<u32> = per_token
            .iter()
            .scan(0u32, |sum, &c| {
                *sum += c;
                Some(*sum)
            })
            .collect();
        let rows: Vec<u32> = order.iter().map(|&i| assignments[i].0 as u32).collect();
        // Positions visited in ascending order fill every token's list ascending.
        let mut fill = token_offsets.clone();
        let mut token_rows = vec![0u32; rows.len()];
        for (p, &t) in rows.iter().enumerate() {
            token_rows[fill[t as usize] as usize] = p as u32;
            fill[t as usize] += 1;
        }
        Ok(DispatchPlan { sizes, rows, slots: order.iter().map(|&i| i as u32).collect(), token_offsets, token_rows })
    }

    /// Dispatched rows, `P`.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn n_tokens(&self) -> usize {
        self.token_offsets.len() - 1
    }
}

/// Permute: `out[p] = scale[p] * x[rows[p]]` over rows of `dim` (without `scale`, a copy). Rows
/// are validated by the caller (`< x`'s rows). With a scale, this is also the combine's backward
/// for the expert outputs.
pub fn permute(x: &[f32], dim: usize, rows: &[u32], scale: Option<&[f32]>, out: &mut [f32]) {
    assert_eq!(out.len(), rows.len() * dim, "permute: out is not [rows, dim]");
    assert!(scale.is_none_or(|s| s.len() == rows.len()), "permute: one scale per row");
    if dim == 0 {
        return;
    }
    let chunk = rows_per_task(dim);
    out.par_chunks_mut(chunk * dim).enumerate().for_each(|(c, block)| {
        for (i, o) in block.chunks_exact_mut(dim).enumerate() {
            let p = c * chunk + i;
            let src = &x[rows[p] as usize * dim..][..dim];
            match scale {
                Some(s) => o.iter_mut().zip(src).for_each(|(o, &v)| *o = s[p] * v),
                None => o.copy_from_slice(src),
            }
        }
    });
}

/// Unpermute (the combine): `out[t] = sum of weight[p] * y[p]` over token `t`'s dispatched rows
/// `p` (ascending, from 0.0; without `weight`, a plain sum). Tokens with no rows get zeros. With
/// no weights, this is also the permute's backward.
pub fn unpermute(
    y: &[f32],
    dim: usize,
    weight: Option<&[f32]>,
    (token_offsets, token_rows): (&[u32], &[u32]),
    out: &mut [f32],
) {
    let n_tokens = token_offsets.len().saturating_sub(1);
    assert_eq!(out.len(), n_tokens * dim, "unpermute: out is not [tokens, dim]");
    if dim == 0 {
        return;
    }
    let chunk = rows_per_task(dim);
    out.par_chunks_mut(chunk * dim).enumerate().for_each(|(c, block)| {
        for (i, o) in block.chunks_exact_mut(dim).enumerate() {
            let t = c * chunk + i;
            o.fill(0.0);
            for &p in &token_rows[token_offsets[t] as usize..token_offsets[t + 1] as usize] {
                let src = &y[p as usize * dim..][..dim];
                match weight {
                    Some(w) => o.iter_mut().zip(src).for_each(|(o, &v)| *o += w[p as usize] * v),
                    None => o.iter_mut().zip(src).for_each(|(o, &v)| *o += v),
                }
            }
        }
    });
}

/// The combine's weight gradient: `dweight[p] = sum over c of dout[rows[p], c] * y[p, c]`: f32
/// products summed in f64 in `c` order, as whale-tensor's `sum` reduces (so it is the gradient
/// `(dout[rows] * y).sum(1)` would give, to the bit).
pub fn unpermute_weight_grad(dout: &[f32], y: &[f32], dim: usize, rows: &[u32], dweight: &mut [f32]) {
    assert_eq!(dweight.len(), rows.len(), "unpermute_weight_grad: one gradient per row");
    assert_eq!(y.len(), rows.len() * dim, "unpermute_weight_grad: y is not [rows, dim]");
    dweight.par_iter_mut().enumerate().for_each(|(p, d)| {
        let g = &dout[rows[p] as usize * dim..][..dim];
        *d = g.iter().zip(&y[p * dim..][..dim]).map(|(&a, &b)| f64::from(a * b)).sum::<f64>() as f32;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    // Tokens 0..3, top-2 over 3 experts, written the way a router returns them (best first).
    const ASSIGNMENTS: [(usize, usize); 6] = [(0, 2), (0, 0), (1, 0), (1, 1), (2, 2), (2, 1)];

    #[test]
    fn the_plan_sorts_by_expert_stably_and_lists_each_tokens_rows() {
        let plan = DispatchPlan::new(&ASSIGNMENTS, 4, 3).unwrap();
        assert_eq!(plan.sizes, vec![2, 2, 2]);
        assert_eq!(plan.slots, vec![1, 2, 3, 5, 0, 4]);
        assert_eq!(plan.rows, vec![0, 1, 1, 2, 0, 2]);
        // Token 3 has no assignment: an empty range.
        assert_eq!(plan.token_offsets, vec![0, 2, 4, 6, 6]);
        assert_eq!(plan.token_rows, vec![0, 4, 1, 2, 3, 5]);
        assert_eq!((plan.len(), plan.n_tokens()), (6, 4));
    }

    #[test]
    fn out_of_range_assignments_are_named() {
        let err = DispatchPlan::new(&[(0, 1), (5, 0)], 4, 3).unwrap_err();
        assert!(err.contains("assignment 1") && err.contains("token 5"), "{err}");
        let err = DispatchPlan::new(&[(0, 3)], 4, 3).unwrap_err();
        assert!(err.contains("expert 3"), "{err}");
    }

    #[test]
    fn unpermute_is_the_weighted_sum_over_each_tokens_assignments() {
        let plan = DispatchPlan::new(&ASSIGNMENTS, 4, 3).unwrap();
        let dim = 3;
        let x: Vec<f32> = (0..4 * dim).map(|i| i as f32 * 0.5 - 2.0).collect();
        let mut xp = vec![0.0; plan.len() * dim];
        permute(&x, dim, &plan.rows, None, &mut xp);
        for (p, &t) in plan.rows.iter().enumerate() {
            assert_eq!(xp[p * dim..][..dim], x[t as usize * dim..][..dim]);
        }
        // An "expert" that scales by (expert + 1); weights per assignment.
        let w_slot = [0.7f32, 0.3, 0.6, 0.4, 0.9, 0.1];
        let w: Vec<f32> = plan.slots.iter().map(|&s| w_slot[s as usize]).collect();
        let mut y = xp.clone();
        for (p, &s) in plan.slots.iter().enumerate() {
            let e = ASSIGNMENTS[s as usize].1 as f32 + 1.0;
            y[p * dim..][..dim].iter_mut().for_each(|v| *v *= e);
        }
        let mut out = vec![f32::NAN; 4 * dim];
        unpermute(&y, dim, Some(&w), (&plan.token_offsets, &plan.token_rows), &mut out);
        for t in 0..4 {
            for c in 0..dim {
                let want: f32 = ASSIGNMENTS
                    .iter()
                    .zip(w_slot)
                    .filter(|((tok, _), _)| *tok == t)
                    .map(|(&(_, e), w)| w * (e as f32 + 1.0) * x[t * dim + c])
                    .sum();
                assert!((out[t * dim + c] - want).abs() < 1e-5, "token {t} column {c}: {} vs {want}", out[t * dim + c]);
            }
        }
        assert_eq!(out[3 * dim..], [0.0; 3], "a token with no expert gets zeros");

        // Without weights it adds each token's copies: the permute's adjoint.
        let mut sums = vec![0.0; 4 * dim];
        unpermute(&xp, dim, None, (&plan.token_offsets, &plan.token_rows), &mut sums);
        for t in 0..3 {
            assert_eq!(sums[t * dim..][..dim], x[t * dim..][..dim].iter().map(|v| 2.0 * v).collect::<Vec<_>>()[..]);
        }
    }

    #[test]
    fn the_weight_gradient_is_the_row_dot_product() {
        let plan = DispatchPlan::new(&ASSIGNMENTS, 3, 3).unwrap();
        let dim = 2;
        let dout = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let y: Vec<f32> = (0..plan.len() * dim).map(|i| i as f32).collect();
        let mut dw = vec![0.0; plan.len()];
        unpermute_weight_grad(&dout, &y, dim, &plan.rows, &mut dw);
        for (p, &t) in plan.rows.iter().enumerate() {
            let t = t as usize;
            assert_eq!(dw[p], dout[t * 2] * y[p * 2] + dout[t * 2 + 1] * y[p * 2 + 1]);
        }
        let mut scaled = vec![0.0; plan.len() * dim];
        permute(&dout, dim, &plan.rows, Some(&dw), &mut scaled);
        assert_eq!(scaled[2..4], [dw[1] * 3.0, dw[1] * 4.0]);
    }
}
