//! The MoE gate after its logits (spec/deepseek-v3.md section 2.2, V3's `noaux_tc`): affinities
//! (sigmoid for V3, softmax for V2), group-limited top-k selection on the biased scores, and the
//! combine weights from the unbiased ones. [`select_experts`] is the selection the model's
//! `Router` runs; [`route`] is the CPU twin of the `moe_route_f32` kernel.

use rayon::prelude::*;

use super::softmax::softmax_forward;
use super::swiglu::sigmoid_forward;

/// One gate's sizes and options, as in a DeepSeek config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterConfig {
    /// `E`, the routed experts.
    pub n_experts: usize,
    /// Groups of `E / n_group` consecutive experts (one node's experts in V3's training).
    pub n_group: usize,
    /// Groups kept per token.
    pub topk_group: usize,
    /// `K`, experts chosen per token.
    pub top_k: usize,
    /// Sigmoid affinities with a top-2-sum group score (V3); else softmax with a max (V2).
    pub sigmoid: bool,
    /// Divide the chosen weights by their sum (plus 1e-20).
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

/// The routing of `T` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    /// `[T, K]` chosen experts, best first.
    pub ids: Vec<usize>,
    /// `[T, K]` combine weights of the chosen experts.
    pub weights: Vec<f32>,
    /// `[T, E]` affinities (unbiased).
    pub scores: Vec<f32>,
}

/// Group-limited top-k over selection scores `choice` (`[T, E]`, affinities plus the bias):
/// `T * K` expert ids, token-major, each token's largest first, ties to the lower index. With more
/// than one group only the `topk_group` best groups compete; the others are masked with -inf,
/// not 0, because biased scores can be negative (spec section 2.2 note).
pub fn select_experts(choice: &[f32], cfg: &RouterConfig) -> Vec<usize> {
    let e = cfg.n_experts;
    assert!(e > 0 && choice.len() % e == 0, "select_experts: {} scores are not rows of {e}", choice.len());
    choice.par_chunks(e).flat_map_iter(|row| select_row(row, cfg)).collect()
}

/// One token's selection.
fn select_row(row: &[f32], cfg: &RouterConfig) -> Vec<usize> {
    let per_group = row.len() / cfg.n_group;
    let mut masked = row.to_vec();
    if cfg.n_group > 1 {
        // A NaN in a group makes its score NaN, as torch's topk-sum (V3) and max (V2) have it,
        // so the group is kept and the NaN reaches the output.
        let group_score = |g: usize| {
            let grp = &row[g * per_group..(g + 1) * per_group];
            if grp.iter().any(|v| v.is_nan()) {
                f32::NAN
            } else if cfg.sigmoid {
                let mut top = [f32::NEG_INFINITY; 2];
                for &v in grp {
                    if v > top[0] {
                        top = [v, top[0]];
                    } else if v > top[1] {
                        top[1] = v;
                    }
                }
                top[0] + top[1]
            } else {
                grp.iter().copied().fold(f32::NEG_INFINITY, f32::max)
            }
        };
        let kept = top_indices(&(0..cfg.n_group).map(group_score).collect::<Vec<_>>(), cfg.topk_group);
        for g in 0..cfg.n_group {
            if !kept.contains(&g) {
                masked[g * per_group..(g + 1) * per_group].fill(f32::NEG_INFINITY);
            }
        }
    }
    top_indices(&masked, cfg.top_k)
}

/// Indices of the `k` largest values, largest first; ties go to the lower index. NaN counts as
/// the largest (as `torch.topk` has it), which keeps the order total: no panic, and the NaN
/// reaches the combine weights and the loss, where training stops on it.
fn top_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| {
        let nan_first = v[b].is_nan().cmp(&v[a].is_nan());
        nan_first.then(v[b].partial_cmp(&v[a]).unwrap_or(std::cmp::Ordering::Equal)).then(a.cmp(&b))
    });
    order.truncate(k);
    order
}

/// The combine weights `[T, K]` of the chosen `ids` from the unbiased `scores` (`[T, E]`):
/// `s_i / (sum of the chosen s + 1e-20)` when normalising, times `routed_scaling_factor`.
pub fn combine_weights(scores: &[f32], ids: &[usize], cfg: &RouterConfig) -> Vec<f32> {
    let (e, k) = (cfg.n_experts, cfg.top_k);
    assert!(e > 0 && k > 0 && scores.len() / e * k == ids.len(), "combine_weights: ids are not [T, {k}]");
    let mut w: Vec<f32> = Vec::with_capacity(ids.len());
    for (row, ids) in scores.chunks(e).zip(ids.chunks(k)) {
        let chosen = ids.iter().map(|&i| row[i]);
        let sum: f32 = chosen.clone().sum();
        w.extend(chosen.map(|s| {
            let s = if cfg.norm_topk_prob { s / (sum + 1e-20) } else { s };
            s * cfg.routed_scaling_factor
        }));
    }
    w
}

