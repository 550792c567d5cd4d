//! The gate (spec section 2.2, V3's `noaux_tc`): affinities `s = sigmoid(W_g x)`, selection on
//! `s + b` restricted to the `topk_group` best groups (group score = sum of its top-2), weights
//! from the unbiased `s`, normalised and scaled by `routed_scaling_factor`.

use whale_tensor::{Device, Tensor};

use crate::config::DeepSeekV3Config;
use crate::nn::ParamBuilder;
use crate::Result;

#[derive(Debug, Clone)]
pub struct Router {
    /// `gate.weight`: `[n_routed_experts, hidden]`.
    pub weight: Tensor,
    /// `gate.e_score_correction_bias`: `[n_routed_experts]`, used only to choose experts; moved
    /// by the balancing update, never by gradients. Present for sigmoid scoring.
    pub e_score_correction_bias: Option<Tensor>,
    pub sigmoid: bool,
    pub n_group: usize,
    pub topk_group: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

/// The routing decision for `T` tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `[T, E]` affinities (differentiable).
    pub scores: Tensor,
    /// `[T, K]` combine weights of the chosen experts (differentiable).
    pub weights: Tensor,
    /// `T * K` chosen expert ids, token-major.
    pub experts: Vec<usize>,
    /// Tokens routed to each expert.
    pub load: Vec<usize>,
}

impl Router {
    pub fn new(b: &mut ParamBuilder<'_>, cfg: &DeepSeekV3Config) -> Result<Self> {
        let e = cfg.n_routed_experts;
        let sigmoid = cfg.scoring_func == "sigmoid";
        Ok(Router {
            weight: b.weight("weight", &[e, cfg.hidden_size])?,
            e_score_correction_bias: if sigmoid {
                Some(b.buffer_zeros("e_score_correction_bias", &[e])?)
            } else {
                None
            },
            sigmoid,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
            routed_scaling_factor: cfg.routed_scaling_factor as f32,
        })
    }

    pub fn n_experts(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Routes `x`: `[T, hidden]`. Gating runs in f32 whatever the compute dtype (spec 2.2).
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let logits = x.to_dtype(whale_tensor::DType::F32)?.matmul(&self.weight.t()?)?;
        let scores = if self.sigmoid { logits.sigmoid()? } else { logits.softmax_last_dim()? };
        let e = self.n_experts();
        let t = x.dims()[0];
        let mut choice = scores.to_vec_f32()?;
        if let Some(b) = &self.e_score_correction_bias {
            let b = b.to_vec_f32()?;
            for row in choice.chunks_mut(e) {
                row.iter_mut().zip(&b).for_each(|(s, b)| *s += b);
            }
        }
        let experts: Vec<usize> = choice.chunks(e).flat_map(|row| self.select(row)).collect();
        let mut load = vec![0usize; e];
        experts.iter().for_each(|&i| load[i] += 1);

        let idx =
            Tensor::from_vec(experts.iter().map(|&i| i as i64).collect::<Vec<_>>(), &[t, self.top_k], &Device::Cpu)?;
        let mut weights = scores.gather(1, &idx)?;
        if self.norm_topk_prob {
            weights = weights.div(&weights.sum_keepdim(1)?.add_scalar(1e-20)?)?;
        }
        let weights = weights.mul_scalar(self.routed_scaling_factor)?;
        Ok(Routing { scores, weights, experts, load })
    }

    /// Group-limited top-k over one token's selection scores.
    fn select(&self, row: &[f32]) -> Vec<usize> {
        let per_group = row.len() / self.n_group;
        let mut masked = row.to_vec();
        if self.n_group > 1 {
            let group_score = |g: usize| {
                let grp = &row[g * per_group..(g + 1) * per_group];
                if self.sigmoid {
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
            let kept = top_indices(&(0..self.n_group).map(group_score).collect::<Vec<_>>(), self.topk_group);
            for g in 0..self.n_group {
                if !kept.contains(&g) {
                    // -inf, not 0: biased scores can be negative (spec section 2.2 note).
                    masked[g * per_group..(g + 1) * per_group].fill(f32::NEG_INFINITY);
                }
            }
        }
        top_indices(&masked, self.top_k)
    }
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
fn top_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    order.truncate(k);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(n_group: usize, topk_group: usize, top_k: usize) -> Router {
        Router {
            weight: Tensor::zeros(&[8, 1], whale_tensor::DType::F32, &Device::Cpu).unwrap(),
            e_score_correction_bias: None,
            sigmoid: true,
            n_group,
            topk_group,
            top_k,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        }
    }

    #[test]
    fn group_limit_uses_the_top2_sum_and_masks_with_minus_infinity() {
        // Groups of 2: g0 = {0.9, 0.0} sums 0.9; g1 = {0.5, 0.5} sums 1.0; g2, g3 negative.
        let row = [0.9, 0.0, 0.5, 0.5, -0.1, -0.2, -0.3, -0.4];
        let r = router(4, 1, 2);
        assert_eq!(r.select(&row), vec![2, 3], "only group 1 is kept, though expert 0 scores highest");
        // All kept scores negative: masked experts must not win (they would with a 0.0 fill).
        let neg = [-0.9, -0.8, -0.5, -0.6, -3.0, -3.0, -3.0, -3.0];
        assert_eq!(router(4, 2, 2).select(&neg), vec![2, 3]);
    }
}