/// The whole gate from `logits` (`[T, E]`) and the optional `e_score_correction_bias` (`[E]`):
/// affinities, selection on the biased affinities, combine weights (twin of `moe_route_f32`).
pub fn route(logits: &[f32], bias: Option<&[f32]>, cfg: &RouterConfig) -> Routed {
    let e = cfg.n_experts;
    assert!(e > 0 && logits.len() % e == 0, "route: {} logits are not rows of {e}", logits.len());
    if let Some(b) = bias {
        assert_eq!(b.len(), e, "route: the bias is not [{e}]");
    }
    let mut scores = vec![0.0f32; logits.len()];
    if cfg.sigmoid {
        sigmoid_forward(logits, &mut scores);
    } else {
        softmax_forward(logits, e, &mut scores);
    }
    let ids = match bias {
        Some(b) => {
            let choice: Vec<f32> = scores.iter().enumerate().map(|(i, s)| s + b[i % e]).collect();
            select_experts(&choice, cfg)
        }
        None => select_experts(&scores, cfg),
    };
    let weights = combine_weights(&scores, &ids, cfg);
    Routed { ids, weights, scores }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::swiglu::sigmoid;

    fn config(n_experts: usize, n_group: usize, topk_group: usize, top_k: usize) -> RouterConfig {
        RouterConfig {
            n_experts,
            n_group,
            topk_group,
            top_k,
            sigmoid: true,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        }
    }

    #[test]
    fn group_limit_uses_the_top2_sum_and_masks_with_minus_infinity() {
        // Groups of 2: g0 = {0.9, 0.0} sums 0.9; g1 = {0.5, 0.5} sums 1.0; g2, g3 negative.
        let row = [0.9, 0.0, 0.5, 0.5, -0.1, -0.2, -0.3, -0.4];
        assert_eq!(select_experts(&row, &config(8, 4, 1, 2)), vec![2, 3], "only group 1 is kept");
        // All kept scores negative: masked experts must not win (they would with a 0.0 fill).
        let neg = [-0.9, -0.8, -0.5, -0.6, -3.0, -3.0, -3.0, -3.0];
        assert_eq!(select_experts(&neg, &config(8, 4, 2, 2)), vec![2, 3]);
        // Softmax scoring ranks groups by their max: g0 (0.9) wins over g1 (0.5).
        let max = RouterConfig { sigmoid: false, ..config(8, 4, 1, 2) };
        assert_eq!(select_experts(&row, &max), vec![0, 1]);
    }

    #[test]
    fn ties_go_to_the_lower_index_for_groups_and_experts() {
        // Groups 1 and 2 tie; group 1 is kept. Inside it, experts 2 and 3 tie.
        let row = [0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1];
        assert_eq!(select_experts(&row, &config(8, 4, 1, 2)), vec![2, 3]);
        // Two tokens, token-major; one group: plain top-k with ties to the lower index.
        let two = [0.3, 0.7, 0.7, 0.1, 0.2, 0.2, 0.2, 0.9];
        assert_eq!(select_experts(&two, &config(4, 1, 1, 3)), vec![1, 2, 0, 3, 0, 1]);
        // NaN among the scores ranks first, in a total order (a partial one may panic the sort
        // with many experts); every finite score keeps its place.
        let mut many: Vec<f32> = (0..256).map(|i| ((i * 37) % 101) as f32).collect();
        many[5] = f32::NAN;
        many[200] = f32::NAN;
        let top = select_experts(&many, &config(256, 1, 1, 4));
        assert_eq!(top[..2], [5, 200]);
        assert_eq!(many[top[2]], 100.0);
        // With groups, a NaN makes its group's score NaN (torch's topk-sum or max), so the group
        // is kept and the NaN expert chosen, where ignoring it would mask the group and hide it.
        let row = [f32::NAN, 0.0, 0.9, 0.8];
        assert_eq!(select_experts(&row, &config(4, 2, 1, 1)), vec![0]);
        let max = RouterConfig { sigmoid: false, ..config(4, 2, 1, 1) };
        assert_eq!(select_experts(&row, &max), vec![0]);
        // A group of three that would lose is kept for its NaN; its finite experts follow it.
        let row = [0.1, f32::NAN, 0.2, 0.9, 0.8, 0.7];
        assert_eq!(select_experts(&row, &config(6, 2, 1, 2)), vec![1, 2]);
    }

    #[test]
    fn route_weights_are_the_unbiased_scores_normalised_and_scaled() {
        let cfg = RouterConfig { routed_scaling_factor: 2.5, ..config(4, 2, 1, 2) };
        let logits = [1.0, -1.0, 0.5, 0.0];
        // The bias moves the choice to group 1, the weights stay the unbiased affinities.
        let r = route(&logits, Some(&[0.0, 0.0, 1.0, 1.0]), &cfg);
        assert_eq!(r.ids, vec![2, 3]);
        let (s2, s3) = (sigmoid(0.5), sigmoid(0.0));
        assert_eq!(r.scores[2], s2);
        assert_eq!(r.weights, vec![s2 / (s2 + s3 + 1e-20) * 2.5, s3 / (s2 + s3 + 1e-20) * 2.5]);
        // Both groups kept, no bias, no normalisation: the two largest affinities, scaled.
        let r = route(&logits, None, &RouterConfig { topk_group: 2, norm_topk_prob: false, ..cfg });
        assert_eq!(r.ids, vec![0, 2]);
        assert_eq!(r.weights, vec![sigmoid(1.0) * 2.5, s2 * 2.5]);
    }
}
